"""Ranking: duplicates merged, features, the calibrated model's order and confidence (heuristic without one)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from codegen_ls.suggest import postprocess, ranking
from codegen_ls.suggest.confidence import FEATURES, ConfidenceModel
from codegen_ls.suggest.context import ContextOptions, build_context, line_window
from codegen_ls.suggest.mode import decide_mode
from codegen_ls.suggest.postprocess import clean
from codegen_ls.suggest.ranking import (
    AGREEMENT_BONUS,
    MAX_CONFIDENCE,
    SYNTAX_ERROR_PENALTY,
    Item,
    SyntaxCheck,
    classify,
    normalize,
    rank,
    repeated_lines,
    structure_penalty,
)
from helpers import COUNTER, ctx_of

CLASS = """import os


class Store:
    def __init__(self, root):
        self.root = root
        self.items = {}

    def get(self, key, default=None):
        |
        return value
"""


def test_classify() -> None:
    assert classify("x = 1\n") == "ok"
    assert classify("x = foo(a,\n") == "incomplete"
    assert classify("def f():\n") == "incomplete"
    assert classify('s = """doc\n') == "incomplete"
    assert classify("x = )\n") == "error"
    assert classify("for x in y\n") == "error"
    assert classify("x = 1\nreturn x\n") == "ok"  # parsing only: a body out of its function is fine
    assert classify("a\x00b") == "unknown"


def test_syntax_errors_are_penalised_valid_prefixes_are_not() -> None:
    ctx = ctx_of("def f(items):\n    total = sum(|\n")
    check = SyntaxCheck(ctx)
    assert not check.is_error("items)")
    assert not check.is_error("x for x in items")  # still open: an incomplete prefix
    assert check.is_error("items))")
    assert check.is_error("items) +")


def test_syntax_check_inside_an_indented_body() -> None:
    ctx = ctx_of(CLASS)
    check = SyntaxCheck(ctx)
    assert check.usable
    assert not check.is_error("value = self.items.get(key, default)")
    assert not check.is_error(
        "if key in self.items:\n            value = self.items[key]\n        else:\n            value = default"
    )
    assert check.is_error("value = = 1")
    assert check.is_error("if key in self.items")  # a finished line without its colon


def test_unfinished_line_is_judged_only_before_its_end() -> None:
    ctx = ctx_of("x = 1\n|\n")
    check = SyntaxCheck(ctx)
    assert check.is_error("for i in range(3)") and not check.is_error("for i in range(3)", partial=True)


def test_window_starting_inside_a_string_is_not_judged() -> None:
    ctx = ctx_of('    is the rest of a docstring\n    """\n|\n')
    assert not SyntaxCheck(ctx).is_error("x = = 1") or not SyntaxCheck(ctx).usable


def test_structure_penalties() -> None:
    ctx = ctx_of("x = compute(|)\n")
    assert structure_penalty("1, 2", ctx, "single") == 0
    assert structure_penalty("1, 2))", ctx, "single") >= SYNTAX_ERROR_PENALTY  # unmatched closer
    assert repeated_lines("a = f(1)\nb = 2\na = f(1)\n") == 1
    loop = ctx_of("x = |\n")
    assert structure_penalty("self.check(self.check(self.check(self.check(", loop, "single", partial=True) > 0
    dup = ctx_of("print(|, sep='')\n")
    assert structure_penalty("value, sep=''", dup, "single") > 0  # re-types what follows the cursor


def test_merge_duplicates_and_order() -> None:
    ctx = ctx_of("x = compute(|)\n")
    items = [
        Item("1, 2", [-0.5, -0.7], "greedy"),
        Item("1,  2", [-0.9, -0.9], "sample"),  # the same up to whitespace
        Item("1, 2))", [-0.1, -0.1], "sample"),  # likelier but breaks the code
        Item("3", [-1.0], "sample"),
    ]
    ranked = rank(items, ctx, "single")
    assert [r.text for r in ranked][0] == "1, 2"
    assert len(ranked) == 3 and ranked[0].votes == 2 and ranked[0].sources == ["greedy", "sample"]
    assert ranked[0].logprob_mean == -0.6  # the better duplicate represents the group
    assert math.isclose(ranked[0].confidence, math.exp(-0.6 + AGREEMENT_BONUS))
    assert ranked[-1].text == "1, 2))"
    assert all(0 < r.confidence <= MAX_CONFIDENCE for r in ranked)


def test_without_coefficients_the_earlier_rule_orders() -> None:
    ctx = ctx_of("x = compute(|)\n")
    items = [
        Item("1, 2", [-0.2, -0.2], "greedy"),
        Item("a, b", [-3.0, -3.0], "lookup:line"),
        Item("c, d", [-1.0, -1.0], "lookup:doc"),
    ]
    ranked = rank(items, ctx, "single")
    assert [r.text for r in ranked] == ["c, d", "a, b", "1, 2"]  # LOOKUP_PRIOR, then the model's log-probs
    assert ranked[1].confidence < ranked[2].confidence  # confidence stays tied to the log-probs


def _model(weights: dict[str, float], bias: float = 0.0) -> ConfidenceModel:
    names = FEATURES
    return ConfidenceModel(
        names, np.zeros(len(names)), np.ones(len(names)), np.array([weights.get(n, 0.0) for n in names]), bias
    )


