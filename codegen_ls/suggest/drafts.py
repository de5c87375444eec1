"""Candidates from the code around the cursor: lookup drafts, verified by the model.

This module finds the drafts (text only); :mod:`codegen_ls.suggest.verify` checks them against the
model (:func:`~codegen_ls.suggest.verify.propose`). The rules of both are described here.

A small model cannot know a project's own names; the document it is completing does. This module
finds *drafts* -- continuations copied from text that looks like the text before the cursor -- and
lets the model judge them (speculative decoding with drafts from the context):

Sources (:func:`find_drafts`), each cheap and bounded in time:

``lookup:line``
    other lines of the same document whose text (indentation ignored) starts with the current
    line's text before the cursor, above and below the cursor. The draft is the rest of that line.
``lookup:doc``
    the same in the other open documents.
``lookup:ngram``
    prompt lookup: the last few words of the prefix (8, then 4, then 2 non-space lexemes, so
    possibly spanning lines) found anywhere in the same document; the draft is what followed
    them up to the end of that line.

Ranking within a source (prompt-lookup style): of the ``RERANK`` nearest matches, the one whose
preceding text agrees longest with the text before the cursor (up to ``CONTEXT_CHARS``) first,
then the nearest. Measured on 4,600 random cursors in 37 non-stdlib files (site-packages), the
copied line was exactly the rest of the line for 33% of cursors with a line match, against 28%
for plain nearest-first. In other documents, ties go to the continuation seen most often.

Work is bounded: only a window of ``WINDOW_CHARS`` either side of the cursor and the first
``OTHER_DOC_CHARS`` of each other document are looked at, regular expressions run over chunks of
at most ``CHUNK_CHARS``, and the time budget is checked between chunks; so a lookup overruns its
budget by at most one chunk (well under a millisecond).

Verification (:func:`propose`): each draft is tokenized on top of the prompt and scored in ONE
forward pass (:meth:`Engine.score`). A draft token is accepted while it is the model's greedy
choice *or* its probability is at least ``min_accept_p`` (default ``MIN_ACCEPT_P`` = 0.1, Medusa's
"typical acceptance" floor is 0.09); the second clause is what lets the document teach the model a
name it would not have picked itself, and ``min_accept_p > 0.5`` makes the rule exactly greedy
agreement (then a verified candidate is the text greedy decoding would produce, only cheaper:
speculative decoding). Where the model rejects a token, the draft gives two candidates: the
*verified* one, cut before that token and continued by greedy decoding from the KV cache the
score left behind (source ``+model``; none when the first judged token is rejected, the model's
own greedy candidate covers that), and the draft as copied, which carries how many of its tokens
the model rejected. A fully accepted draft ended a line (or block) of its source, so the line end
after it is judged the same way (the probability of all tokens that start with a line break);
when the model would go on instead, the copy is kept as it is (one more rejected token) beside
the model's continuation. No rule picks between them: :mod:`codegen_ls.suggest.ranking` weighs
the evidence (:class:`DraftCandidate`: distance, context agreement, copied and rejected tokens,
log-probs) with the calibrated confidence model. On CALIB packages this ranking puts a right
candidate first for 31.6 % of cursors against 24.3 % for the earlier constant preference for
copies (``benchmarks/fit_confidence.py``, cross-validated).
"""

from __future__ import annotations

import heapq
import itertools
import re
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from codegen_ls.kinds import Source
from codegen_ls.suggest.repo_snapshot import RepoSnapshot

WINDOW_CHARS = 200_000  # looked at on each side of the cursor (~2500 lines of 80 characters)
OTHER_DOC_CHARS = 2_000_000  # looked at in each other open document (from its start)
CHUNK_CHARS = 16_384  # unit of work between two looks at the clock
MAX_LINE_CHARS = 1_000  # a current line longer than this disables the line sources
MAX_DRAFT_CHARS = 400  # a draft is cut here
MAX_BLOCK_LINES = 16  # lines after the matched one in multi-line mode
CONTEXT_CHARS = 64  # context agreement (characters before the cursor) is measured up to this
RERANK = 16  # nearest matches of a source re-ranked by context agreement
MATCHES_PER_DOC = 64  # matches counted per other document before picking its best continuations
NGRAM_SIZES = (8, 4, 2)  # non-space lexemes at the end of the prefix, longest match first
MIN_NGRAM_CHARS = 3  # non-space characters an n-gram needs to be worth searching
MIN_ACCEPT_P = 0.1  # a draft token below this (and not the greedy choice) is rejected; see the module docstring
HEAL_TOKENS = 8  # prompt tokens re-tokenized together with the draft

