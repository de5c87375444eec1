"""The completion pipeline shared by the LSP server and ``codegen-ls complete``.

document + cursor -> context (prefix/suffix within a token budget) -> decide mode
(none / single-line / multi-line) -> type-ahead cache -> engine candidates (+ lookup drafts)
-> stop rules and trimming -> ranking -> suggestions.

Knows nothing of LSP: positions are (line, character) in Python code points; the server converts
UTF-16 positions with pygls' document helpers.

Type-ahead cache (per document): typing (or erasing) characters along the last shown suggestion,
on the same line, is answered from that suggestion with no model call (source "typeahead").

Lookup: when ``codegen_ls.suggest.verify`` is present and ``Settings.lookup`` is on, its model-verified
drafts join the model's candidates before ranking; one score across sources.

INTERFACE CONTRACT (stable; the server and CLI are written against it): CompletionRequest,
Suggestion, CompletionResult, CancelFn, Completer.load / .engine / .complete.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, cast

from codegen_ls.engine import latency
from codegen_ls.engine.engine import Candidate, Engine, EngineOptions
from codegen_ls.engine.modeldir import resolve_model_dir
from codegen_ls.engine.remote import RemoteEngine, RemoteOptions
from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.kinds import Mode, Source
from codegen_ls.settings import Settings
from codegen_ls.suggest import confidence
from codegen_ls.suggest.context import (
    Context,
    ContextOptions,
    TokenCounter,
    build_context,
    fim_suffix_budget,
    offset_of,
    sanitize,
    token_budget,
)
from codegen_ls.suggest.mode import decide_mode
from codegen_ls.suggest.postprocess import clean, make_stop
from codegen_ls.suggest.ranking import Item, rank
from codegen_ls.suggest.repo import RepoSnapshot, Snippet, path_of, render_snippets

_lookup: ModuleType | None
try:
    from codegen_ls.suggest import verify as _lookup
except ImportError:  # the lookup module is optional
    _lookup = None

log = logging.getLogger(__name__)

LOOKUP_MIN_MS = 30.0  # time lookup verification always gets, even when the model used the deadline
LOOKUP_FIND_MS = 10.0  # time for finding drafts in the text
TYPEAHEAD_DOCUMENTS = 64  # documents whose last suggestions are kept
CONTINUE_MS = 1500  # deadline of a background continuation (deadline-first)
HEAL_SEARCH_CHARS = 32  # how far into a candidate's decoded tokens its text may start (token healing)
LOOKUP_MARGIN_CHARS = 65_536  # > what lookup reads beyond its windows (a line start before, a draft after)
REPO_CHARS_PER_TOKEN = 4  # repository snippets are picked within budget x this many characters, then cut by tokens
REPO_QUERY_STEP = 16  # the snippets are chosen again only when the cursor enters another block of this many lines ...
REPO_QUERY_LINES = 40  # ... from the identifiers of this many lines above that block (stable prompt: KV cache reuse)
REPO_IMPORT_CHARS = 8_000  # the document's start, where its imports are read
REPO_SECTIONS = 64  # documents whose repository section is remembered


@dataclass
class CompletionRequest:
    text: str  # the whole document
    line: int  # 0-based
    character: int  # 0-based, in code points of that line
    uri: str = "untitled:0"  # key for the KV cache and the type-ahead cache
    language_id: str = "python"
    tab_size: int | None = None  # from formattingOptions, else guessed from the file
    insert_spaces: bool | None = None
    other_documents: dict[str, str] = field(default_factory=dict)  # uri -> text (open buffers)
    explicit: bool = False  # the user asked (triggerKind Invoked) rather than typing
    repo: RepoSnapshot | None = None  # the workspace index (codegen_ls.suggest.repo): repository drafts and snippets


@dataclass
class Suggestion:
    insert_text: str  # replaces the range below
    start: tuple[int, int]  # (line, character) code points; range start
    end: tuple[int, int]  # range end (>= cursor; covers suffix text the suggestion re-types)
    score: float  # ranking score, higher is better
    confidence: float  # 0..1, compared with Settings.min_confidence
    source: (
        str  # "greedy" | "sample" | "typeahead" | lookup's "lookup:line" | "lookup:doc" | "lookup:ngram" (+ "+model")
    )
    logprob_mean: float = 0.0
    finish_reason: str = ""


@dataclass
class CompletionResult:
    suggestions: list[Suggestion]
    mode: Mode
    reason: str = ""  # why nothing / which cache answered
    timings: dict[str, float] = field(
        default_factory=dict
    )  # ms: [load,] context, prefill, decode, [lookup,] rank, total
    stats: dict[str, float] = field(
        default_factory=dict
    )  # prompt/cached/new tokens, tokens/s, candidates, lookup_candidates
    candidates: list[dict[str, Any]] = field(
        default_factory=list
    )  # every ranked candidate: text, source, confidence, features
    prompt_info: dict[str, Any] = field(default_factory=dict)  # what went into the prompt: repository snippets, tokens
    more: bool = (
        False  # the top suggestion was cut by the new-token count or the deadline: ``complete(.., more=True)`` goes on
    )


CancelFn = Callable[[], bool]


@dataclass
class _Shown:
    """The last model answer for a document, for the type-ahead cache."""

    line: int
    line_prefix: str
    line_suffix: str
    before: str  # text before the cursor line (tail)
    after: str  # text after the cursor line
    suggestions: list[Suggestion]


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
        self._shown: OrderedDict[str, _Shown] = OrderedDict()
        self._sections: OrderedDict[str, tuple[tuple[Any, ...], str, list[Snippet]]] = (
            OrderedDict()
        )  # uri -> (key, text, snippets)
        self._lock = threading.RLock()
        self.speeds: latency.Speeds | None = None  # this machine's, for the latency target (local engine)
        self._ahead: OrderedDict[str, _Shown] = (
            OrderedDict()
        )  # per document: the answer as if its suggestion were accepted
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
            self._shown.clear()
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
        with self._lock:
            self._shown.pop(uri, None)
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
        budget = token_budget(settings.context_tokens, engine.context_length, settings.max_new_tokens)
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
            ),
        )
        mode, _ = decide_mode(ctx, settings.multiline, req.language_id or "python")
        hit = self._typeahead(req.uri, ctx, settings) if mode != "none" else []
        return self._done(CompletionResult(hit, mode, "typeahead"), {}, t0) if hit else None

    def complete_ahead(
        self, req: CompletionRequest, settings: Settings, text: str, cancel: CancelFn | None = None
    ) -> CompletionResult:
        """The completion as if ``text`` (the suggestion shown) were accepted at ``req``'s cursor
        (llama.vim's speculative request), kept as a second type-ahead entry: the request right
        after an accept is answered from it at once."""
        from codegen_ls.suggest.context import offset_of

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
        self, engine: Engine, counter: TokenCounter, req: CompletionRequest, settings: Settings
    ) -> tuple[Context, dict[str, Any]]:
        """(the prompt context for ``req`` under sized ``settings``, what went into its prompt)."""
        budget = token_budget(settings.context_tokens, engine.context_length, settings.max_new_tokens)
        preamble, prompt_info = self._repo_section(engine, counter, req, settings, budget)
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
                fim_budget=_fim_budget(engine, settings, budget),
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
        are answered with the longer text. ``warm``: only prefill this cursor's prompt (:meth:`warm`);
        ``ahead``: remembered as the answer after an accept (:meth:`complete_ahead`).
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        engine, counter, loaded = self._engine_for(settings)
        if loaded:  # the model was loaded for this request: not part of the completion's time
            timings["load"] = _ms(t0)
            t0 = time.perf_counter()
        if isinstance(engine, Engine):  # the local engine's prompt cache: promptCacheMb
            engine.set_cache_limit(settings.prompt_cache_mb, settings.context_tokens)
        planned = self.sized(settings)
        full_new = settings.max_new_tokens
        settings = replace(planned, max_new_tokens=full_new, deadline_ms=CONTINUE_MS) if more else planned
        language = req.language_id or "python"  # the models are trained on Python
        ctx, prompt_info = self._context(engine, counter, req, settings)
        if warm:
            return self._done(
                CompletionResult(
                    [], Mode.NONE, "warm", stats={"prompt_tokens": _prefill(engine, ctx, req.uri, cancel)}
                ),
                timings,
                t0,
            )
        mode, reason = decide_mode(ctx, settings.multiline, language)
        timings["context"] = _ms(t0)
        if mode == Mode.NONE:
            return self._done(CompletionResult([], mode, reason), timings, t0)

        hit = [] if more or ahead else self._typeahead(req.uri, ctx, settings)
        if hit:
            return self._done(CompletionResult(hit, mode, "typeahead"), timings, t0)

        gen = engine.generate(
            ctx.prompt,
            doc_key=req.uri,
            n=settings.num_candidates,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            stop=make_stop(ctx, mode, ctx.held),
            deadline_ms=settings.deadline_ms,
            cancel=cancel,
            heal=True,
            **({"suffix": ctx.suffix} if isinstance(engine, RemoteEngine) else {}),
        )
        timings["prefill"] = round(gen.stats.prefill_ms, 1)
        timings["decode"] = round(gen.stats.decode_ms, 1)
        items = [
            self._item(engine, c, ctx, mode, ctx.held, language, Source.SAMPLE if c.sampled else Source.GREEDY)
            for c in gen.candidates
        ]
        n_lookup = 0
        if settings.lookup and _lookup is not None:
            t1 = time.perf_counter()
            found = self._lookup(engine, req, ctx, mode, settings, cancel, t0)
            n_lookup = len(found)
            items += [self._item(engine, c, ctx, mode, "", language, c.source) for c in found]
            timings["lookup"] = _ms(t1)

        t2 = time.perf_counter()
        ranked = rank(
            [it for it in items if it is not None],
            ctx,
            mode,
            language,
            confidence.for_model(getattr(engine, "model_dir", None)),
        )
        explained = [
            {
                "text": r.text,
                "source": r.source,
                "sources": r.sources,
                "confidence": round(r.confidence, 4),
                "score": round(r.score, 4),
                "origin": r.origin,
                "features": r.features,
            }
            for r in ranked
        ]
        prompt_info["prompt_tokens"] = len(ctx.prompt_ids)
        prompt_info["repo_tokens"] = ctx.preamble_tokens
        suggestions = [
            Suggestion(
                r.text,
                (ctx.line, ctx.character),
                (ctx.line, ctx.character),
                round(r.score, 4),
                round(r.confidence, 4),
                r.source,
                round(r.logprob_mean, 4),
                r.finish_reason,
            )
            for r in ranked
        ]
        # lookup drafts join the model's candidates: numCandidates caps the total shown
        shown = [s for s in suggestions if s.confidence >= settings.min_confidence][: settings.num_candidates]
        timings["rank"] = _ms(t2)
        if not shown:
            reason = "below minConfidence" if suggestions else "no usable candidate"
        self._remember(req.uri, ctx, shown, ahead, keep_ahead=more)
        st = gen.stats
        stats = {
            "prompt_tokens": st.prompt_tokens,
            "cached_tokens": st.cached_tokens,
            "new_tokens": st.new_tokens,
            "tokens_per_s": round(st.tokens_per_s, 1),
            "candidates": len(gen.candidates),
            "lookup_candidates": n_lookup,
        }
        cut = (
            bool(shown)
            and not more
            and shown[0].finish_reason in ("length", "deadline")
            and (shown[0].finish_reason == "deadline" or settings.max_new_tokens < full_new)
        )
        return self._done(
            CompletionResult(
                shown,
                mode,
                reason if not shown else "",
                stats=stats,
                candidates=explained,
                prompt_info=prompt_info,
                more=cut,
            ),
            timings,
            t0,
        )

    def _done(self, result: CompletionResult, timings: dict[str, float], t0: float) -> CompletionResult:
        timings["total"] = _ms(t0)
        result.timings = timings
        return result

    def _item(
        self, engine: Engine, cand: Candidate, ctx: Context, mode: str, held_out: str, language_id: str, source: str
    ) -> Item | None:
        cleaned = clean(cand.text, ctx, mode, held_out, cand.finish_reason, language_id)
        if cleaned is None:
            return None
        logprobs = _kept_logprobs(engine, cand, cleaned.kept_chars)
        return Item(
            cleaned.text,
            logprobs,
            source,
            cand.finish_reason,
            cleaned.truncated,
            cleaned.reindented,
            **{k: getattr(cand, k) for k in DRAFT_EVIDENCE if hasattr(cand, k)},
        )

    def _lookup(
        self,
        engine: Engine,
        req: CompletionRequest,
        ctx: Context,
        mode: str,
        settings: Settings,
        cancel: CancelFn | None,
        t0: float,
    ) -> list[Candidate]:
        """Lookup candidates, continuing the cursor itself (not the prompt, which may end before ``held``)."""
        assert _lookup is not None
        prompt_ids = engine.tokenizer.encode(ctx.prompt + ctx.held) if ctx.held else ctx.prompt_ids
        left = max(LOOKUP_MIN_MS, settings.deadline_ms - _ms(t0))
        prefix, suffix, others = _lookup_texts(req, ctx.cursor, _lookup)
        return _lookup.propose(
            engine,
            prompt_ids,
            prefix,
            suffix,
            others,
            _lookup.ProposeOptions(
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
                    repo_exclude=_open_paths(req),
                ),
            ),
        )

    def _repo_section(
        self, engine: Engine, counter: TokenCounter, req: CompletionRequest, settings: Settings, budget: int
    ) -> tuple[str, dict[str, Any]]:
        """The prompt's repository section for ``req`` and what it holds (for ``complete --json``).

        Chosen again only when the index changed or the cursor entered another block of
        ``REPO_QUERY_STEP`` lines, so the prompt's start stays the same while the user types
        (KV-cache reuse); cut to ``repoContextTokens`` and to a quarter of the prompt budget.
        """
        tokens = min(settings.repo_context_tokens, budget // 4)
        if req.repo is None or not settings.repo_context or tokens <= 0 or not len(req.repo):
            return "", {}
        anchor = req.line - req.line % REPO_QUERY_STEP
        key = (req.repo.version, id(req.repo), anchor, tokens, hash(req.text[:REPO_IMPORT_CHARS]))
        with self._lock:
            hit = self._sections.get(req.uri)
        if hit is not None and hit[0] == key:
            text, snippets = hit[1], hit[2]
        else:
            lo, _, _ = offset_of(req.text, max(0, anchor - REPO_QUERY_LINES), 0)
            hi, _, _ = offset_of(req.text, anchor, 0)
            snippets = req.repo.snippets(
                req.text[lo:hi],
                tokens * REPO_CHARS_PER_TOKEN,
                document_path=path_of(req.uri),
                document_text=req.text[:REPO_IMPORT_CHARS],
                exclude=_open_paths(req),
            )
            eot = engine.tokenizer.decode([engine.eos_id])
            while snippets and len(counter.encode(render_snippets(snippets, eot))) > tokens:
                snippets = snippets[:-1]  # the weakest go first
            text = render_snippets(snippets, eot)
            with self._lock:
                self._sections[req.uri] = (key, text, snippets)
                self._sections.move_to_end(req.uri)
                while len(self._sections) > REPO_SECTIONS:
                    self._sections.popitem(last=False)
        info = {
            "repo_snippets": [
                {"file": s.rel, "line": s.start + 1, "lines": s.text.count("\n") + 1, "why": s.why, "score": s.score}
                for s in snippets
            ]
        }
        return text, info

    # -- type-ahead cache ------------------------------------------------------------------
    def _remember(
        self, uri: str, ctx: Context, suggestions: list[Suggestion], ahead: bool = False, keep_ahead: bool = False
    ) -> None:
        with self._lock:
            table = self._ahead if ahead else self._shown
            if not keep_ahead:  # a new answer: the one after accepting the last is stale (a continuation's is not)
                self._ahead.pop(uri, None)
            if not suggestions:
                table.pop(uri, None)
                return
            table[uri] = _Shown(
                ctx.line, ctx.line_prefix, ctx.line_suffix, ctx.before_line, ctx.after_line, suggestions
            )
            table.move_to_end(uri)
            while len(table) > TYPEAHEAD_DOCUMENTS:
                table.popitem(last=False)

    def _typeahead(self, uri: str, ctx: Context, settings: Settings) -> list[Suggestion]:
        """The rest of the last suggestions when the user typed (or erased) along them on the line;
        else of the answer computed as if the last suggestion were accepted (:meth:`complete_ahead`)."""
        with self._lock:
            entries = [self._shown.get(uri), self._ahead.get(uri)]
        for shown in entries:
            out = self._rest(shown, ctx, settings) if shown is not None and _along(shown, ctx) else []
            if out:
                return out
        return []

    def _rest(self, shown: _Shown, ctx: Context, settings: Settings) -> list[Suggestion]:
        """``shown``'s suggestions less what was typed since they were made."""
        typed = ctx.line_prefix[len(shown.line_prefix) :]
        out = []
        for s in shown.suggestions:
            if (
                s.insert_text.startswith(typed)
                and len(s.insert_text) > len(typed)
                and s.confidence >= settings.min_confidence
            ):
                out.append(
                    replace(
                        s,
                        insert_text=s.insert_text[len(typed) :],
                        start=(ctx.line, ctx.character),
                        end=(ctx.line, ctx.character),
                        source=Source.TYPEAHEAD,
                    )
                )
        return out


def remote_options(settings: Settings) -> RemoteOptions | None:
    """The remote backend the settings ask for (None: the local engine)."""
    if settings.backend != "remote":
        return None
    return RemoteOptions(settings.remote_url, settings.remote_model, settings.remote_api_key_env, settings.remote_fim)


DRAFT_EVIDENCE = (
    "distance",
    "agree",
    "draft_tokens",
    "copied_tokens",
    "rejected",
    "origin",
)  # drafts.DraftCandidate -> Item


def _open_paths(req: CompletionRequest) -> set[str]:
    """Files whose text the request has from the editor (this document, the open ones): the
    repository's copies on disk are left out."""
    return {p for p in (path_of(u) for u in (req.uri, *req.other_documents)) if p}


def _lookup_texts(req: CompletionRequest, cursor: int, lookup: ModuleType) -> tuple[str, str, dict[str, str]]:
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


def _along(shown: _Shown, ctx: Context) -> bool:
    """The cursor is on ``shown``'s line, after its start, with the same text around."""
    return (
        shown.line == ctx.line
        and shown.line_suffix == ctx.line_suffix
        and ctx.line_prefix.startswith(shown.line_prefix)
        and shown.after == ctx.after_line
        and _same_tail(shown.before, ctx.before_line)
    )


def _same_tail(a: str, b: str) -> bool:
    """Equal text before the cursor line (the window may have moved: compare the common tail)."""
    n = min(len(a), len(b))
    return a[len(a) - n :] == b[len(b) - n :]


def _kept_logprobs(engine: Engine, cand: Candidate, kept_chars: int) -> list[float]:
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
