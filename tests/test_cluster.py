"""The Ray Serve application, for real, on loopback: Ray started here (2 CPUs, a 200 MB object store),
two replicas of the embedded model behind the session-affinity router.

The language server with ``backend: remote`` gives the local engine's greedy suggestions; a
document's keystrokes stay on one replica and reuse its KV cache; killing a replica during a burst
loses no request (each is answered, with a result or an error); ``/infill`` answers in llama.cpp's
shape.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the cluster tests need Ray Serve: pip install 'codegen-ls[cluster]'")
serve = pytest.importorskip("ray.serve", reason="the cluster tests need Ray Serve: pip install 'codegen-ls[cluster]'")

from codegen_ls.cluster.app import APP_NAME, ClusterOptions, build_app  # noqa: E402
from codegen_ls.engine.remote import BackendUnavailable, HttpClient, RemoteEngine, RemoteOptions  # noqa: E402
from codegen_ls.errors import Cancelled  # noqa: E402
from codegen_ls.suggest.pipeline import Completer, CompletionRequest  # noqa: E402
from helpers import (  # noqa: E402
    MODEL_DIR,
    STORE_CURSORS,
    RawClient,
    free_port,
    infill_request,
    remote_pipeline_settings,
    server_env,
    typed_to,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # offline: Ray reports nothing anywhere
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "60")  # a shared, loaded machine: Serve's 5-10 s would kill a slow-starting proxy
    port = free_port()
    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        namespace="serve",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ClusterOptions(str(MODEL_DIR), replicas=2, threads=1)), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(
    http: HttpClient, session: str, prompt: str, max_tokens: int = 8, timeout_ms: float = 60_000
) -> dict[str, Any]:
    return http.call(
        "POST",
        "/v1/completions",
        {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0},
        timeout_ms=timeout_ms,
        session=session,
    )


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments["Engine"]
    return int(status.replica_states.get("RUNNING", 0))


async def test_lsp_server_with_the_cluster_gives_the_local_engines_greedy_suggestions(cluster: str) -> None:
    local = Completer()
    settings = {
        "backend": "remote",
        "remoteUrl": cluster,
        "numCandidates": 1,
        "lookup": False,
        "maxNewTokens": 40,
        "contextTokens": 1000,
        "deadlineMs": 20_000,
        "minConfidence": 0,
        "fim": False,
    }
    c = await RawClient.start(env=server_env())
    try:
        await c.initialize({"codegenLs": settings})
        status = await c.notification("codegenLs/status", where=lambda p: p["state"] == "ready")
        assert "codegen-ls cluster" in status["params"]["message"]
        shown = 0
        for i, (line, col) in enumerate(STORE_CURSORS):
            uri = f"file:///doc{i}.py"
            await c.open(uri, typed_to(line, col))
            reply = await c.request(
                "textDocument/inlineCompletion",
                {
                    "textDocument": {"uri": uri},
                    "position": {"line": line, "character": col},
                    "context": {"triggerKind": 1},
                },
            )
            got = [item["insertText"] for item in reply["result"]["items"]]
            want = local.complete(
                CompletionRequest(typed_to(line, col), line, col, uri=uri), remote_pipeline_settings()
            ).suggestions
            assert got == [s.insert_text for s in want], (line, col)
            shown += len(got)
        assert shown >= len(STORE_CURSORS) - 1
    finally:
        await c.close()


def test_a_documents_keystrokes_stay_on_its_replica_and_reuse_its_cache(cluster: str) -> None:
    http = HttpClient(cluster)
    text = typed_to(17, 14)
    homes: dict[str, set[str]] = {}
    for s in range(8):
        session = f"session-{s}"
        cached = []
        for k in range(3):  # three keystrokes: the prompt grows by a character each time
            answer = complete(http, session, text[: len(text) - 6 + k])
            homes.setdefault(session, set()).add(answer["codegen_ls"]["replica"])
            cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached[1] > 0 and cached[2] > 0, (session, cached)
    assert all(len(r) == 1 for r in homes.values()), homes
    assert len(set().union(*homes.values())) == 2, "the sessions all hashed to one replica"
    # the remote backend as the language server uses it: the second keystroke reports cached tokens
    remote = RemoteEngine(RemoteOptions(cluster), MODEL_DIR)
    remote.generate("import os\n\n\ndef main():\n    ", doc_key="file:///x.py", max_new_tokens=8, deadline_ms=20_000)
    second = remote.generate(
        "import os\n\n\ndef main():\n    p", doc_key="file:///x.py", max_new_tokens=8, deadline_ms=20_000
    )
    assert second.stats.cached_tokens > 0


def test_infill_speaks_llama_cpp(cluster: str) -> None:
    http = HttpClient(cluster)
    body = infill_request()
    first = http.call("POST", "/infill", body, timeout_ms=60_000, session="infill")
    second = http.call("POST", "/infill", body, timeout_ms=60_000, session="infill")
    assert second["content"] == first["content"] and second["tokens_cached"] > 0
    assert first["codegen_ls"]["replica"] == second["codegen_ls"]["replica"]


def test_killing_a_replica_during_a_burst_loses_no_request(cluster: str) -> None:
    http = HttpClient(cluster)
    text = typed_to(13, 19)
    sessions = [f"burst-{i}" for i in range(24)]
    home = {s: complete(http, s, text)["codegen_ls"]["replica"] for s in sessions}  # warm: each session's replica
    victim = Counter(home.values()).most_common(1)[0][0]
    assert len(set(home.values())) == 2

    def one(i: int) -> tuple[str, Any]:
        client = HttpClient(cluster, retries=0)  # the cluster retries, not the client
        try:
            return "ok", complete(client, sessions[i % len(sessions)], text + " " * (i % 5), max_tokens=24)
        except BackendUnavailable as exc:
            return "error", str(exc)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#Engine#{victim}", namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=300) for f in futures]  # every request answered, none hangs
    kinds = Counter(kind for kind, _ in outcomes)
    served_by = Counter(answer["codegen_ls"]["replica"] for kind, answer in outcomes if kind == "ok")
    retried = sum(1 for kind, answer in outcomes if kind == "ok" and answer["codegen_ls"].get("retried"))
    print(
        f"\n  burst of 48 with replica {victim} killed: {dict(kinds)}, answered by {dict(served_by)}, "
        f"{retried} sent again after the replica died"
    )
    assert len(outcomes) == 48
    assert kinds["ok"] >= 44, outcomes  # the dead replica's requests were sent again to the other one
    # the cluster heals: Serve replaces the replica and both answer again
    deadline = time.monotonic() + 240
    while running_replicas() < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert running_replicas() == 2
    assert complete(http, "after", text)["choices"][0]["text"] is not None


def test_a_cancelled_request_stops_its_replicas_engine(cluster: str) -> None:
    """Closing the HTTP request cancels the replica's call: the engine stops, the next keystroke does not wait."""
    text = typed_to(9, 20)
    http = HttpClient(cluster)
    complete(http, "cancel-me", text)  # warm: the session's replica holds the prompt
    long_body = {"prompt": text, "max_tokens": 1900, "n": 16, "temperature": 1.0}  # 16 rows x ~1900 steps: seconds
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        HttpClient(cluster).call(
            "POST",
            "/v1/completions",
            long_body,
            timeout_ms=120_000,
            session="cancel-me",
            cancel=lambda: time.monotonic() - t0 > 0.3,
        )
    t1 = time.monotonic()
    complete(http, "cancel-me", text + "o")  # the same replica, one engine thread: it waits if the long one runs on
    waited = time.monotonic() - t1
    print(
        f"\n  after cancelling a long request at 0.3 s, the next keystroke on its replica took {waited * 1000:.0f} ms"
    )
    assert waited < 1.5  # uncancelled, the long request runs on for 4 s on a quiet machine (92 s measured here, loaded)
