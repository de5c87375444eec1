"""``codegen-ls model export`` through :func:`codegen_ls.export.pipeline.export`: errors, safety, manifest.

Behaviours of the CLI command, tested on the function it calls: one clear error line for an
offline hub id, :class:`ModelError` for non-CodeGen checkpoints, pickled ``.bin`` weights loaded
only with ``weights_only=True`` (a malicious pickle runs nothing), external data for big models,
and manifest checksums checked with :func:`codegen_ls.engine.modeldir.verify_files`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

from codegen_ls.engine import kernels  # noqa: E402
from codegen_ls.engine.engine import Engine, EngineOptions, Tokenizer  # noqa: E402
from codegen_ls.engine.modeldir import read_manifest, verify_files  # noqa: E402
from codegen_ls.errors import CodegenLsError, ModelError  # noqa: E402
from codegen_ls.export.pipeline import export, random_checkpoint  # noqa: E402
from helpers import hf_greedy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"
SHAPE = dict(vocab_size=8192, n_positions=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "src", tokenizer=TOKENIZER, **SHAPE)


def test_unknown_graph_kind_and_bad_int4(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CodegenLsError, match="graph kind"):
        export(str(checkpoint), tmp_path / "out", graph="fastest")
    with pytest.raises(CodegenLsError, match="int4"):
        export(str(checkpoint), tmp_path / "out", graph="optimum", int4=True)


def test_offline_hub_id_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(CodegenLsError) as info:
        export("Salesforce/codegen-350M-mono", tmp_path / "out")
    message = str(info.value)
    assert "Salesforce/codegen-350M-mono" in message and "offline" in message
    assert "\n" not in message and not isinstance(info.value, ModelError)
    assert not (tmp_path / "out").exists()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CodegenLsError, match="not found"):
        export(str(tmp_path / "nope"), tmp_path / "out")


def test_non_codegen_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="only CodeGen"):
        export(str(src), tmp_path / "out")
    (src / "config.json").write_text(json.dumps({"model_type": "codegen"}))
    with pytest.raises(ModelError, match="no weights"):
        export(str(src), tmp_path / "out")
    with pytest.raises(ModelError, match="no config.json"):
        export(str(tmp_path), tmp_path / "out2")


def test_refuses_a_non_empty_output_directory(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CodegenLsError, match="not empty"):
        export(str(checkpoint), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()


class _Payload:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_pickled_bin_weights_never_run_code(tmp_path: Path) -> None:
    src = random_checkpoint(tmp_path / "src", safetensors=False, tokenizer=TOKENIZER, **SHAPE)
    assert (src / "pytorch_model.bin").is_file() and not list(src.glob("*.safetensors"))
    # a legitimate .bin loads (torch.load weights_only=True) and exports
    export(str(src), tmp_path / "ok", quantize_int8=False)
    assert verify_files(tmp_path / "ok", read_manifest(tmp_path / "ok")) == []
    # a malicious one is refused with one line, and its code never runs
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": _Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        export(str(src), tmp_path / "bad", quantize_int8=False)
    assert "\n" not in str(info.value) and "weights_only=True" in str(info.value)
    assert "weights_only=False" not in str(info.value) and "can run any code" in str(
        info.value
    )  # why, not torch's advice
    assert "GLOBAL" in str(info.value)  # what torch refused
    assert not marker.exists()


@pytest.mark.parametrize("graph", ["optimum", "gqa"])
@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_external_data_manifest_and_checksums(checkpoint: Path, tmp_path: Path, quantize: bool, graph: str) -> None:
    """The >2 GB path (forced here on a tiny model): weights in ``model.onnx.data``, all files listed."""
    out = tmp_path / "model"
    manifest = export(str(checkpoint), out, quantize_int8=quantize, external_data=True, graph=graph, kv_bits=8)
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert (out / "model.onnx").stat().st_size < 200_000 < (out / "model.onnx.data").stat().st_size
    assert manifest.quantization == ("int8-dynamic" if quantize else "none")
    assert manifest.extra["graph"] == graph
    shape = (manifest.n_layer, manifest.n_head, manifest.head_dim, manifest.vocab_size)
    assert shape == (2, 4, 16, Tokenizer(TOKENIZER).vocab_size)  # the vocabulary grown to the tokenizer's
    assert verify_files(out, read_manifest(out)) == []

    ids = [int(t) for t in np.random.default_rng(0).integers(1, 8192, size=20)]
    got = Engine(out, EngineOptions(threads=1)).generate(ids, max_new_tokens=6).candidates[0].token_ids
    if not quantize:
        assert got == hf_greedy(checkpoint, ids, 6)

    if graph == "gqa":  # decode attention: our op over an int8 cache when quantized (an ONNX function
        # whose body is GroupQueryAttention), GroupQueryAttention itself over an fp32 cache
        import onnx

        proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
        ifs = [n for n in proto.graph.node if n.op_type == "If"]  # per layer: decode | prompt path
        branches = {a.name: [x.op_type for x in a.g.node] for a in ifs[0].attribute}
        assert len(ifs) == 2 and branches["else_branch"] == ["DecodeAttention" if quantize else "GroupQueryAttention"]
        functions = {(f.domain, f.name): [x.op_type for x in f.node] for f in proto.functions}
        assert functions == ({("codegen_ls", "DecodeAttention"): ["GroupQueryAttention"]} if quantize else {})
        assert manifest.extra.get("decode_attention") == ("codegen_ls.DecodeAttention" if quantize else None)
        assert branches["then_branch"].count("MatMul") == 2  # activation x activation: never quantized
        integer = sum(n.op_type == "MatMulInteger" for n in proto.graph.node)
        assert integer == (2 * 4 + 1 if quantize else 0)  # weights: qkv, out, fc_in, fc_out; lm_head
        cache = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}["past_key.0"]
        assert cache == (onnx.TensorProto.INT8 if quantize else onnx.TensorProto.FLOAT)
        assert manifest.extra["kv_dtype"] == ("int8" if quantize else "float32")

    data = bytearray((out / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (out / "model.onnx.data").write_bytes(bytes(data))
    (out / "tokenizer.json").unlink()
    assert sorted(verify_files(out, manifest)) == ["checksum mismatch for model.onnx.data", "missing tokenizer.json"]


def test_cli_export_defaults_to_the_gqa_graph_and_info_reports_it(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``codegen-ls model export SRC OUT --int4 --name N`` then ``model info OUT``: the gqa graph
    (the default) with its KV cache as ``--kv-bits auto`` (the default) picks it on this machine
    (4-bit where our kernel runs it vectorized, else int8), 4-bit layer weights, the given name,
    every file verified."""
    from codegen_ls.cli import main

    out = tmp_path / "m"
    assert main(["model", "export", str(checkpoint), str(out), "--int4", "--name", "tiny-test"]) == 0
    manifest = read_manifest(out)
    auto = "int4" if kernels.vector4(best=True) and not kernels.disabled_by_env() else "int8"
    assert (manifest.name, manifest.extra["graph"], manifest.extra["kv_dtype"]) == ("tiny-test", "gqa", auto)
    assert manifest.quantization.startswith("int4")
    capsys.readouterr()
    assert main(["model", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '"graph": "gqa"' in printed and "all files verified" in printed
    assert main(["model", "export", str(checkpoint), str(tmp_path / "o"), "--graph", "optimum", "--int4"]) == 1
    assert "int4 weights need our graph" in capsys.readouterr().err
    for retired in (["--graph", "flat"], ["--kv-fp16"]):  # the flat graph and its float16 cache are gone
        with pytest.raises(SystemExit):
            main(["model", "export", str(checkpoint), str(tmp_path / "o"), *retired])
        assert retired[0] in capsys.readouterr().err
