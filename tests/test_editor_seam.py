"""The editor seam over stdio (pytest-lsp), real server, embedded model (issue #23).

- Inline and completion requests for one cursor, sent back to back as VS Code sends them after a
  trigger character, share one computation and answer the same non-empty suggestions.
- A request sent right after ``initialized``, while the model loads, waits for it (within
  ``deadlineMs``) and is answered with suggestions; with a short ``deadlineMs`` it is answered
  empty within about that time.
- Requests at one document version do not end each other; an edit ends the older version's.
- Accepts (the items' ``codegenLs.accept`` command), shown and partial accepts are counted in
  ``codegenLs/status``.
- ``completionFallback``: ``auto`` answers the completion menu only for clients without inline
  completion; ``always``, ``never``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from helpers import LSP_SOURCE, SERVER_CMD, open_doc, plain, record_statuses, server_env, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="function")

AFTER_DOT = (9, 17)  # ``words = text.`` -> the model continues after the trigger character
DOTTED = LSP_SOURCE.replace("words = text.split()", "words = text.")
ENDS = [(3, 21), (13, 11), (15, 22)]  # line ends where the model runs

INLINE = types.TextDocumentClientCapabilities(
    inline_completion=types.InlineCompletionClientCapabilities(),
    completion=types.CompletionClientCapabilities(),
    synchronization=types.TextDocumentSyncClientCapabilities(),
)
NO_INLINE = types.TextDocumentClientCapabilities(
    completion=types.CompletionClientCapabilities(), synchronization=types.TextDocumentSyncClientCapabilities()
)
CONFIG = ClientServerConfig(server_command=SERVER_CMD, server_env=server_env())


def capabilities(text_document: types.TextDocumentClientCapabilities) -> types.ClientCapabilities:
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16]),
        text_document=text_document,
    )


async def begin(
    client: LanguageClient,
    text_document: types.TextDocumentClientCapabilities = INLINE,
    settings: dict[str, Any] | None = None,
    wait_ready: bool = True,
) -> list[dict[str, Any]]:
    """initialize + initialized with ``settings`` as initializationOptions; the statuses received."""
    statuses = record_statuses(client)
    settings = {"minConfidence": 0, **(settings or {})}  # the seam is under test, not the ranking
    client.init_result = await client.initialize_session(
        types.InitializeParams(  # type: ignore[attr-defined]
            capabilities=capabilities(text_document), initialization_options={"codegenLs": settings}
        )
    )
    if wait_ready:
        await wait_for(lambda: any(s["state"] in ("ready", "error") for s in statuses), "model load")
        assert statuses[-1]["state"] == "ready", statuses
    return statuses


def inline_request(client: LanguageClient, uri: str, pos: tuple[int, int]) -> asyncio.Future[Any]:
    return asyncio.ensure_future(
        client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(*pos),
            )
        )
    )


def completion_request(
    client: LanguageClient, uri: str, pos: tuple[int, int], char: str | None = "."
) -> asyncio.Future[Any]:
    context = types.CompletionContext(trigger_kind=types.CompletionTriggerKind.TriggerCharacter, trigger_character=char)
    return asyncio.ensure_future(
        client.text_document_completion_async(
            types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(*pos), context=context
            )
        )
    )


def inline_texts(result: Any) -> list[str]:
    items = result.items if isinstance(result, types.InlineCompletionList) else result or []
    return [i.insert_text if isinstance(i.insert_text, str) else i.insert_text.value for i in items]


def completion_texts(result: Any) -> list[str]:
    items = result.items if isinstance(result, types.CompletionList) else result or []
    return [i.text_edit.new_text for i in items]


def computed(statuses: list[dict[str, Any]]) -> int:
    """Pipeline runs the server reported (one status with "N suggestion(s) in T ms" per run)."""
    return sum(1 for s in statuses if "suggestion(s) in" in (s.get("message") or ""))


@pytest_lsp.fixture(config=CONFIG)
async def client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


async def test_inline_and_completion_at_one_cursor_share_one_computation(client: LanguageClient):
    statuses = await begin(client, settings={"completionFallback": "always"})
    uri = "file:///dot.py"
    open_doc(client, uri, DOTTED)
    before = computed(statuses)
    inline_f = inline_request(client, uri, AFTER_DOT)  # VS Code: both, back to back, after "."
    completion_f = completion_request(client, uri, AFTER_DOT)
    inline_result, completion_result = await asyncio.wait_for(asyncio.gather(inline_f, completion_f), 60)
    texts = inline_texts(inline_result)
    assert texts, "no inline suggestions after the trigger character"
    assert completion_texts(completion_result) == texts
    await asyncio.sleep(0.2)
    assert computed(statuses) - before == 1, statuses[-3:]
    # the same cursor and version again: the same answer, not a new (resampled) run
    assert inline_texts(await inline_request(client, uri, AFTER_DOT)) == texts
    assert computed(statuses) - before == 1


async def test_request_right_after_initialized_waits_for_the_model(client: LanguageClient):
    statuses = await begin(client, settings={"deadlineMs": 30000}, wait_ready=False)
    uri = "file:///early.py"
    open_doc(client, uri)
    future = inline_request(client, uri, ENDS[0])
    await asyncio.sleep(0)
    assert not any(s["state"] == "ready" for s in statuses), "the model was loaded before the request"
    texts = inline_texts(await asyncio.wait_for(future, 60))
    assert any(s["state"] == "ready" for s in statuses)
    assert texts, "a request made during the model load was answered empty"


async def test_request_during_load_gives_up_at_the_deadline(client: LanguageClient):
    statuses = await begin(client, settings={"deadlineMs": 50}, wait_ready=False)
    uri = "file:///early.py"
    open_doc(client, uri)
    t0 = time.perf_counter()
    texts = inline_texts(await asyncio.wait_for(inline_request(client, uri, ENDS[0]), 60))
    elapsed = time.perf_counter() - t0
    if not any(s["state"] == "ready" for s in statuses):  # (a load under 50 ms would answer)
        assert texts == [] and elapsed < 1.0, elapsed


async def test_requests_at_one_version_all_answered_an_edit_ends_the_older(client: LanguageClient):
    statuses = await begin(client, settings={"deadlineMs": 30000})
    uri = "file:///versions.py"
    open_doc(client, uri)
    before = computed(statuses)
    futures = [inline_request(client, uri, pos) for pos in ENDS]  # one version, three cursors
    await asyncio.wait_for(asyncio.gather(*futures), 120)
    assert computed(statuses) - before == len(ENDS), [s.get("message") for s in statuses]

    before = computed(statuses)
    older = inline_request(client, uri, (4, 25))  # a cursor not asked about yet at this version
    await asyncio.sleep(0)
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(  # typing at the start
            types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            [
                types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(0, 0), types.Position(0, 0)), text="#"
                )
            ],
        )
    )
    newer = inline_request(client, uri, ENDS[2])
    got_older = inline_texts(await asyncio.wait_for(older, 60))
    await asyncio.wait_for(newer, 60)
    runs = computed(statuses) - before
    if got_older:
        # LSP requests carry no document version: where the server read the edit before it started the
        # older request, or finished that request before the edit came, it ran once on its own
        assert runs == 2, [s.get("message") for s in statuses]
    else:  # superseded by the edit: answered empty, and only the newer request ran the pipeline
        assert runs == 1, "the older version's request was answered empty but still ran"


async def test_accept_shown_partial_are_counted(client: LanguageClient):
    statuses = await begin(client)
    uri = "file:///events.py"
    open_doc(client, uri)
    result = await asyncio.wait_for(inline_request(client, uri, ENDS[1]), 60)
    items = result.items
    assert items and all(i.command is not None and i.command.command == "codegenLs.accept" for i in items)
    ref = plain(items[0].command.arguments[0])
    assert ref["index"] == 0 and isinstance(ref["id"], int) and ref["source"]
    assert [plain(i.command.arguments[0])["index"] for i in items] == list(range(len(items)))

    client.protocol.notify("codegenLs/didShowCompletion", {"item": ref})
    client.protocol.notify("codegenLs/didPartiallyAcceptCompletion", {"item": ref, "kind": "word", "acceptedLength": 3})
    await wait_for(lambda: (statuses[-1].get("events") or {}).get("acceptedWord") == 1, "partial accept counted")
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command=items[0].command.command, arguments=items[0].command.arguments)
    )
    await wait_for(lambda: (statuses[-1].get("events") or {}).get("accepted") == 1, "accept counted")
    assert statuses[-1]["events"] == {"shown": 1, "accepted": 1, "acceptedWord": 1, "acceptedLine": 0}
    # settings problems are reported in the status (for :checkhealth), and cleared again
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"codegenLs": {"bogus": 1}}))
    await wait_for(lambda: statuses[-1].get("settingsProblems"), "settings problems in the status")
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"codegenLs": {"minConfidence": 0}})
    )
    await wait_for(lambda: statuses[-1].get("settingsProblems") == [], "no settings problems")
    # a malformed reference is ignored, the server keeps serving
    client.protocol.notify("codegenLs/didShowCompletion", {"item": "nonsense"})
    await client.workspace_execute_command_async(types.ExecuteCommandParams(command="codegenLs.accept", arguments=[]))
    for bad in ({"id": 10**30, "index": -1}, {"id": 1, "index": 99}, {"id": "1", "index": 0}, "x", None, [1, 2]):
        await client.workspace_execute_command_async(  # answered (an error reply would raise here)
            types.ExecuteCommandParams(command="codegenLs.accept", arguments=[bad])
        )
    assert inline_texts(await asyncio.wait_for(inline_request(client, uri, ENDS[2]), 60)) is not None


async def test_execute_command_provider_lists_accept(client: LanguageClient):
    await begin(client)
    provider = client.init_result.capabilities.execute_command_provider  # type: ignore[attr-defined]
    assert provider is not None and "codegenLs.accept" in provider.commands


@pytest.mark.parametrize(
    ("text_document", "mode", "menu"),
    [(INLINE, "auto", False), (NO_INLINE, "auto", True), (INLINE, "always", True), (NO_INLINE, "never", False)],
)
async def test_completion_fallback(client: LanguageClient, text_document: Any, mode: str, menu: bool):
    await begin(client, text_document, settings={"completionFallback": mode, "deadlineMs": 30000})
    uri = "file:///menu.py"
    open_doc(client, uri, DOTTED)
    texts = completion_texts(await asyncio.wait_for(completion_request(client, uri, AFTER_DOT), 60))
    assert bool(texts) == menu, texts
