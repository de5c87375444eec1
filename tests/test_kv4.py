"""The 4-bit KV cache (``--kv-bits 4``): a scale per token and head, read by our kernel's
``codegen_ls.DecodeAttentionQ4`` (``csrc/attend4.c``) and unpacked by the graph's prompt path.

- the op against a numpy reference of its format and math (every path: AVX-512 VNNI, AVX2, plain C)
- the engine's decode steps through the kernel against the same steps through the graph's
  prompt path (elementwise ONNX ops): the same cache bytes, close logits
- greedy agreement with the fp32 model, and a clear error where the kernel is not there
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

from codegen_ls.engine import backends, kernels, kvcache  # noqa: E402
from codegen_ls.engine.backends import GqaBackend  # noqa: E402
from codegen_ls.engine.engine import Engine, EngineOptions  # noqa: E402
from codegen_ls.engine.kvcache import dequantize4, key_rotation, quantize4  # noqa: E402
from codegen_ls.engine.modeldir import read_manifest  # noqa: E402
from codegen_ls.errors import CodegenLsError, ModelError  # noqa: E402
from codegen_ls.export.pipeline import export, random_checkpoint  # noqa: E402
from helpers import decode_run, tiny_export  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="decode-attention kernel not built here")
PATHS = ["", "avx2", "generic"]  # the CPU's best (AVX-512 VNNI where it has it), AVX2, the plain C loop


def tiny(
    tmp_path_factory: pytest.TempPathFactory, n_embd: int, n_head: int, kv_bits: int = 4, quantize: bool = True
) -> Path:
    base = tmp_path_factory.mktemp(f"kv{kv_bits}-{n_embd}-{n_head}")
    return tiny_export(base, n_embd=n_embd, n_head=n_head, kv_bits=kv_bits, quantize=quantize)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny(tmp_path_factory, 128, 4)  # head size 32


@pytest.fixture(
    scope="module", params=[(128, 4), (192, 4), (320, 4), (1024, 4)], ids=["head32", "head48", "head80", "head256"]
)
def head_size_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48: the embedded model's head size (rows of 24 bytes, masked loads); 80: CodeGen-2B's; 256:
    6B and 16B's (4 chunks a row); 64 (350M) is the benchmark's."""
    return tiny(tmp_path_factory, *request.param)


def test_export_writes_a_4bit_cache_and_says_so(model_dir: Path) -> None:
    manifest = read_manifest(model_dir)
    assert manifest.extra["kv_dtype"] == "int4"
    assert manifest.extra["decode_attention"] == kernels.OP4
    assert manifest.extra["key_rotation"] is True
    import onnx

    graph = onnx.load(str(model_dir / manifest.onnx), load_external_data=False).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert inputs["past_key.0"].elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in inputs["past_key.0"].shape.dim] == [1, 4, "cap", 16]  # D/2 bytes
    assert [d.dim_value or d.dim_param for d in inputs["past_value_scale.1"].shape.dim] == [1, 4, "cap", 1]
    assert json.loads((model_dir / "manifest.json").read_text())["extra"]["kv_dtype"] == "int4"


def test_a_4bit_cache_needs_the_gqa_graph_and_quantization(tmp_path: Path) -> None:
    from codegen_ls.errors import CodegenLsError

    src = random_checkpoint(tmp_path / "src", vocab_size=8192, n_positions=256, tokenizer=TOKENIZER)
    with pytest.raises(CodegenLsError, match="4-bit KV cache needs the gqa graph"):
        export(str(src), tmp_path / "a", graph="optimum", kv_bits=4)
    with pytest.raises(CodegenLsError, match="4-bit KV cache needs the gqa graph"):
        export(str(src), tmp_path / "b", quantize_int8=False, kv_bits=4)
    with pytest.raises(CodegenLsError, match="must be 8 or 4"):
        export(str(src), tmp_path / "c", kv_bits=2)


