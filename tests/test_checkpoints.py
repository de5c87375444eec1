"""Real CodeGen checkpoints' forms, exported as a user would (issue #26), each against transformers:

- a sharded checkpoint (safetensors shards and their index; ``.bin`` shards too) exports by
  reading one tensor at a time: greedy output token for token as transformers' (fp32), and the
  export's peak memory, measured in a subprocess, stays far below the checkpoint's float32 size;
- the layer-by-layer calibration and 4-bit check give the whole model's numbers;
- the Salesforce repositories' tokenizer files (GPT-2 style ``vocab.json`` + ``merges.txt`` with
  CodeGen's added whitespace tokens, no ``tokenizer.json``): the exported tokenizer encodes code
  exactly as transformers' slow ``CodeGenTokenizer`` and decodes it back;
- the config variants the real sizes use (2048 positions, tied or untied head, activation,
  ``rotary_dim`` 32 / 64, heads of 64 / 80 / 256).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codegen_ls.engine.engine import Engine, EngineOptions, Tokenizer  # noqa: E402
from codegen_ls.engine.modeldir import read_manifest, verify_files  # noqa: E402
from codegen_ls.export import calibrate, kv_check  # noqa: E402
from codegen_ls.export.graph_builder import kv_scales  # noqa: E402
from codegen_ls.export.pipeline import calibration_batches, export  # noqa: E402
from codegen_ls.export.source import CheckpointSource  # noqa: E402
from helpers import hf_greedy, random_codegen  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # exports of real-checkpoint forms, several per test

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"
VOCAB = Tokenizer(TOKENIZER).vocab_size  # the embedded tokenizer's: 8192 BPE tokens + 3 FIM tokens
CODE = (REPO / "codegen_ls" / "export" / "pipeline.py").read_text()[
    :6000
] + "\n\tif x:\n\t\treturn  [1,\t2]  # tabs\n    é ∑ 😀\n"


def checkpoint(
    out: Path, *, shard: str | None = None, safetensors: bool = True, seed: int = 0, **config: object
) -> Path:
    """A random CodeGen saved by transformers (``shard``: its ``max_shard_size``); EOS (0) suppressed."""
    shape: dict[str, Any] = {"vocab_size": VOCAB} | config
    save: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    tokenizer = TOKENIZER if int(shape["vocab_size"]) >= VOCAB else None
    return random_codegen(out, shape, tokenizer=tokenizer, seed=seed, safe_serialization=safetensors, **save)


def ours_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    return list(Engine(model_dir, EngineOptions(threads=1)).generate(ids, max_new_tokens=n).candidates[0].token_ids)


PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
from codegen_ls.export import pipeline
src, out, quantize, kv_bits = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "int8", int(sys.argv[4]) or None
# first a tiny export with the same options: every library and code path loaded, their peak the baseline
tiny = pipeline.random_checkpoint(out.with_name(out.name + "-tiny-src"), tokenizer=Path(sys.argv[5]), n_positions=256)
pipeline.export(str(tiny), out.with_name(out.name + "-tiny"), quantize_int8=quantize, kv_bits=kv_bits,
                external_data=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipeline.export(str(src), out, quantize_int8=quantize, kv_bits=kv_bits, external_data=True)
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def export_peak(src: Path, out: Path, quantize: str, kv_bits: int) -> tuple[float, float]:
    """Export in a fresh process; (its peak RSS above the peak of a tiny export run first in the
    same process, which loads every library and code path, in bytes; the peak itself)."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(src), str(out), quantize, str(kv_bits), str(TOKENIZER)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    peak = json.loads(run.stdout.strip().splitlines()[-1])
    return (peak["peak_kb"] - peak["base_kb"]) * 1024.0, peak["peak_kb"] * 1024.0


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 150 MB of float32 weights in 8 MB safetensors shards (vocab 16384 x 512 embedding
    and head, 6 layers)."""
    torch.set_num_threads(1)
    return checkpoint(
        tmp_path_factory.mktemp("sharded") / "src",
        shard="8MB",
        vocab_size=16384,
        n_embd=512,
        n_layer=6,
        n_head=8,
        rotary_dim=32,
    )


def test_a_sharded_checkpoint_exports_token_for_token_with_bounded_memory(sharded: Path, tmp_path: Path) -> None:
    shards = sorted(sharded.glob("model-*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(shards) >= 5 and set(index["weight_map"].values()) == {p.name for p in shards}
    fp32 = CheckpointSource(sharded).fp32_bytes()
    assert fp32 > 140e6

    growth, peak = export_peak(sharded, tmp_path / "fp32", "fp32", 0)
    print(
        f"fp32 export: {growth / 1e6:.0f} MB over a tiny export's peak, peak {peak / 1e6:.0f} MB; weights "
        f"{fp32 / 1e6:.0f} MB"
    )
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 16384, size=40)]
    assert ours_greedy(tmp_path / "fp32", ids, 8) == hf_greedy(sharded, ids, 8)
    assert verify_files(tmp_path / "fp32", read_manifest(tmp_path / "fp32")) == []
    # loading the model alone would take fp32 bytes; the export holds about a tensor at a time
    # (the embedding, 32 MB, and what is made of it)
    assert growth < 0.5 * fp32, (
        f"export grew {growth / 1e6:.0f} MB over a tiny export's peak for {fp32 / 1e6:.0f} MB of weights"
    )
    assert peak < 1.5e9

    growth8, peak8 = export_peak(
        sharded, tmp_path / "int8", "int8", 8
    )  # with the int8 cache's layer-by-layer calibration
    print(f"int8 export: {growth8 / 1e6:.0f} MB over a tiny export's peak, peak {peak8 / 1e6:.0f} MB")
    assert growth8 < 0.5 * fp32, f"int8 export grew {growth8 / 1e6:.0f} MB for {fp32 / 1e6:.0f} MB of weights"
    assert len(ours_greedy(tmp_path / "int8", ids, 4)) == 4


def test_sharded_bin_checkpoints_export_token_for_token(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "src", shard="200KB", safetensors=False)
    assert len(list(src.glob("pytorch_model-*.bin"))) >= 3 and (src / "pytorch_model.bin.index.json").is_file()
    export(str(src), tmp_path / "m", quantize_int8=False)
    ids = [int(t) for t in np.random.default_rng(1).integers(1, 8192, size=24)]
    assert ours_greedy(tmp_path / "m", ids, 6) == hf_greedy(src, ids, 6)


def test_layer_by_layer_calibration_and_check_match_the_whole_model(tmp_path: Path) -> None:
    from transformers import CodeGenForCausalLM

    src = checkpoint(tmp_path / "src", n_positions=1024, n_ctx=1024, n_embd=128, n_head=4, rotary_dim=16)
    batches = calibration_batches(TOKENIZER, 1024, 8192)
    model = CodeGenForCausalLM.from_pretrained(str(src)).eval()
    whole_scales = kv_scales(model, batches)
    whole = kv_check.check(model, batches, whole_scales)
    scales, layered = calibrate.run(CheckpointSource(src), batches, check=True)
    for (k0, v0), (k1, v1) in zip(whole_scales, scales):
        np.testing.assert_allclose(k1, k0, rtol=1e-5)
        np.testing.assert_allclose(v1, v0, rtol=1e-5)
    assert layered is not None and layered.tokens == whole.tokens
    for mode in ("exact", "int8", "int4"):
        assert abs(layered.loss[mode] - whole.loss[mode]) < 1e-4
    assert abs(layered.same["int4"] - whole.same["int4"]) < 0.01
    only_scales, none = calibrate.run(CheckpointSource(src), batches, check=False)
    assert none is None and all(np.array_equal(a[0], b[0]) for a, b in zip(only_scales, scales))


# -- the Salesforce repositories' tokenizer files ------------------------------------------------

WHITESPACE = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]  # CodeGen's added tokens


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vocab.json`` + ``merges.txt`` (a byte-level BPE trained here on Python), ``<|endoftext|>``,
    CodeGen's whitespace runs as ``added_tokens.json``, the tokenizer config the checkpoints ship."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2tok")
    bpe = ByteLevelBPETokenizer()
    stdlib = Path(json.__file__).parent.parent
    texts = [(stdlib / n).read_text(errors="replace") for n in ("functools.py", "typing.py", "enum.py", "inspect.py")]
    bpe.train_from_iterator(texts, vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == 0
    (out / "added_tokens.json").write_text(json.dumps({t: len(vocab) + i for i, t in enumerate(WHITESPACE)}))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False, "model_max_length": 2048})
    )
    return out


def test_gpt2_style_tokenizer_files_export_and_encode_code_as_the_slow_tokenizer(
    gpt2_files: Path, tmp_path: Path
) -> None:
    from transformers import CodeGenTokenizer

    src = checkpoint(tmp_path / "src", vocab_size=2048)
    for f in gpt2_files.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    assert not (src / "tokenizer.json").exists()
    export(str(src), tmp_path / "m", kv_bits=8)
    ours = Tokenizer(tmp_path / "m" / "tokenizer.json")
    slow = CodeGenTokenizer.from_pretrained(str(src))
    assert not slow.is_fast and len(slow) == ours.vocab_size == 2000 + len(WHITESPACE)
    samples = [CODE, "def f(x):\n        return x\n\t\t\tpass\n", " " * 40 + "x = 1\n", "<|endoftext|>def g(): pass"]
    for text in samples:
        expected = slow.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected
        # (the slow tokenizer's decode puts spaces around added tokens unless told not to)
        assert ours.text_of(expected) == text == slow.decode(expected, spaces_between_special_tokens=False)
    whitespace_ids = {slow.convert_tokens_to_ids(t) for t in WHITESPACE}
    assert whitespace_ids & set(ours.encode(CODE)), "the sample's indentation uses CodeGen's whitespace tokens"
    engine = Engine(tmp_path / "m", EngineOptions(threads=1))
    assert len(engine.generate("def main():\n    ", max_new_tokens=4).candidates[0].token_ids) == 4


# -- the config variants of the real sizes ---------------------------------------------------------

VARIANTS: dict[
    str, dict[str, Any]
] = {  # name: config; 350M: heads of 64, rotary 32; 2B: 80, 64; 6B/16B: 256, 64; all gelu_new, untied, 2048
    "350M-like, 2048 positions": dict(n_positions=2048, n_ctx=2048, n_embd=256, n_head=4, rotary_dim=32),
    "head 80, rotary 64": dict(n_embd=320, n_head=4, rotary_dim=64),
    "head 256, rotary 64": dict(n_embd=1024, n_head=4, rotary_dim=64, n_layer=1),
    "head 64, rotary 32, tied head": dict(n_embd=256, n_head=4, rotary_dim=32, tie_word_embeddings=True),
    "exact gelu": dict(n_embd=128, n_head=4, rotary_dim=16, activation_function="gelu"),
    "relu": dict(n_embd=128, n_head=4, rotary_dim=16, activation_function="relu"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_variants_export_token_for_token(name: str, tmp_path: Path) -> None:
    config = VARIANTS[name]
    src = checkpoint(tmp_path / "src", **config)  # type: ignore[arg-type]
    assert json.loads((src / "config.json").read_text())["n_embd"] // json.loads((src / "config.json").read_text())[
        "n_head"
    ] in (32, 64, 80, 256)
    if config.get("tie_word_embeddings"):
        assert "lm_head.weight" not in CheckpointSource(src)  # saved once, as the embedding
    export(str(src), tmp_path / "m", quantize_int8=False)
    ids = [int(t) for t in np.random.default_rng(2).integers(1, 8192, size=30)]
    assert ours_greedy(tmp_path / "m", ids, 6) == hf_greedy(src, ids, 6)
    if name.startswith("head"):  # and quantized with the 4-bit cache, which these head sizes take
        export(str(src), tmp_path / "q4", kv_bits=4)
        assert read_manifest(tmp_path / "q4").extra["kv_dtype"] == "int4"
