"""The remote backend (``backend: remote``) against loopback HTTP servers, without Ray.

A plain ``http.server`` runs :class:`CompletionService` (the cluster's replica logic) over the
embedded model, or scripted answers: greedy candidates equal the local engine's, draft scores
equal ``Engine.score``, one kept-alive connection, retries with backoff, time limits within the
deadline, cancellation closing the request, the API key read from the named variable, and the
language server's status line when the backend is unreachable.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from codegen_ls.cluster.service import CompletionService
from codegen_ls.engine.engine import Engine, EngineOptions
from codegen_ls.engine.remote import BackendUnavailable, HttpClient, RemoteEngine, RemoteOptions
from codegen_ls.errors import Cancelled
from codegen_ls.settings import Settings
from codegen_ls.suggest.pipeline import Completer, CompletionRequest
from helpers import (
    MODEL_DIR,
    STORE_CURSORS,
    STORE_SOURCE,
    RawClient,
    free_port,
    infill_request,
    remote_pipeline_settings,
    server_env,
    typed_to,
)

Handler = Callable[[str, str, dict[str, str], Any], tuple[int, Any]]


class LoopbackServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose answers come from ``handler``."""

    def __init__(self, handler: Handler) -> None:
        outer = self
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.disconnects = 0

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else None
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.seen.append((self.command, self.path, headers))
                status, answer = handler(self.command, self.path, headers, body)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    outer.disconnects += 1

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def service_handler(service: CompletionService) -> Handler:
    """The cluster's routes over one engine, as the Ray ingress serves them."""

    def handle(method: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if path == "/v1/models":
            e = service.engine
            return 200, {
                "object": "list",
                "data": [
                    {"id": service.model, "owned_by": "codegen-ls", "codegen_ls": {"context_length": e.context_length}}
                ],
            }
        if path == "/v1/completions":
            return 200, service.completions(body, headers.get("x-session-id"))
        if path == "/infill":
            return 200, service.infill(body, headers.get("x-session-id"))
        return 404, {"error": {"message": "no such route"}}

    return handle


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL_DIR, EngineOptions(threads=1))


@pytest.fixture(scope="module")
def remote_server() -> Iterator[tuple[LoopbackServer, CompletionService]]:
    service = CompletionService(Engine(MODEL_DIR, EngineOptions(threads=1)), "codegen-ls-small", "r0")
    server = LoopbackServer(service_handler(service))
    yield server, service
    server.close()


def test_greedy_suggestions_equal_the_local_engines(remote_server: tuple[LoopbackServer, CompletionService]) -> None:
    server, service = remote_server
    local, remote = Completer(), Completer()
    shown = 0
    for line, col in STORE_CURSORS:
        req = CompletionRequest(typed_to(line, col), line, col, uri="file:///store.py")
        want = local.complete(req, remote_pipeline_settings())
        got = remote.complete(req, remote_pipeline_settings(backend="remote", remote_url=server.url))
        assert [s.insert_text for s in got.suggestions] == [s.insert_text for s in want.suggestions], (line, col)
        shown += len(want.suggestions)
        assert [s.logprob_mean for s in got.suggestions] == pytest.approx(
            [s.logprob_mean for s in want.suggestions], abs=1e-3
        )
    assert shown >= len(STORE_CURSORS) - 1 and isinstance(remote.engine, RemoteEngine)
    # a second keystroke on the same document: the server's cache held the prompt
    req = CompletionRequest(typed_to(17, 13), 17, 13, uri="file:///store.py")
    again = remote.complete(req, remote_pipeline_settings(backend="remote", remote_url=server.url))
    assert again.stats["cached_tokens"] > 0 and service.cached_tokens > 0


def test_lookup_drafts_are_scored_remotely_as_locally(
    engine: Engine, remote_server: tuple[LoopbackServer, CompletionService]
) -> None:
    server, _ = remote_server
    remote = RemoteEngine(RemoteOptions(server.url), MODEL_DIR)
    prompt = engine.tokenizer.encode(STORE_SOURCE[:200])
    draft = engine.tokenizer.encode("        self.items = {}\n")
    want_lp, want_greedy, want_after = engine.score(prompt, draft, doc_key="a")
    got_lp, got_greedy, got_after = remote.score(prompt, draft, doc_key="a")
    assert got_greedy == want_greedy
    assert got_lp == pytest.approx(want_lp, abs=1e-3)
    top = np.argsort(-want_after)[:5]
    assert got_after[top] == pytest.approx(want_after[top], abs=1e-3)
    assert int(got_after.argmax()) == int(want_after.argmax())
    # and the whole pipeline with lookup on answers through the remote backend
    res = Completer().complete(
        CompletionRequest(typed_to(6, 21), 6, 21, uri="file:///s.py"),
        Settings(backend="remote", remote_url=server.url, deadline_ms=20_000),
    )
    assert res.suggestions