def test_keys_are_stored_rotated_which_keeps_scores_and_spreads_outlier_channels(model_dir: Path) -> None:
    """Queries and keys go through the same orthogonal R (kvcache.key_rotation) before the
    cache: (qR).(kR) = q.k, and a key with one channel 10x the others, which unrotated leaves the
    rest of its row one or two 4-bit levels, has its scores' quantization error cut several times."""
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    r = onnx.numpy_helper.to_array(next(t for t in graph.initializer if t.name == "key_rotation"))
    assert r.shape == (32, 32) and np.allclose(r @ r.T, np.eye(32), atol=1e-5)
    for node in (n for n in graph.node if n.op_type == "If"):  # decode: the op rotates; prompt: two MatMuls
        branches = {a.name: a.g.node for a in node.attribute}
        assert [x.input[-1] for x in branches["else_branch"]] == ["key_rotation"]
        rotations = [(x.op_type, x.input[1]) for x in branches["then_branch"] if "rotate_" in x.name]
        assert rotations == [("MatMul", "key_rotation")] * 2  # fp32: not quantized

    rng = np.random.default_rng(0)
    d = 64
    keys = rng.standard_normal((512, d)).astype(np.float32)
    keys[:, 5] *= 10  # an outlier channel, as real models' keys have
    queries = rng.standard_normal((16, d)).astype(np.float32)
    rot = key_rotation(d)
    exact = queries @ keys.T

    def error(k: np.ndarray, q: np.ndarray) -> float:
        scores = q @ dequantize4(*quantize4(k)).T
        return float(np.mean((scores - exact) ** 2) / np.mean(exact**2))

    assert np.allclose((queries @ rot) @ (keys @ rot).T, exact, rtol=1e-4, atol=1e-3)
    assert error(keys @ rot, queries @ rot) * 3 < error(keys, queries)


@pytest.mark.parametrize("setting", ["", "off"])
def test_export_picks_the_4bit_cache_by_default_only_where_it_runs_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """``--kv-bits`` not given: 4-bit where our kernel's vector path for it runs here (AVX-512 VNNI
    or AVX2), int8 elsewhere and where the kernel is turned off, so the model the export writes serves well
    on the machine that wrote it. The model loads and completes either way."""
    monkeypatch.setenv("CODEGEN_LS_KERNEL", setting)
    src = random_checkpoint(tmp_path / "src", vocab_size=8192, n_positions=256, tokenizer=TOKENIZER)
    manifest = export(str(src), tmp_path / "m")
    fast4 = kernels.vector4(best=True) and setting != "off"
    assert manifest.extra["kv_dtype"] == ("int4" if fast4 else "int8")
    assert export(str(src), tmp_path / "fp32", quantize_int8=False).extra["kv_dtype"] == "float32"
    engine = Engine(tmp_path / "m", EngineOptions(threads=1))
    assert ("4-bit" in engine.attention) == fast4
    assert len(engine.generate([5, 6, 7, 8], max_new_tokens=4).candidates[0].token_ids) == 4


