"""Candidates for one cursor: the engine's continuations and the lookup's verified drafts, as
cleaned ranking items.

The model's candidates come from one ``Engine.generate``; lookup (:mod:`codegen_ls.suggest.verify`,
optional) adds drafts copied from the document, the open documents and the repository, verified
by the model. Each becomes a :class:`codegen_ls.suggest.ranking.Item`: post-processed text
(stop rules, the text after the cursor) and the log-probs of the tokens it keeps.
"""

from __future__ import annotations

import math
import time
from types import ModuleType

from codegen_ls.engine.engine import Candidate, Engine
from codegen_ls.settings import Settings
from codegen_ls.suggest.context import Context, sanitize
from codegen_ls.suggest.postprocess import clean, make_stop
from codegen_ls.suggest.ranking import Item
from codegen_ls.suggest.request import CancelFn, CompletionRequest

_lookup: ModuleType | None
try:
    from codegen_ls.suggest import verify as _lookup
except ImportError:  # the lookup module is optional
    _lookup = None

LOOKUP_MIN_MS = 30.0  # time lookup verification always gets, even when the model used the whole budget
LOOKUP_FIND_MS = 10.0  # time for finding drafts in the text
LOOKUP_MARGIN_CHARS = 65_536  # > what lookup reads beyond its windows (a line start before, a draft after)
HEAL_SEARCH_CHARS = 32  # how far into a candidate's decoded tokens its text may start (token healing)
DRAFT_EVIDENCE = ("distance", "agree", "draft_tokens", "copied_tokens", "rejected", "origin")  # DraftCandidate -> Item


def lookup_available() -> bool:
    return _lookup is not None


def to_item(
    engine: Engine, cand: Candidate, ctx: Context, mode: str, held_out: str, language_id: str, source: str
) -> Item | None:
    """``cand`` cleaned for ``ctx`` (None: nothing usable), with the log-probs of what it keeps."""
    cleaned = clean(cand.text, ctx, mode, held_out, cand.finish_reason, language_id)
    if cleaned is None:
        return None
    return Item(
        cleaned.text,
        kept_logprobs(engine, cand, cleaned.kept_chars),
        source,
        cand.finish_reason,
        cleaned.truncated,
        cleaned.reindented,
        **{k: getattr(cand, k) for k in DRAFT_EVIDENCE if hasattr(cand, k)},
    )


def lookup_candidates(
    engine: Engine,
    req: CompletionRequest,
    ctx: Context,
    mode: str,
    settings: Settings,
    cancel: CancelFn | None,
    t0: float,
    budget_ms: float,
) -> list[Candidate]:
    """Lookup's verified drafts, continuing the cursor itself (not the prompt, which may end
    before ``ctx.held``); they get what is left of ``budget_ms`` since ``t0`` (the request's
    latency target, else its deadline), at least ``LOOKUP_MIN_MS``."""
    assert _lookup is not None
    prompt_ids = engine.tokenizer.encode(ctx.prompt + ctx.held) if ctx.held else ctx.prompt_ids
    left = max(LOOKUP_MIN_MS, budget_ms - (time.perf_counter() - t0) * 1000)
    prefix, suffix, others = lookup_texts(req, ctx.cursor, _lookup)
    options = _lookup.ProposeOptions(
        doc_key=req.uri,
        max_new_tokens=settings.max_new_tokens,
        stop=make_stop(ctx, mode, ""),
        cancel=cancel,
        deadline_ms=left,
        find=_lookup.DraftOptions(
            multiline=mode == "multi",
            budget_ms=LOOKUP_FIND_MS,
            include_other_documents=settings.lookup_other_documents,
            repo=req.repo if settings.repo_lookup else None,
            repo_exclude=req.open_paths(),
        ),
    )
    return list(_lookup.propose(engine, prompt_ids, prefix, suffix, others, options))


def lookup_texts(req: CompletionRequest, cursor: int, lookup: ModuleType) -> tuple[str, str, dict[str, str]]:
    """What lookup looks at, sliced before it is copied and sanitized (drafts get encoded).

    Lookup only reads ``WINDOW_CHARS`` either side of the cursor (the suffix window may start at
    the next line, so twice that after it) and the first ``OTHER_DOC_CHARS`` of other documents;
    with the margin, the slices give it exactly the text it would read in the whole documents.
    A lookup without these constants gets the whole texts.
    """
    window = getattr(lookup, "WINDOW_CHARS", len(req.text))
    first = getattr(lookup, "OTHER_DOC_CHARS", max(map(len, req.other_documents.values()), default=0))
    prefix = sanitize(req.text[max(0, cursor - window - LOOKUP_MARGIN_CHARS) : cursor])
    suffix = sanitize(req.text[cursor : cursor + 2 * window + LOOKUP_MARGIN_CHARS])
    others = {u: sanitize(t[: first + LOOKUP_MARGIN_CHARS]) for u, t in req.other_documents.items() if u != req.uri}
    return prefix, suffix, others


def kept_logprobs(engine: Engine, cand: Candidate, kept_chars: int) -> list[float]:
    """Log-probs of the tokens that produced the first ``kept_chars`` characters of ``cand.text``.

    The token at the boundary is kept too (it carries the decision to stop there). Token healing
    may make the first token cover prompt text that ``text`` leaves out; it is found by search.
    """
    lps, ids = cand.logprobs, cand.token_ids
    if kept_chars >= len(cand.text) or not ids or len(lps) != len(ids):
        return list(lps)
    full = engine.tokenizer.decode(ids)
    h = full.find(cand.text[:16]) if cand.text else 0
    if h < 0 or h > HEAL_SEARCH_CHARS:  # cannot align: keep a proportional share
        n = math.ceil(len(lps) * kept_chars / max(1, len(cand.text)))
        return list(lps[: max(1, min(len(lps), n + 1))])
    target = len(full[: h + kept_chars].encode("utf-8", "replace"))
    table = engine.tokenizer.token_bytes()
    total = 0
    for i, t in enumerate(ids):
        total += len(table[t]) if t < len(table) else 0
        if total >= target:
            return list(lps[: min(len(lps), i + 2)])
    return list(lps)
