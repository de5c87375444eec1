"""ONNX CodeGen inference: the loaded model, N candidates from one prefill, log-probs, draft scoring.

The engine knows nothing about LSP. It loads a model directory (see :mod:`codegen_ls.engine.modeldir`),
keeps one KV-cache snapshot per document (:mod:`codegen_ls.engine.prompt_cache`), reuses the
longest common token prefix of each new prompt (llama.cpp's ``cache_prompt``), and generates
candidates: the greedy one plus samples, all from ONE shared prefill (options and results:
:mod:`codegen_ls.engine.generation`). How the ONNX graph is run (and what a KV snapshot is)
belongs to the backend the manifest's graph kind selects (:mod:`codegen_ls.engine.backends`).

Input and output names are read from the session; no layer count or shape is hard-coded.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codegen_ls.engine import kernels, kvcache
from codegen_ls.engine.backends import (
    Backend,
    GqaBackend,
    OptimumBackend,
    PrefillCancelled,
    release_free_heap,
)
from codegen_ls.engine.fim import Fim
from codegen_ls.engine.generation import (
    Candidate,
    GenerateOptions,
    Generation,
    GenerationStats,
    StopFn,
    resolve,
)
from codegen_ls.engine.modeldir import Manifest, read_manifest, verify_at_load
from codegen_ls.engine.prompt_cache import (
    AUTO_CACHE_DOCUMENTS,
    SNAPSHOT_ROOM,
    PromptCache,
    _Snapshot,
    common_prefix,
    kv_bytes_per_token,
)
from codegen_ls.engine.sampling import log_softmax, sample_token
from codegen_ls.engine.tokenizer import Tokenizer
from codegen_ls.errors import Cancelled, ModelError
from codegen_ls.kinds import FinishReason

log = logging.getLogger(__name__)


@dataclass
class ForwardResult:
    """Result of running a prompt through the model with the cache."""

    logits: np.ndarray  # [k, vocab] for positions logits_from .. len(ids)-1
    past: Any  # the backend state covering all of ids
    cached_tokens: int
    fed_tokens: int


BACKENDS: dict[str, Callable[[Any, int, int, int], Backend]] = {
    "optimum": OptimumBackend,
    "gqa": GqaBackend,
}


RETIRED_GRAPHS = {"flat": "the flat graph (shared-prefix KV buffers) was retired: gqa is faster and lighter"}


def check_graph(model_dir: Path, graph: str) -> None:
    """Raise :class:`ModelError` with one line unless this version has a backend for ``graph``."""
    if graph in RETIRED_GRAPHS:
        raise ModelError(
            f"{model_dir}: this model was exported with --graph {graph}, which this version no longer "
            f"runs ({RETIRED_GRAPHS[graph]}); export it again: codegen-ls model export SRC OUT"
        )
    if graph not in BACKENDS:
        raise ModelError(
            f"{model_dir}: unknown graph kind '{graph}' (this version knows {', '.join(sorted(BACKENDS))})"
        )


@dataclass
class EngineOptions:
    threads: int = 0  # 0: all cores
    cache_bytes: int = 512 * 1024 * 1024
    prefill_chunk: int = 128  # tokens per prefill run, so cancel/deadline are checked in between (and
    # the attention scores of one run, chunk x context x heads, stay small: 16 MB at 2048 x 16 heads)
    native_kernel: bool = True  # our decode-attention kernel where built (codegen_ls.engine.kernels)


class Engine:
    """A loaded model: ONNX session + tokenizer + prompt cache. Thread-safe (one call at a time).

    The graph kind in the manifest (``extra.graph``: ``optimum`` when absent, or ``gqa``)
    selects the backend (:mod:`codegen_ls.engine.backends`); generation, sampling, stop rules and the
    prompt cache are the same for all.
    """

    def __init__(self, model_dir: str | os.PathLike[str], options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.model_dir = Path(model_dir)
        self.manifest: Manifest = read_manifest(self.model_dir)
        self.graph = str(self.manifest.extra.get("graph", "optimum"))
        check_graph(self.model_dir, self.graph)
        verify_at_load(self.model_dir, self.manifest)  # checksums, on a directory's first load
        self.tokenizer = Tokenizer(self.model_dir / self.manifest.tokenizer)
        self.session, kernel = self._load_session()
        self.attention = kernel or (
            kernels.ONNXRUNTIME_ATTENTION if self.graph == "gqa" else "onnxruntime MatMul + Softmax"
        )
        try:
            self.backend: Backend = BACKENDS[self.graph](
                self.session, self.options.prefill_chunk, self.manifest.n_head, self.manifest.n_layer
            )
        except ModelError as exc:
            raise ModelError(f"{self.model_dir}: {exc}") from None
        if self.tokenizer.vocab_size > self.manifest.vocab_size:
            raise ModelError(f"{self.model_dir}: tokenizer has more tokens than the model's vocabulary")
        self.cache = PromptCache(self.options.cache_bytes)
        self.eos_id = self.manifest.eos_token_id
        self.context_length = self.manifest.context_length
        self.fim: Fim | None = self._load_fim()  # fill-in-the-middle tokens, or None
        # never generated: the FIM control tokens (a candidate is plain text)
        self._banned = np.asarray([self.fim.prefix, self.fim.middle, self.fim.suffix] if self.fim else [], np.int64)
        self._lock = threading.RLock()
        self._by_bytes: tuple[list[bytes], np.ndarray] | None = None  # token healing lookup

    # -- loading ---------------------------------------------------------------------------
    def _load_session(self) -> tuple[Any, str | None]:
        """The onnxruntime session, with our decode-attention kernel registered where the model
        names it; returns (the session, the kernel's description or None)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        kernel = self._register_kernel(so)
        path = self.model_dir / self.manifest.onnx
        try:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        release_free_heap()  # the parsed model and the weights replaced by prepacked ones
        return session, kernel

    def _register_kernel(self, so: Any) -> str | None:
        """Decode attention: our kernel claims the graph's codegen_ls.DecodeAttention nodes where it
        is built (otherwise onnxruntime inlines their function body, GroupQueryAttention); a 4-bit
        cache's op only our kernel runs, so there it is required."""
        op = self.manifest.extra.get("decode_attention")
        if op == kernels.OP:
            return kernels.register(so, self.options.native_kernel)
        if op != kernels.OP4:
            return None
        if not kvcache.manifest_ok(self.manifest.extra):
            raise ModelError(
                f"{self.model_dir}: its 4-bit KV cache is the format of an earlier codegen-ls (keys not "
                "rotated, or rows not in the kernel's blocks), which this version does not read; export "
                "the model again"
            )
        kernel = kernels.register(so, self.options.native_kernel, required=True)
        if kernel is None:
            raise ModelError(
                f"{self.model_dir}: its 4-bit KV cache (exported with --kv-bits 4) needs codegen-ls's "
                f"decode-attention kernel, which is {kernels.status(required=True)}; reinstall "
                "codegen-ls where a C compiler is, or export the model with --kv-bits 8"
            )
        if not kernels.vector4(head_dim=self.manifest.head_dim):
            log.warning(
                "%s: the 4-bit KV cache's attention has no vector path here (AVX-512 VNNI or AVX2), so a "
                "slow plain C loop runs it; a model exported with --kv-bits 8 decodes faster here",
                self.model_dir,
            )
        return kernel

    def _load_fim(self) -> Fim | None:
        try:
            return Fim.from_json(self.manifest.fim)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{self.model_dir}: invalid fim record in the manifest: {exc}") from None

    def set_cache_limit(self, megabytes: int, context_tokens: int) -> int:
        """Apply the ``promptCacheMb`` setting; 0 sizes the prompt cache to the model: room for
        :data:`AUTO_CACHE_DOCUMENTS` documents' snapshots at ``context_tokens``. Returns the bytes."""
        limit = (
            megabytes << 20
            if megabytes > 0
            else AUTO_CACHE_DOCUMENTS
            * kv_bytes_per_token(self.manifest)
            * (min(context_tokens, self.context_length) + SNAPSHOT_ROOM)
        )
        if limit != self.cache.max_bytes:
            with self._lock:
                self.cache.resize(limit)
        return limit

    @property
    def tokens_fed(self) -> int:
        """Total tokens run through the session (cache reuse skips work)."""
        return self.backend.tokens_fed

    @property
    def session_ms(self) -> float:
        """Time inside ``session.run``, to compare with end-to-end time."""
        return self.backend.session_ms

    def forward(
        self, ids: Sequence[int], doc_key: str, logits_from: int | None = None, cancel: Callable[[], bool] | None = None
    ) -> ForwardResult:
        """Run ``ids`` reusing the document's cached prefix; return logits from ``logits_from`` on.

        Always feeds at least one token (fresh logits). Stores the new snapshot for ``doc_key``.
        """
        with self._lock:
            return self._forward(ids, doc_key, logits_from, cancel)

    def _forward(
        self, ids: Sequence[int], doc_key: str, logits_from: int | None, cancel: Callable[[], bool] | None
    ) -> ForwardResult:
        if not ids:
            raise ValueError("empty prompt")
        ids = list(ids)
        logits_from = len(ids) - 1 if logits_from is None else max(0, min(logits_from, len(ids) - 1))
        snap = self.cache.get(doc_key)
        p = min(common_prefix(snap.ids, ids), logits_from) if snap else 0  # >= 1 token is fed
        try:
            logits, state = self.backend.prefill(snap.past if snap else None, p, ids, logits_from, cancel)
        except PrefillCancelled as exc:  # keep what was fed: a later request continues from there
            if exc.length > 0:
                self.cache.put(doc_key, _Snapshot(ids[: exc.length], exc.state))
            elif snap is not None and self.backend.in_place:
                self.cache.drop(doc_key)
            raise
        except BaseException:
            if snap is not None and self.backend.in_place:  # the buffer now holds ids[:length]
                self.cache.put(doc_key, _Snapshot(ids[: snap.past.length], snap.past))
            raise
        self.cache.put(doc_key, _Snapshot(ids, state))
        return ForwardResult(logits, state, p, len(ids) - p)

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        options: GenerateOptions | None = None,
        *,
        doc_key: str = "default",
        **overrides: Any,
    ) -> Generation:
        """Candidate 0 is greedy; candidates 1..n-1 are samples. All share one prefill.

        ``options`` says how (:class:`GenerateOptions`); keyword ``overrides`` replace its fields
        (``engine.generate(ids, max_new_tokens=4)``: a shorthand for tests and scripts).
        ``heal`` (text prompts only): drop the prompt's last token and let the model regenerate
        it, constrained to start with the dropped text (token healing), so a cursor in the
        middle of a word is continued with natural tokens. The dropped text is removed from the
        candidates' text again, so ``text`` always continues the prompt.
        """
        opts = resolve(options, overrides)
        with self._lock:
            return self._generate(prompt, doc_key, opts)

    def _generate(self, prompt: str | Sequence[int], doc_key: str, opts: GenerateOptions) -> Generation:
        t0 = time.perf_counter()
        ids, healed, max_new_tokens = self._prompt_ids(prompt, opts.heal, opts.max_new_tokens)
        stats = GenerationStats(prompt_tokens=len(ids))
        fwd = self._forward(ids, doc_key, None, opts.cancel)
        stats.cached_tokens, stats.fed_tokens = fwd.cached_tokens, fwd.fed_tokens
        stats.prefill_ms = (time.perf_counter() - t0) * 1000
        n = max(1, opts.n)
        run = _DecodeRun(opts, max_new_tokens, healed, t0, np.random.default_rng(opts.seed))
        logp = self._first_logp(fwd.logits[-1], healed)
        run.rows = [_Row(i > 0) for i in range(n)]
        run.active = list(range(n))
        run.next_tokens = [int(np.argmax(logp))] + [run.sample(logp) for _ in range(n - 1)]
        run.step_logp = [logp] * n
        dec = self.backend.begin(fwd.past, len(ids), n, max_new_tokens)
        t_dec, sess0 = time.perf_counter(), self.session_ms
        self._decode(run, dec, stats)
        stats.decode_ms = (time.perf_counter() - t_dec) * 1000
        stats.decode_session_ms = self.session_ms - sess0
        stats.new_tokens = sum(len(r.ids) for r in run.rows)
        cands = [Candidate(r.text, r.ids, r.logprobs, r.finish or FinishReason.LENGTH, r.sampled) for r in run.rows]
        return Generation(cands, stats, healed.decode("utf-8", "replace"))

    def _decode(self, run: _DecodeRun, dec: Any, stats: GenerationStats) -> None:
        """Decode steps until every row has finished (EOS, stop rule, length, deadline)."""
        for step in range(run.max_new_tokens):
            still = self._accept(run)
            if not still or step == run.max_new_tokens - 1:
                break
            if run.opts.cancel is not None and run.opts.cancel():
                raise Cancelled("cancelled")
            if run.opts.deadline_ms is not None and (time.perf_counter() - run.t0) * 1000 > run.opts.deadline_ms:
                for slot in still:
                    run.rows[run.active[slot]].finish = FinishReason.DEADLINE
                break
            if len(still) < len(run.active):  # drop finished rows from the batch
                self.backend.keep_rows(dec, np.asarray(still))
            run.active = [run.active[s] for s in still]
            logits = self.backend.step(dec, [run.rows[r].ids[-1] for r in run.active])
            stats.steps += 1
            run.step_logp = list(log_softmax(logits))  # one row per active candidate
            if self._banned.size:
                for lp in run.step_logp:
                    lp[self._banned] = -np.inf
            run.next_tokens = [
                run.sample(lp) if run.rows[r].sampled else int(np.argmax(lp))
                for lp, r in zip(run.step_logp, run.active)
            ]

    def _accept(self, run: _DecodeRun) -> list[int]:
        """Append each active row's next token (EOS and the stop rule finish a row); returns the
        slots of the rows that go on."""
        still: list[int] = []
        for slot, r in enumerate(run.active):
            row, tok = run.rows[r], run.next_tokens[slot]
            if tok == self.eos_id:
                row.finish = FinishReason.EOS
                continue
            row.ids.append(tok)
            row.logprobs.append(float(run.step_logp[slot][tok]))
            text = self.tokenizer.text_of(row.ids, run.healed)  # whole characters only (no U+FFFD)
            row.text = text
            cut = run.opts.stop(text) if run.opts.stop is not None else None
            if cut is not None:
                row.text, row.finish = text[:cut], FinishReason.STOP
                continue
            still.append(slot)
        return still

    def _prompt_ids(self, prompt: str | Sequence[int], heal: bool, max_new_tokens: int) -> tuple[list[int], bytes, int]:
        """The prompt's ids (the end of an over-long one; with ``heal``, a text prompt's last token
        dropped), the bytes token healing dropped, and the new tokens that fit the context."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        healed = b""
        if heal and isinstance(prompt, str) and len(ids) > 1 and ids[-1] not in self._banned:
            healed = self.tokenizer.token_bytes()[ids[-1]]
            ids = ids[:-1]
        if not ids:
            ids = [self.eos_id]
        room = max(1, self.context_length - max_new_tokens)
        if len(ids) > room:  # keep the end of an over-long prompt
            ids = ids[-room:]
        return ids, healed, max(1, min(max_new_tokens, self.context_length - len(ids)))

    def _first_logp(self, logits: np.ndarray, healed: bytes) -> np.ndarray:
        """The first new token's log-probs: never a banned (FIM) token; with healing, only tokens
        that start with the dropped bytes."""
        logp = log_softmax(logits)
        if self._banned.size:
            logp[self._banned] = -np.inf
        if healed:
            logp = logp + self._heal_mask(healed)
        return logp

    def _heal_mask(self, healed: bytes) -> np.ndarray:
        """0 for tokens whose bytes start with ``healed``, -inf for the rest.

        Tokens sorted by their bytes once; those starting with ``healed`` are one contiguous
        range of that order, found by bisection (this runs on every healed request).
        """
        if self._by_bytes is None:
            table = self.tokenizer.token_bytes()[: self.manifest.vocab_size]
            order = sorted(range(len(table)), key=table.__getitem__)
            self._by_bytes = ([table[i] for i in order], np.asarray(order, dtype=np.int64))
        keys, ids = self._by_bytes
        lo = bisect.bisect_left(keys, healed)
        upper = healed.rstrip(b"\xff")  # smallest byte string above every one starting with healed
        hi = bisect.bisect_left(keys, upper[:-1] + bytes([upper[-1] + 1])) if upper else len(keys)
        mask = np.full(self.manifest.vocab_size, -np.inf)
        mask[ids[lo:hi]] = 0.0
        return mask

    def without_banned(self, logp: np.ndarray) -> np.ndarray:
        """``logp`` (last axis: the vocabulary) with the FIM control tokens at -inf (a copy where there are any)."""
        if not self._banned.size:
            return logp
        out = np.array(logp, copy=True)
        out[..., self._banned] = -np.inf
        return out

    def score(
        self,
        prompt_ids: Sequence[int],
        draft_ids: Sequence[int],
        doc_key: str = "default",
        cancel: Callable[[], bool] | None = None,
    ) -> tuple[list[float], list[int], np.ndarray]:
        """Verify a draft in ONE forward pass on top of the cached prompt.

        Returns (log-prob of each draft token, the model's greedy token at each draft position,
        log-probs of the token after the whole draft).
        """
        with self._lock:
            ids = list(prompt_ids) + list(draft_ids)
            fwd = self._forward(ids, doc_key, len(prompt_ids) - 1, cancel)
            lp = log_softmax(fwd.logits)
            draft_lp = [float(lp[i, t]) for i, t in enumerate(draft_ids)]
            allowed = self.without_banned(lp)  # as in generate(): the greedy token is never a FIM token
            greedy = [int(np.argmax(allowed[i])) for i in range(len(draft_ids))]
            return draft_lp, greedy, lp[-1]


@dataclass
class _Row:
    sampled: bool
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None


@dataclass
class _DecodeRun:
    """One request's decode: its options, the rows, the active rows' slots and their next tokens."""

    opts: GenerateOptions
    max_new_tokens: int
    healed: bytes
    t0: float
    rng: np.random.Generator
    rows: list[_Row] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)
    step_logp: list[np.ndarray] = field(default_factory=list)

    def sample(self, logp: np.ndarray) -> int:
        return sample_token(logp, self.rng, self.opts.temperature, self.opts.top_k, self.opts.top_p)


__all__ = [  # the engine's names other modules and tests import from here
    "AUTO_CACHE_DOCUMENTS",
    "SNAPSHOT_ROOM",
    "Candidate",
    "Engine",
    "EngineOptions",
    "ForwardResult",
    "GenerateOptions",
    "Generation",
    "GenerationStats",
    "PromptCache",
    "StopFn",
    "Tokenizer",
    "common_prefix",
    "kv_bytes_per_token",
    "log_softmax",
    "sample_token",
]
