"""Checking lookup drafts against the model: a draft is scored in one forward pass on top of the
prompt (speculative decoding, prompt-lookup style) and kept as far as the model agrees; where it
stops agreeing, greedy decoding from the cache continues it. :func:`propose` finds the drafts
(:mod:`codegen_ls.suggest.drafts`, text only) and verifies them; the rules (``MIN_ACCEPT_P``, what
counts as agreeing) are described in that module's docstring.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from codegen_ls.engine.engine import Candidate, Engine, StopFn, Tokenizer, common_prefix
from codegen_ls.errors import Cancelled
from codegen_ls.suggest.drafts import (  # re-exported: the pipeline reads the lookup from here
    HEAL_TOKENS,
    MIN_ACCEPT_P,
    OTHER_DOC_CHARS,
    WINDOW_CHARS,
    Draft,
    DraftOptions,
    find_drafts,
    lookup_only,
)

# -- verifying drafts --------------------------------------------------------------------------


@dataclass
class AlignedDraft:
    base: list[int]  # prompt tokens the draft goes on top of (the prompt, maybe minus a few)
    draft: list[int]  # draft tokens: re-tokenized prompt tail (``healed``) + the draft text
    healed: bytes  # prompt text at the start of the draft tokens (not part of the candidate)


def align_draft(engine: Engine, prompt_ids: Sequence[int], text: str) -> AlignedDraft | None:
    """Tokenize ``text`` so that base + draft is the natural tokenization of prompt + text.

    BPE may merge the characters before the cursor with the draft's first characters (``sel`` +
    ``f.x`` is ``self`` ``.x``). So the last ``HEAL_TOKENS`` prompt tokens are decoded, encoded
    again together with the draft, and the draft tokens start where the two tokenizations first
    differ; the prompt text those tokens re-cover is ``healed`` (token healing, as
    :meth:`Engine.generate` does with ``heal=True``). None when the prompt is too short.
    """
    tok = engine.tokenizer
    table = tok.token_bytes()
    prompt = list(prompt_ids)
    k = min(HEAL_TOKENS, len(prompt))
    tail_bytes = b"".join(table[t] for t in prompt[len(prompt) - k :])
    while k < min(len(prompt), HEAL_TOKENS + 4) and not _decodes(tail_bytes):  # whole characters
        k += 1
        tail_bytes = table[prompt[len(prompt) - k]] + tail_bytes
    tail = prompt[len(prompt) - k :]
    ids = tok.encode(tail_bytes.decode("utf-8", "replace") + text)
    j = common_prefix(tail, ids)
    base, draft = prompt[: len(prompt) - k + j], ids[j:]
    healed = b"".join(table[t] for t in tail[j:])
    if not b"".join(table[t] for t in draft).startswith(healed):  # tail did not round-trip
        base, draft, healed = prompt, tok.encode(text), b""
    if not base or not draft:
        return None
    return AlignedDraft(base, draft, healed)


def forced_tokens(engine: Engine, al: AlignedDraft) -> int:
    """Leading draft tokens that lie wholly inside the healed prompt text (nothing to judge)."""
    table = engine.tokenizer.token_bytes()
    n, size = 0, 0
    while n < len(al.draft) and size + len(table[al.draft[n]]) <= len(al.healed):
        size += len(table[al.draft[n]])
        n += 1
    return n


@functools.lru_cache(maxsize=4)
def _line_end_ids(tokenizer: Tokenizer, eos_id: int, vocab: int) -> np.ndarray:
    """Ids of the tokens that start with a line break, and end of text."""
    table = tokenizer.token_bytes()
    ids = [i for i, b in enumerate(table[:vocab]) if b[:1] in (b"\n", b"\r")]
    return np.asarray(sorted({*ids, eos_id} & set(range(vocab))), dtype=np.int64)


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def accepted_length(
    draft_ids: Sequence[int],
    draft_logprobs: Sequence[float],
    greedy_ids: Sequence[int],
    min_accept_p: float = MIN_ACCEPT_P,
    start: int = 0,
) -> int:
    """How many draft tokens the model accepts: the greedy choice or probability >= min_accept_p.

    The first ``start`` tokens are accepted unconditionally (they only re-cover prompt text).
    """
    floor = math.log(min_accept_p) if min_accept_p > 0 else -math.inf
    m = min(start, len(draft_ids))
    while m < len(draft_ids) and (draft_ids[m] == greedy_ids[m] or draft_logprobs[m] >= floor):
        m += 1
    return m


@dataclass
class DraftCandidate(Candidate):
    """A candidate made from a draft, with the evidence the ranking weighs (see :mod:`ranking`)."""

    distance: int = 0  # the draft's distance (lines from the cursor; 0 in other files)
    agree: int = 0  # context agreement of the draft (characters, up to CONTEXT_CHARS)
    draft_tokens: int = 0  # tokens of the whole draft
    copied_tokens: int = 0  # draft tokens this candidate keeps (the rest, if any, the model wrote)
    rejected: int = 0  # kept draft tokens the model rejects (neither its greedy choice nor p >= min_accept_p)
    origin: str = ""


@dataclass(frozen=True)
class ProposeOptions:
    """How :func:`propose` verifies drafts, and where it finds them when none are given."""

    doc_key: str  # the engine's cache key for the document (also the drafts' ``uri``)
    max_new_tokens: int
    stop: StopFn | None = None  # applied token by token, as in the engine
    cancel: Callable[[], bool] | None = None
    min_accept_p: float = MIN_ACCEPT_P
    deadline_ms: float | None = None  # from the call: stops verifying further drafts, bounds the continuation
    find: DraftOptions = field(default_factory=DraftOptions)  # :func:`find_drafts` (its ``uri`` is ``doc_key``)


def propose(
    engine: Engine,
    prompt_ids: list[int],
    prefix: str,
    suffix: str,
    other_documents: dict[str, str],
    options: ProposeOptions,
    *,
    drafts: list[Draft] | None = None,
) -> list[Candidate]:
    """Lookup drafts verified by the model: up to two candidates per draft.

    ``drafts``: found in ``prefix`` / ``suffix`` / ``other_documents`` (:func:`find_drafts`) unless
    given. Per draft: ONE forward pass (:meth:`Engine.score`) on top of ``prompt_ids``. Where the
    model accepts the whole draft (:func:`accepted_length`), the draft is the candidate. Where it
    rejects a token, there are two: the *verified* one, cut before that token and continued by
    greedy decoding from the cache (source gets ``+model``; none when the first token is
    rejected, the model's own greedy candidate covers that), and the draft as copied, which
    carries how many of its tokens the model rejected (:attr:`DraftCandidate.rejected`): the
    ranking weighs that evidence, no rule picks one of the two. ``logprobs`` are the model's
    log-probs of every token in ``token_ids``; as with token healing, the first token may also
    cover prompt text, which ``text`` leaves out. Candidates with the same text are given once
    (the better-ranked draft's). Raises Cancelled when ``options.cancel()``.
    """
    t0 = time.perf_counter()
    opts = options
    if drafts is None:
        drafts = find_drafts(prefix, suffix, other_documents, replace(opts.find, uri=opts.doc_key))
    if not drafts or not prompt_ids or opts.max_new_tokens <= 0:
        return []
    room = max(1, engine.context_length - opts.max_new_tokens)
    prompt = list(prompt_ids)[-room:]  # the same cut generate() makes, so the cache matches
    out: list[Candidate] = []
    texts: set[str] = set()
    memo: _Memo = {}  # drafts that keep the same tokens continue alike: decoded once
    for d in drafts:
        if opts.cancel is not None and opts.cancel():
            raise Cancelled("cancelled")
        left = None if opts.deadline_ms is None else opts.deadline_ms - (time.perf_counter() - t0) * 1000
        if left is not None and left <= 0:
            break
        for cand in _verify(engine, prompt, d, replace(opts, deadline_ms=left), memo):
            if cand.text not in texts:
                texts.add(cand.text)
                out.append(cand)
    return out


@dataclass(frozen=True)
class _Scored:
    """A draft aligned to the prompt and scored in one forward pass."""

    draft: Draft
    al: AlignedDraft
    ids: list[int]  # the draft tokens judged (at most max_new_tokens)
    logprobs: list[float]  # the model's log-prob of each
    greedy: list[int]  # the model's greedy token at each position
    after: np.ndarray  # log-probs of the token after the whole draft
    forced: int  # leading tokens inside the healed prompt text (nothing to judge)
    accepted: int  # leading tokens the model accepts (:func:`accepted_length`)
    floor: float  # log(min_accept_p)

    def candidate(self, p: _Piece) -> DraftCandidate:
        rejected = sum(
            1 for i in range(self.forced, p.kept) if self.ids[i] != self.greedy[i] and self.logprobs[i] < self.floor
        )
        return DraftCandidate(
            p.text,
            p.token_ids,
            [float(x) for x in p.logprobs],
            p.finish,
            sampled=False,
            source=p.source,
            distance=self.draft.distance,
            agree=self.draft.agree,
            draft_tokens=len(self.ids),
            copied_tokens=p.kept,
            rejected=rejected,
            origin=self.draft.origin,
        )


@dataclass
class _Piece:
    """A candidate being made from a draft: its text and tokens so far."""

    text: str
    kept: int  # draft tokens it keeps
    finish: str
    source: str
    token_ids: list[int]
    logprobs: list[float]


def _score(engine: Engine, prompt: list[int], draft: Draft, opts: ProposeOptions) -> _Scored | None:
    al = align_draft(engine, prompt, draft.text)
    if al is None:
        return None
    ids = al.draft[: opts.max_new_tokens]
    logprobs, greedy, after = engine.score(al.base, ids, doc_key=opts.doc_key, cancel=opts.cancel)
    forced = forced_tokens(engine, al)
    m = accepted_length(ids, logprobs, greedy, opts.min_accept_p, forced)
    floor = math.log(opts.min_accept_p) if opts.min_accept_p > 0 else -math.inf
    return _Scored(draft, al, ids, logprobs, greedy, after, forced, m, floor)


def _piece(engine: Engine, s: _Scored, m: int, stop: StopFn | None) -> _Piece:
    """The first ``m`` draft tokens as a candidate (cut where ``stop`` says)."""
    text, kept, finish = _walk(engine, s.al, s.ids, m, stop)
    return _Piece(text, kept, finish, s.draft.source, s.ids[:kept], s.logprobs[:kept])


def _walk(engine: Engine, al: AlignedDraft, ids: list[int], m: int, stop: StopFn | None) -> tuple[str, int, str]:
    """The first ``m`` draft tokens as the engine would emit them: (text at whole characters,
    tokens kept, "stop" when ``stop`` cut it)."""
    table = engine.tokenizer.token_bytes()
    buf, text, kept = b"", "", 0
    for i in range(m):
        buf += table[ids[i]]
        if len(buf) <= len(al.healed) or not _decodes(buf[len(al.healed) :]):
            continue
        kept, text = i + 1, buf[len(al.healed) :].decode("utf-8")
        cut = stop(text) if stop is not None else None
        if cut is not None:
            return text[:cut], kept, "stop"
    return text, kept, ""


def _verify(
    engine: Engine, prompt: list[int], draft: Draft, opts: ProposeOptions, memo: _Memo | None = None
) -> list[DraftCandidate]:
    """The candidates of one draft: the verified one first (if any), then the draft as copied."""
    s = _score(engine, prompt, draft, opts)
    if s is None:
        return []
    out: list[DraftCandidate] = []
    if s.accepted < len(s.ids):  # the model rejects a token: the draft as copied, with that evidence
        copy = _piece(engine, s, len(s.ids), opts.stop)
        if copy.kept and copy.text.strip():
            copy.finish = copy.finish or ("length" if copy.kept >= opts.max_new_tokens else "stop")
            out.append(s.candidate(copy))
        if copy.kept and copy.kept <= s.accepted:  # the stop rule cut the draft inside its accepted part
            return out
    p = _piece(engine, s, s.accepted, opts.stop)
    if p.kept == 0:
        return out  # rejected at once: the model's own greedy candidate covers this
    if not p.finish and p.kept == len(s.ids) == len(s.al.draft):
        copy_too = _judge_line_end(engine, s, p, opts)
        if copy_too is not None:
            out.append(copy_too)
    if not p.finish and p.kept >= opts.max_new_tokens:
        p.finish = "length"
    if not p.finish:
        _continue(engine, s, p, opts, {} if memo is None else memo)
    if p.text.strip():
        out.insert(0, s.candidate(p))
    return out


def _judge_line_end(engine: Engine, s: _Scored, p: _Piece, opts: ProposeOptions) -> DraftCandidate | None:
    """The whole draft was accepted. It ended a line (or block) of its source, so that line end is
    judged like one more draft token: kept (``p.finish`` set) when the greedy next token ends the
    line, or (unless the rule is plain greedy agreement) when the line-end tokens together have
    probability >= min_accept_p. Where the model goes on instead, the copy as it ends is returned
    too, with one more rejected token."""
    table = engine.tokenizer.token_bytes()
    nxt = int(engine.without_banned(s.after).argmax())
    ends = _line_end_ids(engine.tokenizer, engine.eos_id, len(s.after))
    p_end = float(np.exp(s.after[ends]).sum())
    if nxt == engine.eos_id:
        p.finish = "eos"
    elif nxt in ends or (opts.min_accept_p <= 0.5 and p_end >= opts.min_accept_p):
        p.finish = "stop"
    elif opts.stop is not None:
        more = p.text + table[nxt].decode("utf-8", "replace")
        cut = opts.stop(more)
        if cut is not None and cut <= len(p.text):
            p.text, p.finish = more[:cut], "stop"
    if p.finish or not p.text.strip():
        return None
    copy = s.candidate(replace(p, finish="stop"))
    copy.rejected += 1
    return copy


_Memo = dict[tuple[tuple[int, ...], int], tuple[Candidate, int | None]]
"""Continuations by (prompt + kept draft tokens, new-token count): greedy decoding is a function
of them (the same tokens are the same text, so the stop rule cuts alike): (the continuation,
where the stop rule cut the whole candidate)."""


def _continue(engine: Engine, s: _Scored, p: _Piece, opts: ProposeOptions, memo: _Memo) -> None:
    """Greedy decoding from the cache after the kept draft tokens (the caller's stop sees the
    whole candidate); ``p`` grows by what the model wrote. Several drafts often keep the same
    tokens (the same line found in the document and the repository, copies cut at the same
    place): ``memo`` decodes each such continuation once."""
    text, stop = p.text, opts.stop
    cut_total: int | None = None

    def stop_total(x: str) -> int | None:
        nonlocal cut_total
        c = stop(text + x) if stop is not None else None
        if c is None:
            return None
        cut_total = c
        return max(0, c - len(text))

    key = (tuple(s.al.base + p.token_ids), opts.max_new_tokens - p.kept)
    if key not in memo:
        gen = engine.generate(
            s.al.base + p.token_ids,
            doc_key=opts.doc_key,
            n=1,
            temperature=0.0,
            max_new_tokens=opts.max_new_tokens - p.kept,
            stop=stop_total,
            cancel=opts.cancel,
            deadline_ms=opts.deadline_ms,
        ).candidates[0]
        memo[key] = gen, cut_total
    gen, cut_total = memo[key]
    p.text = (text + gen.text)[:cut_total] if cut_total is not None and cut_total < len(text) else text + gen.text
    p.token_ids, p.logprobs, p.finish = p.token_ids + gen.token_ids, p.logprobs + gen.logprobs, gen.finish_reason
    if gen.token_ids:
        p.source += "+model"


__all__ = [
    "DraftCandidate",
    "DraftOptions",
    "ProposeOptions",
    "propose",
    "AlignedDraft",
    "align_draft",
    "accepted_length",
    "forced_tokens",
    "Draft",
    "find_drafts",
    "lookup_only",
    "MIN_ACCEPT_P",
    "WINDOW_CHARS",
    "OTHER_DOC_CHARS",
]