REPO_HITS = 64  # repository lines looked at per lookup (their continuations deduplicated, then ranked)
SOURCES = ("lookup:line", "lookup:doc", "lookup:repo", "lookup:ngram")  # Draft.source values, in rank order
_LEXEME = re.compile(r"\w+|[^\w\s]")


@dataclass
class Draft:
    """An unverified continuation copied from the context."""

    text: str  # continuation from the cursor (rest of the line; several lines when multiline)
    source: str  # "lookup:line" | "lookup:doc" | "lookup:ngram"
    origin: str  # for debugging: "URI:-3" / "URI:+2" lines above/below the cursor in the same
    # document, "URI:42" (1-based line) in another document
    distance: int  # lines from the cursor (same document); 0 for other documents
    agree: int = field(default=0, compare=False)  # characters before the copied text equal to those before the cursor


class _Clock:
    def __init__(self, budget_ms: float) -> None:
        self.deadline = time.perf_counter() + max(0.0, budget_ms) / 1000

    def over(self) -> bool:
        return time.perf_counter() > self.deadline


@dataclass
class _Cursor:
    """The current line around the cursor, as far as the lookup needs it."""

    line_start: int  # index in prefix where the current line starts; -1: line too long
    indent: str  # the current line's leading whitespace (before the cursor)
    key: str  # the current line before the cursor, without its indentation
    rest: str  # the current line after the cursor
    next_line: int  # index in suffix where the next line starts; -1: none in the window

    @staticmethod
    def of(prefix: str, suffix: str) -> _Cursor:
        lo = max(0, len(prefix) - MAX_LINE_CHARS)
        nl = prefix.rfind("\n", lo)
        start = nl + 1 if nl != -1 or lo == 0 else -1
        line = prefix[start:] if start >= 0 else ""
        key = line.lstrip(" \t")
        eol = suffix.find("\n", 0, WINDOW_CHARS)
        rest = suffix[: eol if eol != -1 else MAX_LINE_CHARS].rstrip("\r")
        return _Cursor(start, line[: len(line) - len(key)], key, rest, eol + 1 if eol != -1 else -1)


# -- finding drafts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftOptions:
    """Where :func:`find_drafts` looks and how much it keeps."""

    multiline: bool = False  # drafts may run over several lines (joined with ``\n``)
    max_drafts: int = 4
    budget_ms: float = 5.0  # time for the search (checked between chunks of work)
    include_other_documents: bool = True
    include_ngram: bool = True
    include_lines: bool = True
    uri: str = ""  # the document's; only labels ``origin``
    repo: RepoSnapshot | None = None  # the workspace index's snapshot (``lookup:repo``)
    repo_exclude: Collection[str] = ()  # paths the repository source skips: this document and the open ones


def find_drafts(
    prefix: str, suffix: str, other_documents: dict[str, str], options: DraftOptions | None = None
) -> list[Draft]:
    """Drafts for the cursor between ``prefix`` and ``suffix``: deduplicated, best first.

    Order: same-document lines, other documents, repository files (``options.repo``, but not the
    paths in ``options.repo_exclude``), n-grams, each ranked as the module says. When several
    sources found something, each keeps at least one of the ``options.max_drafts`` places
    (diversity for the verifier), the rest go to the sources in that order.
    """
    opts = options or DraftOptions()
    if opts.max_drafts <= 0:
        return []
    cur = _Cursor.of(prefix, suffix)
    found = _distinct_per_source(_sources(prefix, suffix, other_documents, cur, opts), cur, opts)
    picked = {(s, 0) for s, got in enumerate(found) if got}  # one place per source that found any
    for s, got in enumerate(found):
        for i in range(len(got)):
            if len(picked) >= opts.max_drafts:
                break
            picked.add((s, i))
    return [found[s][i] for s, i in sorted(picked)][: opts.max_drafts]