@needs_kernel
@pytest.mark.skipif(kernels.library() is None or kernels.library()[1] == "generic", reason="no AVX2 here")
# type: ignore[index]
def test_head_sizes_the_4bit_cache_takes(
    tmp_path_factory: pytest.TempPathFactory,
    best_path_after: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its layout takes heads of a multiple of 8, and every path runs them: on AVX2 alone
    (``CODEGEN_LS_KERNEL=avx2``) heads of 40 load with no warning and complete; on the plain C
    loop (``generic``) loading warns that it is slow. Heads of 20: ``--kv-bits 4`` is a clear
    error and auto picks int8."""
    for setting, warns in (("avx2", False), ("generic", True)):
        monkeypatch.setenv("CODEGEN_LS_KERNEL", setting)
        model = tiny(tmp_path_factory, 160, 4)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="codegen_ls.engine.engine"):
            engine = Engine(model, EngineOptions(threads=1))
        assert kernels.path4(head_dim=40) == ("avx2" if setting == "avx2" else "generic, slow")
        assert ("slow plain C loop" in caplog.text) == warns
        assert len(engine.generate([5, 6, 7, 8], max_new_tokens=4).candidates[0].token_ids) == 4
    monkeypatch.setenv("CODEGEN_LS_KERNEL", "")
    base = tmp_path_factory.mktemp("head20")
    src = random_checkpoint(
        base / "src", vocab_size=8192, n_positions=256, n_embd=80, n_layer=1, n_head=4, tokenizer=TOKENIZER
    )
    with pytest.raises(CodegenLsError, match="multiple of 8"):
        export(str(src), base / "four", kv_bits=4)
    assert kernels.path4(head_dim=20) is None
    assert export(str(src), base / "auto").extra["kv_dtype"] == "int8"


# -- the op alone, against numpy -------------------------------------------------------------
def quantize_query(q: np.ndarray) -> np.ndarray:
    """The kernel's query: int8 with a scale per row (its error is a small part of the 4-bit keys')."""
    amax = np.maximum(np.abs(q).max(axis=-1, keepdims=True), np.float32(1e-30)).astype(np.float32)
    return (np.rint(q * (np.float32(127) / amax)) * (amax / np.float32(127))).astype(np.float32)


def op_session(n_head: int, half: int) -> ort.InferenceSession:
    from onnx import TensorProto, helper

    f, f16, u8, i32 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.UINT8, TensorProto.INT32
    names = [
        "query",
        "key",
        "value",
        "past_key",
        "past_value",
        "past_key_scale",
        "past_value_scale",
        "seqlens_k",
        "total_sequence_length",
        "attention_bias",
        "key_rotation",
    ]
    types = [f, f, f, u8, u8, f16, f16, i32, i32, f, f]
    outs = ["output", "present_key", "present_value", "present_key_scale", "present_value_scale"]
    node = helper.make_node(kernels.OP4_NAME, names, outs, domain=kernels.DOMAIN)
    graph = helper.make_graph(
        [node],
        "q4",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)],
        [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, [f, u8, u8, f16, f16])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    assert kernels.register(so, required=True)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head", [16, 48, 64, 80, 256])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_the_op_matches_a_numpy_reference(
    path: str, head: int, rows: int, best_path_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_op(path, head, rows, 3, 160, 131, monkeypatch)  # 131 + rows: blocks of 16 keys and a remainder


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_the_op_quantizes_new_rows_exactly_as_numpy(
    path: str, best_path_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a signed permutation as the rotation (exact in floating point), the new rows' bytes and
    scales are bit-identical to numpy's quantization of the rotated keys and of the values."""
    check_op(path, 64, 3, 2, 48, 21, monkeypatch, exact=True)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_the_op_past_8192_keys(path: str, best_path_after: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long cache (8290 keys, past the old value pass's per-block int32 sums): still the reference."""
    check_op(path, 64, 2, 1, 8304, 8290, monkeypatch)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_the_op_on_widely_spread_scores_flushes_denormals_only_inside(
    path: str, best_path_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query 40x larger spreads a row's scores over hundreds, so most keys' weights fall below
    float's normal range: the op flushes them (x86: FTZ and DAZ, for speed) and still matches the
    reference, and the calling thread's floating point is as it was (denormals survive numpy)."""
    tiny = np.array([1e-39], np.float32)
    assert (tiny * np.float32(1.0))[0] > 0
    check_op(path, 64, 3, 3, 304, 280, monkeypatch, query_scale=40.0)
    assert (tiny * np.float32(1.0))[0] > 0 and (tiny + tiny)[0] == np.float32(2e-39)


@needs_kernel
@pytest.mark.skipif(kernels.path4(best=True) != "avx512-vnni", reason="no AVX-512 VNNI here")
@pytest.mark.parametrize("head", [16, 48, 80, 256])
@pytest.mark.parametrize("query_scale", [1.0, 40.0])
def test_the_vector_paths_share_one_algorithm(
    head: int, query_scale: float, best_path_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AVX-512 VNNI and AVX2 paths are one body (``csrc/attend4_body.h``) on 16 and 8 lanes:
    the same integer dot products, weights and skipped blocks, so their outputs differ only by
    the order of a float sum (far inside the reference's tolerance, which each path also meets)."""
    wide, narrow = (check_op(path, head, 6, 2, 304, 280, monkeypatch, query_scale=query_scale) for path in ("", "avx2"))
    np.testing.assert_allclose(narrow, wide, rtol=0, atol=2e-6 * float(np.abs(wide).max()))


def check_op(
    path: str,
    head: int,
    rows: int,
    h: int,
    cap: int,
    past: int,
    monkeypatch: pytest.MonkeyPatch,
    exact: bool = False,
    query_scale: float = 1.0,
) -> np.ndarray:
    """The op (``CODEGEN_LS_KERNEL=path``) against numpy, its output returned: the new rows quantized
    into the cache as the rotated keys kR and the values (``exact``: R a signed permutation,
    bit-identical; else the export's rotation, whose sums the op and numpy round apart: all but a
    few nibbles the same and none a level apart), and the output as attention over the op's cache
    with the query qR."""

    monkeypatch.setenv("CODEGEN_LS_KERNEL", path)
    rng = np.random.default_rng(head * 10 + rows)
    n, e = past + rows, h * head
    if exact:
        rot = (
            np.eye(head, dtype=np.float32)[rng.permutation(head)]
            * rng.choice([-1, 1], head).astype(np.float32)[:, None]
        )
    else:
        rot = key_rotation(head)
    cached_k, cached_v = (
        rng.normal(0, 1.5, (1, h, cap, head)).astype(np.float32),
        rng.normal(0, 1, (1, h, cap, head)).astype(np.float32),
    )
    pk, pks = quantize4(cached_k)
    pv, pvs = quantize4(cached_v)
    q, k, v = (rng.normal(0, 1, (1, rows, e)).astype(np.float32) for _ in range(3))
    q *= np.float32(query_scale)
    bias = np.zeros((1, 1, rows, n), np.float32)
    bias[0, 0, :, past:] = np.triu(np.full((rows, rows), -1e9, np.float32), 1)
    bias[0, 0, :, 7] = -1e9  # a masked key in the prompt
    feed = {
        "query": q,
        "key": k,
        "value": v,
        "past_key": kvcache.layout4(pk, False),
        "past_value": kvcache.layout4(pv, True),
        "past_key_scale": pks[..., None].copy(),
        "past_value_scale": pvs[..., None].copy(),
        "seqlens_k": np.array([n - 1], np.int32),
        "total_sequence_length": np.array(n, np.int32),
        "attention_bias": bias,
        "key_rotation": rot,
    }
    out, ok, ov, oks, ovs = op_session(h, head // 2).run(None, feed)
    ok, ov = kvcache.rows4(ok, False), kvcache.rows4(ov, True)  # the cache's layout -> rows

    # the new rows are quantized into positions past .. n-1; the rest of the cache is kept
    rotated = (k.reshape(rows, h, head).transpose(1, 0, 2).astype(np.float64) @ rot).astype(np.float32)
    nk, nks = quantize4(rotated)
    nv, nvs = quantize4(v.reshape(rows, h, head).transpose(1, 0, 2))
    np.testing.assert_array_equal(ov[0, :, past:n], nv)
    np.testing.assert_array_equal(ovs[0, :, past:n, 0], nvs)
    if exact:
        np.testing.assert_array_equal(ok[0, :, past:n], nk)
        np.testing.assert_array_equal(oks[0, :, past:n, 0], nks)
    else:
        got, want = (np.concatenate([x & 15, x >> 4], axis=-1).astype(int) for x in (ok[0, :, past:n], nk))
        assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
        np.testing.assert_allclose(oks[0, :, past:n, 0].astype(np.float32), nks.astype(np.float32), rtol=1e-3)
    np.testing.assert_array_equal(ok[0, :, :past], pk[0, :, :past])
    np.testing.assert_array_equal(ovs[0, :, n:], pvs[0, :, n:, None])

    keys, values = dequantize4(ok[0, :, :n], oks[0, :, :n, 0]), dequantize4(ov[0, :, :n], ovs[0, :, :n, 0])  # [H, n, D]
    qh = quantize_query(q.reshape(rows, h, head).transpose(1, 0, 2) @ rot)  # [H, rows, D]
    scores = qh @ keys.transpose(0, 2, 1) / np.sqrt(head) + bias[0]  # [H, rows, n]
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    ref = (p @ values).transpose(1, 0, 2).reshape(1, rows, e)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3 * float(np.abs(ref).max()))
    return out


@needs_kernel
def test_bad_input_to_the_op_is_a_clear_error() -> None:
    sess = op_session(2, 8)
    f = np.zeros
    feed = {
        "query": f((1, 1, 32), np.float32),
        "key": f((1, 1, 32), np.float32),
        "value": f((1, 1, 32), np.float32),
        "past_key": f((1, 2, 32, 8), np.uint8),
        "past_value": f((1, 2, 32, 8), np.uint8),
        "past_key_scale": f((1, 2, 32, 1), np.float16),
        "past_value_scale": f((1, 2, 32, 1), np.float16),
        "seqlens_k": np.array([9], np.int32),
        "total_sequence_length": np.array(10, np.int32),
        "attention_bias": f((1, 1, 1, 10), np.float32),
        "key_rotation": np.eye(16, dtype=np.float32),
    }
    assert sess.run(None, feed)[0].shape == (1, 1, 32)
    bad = dict(feed, past_value_scale=f((1, 2, 31, 1), np.float16))
    with pytest.raises(Exception, match="codegen_ls.DecodeAttentionQ4: past_key_scale/past_value_scale"):
        sess.run(None, bad)
    with pytest.raises(Exception, match="key_rotation \\[D, D\\]"):
        sess.run(None, dict(feed, key_rotation=np.eye(8, dtype=np.float32)))
    with pytest.raises(Exception, match="seqlens_k out of range"):
        sess.run(
            None,
            dict(
                feed,
                seqlens_k=np.array([40], np.int32),
                total_sequence_length=np.array(41, np.int32),
                attention_bias=f((1, 1, 1, 41), np.float32),
            ),
        )
    with pytest.raises(Exception, match="positions \\(cap\\) a multiple of 16"):
        sess.run(
            None,
            dict(
                feed,
                past_key=f((1, 2, 24, 8), np.uint8),
                past_value=f((1, 2, 24, 8), np.uint8),
                past_key_scale=f((1, 2, 24, 1), np.float16),
                past_value_scale=f((1, 2, 24, 1), np.float16),
            ),
        )
    with pytest.raises(Exception, match="head size: a multiple of 8"):
        sess.run(
            None,
            dict(
                feed,
                query=f((1, 1, 12), np.float32),
                key=f((1, 1, 12), np.float32),
                value=f((1, 1, 12), np.float32),
                past_key=f((1, 2, 32, 3), np.uint8),
                past_value=f((1, 2, 32, 3), np.uint8),
                key_rotation=np.eye(6, dtype=np.float32),
            ),
        )
    assert sess.run(None, feed)[0].shape == (1, 1, 32)  # and it goes on


# -- in the model ----------------------------------------------------------------------------
def backend(model_dir: Path) -> GqaBackend:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    assert kernels.register(so, required=True)
    manifest = read_manifest(model_dir)
    session = ort.InferenceSession(str(model_dir / manifest.onnx), so, providers=["CPUExecutionProvider"])
    return GqaBackend(session, 64, manifest.n_head, manifest.n_layer)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("path", PATHS)
def test_kernel_decode_matches_the_graphs_prompt_path(
    head_size_model: Path, rows: int, path: str, best_path_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same prompt and decode steps, once with decode runs through the kernel and once with
    every run through the graph's prompt path (``PROMPT_PATH_MIN`` 1): the prompt's cache bytes and
    scales are the same (two implementations of one format), and so are the first layer's decoded
    rows (the keys' up to rounding: the two rotate them with their own sums); the logits agree
    closely (the prompt path attends to a run's own keys unquantized)."""
    monkeypatch.setenv("CODEGEN_LS_KERNEL", path)
    rng = np.random.default_rng(rows)
    ids = [int(t) for t in rng.integers(1, 8192, 300)]
    steps = [[int(t) for t in rng.integers(1, 8192, rows)] for _ in range(8)]
    results = []
    for prompt_min in (backends.PROMPT_PATH_MIN, 1):
        monkeypatch.setattr(backends, "PROMPT_PATH_MIN", prompt_min)
        results.append(decode_run(backend(head_size_model), ids, steps, rows))
    (got, got_cache, end), (ref, ref_cache, ref_end) = results
    assert end == ref_end
    for a, b in zip(ref, got):
        spread = float(a.std())
        assert np.abs(b - a).max() < 0.05 * spread
    for j, (a, b) in enumerate(zip(ref_cache, got_cache)):
        if j % 4 < 2:  # keys, values: the cache's layout -> rows
            a, b = kvcache.rows4(a, j % 4 == 1), kvcache.rows4(b, j % 4 == 1)
        if j in (1, 3):  # layer 0: values and their scales
            np.testing.assert_array_equal(a[:, :, :end], b[:, :, :end])
        elif j in (0, 2):  # its keys: the prompt's the same; the decoded ones rotated by the kernel and by
            # a MatMul, whose sums round apart: all but a few nibbles the same, none a level apart
            np.testing.assert_array_equal(a[:, :, :300], b[:, :, :300])
            if j == 0:
                got, want = (
                    np.concatenate([x & 15, x >> 4], axis=-1).astype(int) for x in (b[:, :, 300:end], a[:, :, 300:end])
                )
                assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
            else:
                np.testing.assert_allclose(
                    b[:, :, 300:end].astype(np.float32), a[:, :, 300:end].astype(np.float32), rtol=1e-3
                )
        else:
            np.testing.assert_array_equal(a[:, :, :300], b[:, :, :300])  # the prompt, from the same path


@needs_kernel
def test_a_reused_and_regrown_cache_holds_the_same_rows_as_a_fresh_one(head_size_model: Path) -> None:
    """The engine's writes into the 4-bit cache's blocks: a prompt reused from an unaligned
    position (53), its buffers regrown (the kept positions copied in whole blocks), prompt chunks
    starting off a block, and a few tokens through the kernel at 470 hold the rows of one fresh
    prefill of the same tokens. Not bit for bit: the int8 MatMuls quantize each chunk's inputs with
    a scale of their own, so chunking moves a few nibbles by a level (a row in the wrong place
    would move most of them by many); the last logits agree closely."""
    rng = np.random.default_rng(7)
    ids = [int(t) for t in rng.integers(1, 8192, 475)]
    be = backend(head_size_model)
    _, state = be.prefill(None, 0, ids[:53] + [7] * 47, 99, None)
    room = state.room
    be.prefill(state, 53, ids[:470], 469, None)
    assert state.room > room  # regrown
    got, _ = be.prefill(state, 470, ids, 474, None)  # 5 tokens: the decode op writes them
    ref, fresh = backend(head_size_model).prefill(None, 0, ids, 474, None)
    assert np.abs(got[-1] - ref[-1]).max() < 0.05 * float(ref[-1].std())
    for j in range(8):  # layers 0 and 1: keys, values, their scales
        a, b = fresh.buffers[j][0], state.buffers[j][0]
        if j % 4 < 2:  # the cache's layout -> rows -> nibbles
            a, b = (
                np.concatenate([x & 15, x >> 4], axis=-1).astype(int)[:, :475]
                for x in (kvcache.rows4(a, j % 4 == 1), kvcache.rows4(b, j % 4 == 1))
            )
            assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.08, j
        else:
            np.testing.assert_allclose(b[:, :475].astype(np.float32), a[:, :475].astype(np.float32), rtol=0.05)


@needs_kernel
def test_greedy_agrees_with_the_fp32_model(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> None:
    fp32 = tiny(tmp_path_factory, 128, 4, kv_bits=8, quantize=False)
    int8 = tiny(tmp_path_factory, 128, 4, kv_bits=8)
    rng = np.random.default_rng(5)
    agree = {"int8": [], "int4": []}
    ref_engine = Engine(fp32, EngineOptions(threads=2))
    engines = {"int8": Engine(int8, EngineOptions(threads=2)), "int4": Engine(model_dir, EngineOptions(threads=2))}
    assert engines["int4"].attention.startswith("codegen-ls kernel (")
    assert "4-bit cache" in engines["int4"].attention
    for trial in range(6):
        ids = [int(t) for t in rng.integers(1, 8192, 200)]
        ref = ref_engine.generate(ids, doc_key=str(trial), max_new_tokens=12).candidates[0].token_ids
        for name, eng in engines.items():
            got = eng.generate(ids, doc_key=str(trial), max_new_tokens=12).candidates[0].token_ids
            agree[name].append(sum(a == b for a, b in zip(ref, got)) / len(ref))
    print(
        f"greedy agreement with fp32 (tokens): int8 weights + int8 cache {np.mean(agree['int8']):.2f}, "
        f"int8 weights + int4 cache {np.mean(agree['int4']):.2f}"
    )
    assert np.mean(agree["int4"]) >= 0.5


@needs_kernel
def test_the_engine_serves_a_4bit_model_and_goes_on_after_bad_input(model_dir: Path) -> None:
    engine = Engine(model_dir, EngineOptions(threads=1))
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 8192, 40)]
    before = engine.generate(ids, doc_key="a", max_new_tokens=4, n=3)
    assert len(before.candidates) >= 1
    be = engine.backend
    assert isinstance(be, GqaBackend)
    _, state = be.prefill(None, 0, ids, len(ids) - 1, None)
    with pytest.raises(Exception, match="codegen_ls.DecodeAttentionQ4: attention_bias"):
        be._run(state, np.array([5]), np.array([40]), 40, np.zeros((1, 7), np.float32), 0)
    again = engine.generate(ids, doc_key="b", max_new_tokens=4, n=3)
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in before.candidates]


def test_without_the_kernel_a_4bit_model_is_a_clear_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEGEN_LS_KERNEL", "off")
    with pytest.raises(ModelError, match="4-bit KV cache .* needs codegen-ls's decode-attention kernel"):
        Engine(model_dir, EngineOptions(threads=1))
    with pytest.raises(ModelError, match="--kv-bits 8"):
        Engine(model_dir, EngineOptions(threads=1, native_kernel=True))


def test_a_4bit_model_of_the_earlier_format_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    """A 4-bit model exported before the keys were stored rotated (no ``key_rotation`` in its
    manifest) is refused with one line that says to export it again, not an op error later."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["extra"]["key_rotation"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="earlier codegen-ls .* export the model again"):
        Engine(old, EngineOptions(threads=1))


@needs_kernel
@pytest.mark.parametrize("values", [False, True])
def test_the_prompt_paths_dequantize_ops_match_numpy_and_reject_bad_input(values: bool) -> None:
    """``codegen_ls.DequantizeKeys4`` / ``DequantizeValues4`` (the prompt branch's reads of the
    cache, one per layout): the first past_len rows of every head as (nibble - 8) * scale,
    exactly numpy's; a bad shape or length is a clear error."""
    from onnx import TensorProto, helper

    op = kernels.DEQUANTIZE4_NAMES[values]
    names, types = ["past", "scale", "past_len"], [TensorProto.UINT8, TensorProto.FLOAT16, TensorProto.INT64]
    node = helper.make_node(op, names, ["out"], domain=kernels.DOMAIN)
    graph = helper.make_graph(
        [node],
        "dq4",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    so = ort.SessionOptions()
    assert kernels.register(so, required=True)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for head in (16, 40, 64):
        rows, scale = quantize4(rng.normal(0, 1, (1, 3, 64, head)).astype(np.float32))
        packed = kvcache.layout4(rows, values)
        assert not np.array_equal(packed, rows)  # the layout is not the rows' order
        out = sess.run(None, {"past": packed, "scale": scale[..., None], "past_len": np.array([37], np.int64)})[0]
        np.testing.assert_array_equal(out, dequantize4(rows[:, :, :37], scale[:, :, :37]))
    assert sess.run(None, {"past": packed, "scale": scale[..., None], "past_len": np.array([0], np.int64)})[
        0
    ].shape == (1, 3, 0, 64)
    with pytest.raises(Exception, match=f"codegen_ls.{op}: past_len out of range"):
        sess.run(None, {"past": packed, "scale": scale[..., None], "past_len": np.array([65], np.int64)})
    with pytest.raises(Exception, match=f"codegen_ls.{op}: past .* scales"):
        sess.run(None, {"past": packed, "scale": scale[:, :, :63, None], "past_len": np.array([3], np.int64)})
    with pytest.raises(Exception, match=f"codegen_ls.{op}: past: positions .* multiple of 16"):
        sess.run(
            None, {"past": packed[:, :, :50], "scale": scale[:, :, :50, None], "past_len": np.array([3], np.int64)}
        )


def test_the_layout_keeps_groups_of_rows_in_place_and_inverts() -> None:
    """kvcache.layout4 / rows4: inverse of each other; a prefix of positions rounded up to 16 is a
    prefix of the bytes (what the engine's copies of a cache's first positions rely on); keys:
    token t's bytes 4g .. 4g+3 at block t // 16, chunk g, lane t % 16; values: byte j of token t at
    quad t // 4, 4j + t % 4."""
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (2, 64, 20), dtype=np.uint8)  # heads of 40
    for values in (False, True):
        packed = kvcache.layout4(rows, values)
        np.testing.assert_array_equal(kvcache.rows4(packed, values), rows)
        np.testing.assert_array_equal(kvcache.layout4(rows[:, :32], values), packed[:, :32])
    keys, vals = kvcache.layout4(rows, False).reshape(2, -1), kvcache.layout4(rows, True).reshape(2, -1)
    t, j = 37, 9
    assert keys[1, (t // 16) * 16 * 20 + (j // 4) * 64 + (t % 16) * 4 + j % 4] == rows[1, t, j]
    assert vals[1, (t // 4) * 4 * 20 + 4 * j + t % 4] == rows[1, t, j]


def test_the_c_side_keeps_the_formats_constants() -> None:
    """csrc/ keeps its own copies of the 4-bit format's constants; they are kvcache's (the op's
    bytes against kvcache.quantize4 above check the arithmetic)."""
    attend4_h, attend_h = (REPO / "csrc" / "attend4.h").read_text(), (REPO / "csrc" / "attend.h").read_text()
    assert "codegen_ls/engine/kvcache.py" in attend4_h

    def define(text: str, name: str) -> str:
        found = re.search(rf"#define {name}(?!\w)(.*?)(/\*|$)", text, re.M)
        assert found, name
        return found.group(1).strip()

    assert float(define(attend4_h, "CGLS_SCALE4_MIN").rstrip("f")) == kvcache.SCALE_MIN
    assert float(define(attend4_h, "CGLS_SCALE4_MAX").rstrip("f")) == kvcache.SCALE_MAX
    assert define(attend_h, r"CGLS_PAD16\(n\)") == f"(((n) + {kvcache.BLOCK - 1}) & ~{kvcache.BLOCK - 1})"
    assert f"float amax = {kvcache.TINY:g}f" in (REPO / "csrc" / "attend4_format.c").read_text()
