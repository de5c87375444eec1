"""The completion pipeline shared by the LSP server and ``codegen-ls complete``.

document + cursor -> context (prefix/suffix within a token budget, :mod:`~codegen_ls.suggest.context`)
-> decide mode (none / single-line / multi-line) -> type-ahead cache (:mod:`~codegen_ls.suggest.typeahead`)
-> engine candidates + lookup drafts (:mod:`~codegen_ls.suggest.candidates`) -> stop rules and trimming
-> ranking and calibrated confidence -> suggestions.

Knows nothing of LSP: positions are (line, character) in Python code points; the server converts
UTF-16 positions with pygls' document helpers.

INTERFACE CONTRACT (stable; the server and CLI are written against it): CompletionRequest,
Suggestion, CompletionResult, CancelFn (:mod:`~codegen_ls.suggest.request`, re-exported here),
Completer.load / .engine / .complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from codegen_ls.engine import latency
from codegen_ls.engine.engine import Engine, EngineOptions
from codegen_ls.engine.generation import Generation
from codegen_ls.engine.modeldir import resolve_model_dir
from codegen_ls.engine.remote import RemoteEngine, RemoteOptions
from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.kinds import Mode, Source
from codegen_ls.settings import Settings
from codegen_ls.suggest import candidates, confidence
from codegen_ls.suggest.context import (
    Context,
    ContextOptions,
    TokenCounter,
    build_context,
    fim_suffix_budget,
    offset_of,
    token_budget,
)
from codegen_ls.suggest.mode import decide_mode
from codegen_ls.suggest.postprocess import make_stop
from codegen_ls.suggest.ranking import Item, Ranked, rank
from codegen_ls.suggest.repo_section import RepoSections
from codegen_ls.suggest.request import CancelFn, CompletionRequest, CompletionResult, Suggestion
from codegen_ls.suggest.typeahead import TypeAhead

log = logging.getLogger(__name__)

CONTINUE_MS = 1500  # deadline of a background continuation (deadline-first)


def _default_loader(model_path: str | None, threads: int = 0) -> Engine:
    directory = resolve_model_dir(model_path)
    try:
        return Engine(directory, EngineOptions(threads=threads))
    except CodegenLsError:
        raise
    except Exception as exc:  # onnxruntime / tokenizers / OS errors: one clear line
        raise ModelError(
            f"cannot load model from {directory}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


@dataclass
class _Run:
    """One completion's state between its steps."""

    engine: Engine
    req: CompletionRequest
    settings: Settings  # sized to the latency target (or the continuation's full count)
    full_new: int  # the new-token count before the latency target sized it
    ctx: Context
    mode: Mode
    language: str
    prompt_info: dict[str, Any]
    timings: dict[str, float]
    t0: float
    budget_ms: float  # what the request may take: the latency target (a continuation: its deadline)