def _sources(
    prefix: str, suffix: str, other_documents: dict[str, str], cur: _Cursor, opts: DraftOptions
) -> list[Iterator[Draft]]:
    """The draft sources the options ask for, in rank order, sharing one clock."""
    clock = _Clock(opts.budget_ms)
    multiline = opts.multiline
    sources: list[Iterator[Draft]] = []
    line_pattern = _line_pattern(cur.key)
    if opts.include_lines and line_pattern is not None:
        sources.append(_same_document_lines(prefix, suffix, cur, line_pattern, multiline, opts.uri, clock))
    if opts.include_other_documents and line_pattern is not None:
        sources.append(_other_documents(prefix, other_documents, cur, line_pattern, multiline, clock))
    if opts.repo is not None and line_pattern is not None:
        sources.append(_repo_lines(prefix, opts.repo, cur, multiline, opts.repo_exclude, clock))
    if opts.include_ngram:
        sources.append(_ngrams(prefix, suffix, cur, multiline, opts.uri, clock))
    return sources


def _distinct_per_source(sources: list[Iterator[Draft]], cur: _Cursor, opts: DraftOptions) -> list[list[Draft]]:
    """Each source's first ``max_drafts`` useful drafts whose text no earlier draft has."""
    seen: set[str] = set()
    found: list[list[Draft]] = []
    for it in sources:  # each source: up to max_drafts new texts, in its own order
        got: list[Draft] = []
        for d in it:
            if d.text in seen or not _useful(d.text, cur, opts.multiline):
                continue
            seen.add(d.text)
            got.append(d)
            if len(got) >= opts.max_drafts:
                break
        found.append(got)
    return found


def lookup_only(
    prefix: str, suffix: str, other_documents: dict[str, str], *, multiline: bool = False, budget_ms: float = 5.0
) -> str | None:
    """The best draft's text, unverified (the evaluation's lookup-only mode); None if none."""
    options = DraftOptions(multiline=multiline, max_drafts=1, budget_ms=budget_ms)
    drafts = find_drafts(prefix, suffix, other_documents, options)
    return drafts[0].text if drafts else None


def _useful(text: str, cur: _Cursor, multiline: bool) -> bool:
    if not text.strip():
        return False
    first = text.split("\n", 1)[0]
    return multiline or first != cur.rest  # re-typing what already follows the cursor adds nothing


def _line_pattern(key: str) -> re.Pattern[str] | None:
    """Lines whose text after the indentation starts with ``key`` (group 1: the indentation)."""
    if not key.strip() or len(key) > MAX_LINE_CHARS:
        return None
    return re.compile(r"^([ \t]*)" + re.escape(key), re.M)


def _chunks(text: str, lo: int, hi: int, reverse: bool, clock: _Clock) -> Iterator[tuple[int, int]]:
    """[start, end) pieces of text[lo:hi] of about CHUNK_CHARS, cut after newlines, in order."""
    if reverse:
        end = hi
        while end > lo and not clock.over():
            start = max(lo, end - CHUNK_CHARS)
            if start > lo:
                nl = text.find("\n", start, end)
                start = nl + 1 if nl != -1 else start
            yield start, end
            end = start
    else:
        start = lo
        while start < hi and not clock.over():
            end = min(hi, start + CHUNK_CHARS)
            if end < hi:
                nl = text.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield start, end
            start = end


def _line_matches(
    text: str, pattern: re.Pattern[str], lo: int, hi: int, reverse: bool, clock: _Clock
) -> Iterator[re.Match[str]]:
    for start, end in _chunks(text, lo, hi, reverse, clock):
        found = pattern.finditer(text, start, end)
        for m in reversed(list(found)) if reverse else found:
            if clock.over():
                return
            yield m


def _continuation(text: str, pos: int, indent: str, cur: _Cursor, multiline: bool) -> str:
    """The rest of the line from ``pos`` (+ the indented block after it when multiline)."""
    eol = text.find("\n", pos, pos + MAX_DRAFT_CHARS)
    if eol == -1:
        return text[pos : pos + MAX_DRAFT_CHARS].rstrip("\r")
    out = text[pos:eol].rstrip("\r")
    if not multiline:
        return out
    lines: list[str] = []
    size = len(out)
    start = eol + 1
    while len(lines) < MAX_BLOCK_LINES and start < len(text) and size < MAX_DRAFT_CHARS:
        end = text.find("\n", start, start + MAX_DRAFT_CHARS)
        line = text[start : end if end != -1 else start + MAX_DRAFT_CHARS].rstrip("\r")
        body = line.lstrip(" \t")
        deeper = len(line) - len(body) > len(indent)
        closing = bool(lines) and len(line) - len(body) == len(indent) and body[:1] in (")", "]", "}")
        if body and not deeper and not closing:
            break
        lines.append(cur.indent + line[len(indent) :] if body and line.startswith(indent) else line if body else "")
        size += len(line) + 1
        if closing or end == -1:
            break
        start = end + 1
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join([out, *lines])


