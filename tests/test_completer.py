"""The completion pipeline with the real embedded model (behaviour and invariants, not quality)."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from codegen_ls.engine.engine import Candidate, Engine, Generation, GenerationStats
from codegen_ls.errors import Cancelled, ModelError
from codegen_ls.settings import Settings
from codegen_ls.suggest import postprocess, ranking
from codegen_ls.suggest.candidates import lookup_texts
from codegen_ls.suggest.context import line_window, offset_of
from codegen_ls.suggest.pipeline import Completer, CompletionRequest, CompletionResult, Suggestion
from codegen_ls.suggest.verify import DraftOptions, ProposeOptions
from helpers import CODE, MODEL

FAST = Settings(
    max_new_tokens=8, num_candidates=2, context_tokens=256, deadline_ms=20_000, lookup=False, min_confidence=0.0
)  # (the default hides what the small model is unsure of)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL)


@pytest.fixture()
def completer(engine: Engine) -> Completer:
    return Completer(engine_loader=lambda path: engine)


def request(marked: str, uri: str = "file:///greeter.py") -> CompletionRequest:
    i = marked.index("|")
    before = marked[:i]
    return CompletionRequest(
        marked[:i] + marked[i + 1 :], before.count("\n"), len(before) - before.rfind("\n") - 1, uri=uri
    )


def accept(text: str, s: Suggestion) -> str:
    start = offset_of(text, *s.start)[0]
    end = offset_of(text, *s.end)[0]
    return text[:start] + s.insert_text + text[end:]


def mark(old: str, new: str) -> str:
    assert old in CODE
    return CODE.replace(old, new, 1)


POSITIONS = [
    mark("        self.name = name", "        self.name = |"),  # end of line (the rest deleted)
    mark("        self.name = name", "        self.name = name|"),
    mark("    print(g.greet())", "    print(g.greet(|))"),  # before closing brackets
    mark("        if loud:\n", "        if loud:\n            |\n"),  # blank line after an opener
    mark("    g = Greeter", "    g = |Greeter"),  # mid-line before a word: no completion
    mark("def main():\n", "def main():|\n"),  # end of a block opener line
    mark("import os\n\n", "import os\n\n|"),  # top-level blank line
]


@pytest.mark.parametrize("marked", POSITIONS)
def test_suggestions_insert_exactly_once(marked: str, completer: Completer) -> None:
    req = request(marked)
    result = completer.complete(req, FAST)
    assert result.mode in ("none", "single", "multi")
    if result.mode == "none":
        assert result.suggestions == []
    cursor = offset_of(req.text, req.line, req.character)[0]
    line_suffix = req.text[cursor:].split("\n", 1)[0]
    for s in result.suggestions:
        assert s.start == (req.line, req.character) and s.end >= s.start
        assert s.insert_text.strip() and s.insert_text == s.insert_text.rstrip()
        after = accept(req.text, s)
        assert after == req.text[:cursor] + s.insert_text + req.text[offset_of(req.text, *s.end)[0] :]
        assert after.endswith(req.text[offset_of(req.text, *s.end)[0] :])  # the rest of the document kept once
        if result.mode == "single":
            assert "\n" not in s.insert_text
            assert not (
                line_suffix.strip()
                and s.insert_text.endswith(line_suffix)
                and line_suffix == ")"
                and s.insert_text.count("(") < s.insert_text.count(")")
            )  # no doubled closer
        assert 0.0 <= s.confidence < 1.0 and s.source in ("greedy", "sample")
    assert set(result.timings) >= {"context", "total"}
    if result.mode != "none":
        assert {"prompt_tokens", "cached_tokens", "new_tokens", "tokens_per_s"} <= set(result.stats)


def test_mid_identifier_makes_no_model_call(completer: Completer, engine: Engine) -> None:
    fed = engine.tokens_fed
    result = completer.complete(request(mark("self.name = name", "self.na|me = name")), FAST)
    assert result.mode == "none" and result.suggestions == [] and result.reason
    assert engine.tokens_fed == fed


def _with_suggestion(completer: Completer) -> tuple[CompletionRequest, CompletionResult]:
    for marked in (
        mark("    print(g.greet())", "    print(|"),
        mark("        return message", "        return |"),
        mark('        message = "Hello', "        message = |"),
    ):
        req = request(marked.split("|")[0] + "|\n", uri="file:///typeahead.py")
        result = completer.complete(req, FAST)
        if result.suggestions and len(result.suggestions[0].insert_text) >= 2:
            return req, result
    raise AssertionError("the embedded model gave no suggestion of two characters or more at any of the cursors")


def test_typing_along_the_suggestion_makes_no_model_call(completer: Completer, engine: Engine) -> None:
    req, first = _with_suggestion(completer)
    best = first.suggestions[0].insert_text
    fed = engine.tokens_fed
    typed = replace(req, text=req.text[:-1] + best[0] + "\n", character=req.character + 1)
    hit = completer.complete(typed, FAST)
    assert engine.tokens_fed == fed
    assert hit.reason == "typeahead" and hit.suggestions[0].source == "typeahead"
    assert hit.suggestions[0].insert_text == best[1:]
    assert hit.suggestions[0].start == (typed.line, typed.character)
    # backspace: back to where the suggestion started, still inside it
    back = completer.complete(req, FAST)
    assert engine.tokens_fed == fed and back.suggestions[0].insert_text == best
    # typing something else asks the model again
    other = replace(req, text=req.text[:-1] + "\x07\n", character=req.character + 1)
    if not best.startswith("\x07"):
        completer.complete(other, FAST)
        assert engine.tokens_fed > fed


def test_typeahead_is_per_document_and_line(completer: Completer, engine: Engine) -> None:
    req, first = _with_suggestion(completer)
    best = first.suggestions[0].insert_text
    fed = engine.tokens_fed
    elsewhere = replace(req, uri="file:///other.py", text=req.text[:-1] + best[0] + "\n", character=req.character + 1)
    completer.complete(elsewhere, FAST)
    assert engine.tokens_fed > fed


def test_cancel_raises(completer: Completer) -> None:
    with pytest.raises(Cancelled):
        completer.complete(
            request(mark("        return message", "        return |"), uri="file:///cancel.py"),
            FAST,
            cancel=lambda: True,
        )


def test_min_confidence_one_shows_nothing(completer: Completer) -> None:
    result = completer.complete(
        request(mark("        self.name = name", "        self.name = |")), replace(FAST, min_confidence=1.0)
    )
    assert result.suggestions == [] and result.reason


def test_load_errors_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        Completer().load(str(tmp_path / "missing"))

    def broken(path: str | None) -> Engine:
        raise OSError("disk on fire")

    with pytest.raises(ModelError, match="disk on fire"):
        Completer(engine_loader=broken).load(None)


def test_engine_is_loaded_lazily(engine: Engine) -> None:
    loads: list[str | None] = []

    def loader(path: str | None) -> Engine:
        loads.append(path)
        return engine

    c = Completer(engine_loader=loader)
    assert not c.loaded
    assert c.engine is engine and loads == [None]


class ScriptedEngine:
    """The real engine with ``generate`` answering fixed texts (to test the pipeline exactly)."""

    def __init__(self, engine: Engine, texts: list[str]) -> None:
        self._engine, self.texts, self.calls = engine, texts, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: str, **kw: Any) -> Generation:
        self.calls += 1
        stop = kw["stop"]
        cands = []
        for i, t in enumerate(self.texts):
            cut = stop(t)
            ids = self._engine.tokenizer.encode(t)
            cands.append(
                Candidate(
                    t[:cut] if cut is not None else t,
                    ids,
                    [-0.1] * len(ids),
                    "stop" if cut is not None else "eos",
                    i > 0,
                )
            )
        return Generation(cands, GenerationStats(prompt_tokens=1))


def test_pipeline_trims_and_ranks_scripted_candidates(engine: Engine) -> None:
    scripted = ScriptedEngine(engine, ["a, b)\nmore", "a,  b)", "x))))", "   "])
    c = Completer(engine_loader=lambda path: scripted)  # type: ignore[arg-type, return-value]
    req = request("result = combine(|)\n")
    result = c.complete(req, FAST)
    texts = [s.insert_text for s in result.suggestions]
    assert texts[0] == "a, b" and accept(req.text, result.suggestions[0]) == "result = combine(a, b)\n"
    assert "   " not in texts and len(texts) == len(set(texts))
    assert scripted.calls == 1


def test_multiline_block_with_scripted_candidates(engine: Engine) -> None:
    scripted = ScriptedEngine(engine, ["    y = x * 2\n    return y\n\ndef other():\n    pass"])
    c = Completer(engine_loader=lambda path: scripted)  # type: ignore[arg-type, return-value]
    req = request("def double(x):\n    |\n\n\nprint(double(2))\n")
    result = c.complete(req, FAST)
    assert result.mode == "multi"
    assert (
        accept(req.text, result.suggestions[0]) == "def double(x):\n    y = x * 2\n    return y\n\n\nprint(double(2))\n"
    )


def test_lookup_candidates_join_the_ranking(completer: Completer) -> None:
    text = CODE + '\n\ndef other():\n    g = Greeter("moon")\n    print(g.gr|'
    result = completer.complete(request(text, uri="file:///lookup.py"), replace(FAST, lookup=True))
    assert result.mode == "none" or isinstance(result.stats.get("lookup_candidates"), int)
    for s in result.suggestions:
        assert s.source in ("greedy", "sample") or s.source.startswith("lookup")


def test_keystrokes_reuse_the_kv_cache(completer: Completer) -> None:
    base = mark("        return message", "        return mess|")
    first = completer.complete(request(base, uri="file:///kv.py"), FAST)
    typed = completer.complete(request(base.replace("mess|", "messZ|"), uri="file:///kv.py"), FAST)
    assert typed.reason != "typeahead"  # no suggestion starts with "Z": the model ran, on the cached prompt
    assert first.stats["prompt_tokens"] > 20
    assert typed.stats["cached_tokens"] >= typed.stats["prompt_tokens"] - 3


class FakeLookup:
    """Stands in for codegen_ls.suggest.verify: one verified candidate continuing the cursor."""

    ProposeOptions, DraftOptions = ProposeOptions, DraftOptions

    def __init__(self, engine: Engine, text: str) -> None:
        self.engine, self.text, self.calls = engine, text, []  # type: ignore[var-annotated]

    def propose(
        self,
        engine: Engine,
        prompt_ids: list[int],
        prefix: str,
        suffix: str,
        other_documents: dict[str, str],
        options: ProposeOptions,
        **kw: Any,
    ) -> list[Candidate]:
        self.calls.append((prompt_ids, prefix, suffix, other_documents, options))
        ids = engine.tokenizer.encode(self.text)
        return [Candidate(self.text, ids, [-0.01] * len(ids), "stop", source="lookup:line")]


def test_lookup_candidates_are_merged_and_keep_their_source(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import codegen_ls.suggest.candidates as completer_module

    fake = FakeLookup(engine, "self.name.title())")
    monkeypatch.setattr(completer_module, "_lookup", fake)
    c = Completer(engine_loader=lambda path: engine)
    req = request("class A:\n    def f(self):\n        return str(|)\n", uri="file:///fake-lookup.py")
    req.other_documents = {"file:///b.py": "x = 1\n", req.uri: "stale copy"}
    result = c.complete(req, replace(FAST, lookup=True))
    (prompt_ids, prefix, suffix, others, opts) = fake.calls[0]
    assert prefix == req.text[: len(prefix)] and prefix.endswith("return str(") and suffix.startswith(")\n")
    assert others == {"file:///b.py": "x = 1\n"} and opts.doc_key == req.uri and opts.find.multiline is False
    # ranked with the model's candidates (the calibrated model orders them), its text fitted to the closer
    copy = next(c for c in result.candidates if c["source"] == "lookup:line")
    assert copy["text"] == "self.name.title()" and 0 < copy["confidence"] < 1
    assert result.stats["lookup_candidates"] == 1
    assert not c.complete(request("x = |\n", uri="file:///off.py"), replace(FAST, lookup=False)).stats[
        "lookup_candidates"
    ]


# -- huge documents (issue 7): per-request work bounded by the budget ------------------------------

HUGE_LINE = "x = [" + ", ".join(str(i) for i in range(180_000))  # 1.3 MB, no line break


def count_work(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Characters handed to the tokenizer and to the bracket scan from now on."""
    work = {"encode": 0, "scan": 0}
    encode, scan = engine.tokenizer.encode, postprocess.scan_brackets

    def counting_encode(text: str) -> list[int]:
        work["encode"] += len(text)
        return encode(text)

    def counting_scan(text: str, *args: Any, **kw: Any) -> postprocess.Brackets:
        work["scan"] += len(text)
        return scan(text, *args, **kw)

    monkeypatch.setattr(engine.tokenizer, "encode", counting_encode)
    monkeypatch.setattr(postprocess, "scan_brackets", counting_scan)
    monkeypatch.setattr(ranking, "scan_brackets", counting_scan)
    return work


