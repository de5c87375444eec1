"""Perceived latency: background jobs give way, warm-up on open, prefetch after accept, the
deadline-first continuation, statistics of what was shown (real server, real small model)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from codegen_ls.engine.latency import Speeds
from codegen_ls.errors import Cancelled
from codegen_ls.lsp.worker import InferenceWorker
from codegen_ls.settings import Settings, parse_settings
from codegen_ls.suggest.pipeline import Completer, CompletionRequest
from helpers import MODEL_DIR, RawClient, server_env

URI = "file:///work/perceived.py"
TEXT = "".join(f"def helper_{i}(value):\n    total = value * {i}\n    return total + {i}\n\n\n" for i in range(24))


async def test_background_jobs_give_way_to_requests():
    worker = InferenceWorker()
    started, order = threading.Event(), []

    def background(cancel: Any) -> str:
        started.set()
        while not cancel():  # a prefill checking its cancel flag between chunks
            threading.Event().wait(0.005)
        order.append("background stopped")
        raise Cancelled("gave way")

    def request(cancel: Any) -> str:
        order.append("request")
        return "answer"

    warm = worker.submit("a.py", background, background=True)
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
    answer = await worker.submit("b.py", request)  # another document: the background job stops
    assert answer == "answer" and await warm is None
    assert order == ["background stopped", "request"]
    busy, release = threading.Event(), threading.Event()
    blocker = worker.submit("c.py", lambda cancel: busy.set() or release.wait(30))
    await asyncio.get_running_loop().run_in_executor(None, busy.wait, 30)
    queued = [worker.submit(f"{i}.py", lambda cancel: "late", background=True) for i in range(6)]
    release.set()
    results = await asyncio.gather(*queued)
    assert await blocker and results == [None, None, "late", "late", "late", "late"]  # only the newest 4 wait
    worker.close(timeout=5)


def test_continuation_extends_a_suggestion_cut_by_the_target():
    completer = Completer()
    completer.load(str(MODEL_DIR))
    completer.speeds = Speeds(prefill_ms_per_token=5.0, extend_ms=20.0, step_ms=40.0, step_ms_n=40.0, rows=1)
    settings = Settings(
        model_path=str(MODEL_DIR), num_candidates=1, lookup=False, latency_target_ms=150, min_confidence=0.0
    )
    assert completer.sized(settings).max_new_tokens == 4  # a slow machine: few tokens per request (the floor)
    text = "import os\n\n\ndef list_python_files(root):\n    "
    req = CompletionRequest(text=text, line=4, character=4, uri="mem://cont.py")
    first = completer.complete(req, settings)
    assert first.suggestions and first.stats["new_tokens"] <= 4 and first.more
    longer = completer.complete(req, settings, more=True)  # the background continuation
    assert len(longer.suggestions[0].insert_text) > len(first.suggestions[0].insert_text)
    again = completer.complete(req, settings)  # the type-ahead cache now holds the longer text
    assert again.reason == "typeahead" and again.suggestions[0].insert_text == longer.suggestions[0].insert_text
    explicit = Settings(model_path=str(MODEL_DIR), max_new_tokens=20, context_tokens=512, latency_target_ms=150)
    assert (completer.sized(explicit).max_new_tokens, completer.sized(explicit).context_tokens) == (20, 512)
    assert completer.sized(Settings(latency_target_ms=0)).max_new_tokens == 48
    given, problems = parse_settings({"maxNewTokens": 48, "contextTokens": 1024})  # the defaults, given by the user
    assert not problems and (completer.sized(given).max_new_tokens, completer.sized(given).context_tokens) == (48, 1024)
    assert completer.sized(parse_settings({"numCandidates": 1})[0]).max_new_tokens == 4  # left alone: the plan's


async def debug(c: RawClient, uri: str = URI) -> dict[str, Any]:
    return (await c.request("codegenLs/debugDocument", {"uri": uri}))["result"]


async def test_warm_up_prefetch_after_accept_and_statistics(tmp_path: Path):
    env = server_env(XDG_STATE_HOME=str(tmp_path / "state"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    c = await RawClient.start("--model", str(MODEL_DIR), env=env)
    try:
        await c.initialize({"codegenLs": {"numCandidates": 1, "lookup": False, "minConfidence": 0}})
        await c.open(URI, TEXT)
        lines = TEXT.split("\n")
        for _ in range(600):  # the warm-up prefills the document's prompt in the background
            state = await debug(c)
            if state["cachedTokens"] > 0:
                break
            await asyncio.sleep(0.05)
        assert state["cachedTokens"] > 200 and state["perceived"]["warmups"] == 1, state

        # a request, then its suggestion accepted by an edit: the server computes the next one at once
        end = {"line": len(lines) - 1, "character": 0}
        reply = await c.request(
            "textDocument/inlineCompletion",
            {"textDocument": {"uri": URI}, "position": end, "context": {"triggerKind": 1}},
        )
        items = reply["result"]["items"]
        assert items, reply
        prompt = (await debug(c))["lastPrompt"]  # the warm-up's guess, the document's very end, was right
        assert prompt["cached_tokens"] >= prompt["prompt_tokens"] - 2, prompt
        shown = items[0]["insertText"]
        await c.notify(
            "textDocument/didChange",
            {
                "textDocument": {"uri": URI, "version": 2},
                "contentChanges": [{"range": {"start": end, "end": end}, "text": shown}],
            },
        )
        after = TEXT + shown
        tail = after.split("\n")
        cursor = {"line": len(tail) - 1, "character": len(tail[-1].encode("utf-16-le")) // 2}
        reply = await c.request(
            "textDocument/inlineCompletion",
            {"textDocument": {"uri": URI}, "position": cursor, "context": {"triggerKind": 2}},
        )
        assert "result" in reply
        state = await debug(c)
        assert state["perceived"]["prefetched"] == 1 and state["perceived"]["joins"] == 1, state
    finally:
        await c.close()
    stats = json.loads((tmp_path / "state" / "codegen-ls" / "stats.json").read_text())
    totals = [sum(v[i] for v in stats["counts"].values()) for i in range(4)]
    assert totals[0] >= 1 and totals[1] == 1, stats  # shown, and the one accepted
    assert all(key.split("|")[2] == "python" for key in stats["counts"])
    speeds = json.loads((tmp_path / "cache" / "codegen-ls" / "speeds.json").read_text())
    assert len(speeds) == 1  # measured at load, kept per model and machine


def test_the_answer_after_an_accept_is_ready_before_it():
    completer = Completer()
    completer.load(str(MODEL_DIR))
    settings = Settings(
        model_path=str(MODEL_DIR),
        num_candidates=1,
        lookup=False,
        latency_target_ms=0,
        max_new_tokens=3,
        min_confidence=0.0,
    )
    text = "import os\n\n\ndef list_python_files(root):\n    result = []\n    for name in os.listdir(root):\n        "
    req = CompletionRequest(text=text, line=6, character=8, uri="mem://ahead.py")
    shown = completer.complete(req, settings).suggestions[0].insert_text  # cut after 3 tokens: the line goes on
    ahead = completer.complete_ahead(req, settings, shown)  # a background job while the suggestion is on screen
    lines = (text + shown).split("\n")
    accepted = CompletionRequest(text=text + shown, line=len(lines) - 1, character=len(lines[-1]), uri="mem://ahead.py")
    quick = completer.quick(accepted, settings)  # the server's path: no model, no wait for the inference thread
    assert quick is not None and quick.reason == "typeahead"
    after = completer.complete(accepted, settings)
    assert ahead.suggestions and after.reason == "typeahead"
    assert [s.insert_text for s in after.suggestions] == [s.insert_text for s in ahead.suggestions]


async def test_the_accept_command_names_the_item_taken_before_or_after_its_edit(tmp_path: Path):
    """An editor that sends the accept as a whole-document edit (full sync) is not seen to insert
    the suggestion; the item's ``codegenLs.accept`` command says it was accepted, whether it comes
    after the edit (the verdict is corrected) or before it (the edit is judged by it); both start
    the prefetch after an accept, and the statistics count two accepts and no dismissal."""
    env = server_env(XDG_STATE_HOME=str(tmp_path / "state"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    c = await RawClient.start("--model", str(MODEL_DIR), env=env)
    try:
        await c.initialize({"codegenLs": {"numCandidates": 1, "lookup": False, "minConfidence": 0}})
        for n, command_first in enumerate((False, True), 1):
            uri = f"file:///work/accept{n}.py"
            await c.open(uri, TEXT)
            end = {"line": len(TEXT.split("\n")) - 1, "character": 0}
            reply = await c.request(
                "textDocument/inlineCompletion",
                {"textDocument": {"uri": uri}, "position": end, "context": {"triggerKind": 1}},
            )
            items = reply["result"]["items"]
            assert items and items[0]["command"]["command"] == "codegenLs.accept", reply
            accept = {"command": "codegenLs.accept", "arguments": items[0]["command"]["arguments"]}
            whole = {
                "textDocument": {"uri": uri, "version": 2},
                "contentChanges": [{"text": TEXT + items[0]["insertText"]}],  # full sync: no range
            }
            if command_first:
                assert "result" in await c.request("workspace/executeCommand", accept)
                await c.notify("textDocument/didChange", whole)
            else:
                await c.notify("textDocument/didChange", whole)
                assert "result" in await c.request("workspace/executeCommand", accept)
            state = await debug(c, uri)
            assert state["perceived"]["prefetched"] == n, (command_first, state)
    finally:
        await c.close()
    stats = json.loads((tmp_path / "state" / "codegen-ls" / "stats.json").read_text())
    totals = [sum(v[i] for v in stats["counts"].values()) for i in range(4)]
    assert totals[1] == 2 and totals[3] == 0, stats  # accepted twice, never dismissed


async def test_an_edit_after_a_pause_warms_unless_a_request_follows(tmp_path: Path):
    """An edit after ``WARM_IDLE_S`` without edits warms the document again, after
    ``WARM_DELAY_S``; when a request for it comes first (editors ask right after an edit), the
    request's own prefill does it and no warm-up runs ahead of it."""
    from codegen_ls.lsp.perceived import WARM_DELAY_S, WARM_IDLE_S

    env = server_env(XDG_STATE_HOME=str(tmp_path / "state"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    c = await RawClient.start("--model", str(MODEL_DIR), env=env)
    try:
        await c.initialize({"codegenLs": {"numCandidates": 1, "lookup": False, "minConfidence": 0}})
        await c.open(URI, TEXT)
        end = {"line": len(TEXT.split("\n")) - 1, "character": 0}
        version = 1
        for then_ask in (False, True):
            await asyncio.sleep(WARM_IDLE_S + 0.2)
            version += 1
            await c.notify(
                "textDocument/didChange",
                {
                    "textDocument": {"uri": URI, "version": version},
                    "contentChanges": [{"range": {"start": end, "end": end}, "text": "x"}],
                },
            )
            end = {"line": end["line"], "character": end["character"] + 1}
            if then_ask:
                reply = await c.request(
                    "textDocument/inlineCompletion",
                    {"textDocument": {"uri": URI}, "position": end, "context": {"triggerKind": 2}},
                )
                assert "result" in reply
            await asyncio.sleep(WARM_DELAY_S + 0.3)
            state = await debug(c)
            assert state["perceived"]["warmups"] == 2, (then_ask, state)  # the open's, the pause's: none more
    finally:
        await c.close()