class Completer:
    """The pipeline with its state: the engine, a token-count cache, the type-ahead cache.

    ``complete`` is meant to be called from one worker thread at a time; ``load`` may be called
    from another (it swaps the engine under a lock).
    """

    def __init__(self, engine_loader: Callable[[str | None], Engine] | None = None) -> None:
        self._loader = engine_loader
        self._engine: Engine | None = None
        self._model_path: str | None = None
        self._remote: RemoteOptions | None = None  # the remote backend in use (None: the local engine)
        self._counter: TokenCounter | None = None
        self.typeahead = TypeAhead()  # answers already made, per document
        self.sections = RepoSections()  # the prompt's repository section, per document
        self._lock = threading.RLock()
        self.speeds: latency.Speeds | None = None  # this machine's, for the latency target (local engine)
        self._quick_counter: TokenCounter | None = None

    # -- model -----------------------------------------------------------------------------
    def load(self, model_path: str | None = None, threads: int = 0, remote: RemoteOptions | None = None) -> Engine:
        """Load (or replace) the engine; raises :class:`ModelError` with a clear message.

        With ``remote``, the engine is a :class:`RemoteEngine` (the model directory only gives the
        tokenizer); it implements the part of :class:`Engine` the pipeline uses.
        """
        if remote is not None:
            engine = cast(Engine, RemoteEngine(remote, resolve_model_dir(model_path)))
        elif self._loader is not None:
            try:
                engine = self._loader(model_path)
            except CodegenLsError:
                raise
            except Exception as exc:
                raise ModelError(f"cannot load model {model_path or '(default)'}: {exc}") from None
        else:
            engine = _default_loader(model_path, threads)
        speeds = None
        if remote is None:
            try:  # measured once per model and machine (cached in the XDG cache directory)
                speeds = latency.speeds_for(engine, threads)
            except Exception as exc:  # the target is then off; serving goes on
                log.warning("cannot measure the model's speed: %r", exc)
        with self._lock:
            self.speeds = speeds
            self._engine, self._model_path, self._remote = engine, model_path, remote
            self._counter = TokenCounter(engine.tokenizer)
            self._quick_counter = TokenCounter(engine.tokenizer)  # quick()'s, on another thread
            self.typeahead.clear()
        return engine

    @property
    def engine(self) -> Engine:
        """The loaded engine (the default model is loaded on first use)."""
        with self._lock:
            if self._engine is None:
                self.load(self._model_path)
            assert self._engine is not None
            return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def cached_tokens(self, uri: str) -> int:
        """Tokens of ``uri``'s prompt in the engine's KV cache (0: none; for tests and logs)."""
        engine = self._engine
        snap = engine.cache.peek(uri) if engine is not None and hasattr(engine.cache, "peek") else None
        return len(snap.ids) if snap is not None else 0

    def forget(self, uri: str) -> None:
        """Drop a closed document's caches (type-ahead entry and KV snapshot)."""
        self.typeahead.forget(uri)
        self.sections.forget(uri)
        with self._lock:
            if self._engine is not None:
                self._engine.cache.drop(uri)

    def _engine_for(self, settings: Settings) -> tuple[Engine, TokenCounter, bool]:
        """The engine for ``settings.model_path`` (loaded now if needed: the flag)."""
        with self._lock:
            remote = remote_options(settings)
            loading = self._engine is None or settings.model_path != self._model_path or remote != self._remote
            if loading:
                self.load(settings.model_path, settings.threads, remote)
            assert self._engine is not None and self._counter is not None
            return self._engine, self._counter, loading

    def sized(self, settings: Settings) -> Settings:
        """``settings`` with the prompt budget and new-token count that ``latencyTargetMs`` gives
        this model on this machine (:func:`codegen_ls.engine.latency.plan`), where the user left
        ``contextTokens`` / ``maxNewTokens`` to it (values they gave win, defaults included)."""
        engine, speeds = self._engine, self.speeds
        if engine is None or speeds is None or settings.latency_target_ms <= 0:
            return settings
        p = latency.plan(speeds, settings.latency_target_ms, settings.num_candidates, engine.context_length)
        return replace(
            settings,
            context_tokens=settings.context_tokens if settings.is_explicit("context_tokens") else p.context_tokens,
            max_new_tokens=settings.max_new_tokens if settings.is_explicit("max_new_tokens") else p.max_new_tokens,
        )

    def quick(self, req: CompletionRequest, settings: Settings) -> CompletionResult | None:
        """The type-ahead answer for ``req``, or None when the model is needed. Safe to call on
        another thread while :meth:`complete` runs (a token counter of its own), so a keystroke
        along a suggestion never waits for a running job to give way."""
        t0 = time.perf_counter()
        with self._lock:
            engine, counter = self._engine, self._quick_counter
        if engine is None or counter is None or settings.model_path != self._model_path:
            return None
        settings = self.sized(settings)
        ctx = self._context(engine, counter, req, settings, whole=False)[0]  # the cursor's line and its neighbours
        mode, _ = decide_mode(ctx, settings.multiline, req.language_id or "python")
        hit = self.typeahead.answer(req.uri, ctx, settings.min_confidence) if mode != "none" else []
        return CompletionResult(hit, mode, "typeahead", timings={"total": _ms(t0)}) if hit else None

    def complete_ahead(
        self, req: CompletionRequest, settings: Settings, text: str, cancel: CancelFn | None = None
    ) -> CompletionResult:
        """The completion as if ``text`` (the suggestion shown) were accepted at ``req``'s cursor
        (llama.vim's speculative request), kept as a second type-ahead entry: the request right
        after an accept is answered from it at once."""
        at = offset_of(req.text, req.line, req.character)[0]
        lines = text.split("\n")
        line = req.line + len(lines) - 1
        character = (req.character if len(lines) == 1 else 0) + len(lines[-1])
        after = replace(req, text=req.text[:at] + text + req.text[at:], line=line, character=character)
        return self.complete(after, settings, cancel, ahead=True)

    def context(self, req: CompletionRequest, settings: Settings) -> Context:
        """The prompt a completion at ``req``'s cursor would have (repository section and
        fill-in-the-middle included): what a warm-up prefills, and what an evaluation harness
        prefills to stand for the keystrokes before a cursor."""
        engine, counter, _ = self._engine_for(settings)
        return self._context(engine, counter, req, self.sized(settings))[0]

    def _context(
        self, engine: Engine, counter: TokenCounter, req: CompletionRequest, settings: Settings, whole: bool = True
    ) -> tuple[Context, dict[str, Any]]:
        """(the prompt context for ``req`` under sized ``settings``, what went into its prompt).
        ``whole`` False: without the repository section and the FIM head (the type-ahead check
        only reads the text around the cursor, and must not wait for a section)."""
        budget = token_budget(settings.context_tokens, engine.context_length, settings.max_new_tokens)
        preamble, prompt_info = self.sections.section(engine, counter, req, settings, budget) if whole else ("", {})
        ctx = build_context(
            req.text,
            req.line,
            req.character,
            counter,
            budget,
            ContextOptions(
                bos_text=engine.tokenizer.decode([engine.eos_id]),
                tab_size=req.tab_size,
                insert_spaces=req.insert_spaces,
                preamble=preamble,
                fim_budget=_fim_budget(engine, settings, budget) if whole else 0,
            ),
        )
        return ctx, prompt_info

    def warm(self, req: CompletionRequest, settings: Settings, cancel: CancelFn | None = None) -> int:
        """Prefill the prompt a completion at ``req``'s cursor would have (the warm-up), so that
        the request itself only extends the KV cache; returns the tokens prefilled (0: none)."""
        return int(self.complete(req, settings, cancel, warm=True).stats.get("prompt_tokens", 0))

    # -- completion ------------------------------------------------------------------------
    def complete(
        self,
        req: CompletionRequest,
        settings: Settings,
        cancel: CancelFn | None = None,
        more: bool = False,
        warm: bool = False,
        ahead: bool = False,
    ) -> CompletionResult:
        """Suggestions for the cursor in ``req``; raises :class:`Cancelled` when ``cancel()``.

        ``more``: the deadline-first continuation of an answer whose ``more`` was set: the same
        prompt, the new-token count without the latency target's cut, ``CONTINUE_MS`` to run, no
        type-ahead answer; its suggestions replace the type-ahead entry, so the keystrokes after
        are answered with the longer text. ``warm``: only prefill this cursor's prompt
        (:meth:`warm`); ``ahead``: remembered as the answer after an accept (:meth:`complete_ahead`).
        """
        run = self._start(req, settings, more)
        if warm:
            prefilled = _prefill(run.engine, run.ctx, req.uri, cancel)
            return self._done(CompletionResult([], Mode.NONE, "warm", stats={"prompt_tokens": prefilled}), run)
        mode, reason = decide_mode(run.ctx, run.settings.multiline, run.language)
        run.mode = mode
        run.timings["context"] = _ms(run.t0)
        if mode == Mode.NONE:
            return self._done(CompletionResult([], mode, reason), run)
        hit = [] if more or ahead else self.typeahead.answer(req.uri, run.ctx, run.settings.min_confidence)
        if hit:
            return self._done(CompletionResult(hit, mode, "typeahead"), run)
        gen, items, n_lookup = self._candidates(run, cancel)
        return self._answer(run, gen, items, n_lookup, ahead, more)

    def _start(self, req: CompletionRequest, settings: Settings, more: bool) -> _Run:
        """The engine (loaded if needed), the settings sized for this request, its context."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        engine, counter, loaded = self._engine_for(settings)
        if loaded:  # the model was loaded for this request: not part of the completion's time
            timings["load"] = _ms(t0)
            t0 = time.perf_counter()
        if isinstance(engine, Engine):  # the local engine's prompt cache: promptCacheMb
            engine.set_cache_limit(settings.prompt_cache_mb, settings.context_tokens)
        planned = self.sized(settings)
        if more:
            planned = replace(planned, max_new_tokens=settings.max_new_tokens, deadline_ms=CONTINUE_MS)
        ctx, prompt_info = self._context(engine, counter, req, planned)
        language = req.language_id or "python"  # the models are trained on Python
        targeted = settings.latency_target_ms > 0 and self.speeds is not None and not more  # (sized() applied it)
        budget_ms = min(planned.deadline_ms, settings.latency_target_ms) if targeted else planned.deadline_ms
        return _Run(
            engine, req, planned, settings.max_new_tokens, ctx, Mode.NONE, language, prompt_info, timings, t0, budget_ms
        )

    def _candidates(self, run: _Run, cancel: CancelFn | None) -> tuple[Generation, list[Item], int]:
        """The engine's candidates and lookup's verified drafts, as ranking items."""
        engine, ctx, s = run.engine, run.ctx, run.settings
        gen = engine.generate(
            ctx.prompt,
            doc_key=run.req.uri,
            n=s.num_candidates,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            stop=make_stop(ctx, run.mode, ctx.held),
            deadline_ms=s.deadline_ms,
            cancel=cancel,
            heal=True,
            **({"suffix": ctx.suffix} if isinstance(engine, RemoteEngine) else {}),
        )
        run.timings["prefill"] = round(gen.stats.prefill_ms, 1)
        run.timings["decode"] = round(gen.stats.decode_ms, 1)
        model_source = {True: Source.SAMPLE, False: Source.GREEDY}
        items = [
            candidates.to_item(engine, c, ctx, run.mode, ctx.held, run.language, model_source[c.sampled])
            for c in gen.candidates
        ]
        found = []
        if s.lookup and candidates.lookup_available():
            t1 = time.perf_counter()
            found = candidates.lookup_candidates(engine, run.req, ctx, run.mode, s, cancel, run.t0, run.budget_ms)
            items += [candidates.to_item(engine, c, ctx, run.mode, "", run.language, c.source) for c in found]
            run.timings["lookup"] = _ms(t1)
        return gen, [it for it in items if it is not None], len(found)

    def _answer(
        self, run: _Run, gen: Generation, items: list[Item], n_lookup: int, ahead: bool, more: bool
    ) -> CompletionResult:
        """Rank the items, keep those at least ``minConfidence`` likely (at most numCandidates:
        lookup drafts join the model's candidates), remember them for type-ahead."""
        t2 = time.perf_counter()
        ctx, s = run.ctx, run.settings
        ranked = rank(items, ctx, run.mode, run.language, confidence.for_model(getattr(run.engine, "model_dir", None)))
        suggestions = [_suggestion(r, ctx) for r in ranked]
        shown = [x for x in suggestions if x.confidence >= s.min_confidence][: s.num_candidates]
        run.timings["rank"] = _ms(t2)
        self.typeahead.remember(run.req.uri, ctx, shown, ahead, keep_ahead=more)
        run.prompt_info["prompt_tokens"] = len(ctx.prompt_ids)
        run.prompt_info["repo_tokens"] = ctx.preamble_tokens
        run.prompt_info["cached_tokens"] = gen.stats.cached_tokens  # of the prompt, already in the KV cache
        st = gen.stats
        stats = {
            "prompt_tokens": st.prompt_tokens,
            "cached_tokens": st.cached_tokens,
            "new_tokens": st.new_tokens,
            "tokens_per_s": round(st.tokens_per_s, 1),
            "candidates": len(gen.candidates),
            "lookup_candidates": n_lookup,
        }
        top = shown[0].finish_reason if shown and not more else ""
        # cut by the deadline, or by a new-token count the latency target lowered
        cut = top == "deadline" or (top == "length" and run.settings.max_new_tokens < run.full_new)
        reason = "" if shown else ("below minConfidence" if suggestions else "no usable candidate")
        result = CompletionResult(
            shown, run.mode, reason, stats=stats, candidates=[_explained(r) for r in ranked], more=cut
        )
        result.prompt_info = run.prompt_info
        return self._done(result, run)

    def _done(self, result: CompletionResult, run: _Run) -> CompletionResult:
        run.timings["total"] = _ms(run.t0)
        result.timings = run.timings
        return result


def remote_options(settings: Settings) -> RemoteOptions | None:
    """The remote backend the settings ask for (None: the local engine)."""
    if settings.backend != "remote":
        return None
    return RemoteOptions(settings.remote_url, settings.remote_model, settings.remote_api_key_env, settings.remote_fim)


def _suggestion(r: Ranked, ctx: Context) -> Suggestion:
    at = (ctx.line, ctx.character)
    return Suggestion(
        r.text, at, at, round(r.score, 4), round(r.confidence, 4), r.source, round(r.logprob_mean, 4), r.finish_reason
    )


def _explained(r: Ranked) -> dict[str, Any]:
    """A ranked candidate as ``complete --json`` and the evaluation scripts see it."""
    return {
        "text": r.text,
        "source": r.source,
        "sources": r.sources,
        "confidence": round(r.confidence, 4),
        "score": round(r.score, 4),
        "origin": r.origin,
        "features": r.features,
    }


def _fim_budget(engine: Engine, settings: Settings, budget: int) -> int:
    """Tokens for the text after the cursor: a FIM model's share of the budget, else 0 (prefix-only prompt)."""
    return fim_suffix_budget(budget) if settings.fim and getattr(engine, "fim", None) is not None else 0


def _prefill(engine: Engine, ctx: Context, key: str, cancel: CancelFn | None) -> int:
    """Feed ``ctx``'s prompt as ``generate(heal=True)`` would (its last token is left for the request)."""
    if isinstance(engine, RemoteEngine):
        return 0
    ids = engine.tokenizer.encode(ctx.prompt)[:-1]
    if len(ids) < 2:
        return 0
    engine.forward(ids, doc_key=key, cancel=cancel)
    return len(ids)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


__all__ = ["CancelFn", "Completer", "CompletionRequest", "CompletionResult", "Suggestion", "remote_options"]