@dataclass
class _Hit:
    draft: Draft
    agree: int  # characters before the cursor that equal those before the copied text


def _agreement(prefix: str, text: str, end: int, below: bool) -> int:
    """How many of the CONTEXT_CHARS characters before the cursor equal those before text[end].

    For a match below the cursor (``text`` is the suffix) the prefix comes before the suffix.
    """
    if below and end < CONTEXT_CHARS:
        before = (prefix[-CONTEXT_CHARS:] + text[:end])[-CONTEXT_CHARS:]
    else:
        before = text[max(0, end - CONTEXT_CHARS) : end]
    n = 0
    for a, b in zip(reversed(prefix[-CONTEXT_CHARS:]), reversed(before)):
        if a != b:
            break
        n += 1
    return n


def _rerank(hits: Iterator[_Hit]) -> Iterator[Draft]:
    """The first RERANK hits by longest context agreement (prompt-lookup style), then nearest;
    the hits after them in their own order."""
    first = list(itertools.islice(hits, RERANK))
    first.sort(key=lambda h: (-h.agree, h.draft.distance))
    for h in itertools.chain(first, hits):
        h.draft.agree = h.agree
        yield h.draft


def _same_document_lines(
    prefix: str, suffix: str, cur: _Cursor, pattern: re.Pattern[str], multiline: bool, uri: str, clock: _Clock
) -> Iterator[Draft]:
    def above() -> Iterator[_Hit]:
        dist, last = 0, cur.line_start
        lo = max(0, cur.line_start - WINDOW_CHARS)
        for m in _line_matches(prefix, pattern, lo, cur.line_start, True, clock):
            dist += prefix.count("\n", m.start(), last)
            last = m.start()
            text = _continuation(prefix, m.end(), m.group(1), cur, multiline)
            if _useful(text, cur, multiline):
                agree = _agreement(prefix, prefix, m.end(), False)
                yield _Hit(Draft(text, Source.LOOKUP_LINE, f"{uri}:-{dist}", dist), agree)

    def below() -> Iterator[_Hit]:
        if cur.next_line < 0:
            return
        dist, last = 1, cur.next_line
        hi = min(len(suffix), cur.next_line + WINDOW_CHARS)
        for m in _line_matches(suffix, pattern, cur.next_line, hi, False, clock):
            dist += suffix.count("\n", last, m.start())
            last = m.start()
            text = _continuation(suffix, m.end(), m.group(1), cur, multiline)
            if _useful(text, cur, multiline):
                agree = _agreement(prefix, suffix, m.end(), True)
                yield _Hit(Draft(text, Source.LOOKUP_LINE, f"{uri}:+{dist}", dist), agree)

    if cur.line_start < 0:
        return iter(())
    return _rerank(heapq.merge(above(), below(), key=lambda h: h.draft.distance))


def _other_documents(
    prefix: str, documents: dict[str, str], cur: _Cursor, pattern: re.Pattern[str], multiline: bool, clock: _Clock
) -> Iterator[Draft]:
    """Per document: longest context agreement first, then the continuation seen most often."""
    for uri, text in documents.items():
        best: dict[str, tuple[int, int, int, Draft]] = {}  # text -> (-agree, -count, order, draft)
        line, last = 1, 0
        for n, m in enumerate(_line_matches(text, pattern, 0, min(len(text), OTHER_DOC_CHARS), False, clock)):
            line += text.count("\n", last, m.start())
            last = m.start()
            cont = _continuation(text, m.end(), m.group(1), cur, multiline)
            if not _useful(cont, cur, multiline):
                continue
            agree = _agreement(prefix, text, m.end(), False)
            old = best.get(cont)
            if old is None:
                best[cont] = (-agree, -1, n, Draft(cont, Source.LOOKUP_DOC, f"{uri}:{line}", 0, agree))
            else:
                best[cont] = (min(old[0], -agree), old[1] - 1, old[2], old[3])
                old[3].agree = max(old[3].agree, agree)
            if n + 1 >= MATCHES_PER_DOC:
                break
        yield from (v[3] for v in sorted(best.values(), key=lambda v: v[:3]))
        if clock.over():
            return