def test_the_confidence_model_ranks_by_evidence_and_its_probability_is_the_confidence() -> None:
    ctx = ctx_of("x = compute(|)\n")
    items = [
        Item("1, 2", [-0.2, -0.2], "greedy"),
        Item("a, b", [-3.0, -3.0], "lookup:line", distance=2, agree=40, draft_tokens=3, copied_tokens=3),
        Item("c, d", [-1.0, -1.0], "lookup:doc", draft_tokens=3, copied_tokens=3, rejected=2),
    ]
    # a copy from this document counts for much, rejected tokens against
    model = _model({"src_line": 3.0, "src_doc": 1.0, "rejected": -2.0, "lp_mean": 0.5}, bias=-1.0)
    ranked = rank(items, ctx, "single", model=model)
    assert [r.text for r in ranked] == ["a, b", "1, 2", "c, d"]
    f = ranked[0].features
    assert f["src_line"] == 1.0 and f["agree"] == 40 / 64 and f["distance_log"] == math.log1p(2)
    assert ranked[2].features["rejected"] == 2.0
    for r in ranked:
        z = float(model.logit(model.vector(r.features)[None, :])[0])
        assert math.isclose(r.score, z) and math.isclose(r.confidence, min(MAX_CONFIDENCE, 1 / (1 + math.exp(-z))))


def test_features_describe_votes_identifiers_and_structure() -> None:
    ctx = ctx_of("total = compute(values|)\n")
    items = [
        Item(", scale)", [-0.5, -0.5], "greedy"),
        Item(", scale)", [-0.6, -0.6], "lookup:line", draft_tokens=3, copied_tokens=3),
        Item(", unknown_name))", [-0.1], "sample"),
    ]
    ranked = rank(items, ctx, "single")
    merged = next(r for r in ranked if r.votes == 2)
    assert merged.source == "lookup:line"  # the copy represents the group: its evidence
    assert merged.features["votes"] == 1 and merged.features["mixed_votes"] == 1 and merged.features["has_greedy"] == 1
    other = next(r for r in ranked if r.votes == 1)
    assert other.features["idents_new"] == 1 and merged.features["idents_new"] == 1  # names the context lacks
    assert ranking.features is not None and merged.features["idents_shared"] == 0
    assert other.features["closers"] >= 1


def test_confidence_never_reaches_one() -> None:
    ctx = ctx_of("x = |\n")
    ranked = rank([Item("1", [0.0], "greedy"), Item("1", [0.0], "sample")], ctx, "single")
    assert ranked[0].confidence == MAX_CONFIDENCE < 1.0


def test_normalize() -> None:
    assert normalize("a  =  1\n\n   b\t= 2  ") == normalize("a = 1\n    b = 2")


def test_other_languages_skip_the_python_check() -> None:
    ctx = ctx_of("let x = compute(|);\n")
    ranked = rank([Item("1, 2", [-1.0], "greedy"), Item("1, 2))", [-1.0], "sample")], ctx, "single", "javascript")
    assert ranked[0].text == "1, 2" and ranked[1].penalty > 0


def test_a_huge_line_is_scanned_and_parsed_in_a_bounded_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cleaning and ranking look at the cut cursor line only, not the whole 1.3 MB line (issue 7)."""
    counted = {"scan": 0, "parse": 0}
    scan, parse = postprocess.scan_brackets, ranking._parse

    def counting_scan(text: str, *args: Any, **kw: Any) -> postprocess.Brackets:
        counted["scan"] += len(text)
        return scan(text, *args, **kw)

    def counting_parse(source: str) -> tuple[str, int]:
        counted["parse"] += len(source)
        return parse(source)

    monkeypatch.setattr(postprocess, "scan_brackets", counting_scan)
    monkeypatch.setattr(ranking, "scan_brackets", counting_scan)
    monkeypatch.setattr(ranking, "_parse", counting_parse)
    line = "total = compute(" + ", ".join(f"a{i}" for i in range(160_000))  # 1.3 MB
    text = line + ", )\n"
    budget = 512
    ctx = build_context(text, 0, len(line) + 2, COUNTER, budget, ContextOptions(bos_text="<|endoftext|>"))
    assert ctx.line_cut > 0 and ctx.line_suffix == ")"
    mode = decide_mode(ctx)[0]
    raws = ["a160000)", "a160000, b)", "a160000))", "a160000) + 1"]
    cleaned = [clean(raw, ctx, mode) for raw in raws]
    assert [c.text if c else None for c in cleaned] == ["a160000", "a160000, b", "a160000", "a160000"]
    items = [Item(c.text, [-0.5], "greedy") for c in cleaned if c] + [Item("a160000))", [-0.1], "sample")]
    ranked = rank(items, ctx, mode)
    assert not SyntaxCheck(ctx).usable  # a cut line starts mid-line: not parsed
    assert ranked[0].text == "a160000" and ranked[0].votes == 3
    assert ranked[-1].text == "a160000))" and ranked[-1].penalty > 0  # the unmatched closers still count
    window = line_window(budget)
    assert counted["scan"] <= 10 * len(raws) * window and counted["parse"] <= 2 * window
    assert counted["scan"] < len(line) // 10
