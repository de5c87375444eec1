"""A remote backend: the :class:`~codegen_ls.engine.engine.Engine` surface over an OpenAI-compatible server.

With the setting ``backend: remote`` the pipeline keeps doing its own work (context, lookup drafts,
ranking, type-ahead, cancellation) and this class sends the model calls to ``remoteUrl``'s
``/v1/completions``: ``generate`` as a completion (``max_tokens``, ``temperature``, ``n``,
``logprobs``, ``suffix`` when ``remoteFim``), ``score`` (verifying a lookup draft) as an ``echo``
request with ``logprobs``. Any OpenAI-compatible completions server answers them (vLLM, llama.cpp's
server, TGI, Ollama); against our own (``codegen-ls cluster serve``, recognised by ``/v1/models``'
``owned_by``) it also asks for token healing and token ids, so its greedy suggestions are the
local engine's.

The prompt is built with a local tokenizer (the ``modelPath`` model's, the embedded one by
default): it sizes the context window and maps tokens. Each document's requests carry an
``x-session-id`` header (a hash of its URI with a per-process salt), which our cluster's router
uses to send them to the replica that holds the document's KV cache.

HTTP: one keep-alive connection (stdlib ``http.client``); each call has the request's deadline as
its time limit, retries connection failures and 429/5xx with exponential backoff while time is
left, polls the cancel flag while it waits and closes the connection when it turns true (the
server sees the request go away). Failures raise :class:`BackendUnavailable` with one line
naming the server, which the language server shows in its status. Nothing here runs unless the
backend is remote: the default never opens a socket.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import secrets
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from codegen_ls.engine.generation import (
    Candidate,
    GenerateOptions,
    Generation,
    GenerationStats,
    StopFn,
    resolve,
)
from codegen_ls.engine.modeldir import read_manifest
from codegen_ls.engine.tokenizer import Tokenizer
from codegen_ls.errors import Cancelled, CodegenLsError

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
RETRYABLE = frozenset({429, 500, 502, 503, 504})
BACKOFF_S = 0.05  # first retry's wait; doubles each time
POLL_S = 0.02  # how often a waiting call looks at the cancel flag
DEFAULT_TIMEOUT_MS = 10_000.0  # calls without a deadline of their own (draft verification, model info)
SERVER_SHARE = 0.8  # the server's decode deadline: this share of what is left of the request's
SCORE_TOP = 5  # alternatives per position asked for when verifying a draft


class BackendUnavailable(CodegenLsError):
    """The remote backend did not answer (down, unreachable, timed out, or an error status)."""


@dataclass
class RemoteOptions:
    """Where the remote backend is and how to talk to it (from the settings)."""

    url: str
    model: str = ""  # the ``model`` field; empty: the server's first model
    api_key_env: str = ""  # NAME of the environment variable holding the API key (never the key)
    fim: bool = False  # send the text after the cursor as ``suffix`` (servers with fill-in-the-middle models)
    retries: int = 2


class HttpClient:
    """JSON over one keep-alive HTTP(S) connection, with deadlines, retries and cancellation."""

    def __init__(self, url: str, api_key_env: str = "", retries: int = 2) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CodegenLsError(f"remoteUrl must be an http:// or https:// URL, got '{url}'")
        self.url = url.rstrip("/")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base = parts.path.rstrip("/")
        if self.base.endswith("/v1"):  # both http://host:8000 and http://host:8000/v1 are accepted
            self.base = self.base[:-3]
        self.api_key_env, self.retries = api_key_env, retries
        self._conn: http.client.HTTPConnection | None = None
        self.requests = 0  # HTTP requests sent (tests and logs)
        self.connections = 0  # connections opened

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=timeout)
            self.connections += 1
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _headers(self, session: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if key:
                headers["Authorization"] = f"Bearer {key}"
        if session:
            headers[SESSION_HEADER] = session
        return headers

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout_ms: float,
        cancel: Callable[[], bool] | None = None,
        session: str | None = None,
    ) -> dict[str, Any]:
        """The JSON answer of ``method path``; raises :class:`BackendUnavailable` or :class:`Cancelled`."""
        deadline = time.monotonic() + timeout_ms / 1000
        request = _Request(method, path, json.dumps(body).encode() if body is not None else None, session)
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status, payload = self._once(request, deadline, cancel)
            except Cancelled:
                self.close()  # the server sees the request go away
                raise
            except (OSError, http.client.HTTPException, TimeoutError) as exc:
                self.close()
                problem = _describe(exc)
                if isinstance(exc, TimeoutError) or "timed out" in problem:
                    break  # the time is spent: no retry fits
                if attempt == 0 and isinstance(
                    exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                ):
                    continue  # a kept-alive connection the server had closed: reconnect at once
            else:
                if status < 300:
                    return payload
                problem = f"HTTP {status}: {_error_message(payload)}"
                if status not in RETRYABLE:
                    raise BackendUnavailable(f"remote backend {self.url} refused the request: {problem}")
            self._sleep(BACKOFF_S * 2**attempt, deadline, cancel)
        raise BackendUnavailable(f"remote backend {self.url} unreachable: {problem}")

    def _once(self, req: _Request, deadline: float, cancel: Callable[[], bool] | None) -> tuple[int, Any]:
        conn = self._connection(deadline - time.monotonic())
        conn.request(req.method, self.base + req.path, body=req.data, headers=self._headers(req.session))
        self.requests += 1
        sock = conn.sock
        while sock is not None:  # wait for the answer, looking at the cancel flag and the deadline
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            readable, _, _ = select.select([sock], [], [], min(POLL_S, remaining))
            if readable:
                break
        resp = conn.getresponse()
        raw = resp.read()
        if resp.will_close:
            self.close()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, {"error": {"message": raw[:200].decode("utf-8", "replace")}}

    @staticmethod
    def _sleep(seconds: float, deadline: float, cancel: Callable[[], bool] | None) -> None:
        end = min(time.monotonic() + seconds, deadline)
        while time.monotonic() < end:
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))


@dataclass(frozen=True)
class _Request:
    """One HTTP request as :meth:`HttpClient.call` sends it, each attempt the same."""

    method: str
    path: str
    data: bytes | None
    session: str | None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "timed out"
    return text.splitlines()[0][:200]


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail", payload))
        if isinstance(err, dict):
            return str(err.get("message", err))[:200]
        return str(err)[:200]
    return str(payload)[:200]


class _NoCache:
    """The local engine's prompt cache has no remote twin here: the server keeps its own."""

    nbytes = 0

    def drop(self, key: str) -> None:
        pass

    def __len__(self) -> int:
        return 0