def _repo_lines(
    prefix: str, repo: RepoSnapshot, cur: _Cursor, multiline: bool, exclude: Collection[str], clock: _Clock
) -> Iterator[Draft]:
    """Lines of the repository's files that start with the cursor line's text: longest context
    agreement first, then the continuation seen most often."""
    if cur.line_start < 0:
        return
    best: dict[str, tuple[int, int, int, Draft]] = {}  # text -> (-agree, -count, order, draft)
    for n, (f, line, pos) in enumerate(repo.line_matches(cur.key, exclude)):
        if n >= REPO_HITS or clock.over():
            break
        body = f.line(line)
        cont = _continuation(f.text, pos, body[: len(body) - len(body.lstrip(" \t"))], cur, multiline)
        if not _useful(cont, cur, multiline):
            continue
        agree = _agreement(prefix, f.text, pos, False)
        old = best.get(cont)
        if old is None:
            best[cont] = (-agree, -1, n, Draft(cont, "lookup:repo", f"{f.rel}:{line + 1}", 0, agree))
        else:
            best[cont] = (min(old[0], -agree), old[1] - 1, old[2], old[3])
            old[3].agree = max(old[3].agree, agree)
    yield from (v[3] for v in sorted(best.values(), key=lambda v: v[:3]))


def _ngram_tails(prefix: str) -> list[str]:
    """The prefix's last n non-space lexemes (plus what follows them), for each n in NGRAM_SIZES."""
    tail = prefix[-400:]
    starts = [m.start() for m in _LEXEME.finditer(tail)]
    out: list[str] = []
    for n in NGRAM_SIZES:
        if len(starts) < n:
            continue
        gram = tail[starts[-n] :]
        if sum(not c.isspace() for c in gram) >= MIN_NGRAM_CHARS and gram not in out:
            out.append(gram)
    return out


def _ngrams(prefix: str, suffix: str, cur: _Cursor, multiline: bool, uri: str, clock: _Clock) -> Iterator[Draft]:
    """The nearest RERANK hits of each n-gram, all ranked together by context agreement."""
    hits: list[_Hit] = []
    for gram in _ngram_tails(prefix):
        near = heapq.merge(
            _ngram_above(prefix, gram, cur, multiline, uri, clock),
            _ngram_below(prefix, suffix, gram, cur, multiline, uri, clock),
            key=lambda h: h.draft.distance,
        )
        hits.extend(itertools.islice(near, RERANK))
    hits.sort(key=lambda h: (-h.agree, h.draft.distance))
    for h in hits:
        h.draft.agree = h.agree
    return (h.draft for h in hits)


def _indent_at(text: str, pos: int) -> str:
    start = text.rfind("\n", max(0, pos - MAX_LINE_CHARS), pos) + 1
    line = text[start:pos]
    return line[: len(line) - len(line.lstrip(" \t"))]


def _ngram_above(prefix: str, gram: str, cur: _Cursor, multiline: bool, uri: str, clock: _Clock) -> Iterator[_Hit]:
    lo = max(0, len(prefix) - WINDOW_CHARS)
    hi = len(prefix) - 1  # not the n-gram at the cursor itself
    dist, last = 0, len(prefix)
    while not clock.over():
        pos = prefix.rfind(gram, lo, hi)
        if pos == -1:
            return
        end = pos + len(gram)
        dist += prefix.count("\n", end, last)
        last = end
        text = _continuation(prefix, end, _indent_at(prefix, end), cur, multiline)
        if _useful(text, cur, multiline):
            yield _Hit(Draft(text, Source.LOOKUP_NGRAM, f"{uri}:-{dist}", dist), _agreement(prefix, prefix, end, False))
        hi = end - 1


def _ngram_below(
    prefix: str, suffix: str, gram: str, cur: _Cursor, multiline: bool, uri: str, clock: _Clock
) -> Iterator[_Hit]:
    hi = min(len(suffix), WINDOW_CHARS)
    start, dist, last = 0, 0, 0
    while not clock.over():
        pos = suffix.find(gram, start, hi)
        if pos == -1:
            return
        end = pos + len(gram)
        dist += suffix.count("\n", last, end)
        last = end
        text = _continuation(suffix, end, _indent_at(suffix, end), cur, multiline)
        if _useful(text, cur, multiline):
            yield _Hit(Draft(text, Source.LOOKUP_NGRAM, f"{uri}:+{dist}", dist), _agreement(prefix, suffix, end, True))
        start = pos + 1


__all__ = [
    "Draft",
    "DraftOptions",
    "find_drafts",
    "lookup_only",
    "MIN_ACCEPT_P",
    "SOURCES",
    "WINDOW_CHARS",
    "OTHER_DOC_CHARS",
]
