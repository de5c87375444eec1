"""Lookup drafts (codegen_ls.suggest.drafts): sources, ordering, time bounds, and model verification.

The pure tests need no model. The verification tests use the embedded dev model and assert
behaviour, never quality: expected cuts are computed from the model's own greedy choices.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen_ls.errors import Cancelled
from codegen_ls.suggest.drafts import Draft, DraftOptions, find_drafts, lookup_only
from codegen_ls.suggest.verify import ProposeOptions, accepted_length, align_draft, forced_tokens, propose

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "codegen-ls-small"


def split(doc: str, marker: str = "|") -> tuple[str, str]:
    i = doc.index(marker)
    return doc[:i], doc[i + len(marker) :]


def newline_stop(text: str) -> int | None:
    i = text.find("\n")
    return i if i != -1 else None


# -- sources -----------------------------------------------------------------------------------

DOC = """\
def setup(ctx):
    value = compute(alpha, ctx)
    other = 1
    value = compute(beta, ctx)
    other = 2
    value = comp|
    value = compute(gamma, ctx)
    return value
"""


def test_line_source_finds_other_lines_nearest_first() -> None:
    prefix, suffix = split(DOC)
    drafts = find_drafts(prefix, suffix, {}, DraftOptions(include_ngram=False))
    assert [d.text for d in drafts] == ["ute(gamma, ctx)", "ute(beta, ctx)", "ute(alpha, ctx)"]
    assert all(d.source == "lookup:line" for d in drafts)
    assert [d.distance for d in drafts] == [1, 2, 4]
    assert lookup_only(prefix, suffix, {}) == "ute(gamma, ctx)"


def test_line_source_ignores_indentation_and_dedupes() -> None:
    prefix, suffix = split("if x:\n        total = add(a)\ntotal = add(a)\n  total = a|\n")
    drafts = find_drafts(prefix, suffix, {}, DraftOptions(include_ngram=False))
    assert [d.text for d in drafts] == ["dd(a)"]


def test_line_source_prefers_the_line_whose_context_agrees() -> None:
    prefix, suffix = split(
        'if mode == "fast":\n    y = quick(x)\nif mode == "slow":\n    y = careful(x)\n'
        'z = 0\nif mode == "fast":\n    y = |\n'
    )
    drafts = find_drafts(prefix, suffix, {}, DraftOptions(include_ngram=False))
    assert [(d.text, d.distance) for d in drafts] == [("quick(x)", 5), ("careful(x)", 3)]


def test_other_document_source() -> None:
    prefix, suffix = split("import os\nresult = frobnicate_|\n")
    others = {
        "file:///lib.py": "x = 1\nresult = frobnicate_all(items)\nresult = frobnicate_all(items)\n"
        "result = frobnicate_one(item)\n"
    }
    drafts = find_drafts(prefix, suffix, others)
    assert drafts[0] == Draft("all(items)", "lookup:doc", "file:///lib.py:2", 0)  # seen twice: first
    assert drafts[1].text == "one(item)" and drafts[1].origin == "file:///lib.py:4"
    assert not find_drafts(prefix, suffix, others, DraftOptions(include_other_documents=False, include_ngram=False))


def test_same_document_ranks_before_other_documents() -> None:
    prefix, suffix = split("y = load_config(path)\ny = load_|\n")
    drafts = find_drafts(prefix, suffix, {"file:///b.py": "y = load_data(path)\n"}, DraftOptions(include_ngram=False))
    assert [(d.text, d.source) for d in drafts] == [("config(path)", "lookup:line"), ("data(path)", "lookup:doc")]


def test_ngram_source_matches_inside_lines() -> None:
    # No other line starts like the current one; the last words occur in the middle of a line.
    prefix, suffix = split("print(self.registry.lookup(name, default=None))\nvalue = self.registry.lookup(|\n")
    assert not find_drafts(prefix, suffix, {}, DraftOptions(include_ngram=False))
    drafts = find_drafts(prefix, suffix, {})
    assert drafts[0].source == "lookup:ngram"
    assert drafts[0].text == "name, default=None))"
    assert drafts[0].distance == 1
    assert find_drafts(prefix, suffix, {}, DraftOptions(include_lines=False))[0].source == "lookup:ngram"


def test_each_source_keeps_a_place() -> None:
    lines = "key = pick(v0)\nkey = pick(v1)\n"
    prefix, suffix = split(lines + "call(pick(z9))\nkey = pick(|\n")
    drafts = find_drafts(prefix, suffix, {"file:///o.py": "key = pick(w)\n"}, DraftOptions(max_drafts=3))
    assert [(d.text, d.source) for d in drafts] == [
        ("v1)", "lookup:line"),
        ("w)", "lookup:doc"),
        ("z9))", "lookup:ngram"),
    ]
    assert [d.text for d in find_drafts(prefix, suffix, {}, DraftOptions(max_drafts=2))] == ["v1)", "z9))"]
    assert [d.text for d in find_drafts(prefix, suffix, {}, DraftOptions(max_drafts=3))] == ["v1)", "v0)", "z9))"]
    assert find_drafts(prefix, suffix, {}, DraftOptions(max_drafts=0)) == []


def test_multiline_draft_takes_the_block_reindented() -> None:
    prefix, suffix = split(
        "class A:\n"
        "    def close(self):\n"
        "        self.handle.flush()\n"
        "        self.handle.close()\n"
        "\n"
        "    def size(self):\n"
        "        return 1\n"
        "def clo|\n"
    )
    drafts = find_drafts(prefix, suffix, {}, DraftOptions(multiline=True, include_ngram=False))
    assert drafts[0].text == "se(self):\n    self.handle.flush()\n    self.handle.close()"
    single = find_drafts(prefix, suffix, {}, DraftOptions(include_ngram=False))
    assert single[0].text == "se(self):"


def test_nothing_to_copy_gives_nothing() -> None:
    assert find_drafts("", "", {}) == []
    assert lookup_only("    ", "\n", {"file:///a.py": "    x = 1\n"}) is None  # no text to match on
    prefix, suffix = split("a = f(x)\na = f(|x)\n")  # the copy would re-type what follows the cursor
    assert find_drafts(prefix, suffix, {}, DraftOptions(include_ngram=False)) == []


# -- bounded work ------------------------------------------------------------------------------


def _big_document(size: int) -> str:
    line = "    value_{0} = compute(value_{0}, 'x' * {0})  # filler to make the line longer\n"
    out, n, i = [], 0, 0
    while n < size:
        s = line.format(i)
        out.append(s)
        n += len(s)
        i += 1
    return "".join(out)


@pytest.mark.parametrize("kind", ["lines", "one-line", "repetitive"])
def test_lookup_stays_within_budget_on_10mb(kind: str) -> None:
    size = 10 * 1024 * 1024
    if kind == "lines":
        doc = _big_document(size)
    elif kind == "one-line":
        doc = "x = (" + "a + " * (size // 4)
    else:
        doc = "a a a a a a a a a a\n" * (size // 20)
    prefix, suffix = doc[: len(doc) // 2], doc[len(doc) // 2 :]  # somewhere inside a line
    others = {"file:///big1.py": doc, "file:///big2.py": doc}
    for budget in (0.0, 20.0):
        t = time.perf_counter()
        find_drafts(prefix, suffix, others, DraftOptions(multiline=True, max_drafts=8, budget_ms=budget))
        lookup_only(prefix, suffix, others, budget_ms=budget)
        elapsed_ms = (time.perf_counter() - t) * 1000
        assert elapsed_ms < 2 * budget + 200, (kind, budget, elapsed_ms)


# -- random inputs -----------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from(list("ab_x(). :=\n\t\r#é\u2603")), max_size=200)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_text, suffix=_text, other=_text, multiline=st.booleans(), max_drafts=st.integers(0, 6))
def test_find_drafts_never_crashes(prefix: str, suffix: str, other: str, multiline: bool, max_drafts: int) -> None:
    drafts = find_drafts(
        prefix, suffix, {"file:///o.py": other}, DraftOptions(multiline=multiline, max_drafts=max_drafts)
    )
    assert len(drafts) <= max_drafts
    assert len({d.text for d in drafts}) == len(drafts)
    for d in drafts:
        assert d.text.strip() and d.source in ("lookup:line", "lookup:doc", "lookup:ngram")
        assert multiline or "\n" not in d.text
    lookup_only(prefix, suffix, {"file:///o.py": other})


# -- verification by the model -----------------------------------------------------------------


def test_accepted_length_rule() -> None:
    draft, greedy = [5, 6, 7, 8], [5, 6, 9, 8]
    assert accepted_length(draft, [-0.1, -0.2, -5.0, -0.1], greedy, min_accept_p=1.0) == 2
    assert accepted_length(draft, [-0.1, -0.2, -1.0, -0.1], greedy, min_accept_p=0.3) == 4  # p=0.37
    assert accepted_length(draft, [-0.1, -0.2, -5.0, -0.1], greedy, min_accept_p=0.0) == 4
    assert accepted_length(draft, [-9.0, -0.2, -5.0, -0.1], [1, 6, 9, 8], min_accept_p=1.0, start=2) == 2


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    if not (MODEL_DIR / "manifest.json").exists():
        pytest.skip("embedded model missing")
    from codegen_ls.engine.engine import Engine, EngineOptions

    return Engine(MODEL_DIR, EngineOptions(threads=1))


CODE = """import os