def test_infill_answers_in_llama_cpp_shape(remote_server: tuple[LoopbackServer, CompletionService]) -> None:
    server, _ = remote_server
    http = HttpClient(server.url)
    body = infill_request()
    first = http.call("POST", "/infill", body, timeout_ms=20_000, session="s1")
    second = http.call("POST", "/infill", body, timeout_ms=20_000, session="s1")
    assert isinstance(first["content"], str) and first["tokens_predicted"] >= 1
    assert second["tokens_cached"] > 0 and second["timings"]["cache_n"] == second["tokens_cached"]
    assert second["content"] == first["content"]


def test_one_connection_is_kept_alive_and_the_key_comes_from_the_named_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = LoopbackServer(lambda m, p, h, b: (200, {"ok": True}))
    try:
        monkeypatch.setenv("TEAM_KEY", "s3cret")
        http = HttpClient(server.url + "/v1", api_key_env="TEAM_KEY")
        for _ in range(3):
            assert http.call("POST", "/v1/completions", {"prompt": "x"}, timeout_ms=5000, session="abc") == {"ok": True}
        assert http.connections == 1 and http.requests == 3
        assert [p for _, p, _ in server.seen] == ["/v1/completions"] * 3
        assert all(h["authorization"] == "Bearer s3cret" and h["x-session-id"] == "abc" for _, _, h in server.seen)
    finally:
        server.close()


def test_retries_with_backoff_then_answers() -> None:
    answers = iter([(503, {"error": {"message": "busy"}}), (502, {}), (200, {"ok": 1})])
    server = LoopbackServer(lambda m, p, h, b: next(answers))
    try:
        http = HttpClient(server.url, retries=2)
        t0 = time.monotonic()
        assert http.call("POST", "/v1/completions", {}, timeout_ms=5000) == {"ok": 1}
        assert len(server.seen) == 3 and time.monotonic() - t0 >= 0.05 + 0.1  # backoff 50 ms, then 100 ms
    finally:
        server.close()


def test_a_client_error_is_not_retried_and_says_why() -> None:
    server = LoopbackServer(lambda m, p, h, b: (400, {"error": {"message": "'suffix' is not supported"}}))
    try:
        with pytest.raises(BackendUnavailable, match="refused the request: HTTP 400: 'suffix' is not supported"):
            HttpClient(server.url).call("POST", "/v1/completions", {}, timeout_ms=5000)
        assert len(server.seen) == 1
    finally:
        server.close()


def test_down_server_fails_fast_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        HttpClient(url).call("POST", "/v1/completions", {}, timeout_ms=3000)
    assert str(info.value) == f"remote backend {url} unreachable: connection refused"
    assert time.monotonic() - t0 < 1.0


def test_slow_server_times_out_within_the_deadline() -> None:
    server = LoopbackServer(lambda m, p, h, b: (time.sleep(2.0), (200, {}))[1])
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="timed out"):
            HttpClient(server.url).call("POST", "/v1/completions", {}, timeout_ms=300)
        assert time.monotonic() - t0 < 0.5
    finally:
        server.close()


def test_cancel_closes_the_request() -> None:
    server = LoopbackServer(lambda m, p, h, b: (time.sleep(1.0), (200, {"late": True}))[1])
    try:
        http = HttpClient(server.url)
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            http.call("POST", "/v1/completions", {}, timeout_ms=10_000, cancel=lambda: time.monotonic() - t0 > 0.1)
        assert time.monotonic() - t0 < 0.3
        assert http._conn is None  # closed: the server's answer finds no reader
        deadline = time.monotonic() + 3
        while server.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.disconnects == 1
    finally:
        server.close()


async def test_status_says_when_the_backend_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    c = await RawClient.start(env=server_env())
    try:
        await c.initialize({"codegenLs": {"backend": "remote", "remoteUrl": url}})
        status = await c.notification("codegenLs/status", where=lambda p: p["state"] == "error")
        assert status["params"]["message"] == f"remote backend {url} unreachable: connection refused"
        await c.open("file:///a.py", typed_to(6, 21))
        since = len(c.notifications)
        reply = await c.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": "file:///a.py"},
                "position": {"line": 6, "character": 21},
                "context": {"triggerKind": 1},
            },
        )
        assert "result" in reply  # answered (empty), the server keeps serving
        again = await c.notification("codegenLs/status", since=since, where=lambda p: p["state"] == "error")
        assert "unreachable" in again["params"]["message"]
    finally:
        await c.close()