def test_end_of_a_huge_line_is_answered(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = replace(FAST, lookup=True)
    c = Completer(engine_loader=lambda path: engine)
    req = CompletionRequest(HUGE_LINE, 0, len(HUGE_LINE), uri="file:///huge-line.py")
    work = count_work(engine, monkeypatch)
    t0 = time.perf_counter()
    result = c.complete(req, settings)
    elapsed = time.perf_counter() - t0
    print(
        f"\ncompletion at the end of a {len(HUGE_LINE) / 1e6:.1f} MB line: {elapsed * 1000:.0f} ms, "
        f"{result.timings}, {work}"
    )
    assert result.mode == "single"
    window = line_window(settings.context_tokens)
    assert work["encode"] <= 5 * window and work["scan"] <= 40 * window  # measured: 2.1 and 3.8 windows
    for s in result.suggestions:
        assert s.start == s.end == (0, len(HUGE_LINE)) and "\n" not in s.insert_text
    assert result.suggestions and len(result.suggestions[0].insert_text) >= 2
    if True:  # typing along: the type-ahead cache
        best = result.suggestions[0].insert_text
        typed = replace(req, text=HUGE_LINE + best[0], character=len(HUGE_LINE) + 1)
        assert c.complete(typed, settings).reason == "typeahead"


def test_end_of_a_ten_megabyte_file_is_answered(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(f"def f_{i}(x):\n    return x * {i} + len('{'é' * (i % 7)}')\n\n" for i in range(200_000))
    assert len(text) > 10_000_000
    settings = replace(FAST, lookup=True)
    c = Completer(engine_loader=lambda path: engine)
    req = CompletionRequest(text, 600_000, 0, uri="file:///big.py", other_documents={"file:///copy.py": text})
    work = count_work(engine, monkeypatch)
    t0 = time.perf_counter()
    result = c.complete(req, settings)
    elapsed = time.perf_counter() - t0
    print(
        f"\ncompletion at the end of a {len(text) / 1e6:.1f} MB file: {elapsed * 1000:.0f} ms, {result.timings}, {work}"
    )
    assert result.mode == "multi"
    window = line_window(settings.context_tokens)
    assert work["encode"] <= 5 * window and work["scan"] <= 40 * window
    for s in result.suggestions:
        assert s.start == s.end == (600_000, 0)


def test_lookup_is_given_exactly_the_text_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The completer slices the documents to lookup's windows: the drafts are the same as with the whole texts."""
    from codegen_ls.suggest import drafts as lookup

    monkeypatch.setattr(lookup, "WINDOW_CHARS", 20_000)  # small windows: a 300 kB document is sliced
    monkeypatch.setattr(lookup, "OTHER_DOC_CHARS", 30_000)
    rng = random.Random(4)
    words = ["self", "value", "compute", "x", "(", ")", ".", "items", "return", "for", "in", ":", "=", "+", "'a'"]
    text = "\n".join(
        "    " * rng.randint(0, 3) + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        for _ in range(12_000)
    )
    others = {"file:///b.py": text}
    found = 0
    for cursor in rng.sample(range(len(text)), 20):
        req = CompletionRequest(text, 0, 0, uri="file:///a.py", other_documents=others)
        prefix, suffix, sliced = lookup_texts(req, cursor, lookup)
        assert len(prefix) + len(suffix) < len(text) and len(sliced["file:///b.py"]) < len(text)
        for multiline in (False, True):
            whole = lookup.find_drafts(
                text[:cursor], text[cursor:], others, lookup.DraftOptions(multiline=multiline, budget_ms=1e6)
            )
            assert (
                lookup.find_drafts(prefix, suffix, sliced, lookup.DraftOptions(multiline=multiline, budget_ms=1e6))
                == whole
            )
            found += len(whole)
    assert found > 20
