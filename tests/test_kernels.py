"""Our decode-attention kernel (``csrc/``, :mod:`codegen_ls.engine.kernels`) against onnxruntime's
GroupQueryAttention, on the same exported int8 ``gqa`` model (a tiny random CodeGen): the graph's
``codegen_ls.DecodeAttention`` nodes run our kernel when the library is registered and the
function body (GroupQueryAttention) when it is not."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

from codegen_ls.engine import kernels  # noqa: E402
from codegen_ls.engine.backends import GqaBackend  # noqa: E402
from codegen_ls.engine.engine import Engine, EngineOptions  # noqa: E402
from codegen_ls.engine.modeldir import read_manifest  # noqa: E402
from helpers import decode_run, tiny_export  # noqa: E402


def cpu_has_avx2() -> bool:
    try:
        return platform.machine() in ("x86_64", "AMD64") and " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


needs_kernel = pytest.mark.skipif(
    kernels.library() is None or kernels.library()[1] == "generic",  # type: ignore[index]
    reason="decode-attention kernel not built with a vector path here",
)


def tiny_model(tmp_path_factory: pytest.TempPathFactory, n_embd: int, n_head: int) -> Path:
    return tiny_export(tmp_path_factory.mktemp(f"kernel-{n_embd}-{n_head}"), n_embd=n_embd, n_head=n_head, kv_bits=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory, 128, 8)  # head size 16


@pytest.fixture(scope="module", params=[(128, 8), (320, 4), (1024, 4)], ids=["head16", "head80", "head256"])
def head_size_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Head sizes of the real checkpoints too: 80 (CodeGen-2B), 256 (6B and 16B); 64 (350M) is the
    benchmark's and 48 the embedded model's."""
    return tiny_model(tmp_path_factory, *request.param)


def test_the_kernel_is_built_where_a_compiler_and_avx2_are() -> None:
    if not (cpu_has_avx2() and (shutil.which("cc") or shutil.which("gcc"))):
        pytest.skip("no C compiler or no AVX2 here: the package installs without the kernel")
    lib = kernels.library()
    assert lib is not None, kernels.status()
    assert lib[1] in ("avx512", "avx2")
    assert kernels.status().startswith(f"built ({lib[1]})")


@needs_kernel
def test_engine_picks_the_kernel_and_can_be_told_not_to(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Engine(model_dir, EngineOptions(threads=1)).attention.startswith("codegen-ls kernel (")
    assert Engine(model_dir, EngineOptions(threads=1, native_kernel=False)).attention == kernels.ONNXRUNTIME_ATTENTION
    monkeypatch.setenv("CODEGEN_LS_KERNEL", "off")
    assert Engine(model_dir, EngineOptions(threads=1)).attention == kernels.ONNXRUNTIME_ATTENTION
    assert "turned off" in kernels.status()


def backend(model_dir: Path, kernel: bool, path: str = "") -> GqaBackend:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if kernel:
        assert kernels.register(so) == f"codegen-ls kernel ({path or kernels.library()[1]})"  # type: ignore[index]
    manifest = read_manifest(model_dir)
    session = ort.InferenceSession(str(model_dir / manifest.onnx), so, providers=["CPUExecutionProvider"])
    return GqaBackend(session, 64, manifest.n_head, manifest.n_layer)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 6])  # 6: two passes over the cache (4 rows, then 2)
@pytest.mark.parametrize("path", ["", "avx2", "generic"])  # the CPU's best, then each lesser one
def test_kernel_matches_group_query_attention(
    head_size_model: Path, rows: int, path: str, best_path_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same prompt, same decode steps (``rows`` candidates side by side, one finishing early):
    the logits agree to float rounding, and the caches hold the same int8 keys and values."""
    best = kernels.library()[1]  # type: ignore[index]
    if path and kernels.LEVELS[path] > kernels.LEVELS[best]:
        pytest.skip(f"this CPU has no {path}")
    monkeypatch.setenv("CODEGEN_LS_KERNEL", path)
    rng = np.random.default_rng(rows)
    ids = [int(t) for t in rng.integers(1, 8192, 300)]  # several prompt chunks, then decode
    steps = [[int(t) for t in rng.integers(1, 8192, rows)] for _ in range(8)]
    results = []
    for kernel in (False, True):
        results.append(decode_run(backend(head_size_model, kernel, path), ids, steps, rows))
    (ref, ref_cache, end), (got, got_cache, got_end) = results
    assert end == got_end
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-4 * float(np.abs(a).max()))
    for a, b in zip(ref_cache, got_cache):
        assert a.dtype == b.dtype == np.int8
        diff = np.abs(a[:, :, :end].astype(np.int16) - b[:, :, :end])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # rounding ties at most


@needs_kernel
def test_bad_input_to_the_kernel_is_a_clear_error_and_the_engine_goes_on(model_dir: Path) -> None:
    engine = Engine(model_dir, EngineOptions(threads=1))
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 8192, 40)]
    before = engine.generate(ids, doc_key="a", max_new_tokens=4).candidates[0].token_ids
    be = engine.backend
    assert isinstance(be, GqaBackend)
    _, state = be.prefill(None, 0, ids, len(ids) - 1, None)
    with pytest.raises(Exception, match="codegen_ls.DecodeAttention: attention_bias"):
        be._run(state, np.array([5]), np.array([40]), 40, np.zeros((1, 7), np.float32), 0)  # bias too short
    assert engine.generate(ids, doc_key="b", max_new_tokens=4).candidates[0].token_ids == before


def test_a_library_that_does_not_load_leaves_onnxruntimes_attention(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken or foreign build (here: not a shared library at all) must not stop the engine."""
    broken = tmp_path / "_decode_attention.so"
    broken.write_text("not a shared library")

    class FakeLib:
        def cgls_limit_isa(self, level: int) -> None:
            pass

        def cgls_isa(self) -> bytes:
            return b"avx512"

    monkeypatch.setattr(kernels, "_load", lambda: (str(broken), "avx512", FakeLib()))
    engine = Engine(model_dir, EngineOptions(threads=1))
    assert engine.attention == kernels.ONNXRUNTIME_ATTENTION
    ids = [int(t) for t in np.random.default_rng(3).integers(1, 8192, 30)]
    assert len(engine.generate(ids, max_new_tokens=4).candidates[0].token_ids) == 4
