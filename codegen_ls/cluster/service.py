"""One replica's work: an :class:`~codegen_ls.engine.engine.Engine` answering completion bodies.

No Ray here: :class:`CompletionService` turns a checked request (:mod:`codegen_ls.cluster.protocol`)
into engine calls and the response body, so it runs (and is tested) the same inside a Ray Serve
replica and in a plain process. The KV cache is keyed by the session id the client sends
(``x-session-id``: one per document), so a document's keystrokes reuse its prompt cache on the
replica the router sends them to; every response says how many prompt tokens came from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from codegen_ls.cluster import protocol
from codegen_ls.cluster.protocol import Choice, CompletionArgs
from codegen_ls.engine.engine import Engine, log_softmax, sample_token

DEFAULT_SESSION = "anonymous"


class CompletionService:
    """The engine behind the routes, with the counters a replica reports."""

    def __init__(self, engine: Engine, model: str, replica: str = "local") -> None:
        self.engine, self.model, self.replica = engine, model, replica
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.busy_ms = 0.0
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        """Counters for routing stats and ``/health``: requests, prompt and cached tokens, documents cached."""
        return {
            "replica": self.replica,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "documents": len(self.engine.cache),
            "cache_bytes": self.engine.cache.nbytes,
            "busy_ms": round(self.busy_ms, 1),
        }

    def _count(self, prompt: int, cached: int, t0: float) -> dict[str, Any]:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.busy_ms += (time.perf_counter() - t0) * 1000
        return {"replica": self.replica, "cached_tokens": cached}

    def completions(self, body: Any, session: str | None, cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
        """``POST /v1/completions``; raises :class:`protocol.ProtocolError` or :class:`Cancelled`."""
        args = protocol.parse_completion(body)
        doc = session or DEFAULT_SESSION
        t0 = time.perf_counter()
        if args.echo:
            return self._echo(args, doc, cancel, t0)
        gen = self.engine.generate(
            args.prompt,
            doc_key=doc,
            n=args.n,
            max_new_tokens=max(1, args.max_tokens),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop=protocol.stop_at_strings(args.stop),
            deadline_ms=args.deadline_ms,
            cancel=cancel,
            seed=args.seed,
            heal=args.heal and isinstance(args.prompt, str),
        )
        choices = [
            Choice(
                c.text,
                list(c.token_ids),
                list(c.logprobs),
                c.finish_reason,
                [[(t, lp)] for t, lp in zip(c.token_ids, c.logprobs)],
            )
            for c in gen.candidates
        ]
        st = gen.stats
        extra = self._count(st.prompt_tokens, st.cached_tokens, t0)
        extra.update(prefill_ms=round(st.prefill_ms, 1), decode_ms=round(st.decode_ms, 1), healed=gen.healed)
        return protocol.completion_response(
            choices,
            model=self.model,
            prompt_tokens=st.prompt_tokens,
            cached_tokens=st.cached_tokens,
            logprobs=args.logprobs,
            decode=self.engine.tokenizer.decode,
            extra=extra,
        )

    def _echo(self, args: CompletionArgs, doc: str, cancel: Callable[[], bool] | None, t0: float) -> dict[str, Any]:
        """``echo``: the prompt's own log-probs (from ``echo_from`` on) and at most one new token.

        One forward pass over the cached prompt: this is how a client verifies a draft (the
        local engine's ``score``).
        """
        if args.max_tokens > 1:
            raise protocol.ProtocolError("with 'echo', 'max_tokens' must be 0 or 1 here")
        tok = self.engine.tokenizer
        ids = tok.encode(args.prompt) if isinstance(args.prompt, str) else list(args.prompt)
        if not ids:
            raise protocol.ProtocolError("'prompt' is empty")
        start = min(args.echo_from, len(ids))  # first prompt position whose log-prob is returned
        fwd = self.engine.forward(ids, doc, start - 1, cancel)
        lp = log_softmax(fwd.logits)  # row r predicts position start + r
        k = args.logprobs or 1
        logprobs: list[float | None] = [None] * start
        tops: list[list[tuple[int, float]]] = [[] for _ in range(start)]
        for r, pos in enumerate(range(start, len(ids))):
            logprobs.append(float(lp[r, ids[pos]]))
            tops.append(protocol.top_entries(lp[r], k))
        text, new, detail = "", [], "length"
        if args.max_tokens == 1:
            after = lp[-1]
            rng = np.random.default_rng(args.seed)
            t = sample_token(after, rng, args.temperature, args.top_k, args.top_p)
            new, detail = [t], ("eos" if t == self.engine.eos_id else "length")
            logprobs.append(float(after[t]))
            tops.append(protocol.top_entries(after, k))
            text = tok.decode([t])
        prompt_text = args.prompt if isinstance(args.prompt, str) else tok.decode(ids)
        choice = Choice(prompt_text + text, ids + new, logprobs, detail, tops)
        extra = self._count(len(ids), fwd.cached_tokens, t0)
        return protocol.completion_response(
            [choice],
            model=self.model,
            prompt_tokens=len(ids),
            cached_tokens=fwd.cached_tokens,
            logprobs=k,
            decode=tok.decode,
            extra=extra,
        )

    def infill(self, body: Any, session: str | None, cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
        """``POST /infill`` (llama.cpp server's shape)."""
        args = protocol.parse_infill(body)
        doc = session or DEFAULT_SESSION
        if not args.cache_prompt:
            self.engine.cache.drop(doc)
        t0 = time.perf_counter()
        gen = self.engine.generate(
            args.prompt,
            doc_key=doc,
            n=1,
            max_new_tokens=max(1, args.n_predict),
            temperature=args.temperature,
            stop=protocol.chain_stops(protocol.stop_at_strings(args.stop), protocol.suffix_stop(args.suffix)),
            deadline_ms=args.deadline_ms,
            cancel=cancel,
            heal=True,
        )
        c, st = gen.candidates[0], gen.stats
        extra = self._count(st.prompt_tokens, st.cached_tokens, t0)
        return protocol.infill_response(
            c.text,
            model=self.model,
            prompt_tokens=st.prompt_tokens,
            cached_tokens=st.cached_tokens,
            predicted=len(c.token_ids),
            prompt_ms=st.prefill_ms,
            predicted_ms=st.decode_ms,
            finish_detail=c.finish_reason,
            extra=extra,
        )
