"""Ranking: one probability for candidates from every source (greedy, samples, lookup drafts).

Candidates equal up to whitespace are merged (each extra vote is evidence: samples agreeing
with greedy, a copy the model also wrote). Each group is described by :func:`features` -- its
source, the model's log-probs, length, the structure checks below, how a copied draft matched and
what the model thought of it, identifiers new to the context, the votes -- and the calibrated
confidence model (:mod:`codegen_ls.suggest.confidence`) turns them into the probability that it
is exactly right. That probability orders the candidates (so evidence, not a constant, decides
between a copy and the model's own text) and is their ``confidence``; ``score`` is its log-odds.
Without coefficients (none readable) the order falls back to the earlier rule, the heuristic score
below, and the confidence to exp(mean log-prob - penalties), uncalibrated:

heuristic score = mean token log-prob - structure penalties + agreement bonus + a small length bonus
                  + LOOKUP_PRIOR for a copy that breaks nothing

Structure (Python): the code before the cursor + the completed line (+ the following lines when
they parsed before) must parse or be a valid *incomplete* prefix (``codeop``'s
``PyCF_ALLOW_INCOMPLETE_INPUT``: unclosed brackets, a block without its body, an open string
are fine; ``x = )`` or ``for x in y`` without ``:`` are not); a cursor line too long to be read
whole (:attr:`Context.line_cut`) is not parsed. Any language: closing brackets that
match nothing, lines repeated inside the suggestion, decoding loops, and text that only repeats
what follows the cursor are penalised.

Penalties and bonuses are in the units of the mean log-prob (nats per token).
"""

from __future__ import annotations

import ast
import codeop
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from codegen_ls.suggest.confidence import MAX_CONFIDENCE, ConfidenceModel
from codegen_ls.suggest.context import Context
from codegen_ls.suggest.postprocess import Brackets, leading_ws, scan_brackets

SYNTAX_ERROR_PENALTY = 1.5  # the completed code is no longer a valid (possibly incomplete) program
BRACKET_PENALTY = 0.5  # per new closing bracket that matches nothing ...
MAX_BRACKET_PENALTIES = 3  # ... counted up to this many
REPEAT_PENALTY = 0.5  # per line that occurs again inside the suggestion
LOOP_PENALTY = 1.0  # a chunk of LOOP_MIN..LOOP_MAX characters three times in a row (decoding loop)
LOOP_MIN, LOOP_MAX = 8, 40
DUPLICATE_PENALTY = 1.0  # the suggestion re-types code that follows the cursor
DEDENT_PENALTY = 1.0  # the model indented less than the user had typed (it meant another block)
AGREEMENT_BONUS = 0.15  # per extra candidate with the same text (self-consistency) ...
MAX_VOTES = 3  # ... counted up to this many extra votes
LENGTH_BONUS = 0.05  # x ln(1 + tokens), score only: between similar candidates prefer the longer
EMPTY_LOGPROB = -5.0  # mean log-prob assumed for a candidate without any (never expected)
PARSE_LINES = 60  # lines before the cursor line that the syntax check looks at
MIN_REPEAT_CHARS = 6  # shorter lines (``)``, ``pass``, ``else:``) may legitimately repeat
CONTEXT_IDENT_CHARS = 20_000  # text before the cursor whose identifiers count as known
LP_FLOOR = -15.0  # log-prob features are clipped here (one absurd token should not dominate)
COPY_SOURCES = ("lookup:line", "lookup:doc", "lookup:repo", "lookup:ngram")
LOOKUP_PRIOR = 10.0  # the fallback's constant preference for copies (stdlib eval: 10.0 -> 27.0 % exact vs 0 -> 10.0 %)
LOOKUP_CONFIDENCE_PRIOR = 1.0  # ... and its lift of their confidence

# codeop's compile flags (not in typeshed): an unfinished statement is "incomplete input", not an error.
_FLAGS = (
    getattr(codeop, "PyCF_ALLOW_INCOMPLETE_INPUT", 0x4000)
    | getattr(codeop, "PyCF_DONT_IMPLY_DEDENT", 0x200)
    | ast.PyCF_ONLY_AST
)
_LOOP = re.compile(r"(.{%d,%d}?)\1\1" % (LOOP_MIN, LOOP_MAX), re.DOTALL)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = frozenset(
    (
        "False None True and as assert async await break class continue def del elif else except "
        "finally for from global if import in is lambda nonlocal not or pass raise return try while "
        "with yield self"
    ).split()
)


