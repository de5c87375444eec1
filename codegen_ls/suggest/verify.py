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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from codegen_ls.engine.engine import Candidate, Engine, StopFn, Tokenizer, common_prefix
from codegen_ls.errors import Cancelled
from codegen_ls.suggest.drafts import (  # re-exported: the pipeline reads the lookup from here
    HEAL_TOKENS,
    MIN_ACCEPT_P,
    OTHER_DOC_CHARS,
    WINDOW_CHARS,
    Draft,
    find_drafts,
    lookup_only,
)
from codegen_ls.suggest.repo_snapshot import RepoSnapshot

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


def propose(
    engine: Engine,
    prompt_ids: list[int],
    prefix: str,
    suffix: str,
    other_documents: dict[str, str],
    *,
    doc_key: str,
    multiline: bool,
    stop: StopFn | None,
    cancel: Callable[[], bool] | None,
    max_new_tokens: int,
    budget_ms: float = 5.0,
    include_other_documents: bool = True,
    max_drafts: int = 4,
    include_ngram: bool = True,
    include_lines: bool = True,
    min_accept_p: float = MIN_ACCEPT_P,
    deadline_ms: float | None = None,
    drafts: list[Draft] | None = None,
    repo: RepoSnapshot | None = None,
    repo_exclude: Collection[str] = (),
) -> list[Candidate]:
    """Lookup drafts verified by the model: up to two candidates per draft.

    Per draft: ONE forward pass (:meth:`Engine.score`) on top of ``prompt_ids``. Where the model
    accepts the whole draft (:func:`accepted_length`), the draft is the candidate. Where it
    rejects a token, there are two: the *verified* one, cut before that token and continued by
    greedy decoding from the cache (source gets ``+model``; none when the first token is
    rejected, the model's own greedy candidate covers that), and the draft as copied, which
    carries how many of its tokens the model rejected (:attr:`DraftCandidate.rejected`): the
    ranking weighs that evidence, no rule picks one of the two. ``stop`` applies token by token
    as in the engine. ``logprobs`` are the model's log-probs of every token in ``token_ids``; as
    with token healing, the first token may also cover prompt text, which ``text`` leaves out.
    ``deadline_ms`` (from the call) stops verifying further drafts and bounds the continuation.
    Candidates with the same text are given once (the better-ranked draft's). Raises Cancelled
    when ``cancel()``.
    """
    t0 = time.perf_counter()
    if drafts is None:
        drafts = find_drafts(
            prefix,
            suffix,
            other_documents,
            multiline=multiline,
            max_drafts=max_drafts,
            budget_ms=budget_ms,
            include_other_documents=include_other_documents,
            include_ngram=include_ngram,
            include_lines=include_lines,
            uri=doc_key,
            repo=repo,
            repo_exclude=repo_exclude,
        )
    if not drafts or not prompt_ids or max_new_tokens <= 0:
        return []
    room = max(1, engine.context_length - max_new_tokens)
    prompt = list(prompt_ids)[-room:]  # the same cut generate() makes, so the cache matches
    out: list[Candidate] = []
    texts: set[str] = set()
    for d in drafts:
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        left = None if deadline_ms is None else deadline_ms - (time.perf_counter() - t0) * 1000
        if left is not None and left <= 0:
            break
        for cand in _verify(
            engine,
            prompt,
            d,
            doc_key=doc_key,
            stop=stop,
            cancel=cancel,
            max_new_tokens=max_new_tokens,
            min_accept_p=min_accept_p,
            deadline_ms=left,
        ):
            if cand.text not in texts:
                texts.add(cand.text)
                out.append(cand)
    return out


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
    engine: Engine,
    prompt: list[int],
    draft: Draft,
    *,
    doc_key: str,
    stop: StopFn | None,
    cancel: Callable[[], bool] | None,
    max_new_tokens: int,
    min_accept_p: float,
    deadline_ms: float | None,
) -> list[DraftCandidate]:
    al = align_draft(engine, prompt, draft.text)
    if al is None:
        return []
    ids = al.draft[:max_new_tokens]
    logprobs, greedy, after = engine.score(al.base, ids, doc_key=doc_key, cancel=cancel)
    forced = forced_tokens(engine, al)
    m = accepted_length(ids, logprobs, greedy, min_accept_p, forced)
    floor = math.log(min_accept_p) if min_accept_p > 0 else -math.inf

    def make(text: str, kept: int, finish: str, source: str, token_ids: list[int], lps: list[float]) -> DraftCandidate:
        rejected = sum(1 for i in range(forced, kept) if ids[i] != greedy[i] and logprobs[i] < floor)
        return DraftCandidate(
            text,
            token_ids,
            [float(x) for x in lps],
            finish,
            sampled=False,
            source=source,
            distance=draft.distance,
            agree=draft.agree,
            draft_tokens=len(ids),
            copied_tokens=kept,
            rejected=rejected,
            origin=draft.origin,
        )

    out: list[DraftCandidate] = []
    if m < len(ids):  # the model rejects a token: the draft as copied, with that evidence
        text, kept, finish = _walk(engine, al, ids, len(ids), stop)
        if kept and text.strip():
            out.append(
                make(
                    text,
                    kept,
                    finish or ("length" if kept >= max_new_tokens else "stop"),
                    draft.source,
                    ids[:kept],
                    logprobs[:kept],
                )
            )
        if kept and kept <= m:  # the stop rule cut the draft inside its accepted part: nothing to verify
            return out
    text, kept, finish = _walk(engine, al, ids, m, stop)
    if kept == 0:
        return out  # rejected at once: the model's own greedy candidate covers this
    token_ids, lps = ids[:kept], logprobs[:kept]
    source = draft.source
    if not finish and kept == len(ids) == len(al.draft):
        # The whole draft was accepted. It ended a line (or block) of its source, so that line
        # end is judged like one more draft token: kept when the greedy next token ends the line,
        # or (unless the rule is plain greedy agreement) when the line-end tokens together have
        # probability >= min_accept_p.
        table = engine.tokenizer.token_bytes()
        nxt = int(engine.without_banned(after).argmax())
        ends = _line_end_ids(engine.tokenizer, engine.eos_id, len(after))
        p_end = float(np.exp(after[ends]).sum())
        if nxt == engine.eos_id:
            finish = "eos"
        elif nxt in ends or (min_accept_p <= 0.5 and p_end >= min_accept_p):
            finish = "stop"
        elif stop is not None:
            more = text + table[nxt].decode("utf-8", "replace")
            cut = stop(more)
            if cut is not None and cut <= len(text):
                text, finish = more[:cut], "stop"
        if not finish and text.strip():  # the model goes on where the copy ended: keep the copy too
            copy = make(text, kept, "stop", source, token_ids, lps)
            copy.rejected += 1
            out.append(copy)
    if not finish and kept >= max_new_tokens:
        finish = "length"
    if not finish:
        cut_total: int | None = None

        def stop_total(s: str) -> int | None:  # the caller's stop sees the whole candidate
            nonlocal cut_total
            c = stop(text + s) if stop is not None else None
            if c is None:
                return None
            cut_total = c
            return max(0, c - len(text))

        gen = engine.generate(
            al.base + token_ids,
            doc_key=doc_key,
            n=1,
            temperature=0.0,
            max_new_tokens=max_new_tokens - kept,
            stop=stop_total,
            cancel=cancel,
            deadline_ms=deadline_ms,
        ).candidates[0]
        text = (text + gen.text)[:cut_total] if cut_total is not None and cut_total < len(text) else text + gen.text
        token_ids, lps, finish = token_ids + gen.token_ids, lps + gen.logprobs, gen.finish_reason
        if gen.token_ids:
            source += "+model"
    if text.strip():
        out.insert(0, make(text, kept, finish, source, token_ids, lps))
    return out


__all__ = [
    "DraftCandidate",
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
