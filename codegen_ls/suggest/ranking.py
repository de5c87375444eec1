"""Ranking: one score for candidates from every source (greedy, samples, lookup drafts).

score      = mean token log-prob (length-normalised model confidence)
             - structure penalties + agreement bonus + a small length bonus
confidence = exp(mean log-prob - penalties + agreement bonus), at most ``MAX_CONFIDENCE``

Structure (Python): the code before the cursor + the completed line (+ the following lines when
they parsed before) must parse or be a valid *incomplete* prefix (``codeop``'s
``PyCF_ALLOW_INCOMPLETE_INPUT``: unclosed brackets, a block without its body, an open string
are fine; ``x = )`` or ``for x in y`` without ``:`` are not); a cursor line too long to be read
whole (:attr:`Context.line_cut`) is not parsed. Any language: closing brackets that
match nothing, lines repeated inside the suggestion, decoding loops, and text that only repeats
what follows the cursor are penalised. Candidates equal up to whitespace are merged; each extra
vote raises the score and the confidence a little (samples agreeing with greedy is evidence).

Penalties and bonuses are in the units of the mean log-prob (nats per token).
"""

from __future__ import annotations

import ast
import codeop
import math
import re
import warnings
from dataclasses import dataclass, field

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
# Lookup drafts (text copied from this project, scored by the model) against the model's own guesses.
# Held-out eval (benchmarks/eval_completion.py, N=200): exact match 10.0 / 14.0 / 21.5 / 25.5 / 27.0 %
# for a score prior of 0 / 1 / 2.5 / 5 / 10 nats: with the small embedded model, a draft from the
# document beats its own guesses nearly always; among drafts, the model's log-prob decides.
LOOKUP_PRIOR = 10.0  # added to the ranking score of lookup drafts
LOOKUP_CONFIDENCE_PRIOR = 1.0  # added to their log-prob for confidence (36 % vs 9 % exact when shown)
MAX_CONFIDENCE = 0.99  # a model is never certain; minConfidence 1 therefore shows nothing
PARSE_LINES = 60  # lines before the cursor line that the syntax check looks at
MIN_REPEAT_CHARS = 6  # shorter lines (``)``, ``pass``, ``else:``) may legitimately repeat

# codeop's compile flags (not in typeshed): an unfinished statement is "incomplete input", not an error.
_FLAGS = getattr(codeop, "PyCF_ALLOW_INCOMPLETE_INPUT", 0x4000) | getattr(codeop, "PyCF_DONT_IMPLY_DEDENT", 0x200) | ast.PyCF_ONLY_AST
_LOOP = re.compile(r"(.{%d,%d}?)\1\1" % (LOOP_MIN, LOOP_MAX), re.DOTALL)


@dataclass
class Item:
    """A cleaned candidate: the text to insert and the model's log-probs of its tokens."""

    text: str
    logprobs: list[float]
    source: str
    finish_reason: str = ""
    truncated: bool = False
    reindented: bool = False  # see postprocess.Cleaned

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


def normalize(text: str) -> str:
    """Key for merging duplicates: whitespace runs collapsed, blank lines dropped."""
    return "\n".join(" ".join(ln.split()) for ln in text.splitlines() if ln.strip())


def rank(items: list[Item], ctx: Context, mode: str, language_id: str = "python") -> list[Ranked]:
    """Deduplicated candidates, best first."""
    python = language_id == "python"
    check = SyntaxCheck(ctx) if python else None
    before = brackets_before(ctx, python)
    groups: dict[str, list[Ranked]] = {}
    for it in items:
        text = it.text.replace("\r\n", "\n")
        partial = mode == "single" and it.finish_reason in ("length", "deadline")
        pen = structure_penalty(text, ctx, mode, python, partial, check, before) + DEDENT_PENALTY * it.reindented
        mean = it.logprob_mean
        prior = it.source.startswith("lookup") and pen == 0  # a draft that breaks the code loses it
        score = mean - pen + LENGTH_BONUS * math.log1p(len(it.logprobs)) + LOOKUP_PRIOR * prior
        groups.setdefault(normalize(text), []).append(
            Ranked(it.text, it.source, score, 0.0, mean, it.finish_reason, pen, 1, [it.source]))
    out = []
    for group in groups.values():
        best = max(group, key=lambda r: r.score)
        best.votes = len(group)
        best.sources = sorted({s for r in group for s in r.sources})
        bonus = AGREEMENT_BONUS * min(MAX_VOTES, best.votes - 1)
        best.score += bonus
        lift = LOOKUP_CONFIDENCE_PRIOR if any(src.startswith("lookup") for src in best.sources) else 0.0
        best.confidence = min(MAX_CONFIDENCE, math.exp(min(0.0, best.logprob_mean - best.penalty + bonus + lift)))
        out.append(best)
    out.sort(key=lambda r: r.score, reverse=True)
    return out


def structure_penalty(text: str, ctx: Context, mode: str, python: bool = True, partial: bool = False,
                      check: SyntaxCheck | None = None, before: Brackets | None = None) -> float:
    """Sum of the structure penalties for inserting ``text`` at the cursor.

    ``check`` and ``before`` depend only on the context: pass them to share them between candidates.
    """
    pen = 0.0
    if python:
        check = check or SyntaxCheck(ctx)
        if check.is_error(text, partial):
            pen += SYNTAX_ERROR_PENALTY
    closers = new_unmatched_closers(ctx, text, python, before)
    pen += BRACKET_PENALTY * min(MAX_BRACKET_PENALTIES, closers)
    pen += REPEAT_PENALTY * repeated_lines(text)
    if _LOOP.search(text[:400]):
        pen += LOOP_PENALTY
    if duplicates_following(ctx, text, mode):
        pen += DUPLICATE_PENALTY
    return pen


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
    """"ok" | "incomplete" | "error" | "unknown" for Python source (parsing only, no bytecode)."""
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
    starts = [i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith(("#", ")", "]", "}", "\"", "'"))]
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
            out.append(ln[len(margin):])
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
        self.usable = (not ctx.line_cut and self.before is not None
                       and classify(self.before) in ("ok", "incomplete"))
        self.following = self._following()
        self.with_following = False
        if self.usable and self.following:
            original = self._dedent_line(ctx.line_prefix + ctx.line_suffix)
            self.with_following = original is not None and classify(
                f"{self.before}{original}\n{self.following}") in ("ok", "incomplete")

    def _dedent_line(self, text: str) -> str | None:
        if not text.strip() and "\n" not in text:
            return ""
        return _dedent(text, self.margin)

    def _following(self) -> str:
        lines = []
        for ln in self.ctx.next_lines:
            if ln.strip() and not ln.startswith(self.margin):
                break
            lines.append(ln[len(self.margin):] if ln.strip() else "")
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


__all__ = ["Item", "Ranked", "rank", "normalize", "structure_penalty", "classify", "SyntaxCheck",
           "repeated_lines", "duplicates_following", "new_unmatched_closers", "brackets_before"]