class RemoteEngine:
    """``generate`` / ``score`` over HTTP, with the local tokenizer for context and token maps."""

    graph = "remote"
    attention = "remote"

    def __init__(self, options: RemoteOptions, model_dir: str | os.PathLike[str]) -> None:
        self.options = options
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir / self.manifest.tokenizer)
        self.eos_id = self.manifest.eos_token_id
        self.context_length = self.manifest.context_length
        self.cache = _NoCache()
        self.http = HttpClient(options.url, options.api_key_env, options.retries)
        self._salt = secrets.token_hex(8)
        self._ours: bool | None = None  # the server is codegen-ls's cluster (None: not asked yet)
        self._model = options.model
        self._ids_by_bytes: dict[bytes, int] | None = None
        self.timeout_ms = DEFAULT_TIMEOUT_MS  # for calls without a deadline: the last request's budget

    @property
    def description(self) -> str:
        kind = "codegen-ls cluster" if self._ours else "OpenAI-compatible server"
        return f"{self._model or 'remote model'} at {self.options.url} ({kind})"

    def probe(self, timeout_ms: float = 2000.0, cancel: Callable[[], bool] | None = None) -> None:
        """Ask ``/v1/models`` which server this is and which model it serves; raises :class:`BackendUnavailable`."""
        answer = self.http.call("GET", "/v1/models", timeout_ms=timeout_ms, cancel=cancel)
        models = answer.get("data") or []
        chosen = next((m for m in models if m.get("id") == self._model), models[0] if models else {})
        self._ours = chosen.get("owned_by") == "codegen-ls"
        if not self._model:
            self._model = str(chosen.get("id", ""))
        info = chosen.get("codegen_ls") or {}
        if self._ours and info.get("context_length"):
            self.context_length = int(info["context_length"])

    def session(self, doc_key: str) -> str:
        """The ``x-session-id`` of a document: stable for this process, reveals nothing of the URI."""
        return hashlib.blake2b(f"{self._salt}\0{doc_key}".encode(), digest_size=12).hexdigest()

    def _post(
        self, body: dict[str, Any], doc_key: str, timeout_ms: float, cancel: Callable[[], bool] | None
    ) -> dict[str, Any]:
        if self._ours is None:
            self.probe(min(timeout_ms, 2000.0), cancel)
        if self._model:
            body["model"] = self._model
        return self.http.call(
            "POST", "/v1/completions", body, timeout_ms=timeout_ms, cancel=cancel, session=self.session(doc_key)
        )

    # -- the Engine surface the pipeline uses ------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        options: GenerateOptions | None = None,
        *,
        doc_key: str = "default",
        suffix: str | None = None,
        **overrides: Any,
    ) -> Generation:
        """Candidate 0 greedy, 1..n-1 sampled, as :meth:`Engine.generate` (the same ``options``
        and keyword ``overrides``); ``stop`` applied here per token; ``suffix``: the text after
        the cursor, sent where the ``remoteFim`` setting says the server's model takes it."""
        opts = resolve(options, overrides)
        t0 = time.monotonic()
        budget = float(opts.deadline_ms) if opts.deadline_ms else DEFAULT_TIMEOUT_MS
        self.timeout_ms = budget
        if self._ours is None:
            self.probe(min(budget, 2000.0), opts.cancel)
        body: dict[str, Any] = {
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": opts.max_new_tokens,
            "logprobs": 1,
        }
        if suffix is not None and self.options.fim:
            body["suffix"] = suffix
        left = lambda: budget - (time.monotonic() - t0) * 1000  # noqa: E731
        if self._ours:  # one request: the engine's own N-from-one-prefill (choice 0 greedy)
            body.update(
                n=opts.n,
                temperature=opts.temperature,
                top_k=opts.top_k,
                top_p=opts.top_p,
                seed=opts.seed,
                heal=opts.heal and isinstance(prompt, str),
                deadline_ms=max(1.0, left() * SERVER_SHARE),
            )
            answers = [self._post(body, doc_key, left(), opts.cancel)]
        else:
            answers = self._greedy_then_samples(body, doc_key, opts, left)
        healed = str((answers[0].get("codegen_ls") or {}).get("healed", ""))
        candidates = [
            self._candidate(ch, opts.stop, healed, sampled=(a is not answers[0] or i > 0))
            for a in answers
            for i, ch in enumerate(a.get("choices", []))
        ]
        return Generation(candidates, self._stats(answers[0], candidates, t0), healed)

    def _greedy_then_samples(
        self, body: dict[str, Any], doc_key: str, opts: GenerateOptions, left: Callable[[], float]
    ) -> list[dict[str, Any]]:
        """Standard semantics: a greedy request, then the n - 1 samples while time is left."""
        answers = [self._post({**body, "n": 1, "temperature": 0.0}, doc_key, left(), opts.cancel)]
        if opts.n > 1 and left() > 0:
            samples = {**body, "n": opts.n - 1, "temperature": opts.temperature, "top_p": opts.top_p, "seed": opts.seed}
            answers.append(self._post(samples, doc_key, left(), opts.cancel))
        return answers

    def score(
        self,
        prompt_ids: Sequence[int],
        draft_ids: Sequence[int],
        doc_key: str = "default",
        cancel: Callable[[], bool] | None = None,
    ) -> tuple[list[float], list[int], np.ndarray]:
        """Verify a draft with one ``echo`` request: as :meth:`Engine.score` (the last row from the
        top alternatives)."""
        ids = list(prompt_ids) + list(draft_ids)
        body = {
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": SCORE_TOP,
            "echo_from": max(1, len(prompt_ids)),
        }
        answer = self._post(body, doc_key, self.timeout_ms, cancel)
        lp = (answer.get("choices") or [{}])[0].get("logprobs") or {}
        token_lps = lp.get("token_logprobs") or []
        tops = self._tops(lp)
        first = len(prompt_ids)
        draft_lp = [
            float(token_lps[first + i]) if first + i < len(token_lps) and token_lps[first + i] is not None else -np.inf
            for i in range(len(draft_ids))
        ]
        greedy = [
            tops[first + i][0][0] if first + i < len(tops) and tops[first + i] else -1 for i in range(len(draft_ids))
        ]
        after = np.full(self.manifest.vocab_size, -np.inf, dtype=np.float32)
        last = tops[len(ids)] if len(tops) > len(ids) else []
        for t, v in last:
            if 0 <= t < after.shape[0]:
                after[t] = v
        return draft_lp, greedy, after

    # -- responses -> candidates -------------------------------------------------------------
    def _candidate(self, choice: dict[str, Any], stop: StopFn | None, healed: str, sampled: bool) -> Candidate:
        lp = choice.get("logprobs") or {}
        ids = self._token_ids(lp, str(choice.get("text", "")))
        lps = [float(x) if x is not None else 0.0 for x in (lp.get("token_logprobs") or [0.0] * len(ids))][: len(ids)]
        detail = choice.get("finish_detail") or ("eos" if choice.get("finish_reason") == "stop" else "length")
        kept: list[int] = []
        text = ""
        for tok in ids:  # the engine's own loop: text after each token, the stop rule on it
            if tok == self.eos_id:
                detail = "eos"
                break
            kept.append(tok)
            full = self.tokenizer.decode(kept)
            text = full[len(healed) :] if healed and full.startswith(healed) else full
            cut = stop(text) if stop is not None else None
            if cut is not None:
                text, detail = text[:cut], "stop"
                break
        return Candidate(text, kept, lps[: len(kept)], detail, sampled)

    def _token_ids(self, lp: dict[str, Any], text: str) -> list[int]:
        if isinstance(lp.get("token_ids"), list):
            return [int(t) for t in lp["token_ids"]]
        tokens = lp.get("tokens")
        if not isinstance(tokens, list):  # no log-probs came back: tokenize the text
            return self.tokenizer.encode(text)
        return [self._id_of(str(t)) for t in tokens]

    def _id_of(self, token: str) -> int:
        """A token string (as OpenAI-style servers send) back to an id of the local tokenizer."""
        if token.startswith("token_id:"):  # vLLM's return_tokens_as_token_ids
            return int(token.split(":", 1)[1])
        if self._ids_by_bytes is None:
            self._ids_by_bytes = {b: i for i, b in enumerate(self.tokenizer.token_bytes()) if b}
        found = self._ids_by_bytes.get(token.encode("utf-8"))
        if found is not None:
            return found
        ids = self.tokenizer.encode(token)
        return ids[0] if ids else self.eos_id

    def _tops(self, lp: dict[str, Any]) -> list[list[tuple[int, float]]]:
        if isinstance(lp.get("top_token_ids"), list):
            return [[(int(t), float(v)) for t, v in row] for row in lp["top_token_ids"]]
        rows = lp.get("top_logprobs") or []
        return [
            sorted(((self._id_of(k), float(v)) for k, v in (row or {}).items()), key=lambda e: -e[1]) for row in rows
        ]

    def _stats(self, answer: dict[str, Any], candidates: list[Candidate], t0: float) -> GenerationStats:
        usage = answer.get("usage") or {}
        extra = answer.get("codegen_ls") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int(
            ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or extra.get("cached_tokens") or 0
        )
        total_ms = (time.monotonic() - t0) * 1000
        return GenerationStats(
            prompt_tokens=prompt,
            cached_tokens=cached,
            fed_tokens=max(0, prompt - cached),
            new_tokens=sum(len(c.token_ids) for c in candidates),
            prefill_ms=float(extra.get("prefill_ms", total_ms)),
            decode_ms=float(extra.get("decode_ms", 0.0)),
        )


__all__ = ["BackendUnavailable", "HttpClient", "RemoteEngine", "RemoteOptions", "SESSION_HEADER"]