@dataclass
class Item:
    """A cleaned candidate: the text to insert and the model's log-probs of its tokens."""

    text: str
    logprobs: list[float]
    source: str
    finish_reason: str = ""
    truncated: bool = False
    reindented: bool = False  # see postprocess.Cleaned
    # a lookup draft's evidence (drafts.DraftCandidate); zeros for the model's own candidates
    distance: int = 0
    agree: int = 0
    draft_tokens: int = 0
    copied_tokens: int = 0
    rejected: int = 0
    origin: str = ""

    @property
    def logprob_mean(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else EMPTY_LOGPROB


@dataclass
class Ranked:
    text: str
    source: str
    score: float
    confidence: float
    logprob_mean: float
    finish_reason: str
    penalty: float = 0.0
    votes: int = 1
    sources: list[str] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)
    origin: str = ""


@dataclass
class _Judged:
    item: Item
    text: str
    parts: dict[str, float]  # structure checks
    penalty: float
    score: float  # heuristic


def normalize(text: str) -> str:
    """Key for merging duplicates: whitespace runs collapsed, blank lines dropped."""
    return "\n".join(" ".join(ln.split()) for ln in text.splitlines() if ln.strip())


def rank(
    items: list[Item], ctx: Context, mode: str, language_id: str = "python", model: ConfidenceModel | None = None
) -> list[Ranked]:
    """Deduplicated candidates, most likely right first (see the module docstring)."""
    python = language_id == "python"
    check = SyntaxCheck(ctx) if python else None
    before = brackets_before(ctx, python)
    known = context_identifiers(ctx)
    groups: dict[str, list[_Judged]] = {}
    for it in items:
        text = it.text.replace("\r\n", "\n")
        partial = mode == "single" and it.finish_reason in ("length", "deadline")
        parts = structure_parts(text, ctx, mode, python, partial, check, before)
        pen = penalty_of(parts) + DEDENT_PENALTY * it.reindented
        score = it.logprob_mean - pen + LENGTH_BONUS * math.log1p(len(it.logprobs))
        groups.setdefault(normalize(text), []).append(_Judged(it, text, parts, pen, score))
    out = []
    for group in groups.values():
        copies = [j for j in group if j.item.source.startswith(COPY_SOURCES)]
        rep = max(copies or group, key=lambda j: j.score)  # a copy represents the group: its evidence
        sources = sorted({j.item.source for j in group})
        votes = len(group)
        bonus = AGREEMENT_BONUS * min(MAX_VOTES, votes - 1)
        feats = features(rep, group, ctx, mode, known)
        out.append(
            Ranked(
                rep.item.text,
                rep.item.source,
                rep.score + bonus,
                0.0,
                rep.item.logprob_mean,
                rep.item.finish_reason,
                rep.penalty,
                votes,
                sources,
                feats,
                rep.item.origin,
            )
        )
    if model is not None and out:
        logits = model.logit(np.stack([model.vector(r.features) for r in out]))
        for r, z in zip(out, logits):
            r.score = float(z)
            r.confidence = min(MAX_CONFIDENCE, 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, float(z))))))
    else:  # the earlier, uncalibrated rule
        for r in out:
            bonus = AGREEMENT_BONUS * min(MAX_VOTES, r.votes - 1)
            copy = any(src.startswith(COPY_SOURCES) for src in r.sources)
            r.score += LOOKUP_PRIOR * (r.source.startswith(COPY_SOURCES) and r.penalty == 0)
            r.confidence = min(
                MAX_CONFIDENCE, math.exp(min(0.0, r.logprob_mean - r.penalty + bonus + LOOKUP_CONFIDENCE_PRIOR * copy))
            )
    out.sort(key=lambda r: r.score, reverse=True)
    return out


def context_identifiers(ctx: Context) -> frozenset[str]:
    """Identifiers in the text around the cursor (what a suggestion's names are checked against)."""
    return frozenset(_IDENT.findall(ctx.prefix[-CONTEXT_IDENT_CHARS:])) | frozenset(_IDENT.findall(ctx.suffix))


