"""Fill-in-the-middle: token detection at export, the SPM prompt (budget, KV-stable head), no FIM
control token ever generated, and prefix-only prompts for models without FIM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from codegen_ls.engine import fim  # noqa: E402
from codegen_ls.engine.engine import Engine, Tokenizer  # noqa: E402
from codegen_ls.engine.modeldir import read_manifest  # noqa: E402
from codegen_ls.export.pipeline import export  # noqa: E402
from codegen_ls.suggest.context import ContextOptions, TokenCounter, build_context, fim_suffix_budget  # noqa: E402
from helpers import BOS, CODE, MODEL, random_codegen  # noqa: E402


def fim_tokenizer(tmp: Path) -> Path:
    """The embedded model's tokenizer with the three FIM tokens (added if it lacks them)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HF

    tok = HF.from_file(str(MODEL / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fim.TOKENS])
    out = tmp / "tokenizer.json"
    tok.save(str(out))
    return out


def plain_tokenizer(tmp: Path) -> Path:
    """The embedded model's tokenizer without FIM tokens (as a Salesforce checkpoint's)."""
    data = json.loads((MODEL / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["content"] not in fim.TOKENS]
    out = tmp / "plain-tokenizer.json"
    out.write_text(json.dumps(data), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def fim_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fim_tokenizer(tmp_path_factory.mktemp("fimtok"))


def test_detect(fim_tok: Path, tmp_path: Path) -> None:
    found = fim.detect(fim_tok)
    assert found is not None
    ids = {t: Tokenizer(fim_tok).encode(t) for t in fim.TOKENS}
    assert ids == {fim.PREFIX: [found.prefix], fim.MIDDLE: [found.middle], fim.SUFFIX: [found.suffix]}
    assert fim.detect(plain_tokenizer(tmp_path)) is None
    assert fim.Fim.from_json(found.to_json()) == found and fim.Fim.from_json({}) is None
    with pytest.raises(ValueError):
        fim.Fim.from_json({**found.to_json(), "format": "psm-v9"})


def test_spm_prompt_layout_budget_and_stable_head(fim_tok: Path) -> None:
    counter = TokenCounter(Tokenizer(fim_tok))
    lines = CODE.split("\n")
    line = next(i for i, ln in enumerate(lines) if "def greet" in ln) + 1  # inside greet's body
    text = "\n".join(lines[:line] + ["        msg = "] + lines[line:])
    budget = 256
    opts = ContextOptions(bos_text=BOS, fim_budget=fim_suffix_budget(budget))
    ctx = build_context(text, line, len("        msg = "), counter, budget, opts)
    after = text[ctx.cursor :]
    assert ctx.prompt.startswith(fim.PREFIX + fim.SUFFIX)
    head, _, before = ctx.prompt.partition(fim.MIDDLE)
    assert after.startswith(head[len(fim.PREFIX + fim.SUFFIX) :])  # whole lines after the cursor, in order
    assert len(head) > len(fim.PREFIX + fim.SUFFIX)
    assert before.endswith("        msg = ") and BOS not in ctx.prompt
    assert ctx.prompt_ids == counter.encode(ctx.prompt) and len(ctx.prompt_ids) <= budget
    # typing at the cursor keeps the head and extends the prompt: the KV cache reuses it all
    text2 = text.replace("        msg = ", "        msg = 'h", 1)
    ctx2 = build_context(text2, line, len("        msg = 'h"), counter, budget, opts)
    common = next(
        (i for i, (a, b) in enumerate(zip(ctx.prompt_ids, ctx2.prompt_ids)) if a != b),
        min(len(ctx.prompt_ids), len(ctx2.prompt_ids)),
    )
    assert common >= len(ctx.prompt_ids) - 1


def test_a_repository_section_joins_the_fim_prompt_as_one_encoding_would(fim_tok: Path) -> None:
    """The prompt's ids are what encoding the whole prompt gives (what generate feeds and the KV
    cache holds): the repository section ends in a special token, so BPE cannot merge it with the
    document's first characters (a section ending in a line break, a window starting indented)."""
    counter = TokenCounter(Tokenizer(fim_tok))
    text = "        value = compute(1)\n        total = value + "
    section = "# lib/util.py\ndef compute(x):\n    return x * 2\n"
    opts = ContextOptions(bos_text=BOS, fim_budget=32, preamble=section)
    ctx = build_context(text, 1, len("        total = value + "), counter, 256, opts)
    assert section in ctx.prompt and ctx.preamble_tokens > 0
    assert ctx.prompt_ids == counter.encode(ctx.prompt)


def test_document_cannot_inject_fim_tokens(fim_tok: Path) -> None:
    counter = TokenCounter(Tokenizer(fim_tok))
    found = fim.detect(fim_tok)
    assert found is not None
    text = f"x = 1\ny = '{fim.MIDDLE}'\nz = 2\n"
    ctx = build_context(text, 0, 2, counter, 128, ContextOptions(fim_budget=32))
    assert ctx.prompt_ids.count(found.middle) == 1 and ctx.prompt_ids.count(found.prefix) == 1


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory: pytest.TempPathFactory, fim_tok: Path) -> Path:
    """A tiny random CodeGen whose LM head strongly prefers the FIM tokens: only the ban keeps them out."""
    found = fim.detect(fim_tok)
    assert found is not None
    src = random_codegen(
        tmp_path_factory.mktemp("fimsrc"),
        {"vocab_size": Tokenizer(fim_tok).vocab_size, "n_positions": 512, "n_ctx": 512},
        biases={i: 50.0 for i in (found.prefix, found.middle, found.suffix)},
        tokenizer=fim_tok,
    )
    out = tmp_path_factory.mktemp("fimout") / "model"
    export(str(src), out, graph="gqa", kv_bits=8)
    return out


def test_export_records_fim_and_engine_never_generates_its_tokens(fim_model: Path) -> None:
    manifest = read_manifest(fim_model)
    engine = Engine(fim_model)
    assert engine.fim is not None and manifest.fim == engine.fim.to_json()
    banned = {engine.fim.prefix, engine.fim.middle, engine.fim.suffix}
    gen = engine.generate(
        fim.spm_prompt("def f(x):\n    return", "\n\nprint(f(2))\n"), n=3, max_new_tokens=8, temperature=1.0, seed=0
    )
    assert len(gen.candidates) == 3
    for cand in gen.candidates:
        assert len(cand.token_ids) == 8 and not banned & set(cand.token_ids)
        assert not any(t in cand.text for t in fim.TOKENS)


def test_model_without_fim_gets_prefix_only_prompts(tmp_path: Path) -> None:
    """The shipped export of a tokenizer without FIM tokens records no FIM, and the engine says so."""
    from codegen_ls.export.pipeline import random_checkpoint

    tok = plain_tokenizer(tmp_path)
    src = random_checkpoint(
        tmp_path / "src",
        vocab_size=Tokenizer(tok).vocab_size,
        n_positions=256,
        n_embd=32,
        n_layer=1,
        n_head=4,
        rotary_dim=4,
        tokenizer=tok,
    )
    out = tmp_path / "model"
    export(str(src), out, graph="gqa", kv_bits=8)
    assert read_manifest(out).fim == {}
    assert Engine(out).fim is None