def read_config(path):
    with open(path) as handle:
        return handle.read()


def main(argv):
    config = read_config(argv[1])
    print("""


JUNK = "\u2603~QZX"  # after the model's greedy text: tokens it would never write


def test_draft_is_cut_where_the_model_diverges(engine) -> None:  # type: ignore[no-untyped-def]
    """Draft = the model's own greedy tokens + junk; the verified candidate keeps exactly the agreed
    part, and the copy as it was comes with the count of the tokens the model rejected."""
    checked = 0
    for cut in range(len(CODE) - 40, len(CODE) + 1, 4):
        prefix = CODE[:cut]
        prompt = engine.tokenizer.encode(prefix)
        greedy_text = engine.generate(prompt, doc_key="t", temperature=0, max_new_tokens=3).candidates[0].text
        draft_text = greedy_text + JUNK
        al = align_draft(engine, prompt, draft_text)
        assert al is not None
        logprobs, greedy, _ = engine.score(al.base, al.draft, doc_key="t")
        forced = forced_tokens(engine, al)
        m = forced
        while m < len(al.draft) and al.draft[m] == greedy[m]:  # first disagreement, computed here
            m += 1
        cands = propose(
            engine,
            prompt,
            prefix,
            "",
            {},
            ProposeOptions(
                doc_key="t",
                stop=None,
                cancel=None,
                max_new_tokens=len(al.draft) + 2,
                min_accept_p=1.0,
                find=DraftOptions(multiline=True),
            ),
            drafts=[Draft(draft_text, "lookup:line", "test", 1)],
        )
        verified = [c for c in cands if c.rejected == 0]
        copies = [c for c in cands if c.rejected > 0]
        if m < len(al.draft):  # the draft as copied stays a candidate, carrying the evidence against it
            assert len(copies) == 1 and copies[0].text == draft_text and copies[0].source == "lookup:line"
            assert copies[0].copied_tokens == len(al.draft) == copies[0].draft_tokens
        if m == forced:  # the very first judged token was rejected: no verified candidate
            assert verified == []
            continue
        (c,) = verified
        assert c.copied_tokens == m
        assert c.token_ids[:m] == al.draft[:m]
        assert c.logprobs[:m] == pytest.approx(logprobs[:m], abs=1e-4)
        assert len(c.logprobs) == len(c.token_ids)
        if m < len(al.draft):
            if m < len(al.draft) - len(engine.tokenizer.encode(JUNK)) and c.token_ids[m : m + 1] == al.draft[m : m + 1]:
                # inside the model's own greedy text: a near tie that the prompt path (score) and the
                # decode path (generate, int8 cache) rank the other way round; not a rejected copy
                continue
            checked += 1
            assert c.token_ids[m : m + 1] != al.draft[m : m + 1]  # cut: the rejected token is gone
            assert c.source == ("lookup:line+model" if len(c.token_ids) > m else "lookup:line")
    assert checked > 0, "no prefix gave a partly accepted draft"


def test_greedy_agreement_is_lossless(engine) -> None:  # type: ignore[no-untyped-def]
    """With min_accept_p > 0.5 a lookup candidate is exactly the greedy continuation, cheaper."""
    prefix = CODE + "config)\n    return config\n\n\ndef other(argv):\n    config = read_config(argv[1])\n    print("
    prompt = engine.tokenizer.encode(prefix)
    engine.forward(prompt, "lossless")
    fed = engine.tokens_fed
    plain = engine.generate(prompt, doc_key="lossless", temperature=0, max_new_tokens=16, stop=newline_stop)
    plain_fed = engine.tokens_fed - fed
    text = plain.candidates[0].text
    assert text, "the model ends the line at once"
    engine.forward(prompt, "lossless")
    fed = engine.tokens_fed
    cands = propose(
        engine,
        prompt,
        prefix,
        "",
        {},
        ProposeOptions(
            doc_key="lossless",
            stop=newline_stop,
            cancel=None,
            max_new_tokens=16,
            min_accept_p=1.0,
            find=DraftOptions(multiline=False),
        ),
        drafts=[Draft(text, "lookup:line", "test", 1)],
    )
    al = align_draft(engine, prompt, text)
    assert al is not None
    assert not al.healed, "token healing at the cursor would change the greedy path"
    (c,) = cands
    assert c.text == text
    assert c.source == "lookup:line"  # fully accepted, the line end too: no model steps
    assert engine.tokens_fed - fed <= plain_fed


def test_propose_uses_found_drafts(engine) -> None:  # type: ignore[no-untyped-def]
    prefix, suffix = split(DOC)
    prompt = engine.tokenizer.encode(prefix)
    cands = propose(
        engine,
        prompt,
        prefix,
        suffix,
        {},
        ProposeOptions(
            doc_key="p",
            stop=newline_stop,
            cancel=None,
            max_new_tokens=12,
            min_accept_p=0.0,
            find=DraftOptions(multiline=False),
        ),
    )
    assert cands, "min_accept_p=0 keeps every draft"
    assert cands[0].text.startswith("ute(gamma, ctx)")
    for c in cands:
        assert c.source.startswith("lookup:line")
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
        assert "\n" not in c.text
    with pytest.raises(Cancelled):
        propose(
            engine,
            prompt,
            prefix,
            suffix,
            {},
            ProposeOptions(
                doc_key="p",
                stop=newline_stop,
                cancel=lambda: True,
                max_new_tokens=12,
                find=DraftOptions(multiline=False),
            ),
        )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    doc=st.text(alphabet=st.sampled_from(list("ab_x(). :=\n\t#é")), max_size=120),
    pos=st.integers(0, 120),
    multiline=st.booleans(),
    accept=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_propose_never_crashes(
    engine,
    doc: str,
    pos: int,
    multiline: bool,  # type: ignore[no-untyped-def]
    accept: float,
) -> None:
    pos = min(pos, len(doc))
    prefix, suffix = doc[:pos], doc[pos:]
    prompt = engine.tokenizer.encode(prefix) or [engine.eos_id]
    cands = propose(
        engine,
        prompt,
        prefix,
        suffix,
        {"file:///o.py": doc},
        ProposeOptions(
            doc_key="h",
            stop=None if multiline else newline_stop,
            cancel=None,
            max_new_tokens=6,
            min_accept_p=accept,
            find=DraftOptions(multiline=multiline),
        ),
    )
    for c in cands:
        assert c.text.strip()
        assert len(c.logprobs) == len(c.token_ids) <= 6