def features(rep: _Judged, group: list[_Judged], ctx: Context, mode: str, known: frozenset[str]) -> dict[str, float]:
    """The evidence about one merged candidate, by :data:`confidence.FEATURES` name."""
    it = rep.item
    base = it.source.split("+")[0]
    lps = [max(LP_FLOOR, x) for x in it.logprobs] or [EMPTY_LOGPROB]
    mean, low = sum(lps) / len(lps), min(lps)
    copy = base in COPY_SOURCES
    sources = {j.item.source.split("+")[0] for j in group}
    first = rep.text.split("\n", 1)[0]
    names = [w for w in _IDENT.findall(first) if w not in _KEYWORDS]
    new = sum(1 for w in names if w not in known)
    return {
        "src_sample": float(base == "sample"),
        "src_line": float(base == "lookup:line"),
        "src_doc": float(base == "lookup:doc"),
        "src_repo": float(base == "lookup:repo"),
        "src_ngram": float(base == "lookup:ngram"),
        "model_continued": float("+model" in it.source),
        "votes": float(min(MAX_VOTES, len(group) - 1)),
        "has_greedy": float("greedy" in sources),
        "mixed_votes": float(bool(sources & set(COPY_SOURCES)) and bool(sources & {"greedy", "sample"})),
        "lp_mean": mean,
        "lp_min": low,
        "lp_first": lps[0],
        "lp_mean_copy": mean if copy else 0.0,
        "lp_min_copy": low if copy else 0.0,
        "tokens_log": math.log1p(len(it.logprobs)),
        "chars_log": math.log1p(len(first.strip())),
        "syntax_error": rep.parts["syntax_error"],
        "closers": rep.parts["closers"],
        "repeats": rep.parts["repeats"],
        "reindented": float(it.reindented),
        "partial": float(it.finish_reason in ("length", "deadline")),
        "distance_log": math.log1p(it.distance) if copy else 0.0,
        "agree": it.agree / 64 if copy else 0.0,
        "copied_frac": it.copied_tokens / max(1, it.draft_tokens) if copy else 0.0,
        "rejected": float(min(5, it.rejected)),
        "idents_new": float(min(5, new)),
        "idents_shared": float(min(5, len(names) - new)),
        "multi": float(mode == "multi"),
        "blank_prefix": float(not ctx.line_prefix.strip()),
    }


def structure_parts(
    text: str,
    ctx: Context,
    mode: str,
    python: bool = True,
    partial: bool = False,
    check: SyntaxCheck | None = None,
    before: Brackets | None = None,
) -> dict[str, float]:
    """The structure checks of inserting ``text`` at the cursor: syntax error (0/1), new unmatched
    closers (up to MAX_BRACKET_PENALTIES), repetition (repeated lines, a decoding loop, re-typing
    what follows the cursor)."""
    error = 0.0
    if python:
        check = check or SyntaxCheck(ctx)
        error = float(check.is_error(text, partial))
    closers = float(min(MAX_BRACKET_PENALTIES, new_unmatched_closers(ctx, text, python, before)))
    repeats = (
        REPEAT_PENALTY * repeated_lines(text)
        + LOOP_PENALTY * bool(_LOOP.search(text[:400]))
        + DUPLICATE_PENALTY * duplicates_following(ctx, text, mode)
    )
    return {"syntax_error": error, "closers": closers, "repeats": float(repeats)}


def penalty_of(parts: dict[str, float]) -> float:
    return SYNTAX_ERROR_PENALTY * parts["syntax_error"] + BRACKET_PENALTY * parts["closers"] + parts["repeats"]


def structure_penalty(
    text: str,
    ctx: Context,
    mode: str,
    python: bool = True,
    partial: bool = False,
    check: SyntaxCheck | None = None,
    before: Brackets | None = None,
) -> float:
    """Sum of the structure penalties for inserting ``text`` at the cursor.

    ``check`` and ``before`` depend only on the context: pass them to share them between candidates.
    """
    return penalty_of(structure_parts(text, ctx, mode, python, partial, check, before))


def repeated_lines(text: str) -> int:
    """How many lines (of MIN_REPEAT_CHARS or more) occur again inside ``text``."""
    seen: set[str] = set()
    n = 0
    for ln in text.splitlines():
        s = ln.strip()
        if len(s) >= MIN_REPEAT_CHARS:
            n += s in seen
            seen.add(s)
    return n


def duplicates_following(ctx: Context, text: str, mode: str) -> bool:
    """The suggestion contains code that is already after the cursor."""
    rest = ctx.line_suffix.strip().rstrip(")]};:")  # the closers alone are fitted by postprocess
    if len(rest) >= 3 and any(ch.isalnum() for ch in rest) and rest in text:
        return True
    following = {ln.strip() for ln in ctx.next_lines if len(ln.strip()) >= MIN_REPEAT_CHARS}
    lines = [ln.strip() for ln in (ctx.line_prefix + text).splitlines()]
    return mode == "multi" and any(ln in following for ln in lines)


def brackets_before(ctx: Context, python: bool = True) -> Brackets:
    """Brackets left open by the lines before the cursor line (from a statement start)."""
    state = scan_brackets(_window_before(ctx)[0], python=python)
    state.quote = ""  # a window starting inside a string would make everything look quoted
    return state


