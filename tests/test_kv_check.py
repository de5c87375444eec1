"""The export's check of what the 4-bit KV cache costs a checkpoint (``codegen_ls.export.kv_check``),
which ``--kv-bits auto`` runs before it picks that cache:

- its 4-bit quantization is the cache's format (the numpy reference of ``test_kv4``)
- it runs the real torch model with each cache's quantization, and leaves the model as it was
- the export follows its verdict, says so, and records the numbers in the manifest
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # runs the torch model on each cache

from codegen_ls.engine import kernels  # noqa: E402
from codegen_ls.engine.kvcache import dequantize4, quantize4  # noqa: E402
from codegen_ls.engine.modeldir import read_manifest  # noqa: E402
from codegen_ls.export import kv_check  # noqa: E402
from codegen_ls.export.graph_builder import kv_scales  # noqa: E402
from codegen_ls.export.pipeline import calibration_batches, export, random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"
FAST4 = kernels.vector4(best=True) and not kernels.disabled_by_env()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(
        tmp_path_factory.mktemp("kvcheck") / "src",
        vocab_size=8192,
        n_positions=1024,
        n_embd=128,
        n_head=4,
        tokenizer=TOKENIZER,
    )


def test_fake_quantize_is_the_4bit_cache_format() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (3, 5, 64)) * rng.uniform(0.01, 100, (3, 5, 1))).astype(np.float32)
    x[0, 0, 7] = 40.0  # an outlier channel
    got = kv_check.fake_quantize(torch.from_numpy(x), 4).numpy()
    np.testing.assert_allclose(got, dequantize4(*quantize4(x)), rtol=1e-6, atol=0)
    assert all(len(np.unique(row)) <= 16 for row in got.reshape(-1, 64))


def test_the_check_runs_each_cache_and_restores_the_model(checkpoint: Path) -> None:
    from transformers import CodeGenForCausalLM
    from transformers.models.codegen import modeling_codegen

    model = CodeGenForCausalLM.from_pretrained(str(checkpoint)).eval()
    batches = calibration_batches(TOKENIZER, 1024, 8192)
    original = modeling_codegen.CodeGenAttention._attn
    result = kv_check.check(model, batches, kv_scales(model, batches))
    assert modeling_codegen.CodeGenAttention._attn is original
    assert result.tokens == sum(len(b) - 1 for b in batches[: kv_check.CHECK_WINDOWS]) > 1000
    assert set(result.loss) == {"exact", "int8", "int4"} and all(np.isfinite(v) for v in result.loss.values())
    # int8 per channel is finer than 4 bits per token: it changes fewer next tokens, and both change some
    assert 1.0 >= result.same["int8"] > result.same["int4"] > 0.5
    assert result.four_bit_ok == (result.loss["int4"] <= result.loss["int8"] + kv_check.KV4_TOLERANCE)
    with pytest.raises(RuntimeError), kv_check.quantized_cache(model, "int4", kv_scales(model, batches[:1])):
        raise RuntimeError("inside")
    assert modeling_codegen.CodeGenAttention._attn is original


@pytest.mark.skipif(not FAST4, reason="auto picks int8 here without a check (no fast 4-bit path)")
@pytest.mark.parametrize("tolerance", [float("inf"), float("-inf")], ids=["passes", "fails"])
def test_auto_export_follows_the_check(
    checkpoint: Path,
    tmp_path: Path,
    tolerance: float,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--kv-bits auto`` on a machine with the fast 4-bit path: the 4-bit cache where the check
    passes, the int8 one (calibrated) where it fails; the export prints the losses and the
    choice, and the manifest keeps them. An explicit ``--kv-bits`` runs no check."""
    monkeypatch.setattr(kv_check, "KV4_TOLERANCE", tolerance)
    manifest = export(str(checkpoint), tmp_path / "auto")
    printed = capsys.readouterr().err
    record = manifest.extra["kv_check"]
    assert record["tokens"] > 1000 and set(record["loss"]) == {"exact", "int8", "int4"}
    assert manifest.extra["kv_dtype"] == ("int4" if tolerance > 0 else "int8")
    assert "with the 4-bit one: " + ("the 4-bit cache" if tolerance > 0 else "the int8 cache") in printed
    assert read_manifest(tmp_path / "auto").extra["kv_check"] == record
    explicit = export(str(checkpoint), tmp_path / "four", kv_bits=4)
    assert explicit.extra["kv_dtype"] == "int4" and "kv_check" not in explicit.extra
    assert "codegen_ls.export.kv_check" not in capsys.readouterr().err