def new_unmatched_closers(ctx: Context, text: str, python: bool = True, before: Brackets | None = None) -> int:
    """Closing brackets matching nothing that the suggestion adds to the cursor line."""
    state = before or brackets_before(ctx, python)
    base = scan_brackets(ctx.line_prefix + ctx.line_suffix, _copy(state), python).unmatched
    with_text = scan_brackets(ctx.line_prefix + text + ctx.line_suffix, _copy(state), python).unmatched
    return max(0, with_text - base)


def _copy(b: Brackets) -> Brackets:
    return Brackets(list(b.stack), b.unmatched, b.quote)


def classify(source: str) -> str:
    """ "ok" | "incomplete" | "error" | "unknown" for Python source (parsing only, no bytecode)."""
    return _parse(source)[0]


def _parse(source: str) -> tuple[str, int]:
    """(classification, line of the error or 0)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, "<completion>", "exec", _FLAGS)
        return "ok", 0
    except SyntaxError as exc:
        msg = str(exc.msg or "")
        if "incomplete input" in msg:
            return "incomplete", 0
        if exc.lineno is None or "null bytes" in msg:
            return "unknown", 0
        return "error", exc.lineno
    except (ValueError, MemoryError, RecursionError, OverflowError):
        return "unknown", 0


def _window_before(ctx: Context) -> tuple[str, str]:
    """(the last PARSE_LINES lines before the cursor line from a statement start, their margin)."""
    before = ctx.prefix[: max(0, len(ctx.prefix) - len(ctx.line_prefix))].replace("\r\n", "\n").replace("\r", "\n")
    lines = before.split("\n")[:-1][-PARSE_LINES:]
    starts = [
        i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith(("#", ")", "]", "}", '"', "'"))
    ]
    if not starts:
        return "", ""
    start = min(starts, key=lambda i: (len(leading_ws(lines[i])), i))
    return "\n".join(lines[start:]) + "\n", leading_ws(lines[start])


def _dedent(text: str, margin: str) -> str | None:
    """``text`` with ``margin`` removed from every non-blank line; None if a line lacks it."""
    if not margin:
        return text
    out = []
    for ln in text.split("\n"):
        if not ln.strip():
            out.append("")
        elif ln.startswith(margin):
            out.append(ln[len(margin) :])
        else:
            return None
    return "\n".join(out)


class SyntaxCheck:
    """Does inserting a suggestion turn valid-or-incomplete Python into a syntax error?"""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        before, self.margin = _window_before(ctx)
        self.before = _dedent(before, self.margin) if before else ""
        # A cut cursor line (see context.line_cut) starts mid-line: nothing to parse.
        self.usable = not ctx.line_cut and self.before is not None and classify(self.before) in ("ok", "incomplete")
        self.following = self._following()
        self.with_following = False
        if self.usable and self.following:
            original = self._dedent_line(ctx.line_prefix + ctx.line_suffix)
            self.with_following = original is not None and classify(f"{self.before}{original}\n{self.following}") in (
                "ok",
                "incomplete",
            )

    def _dedent_line(self, text: str) -> str | None:
        if not text.strip() and "\n" not in text:
            return ""
        return _dedent(text, self.margin)

    def _following(self) -> str:
        lines = []
        for ln in self.ctx.next_lines:
            if ln.strip() and not ln.startswith(self.margin):
                break
            lines.append(ln[len(self.margin) :] if ln.strip() else "")
        return "\n".join(lines)

    def is_error(self, text: str, partial: bool = False) -> bool:
        if not self.usable:
            return False
        completed = self._dedent_line(self.ctx.line_prefix + text.replace("\r\n", "\n") + self.ctx.line_suffix)
        if completed is None:  # the suggestion dedents below the checked window
            return False
        assert self.before is not None
        if self.with_following and not partial:
            return classify(f"{self.before}{completed}\n{self.following}") == "error"
        if partial:  # an unfinished line may be anything so far: only errors before it count
            source = self.before + completed
            kind, lineno = _parse(source)
            return kind == "error" and lineno < source.count("\n") + 1
        return classify(self.before + completed + "\n") == "error"


__all__ = [
    "Item",
    "Ranked",
    "rank",
    "features",
    "normalize",
    "structure_penalty",
    "structure_parts",
    "classify",
    "SyntaxCheck",
    "repeated_lines",
    "duplicates_following",
    "new_unmatched_closers",
    "brackets_before",
]
