"""End-to-end tests of the language server over stdio (pytest-lsp), real engine, embedded model.

The embedded model is small: these tests assert behaviour (ranges, ranking,
cancellation, settings, answers to bad requests), never the quality of a suggestion.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcMethodNotFound
from pytest_lsp import ClientServerConfig, LanguageClient

from codegen_ls.lsp.items import editor_indentation
from helpers import (
    LSP_SOURCE,
    SERVER_CMD,
    RawClient,
    open_doc,
    record_statuses,
    server_env,
    start_tcp,
    utf16_offset,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CAPABILITIES = types.ClientCapabilities(
    general=types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf16]),
    window=types.WindowClientCapabilities(work_done_progress=True),
    workspace=types.WorkspaceClientCapabilities(configuration=True),
    text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities(),
        completion=types.CompletionClientCapabilities(),
        synchronization=types.TextDocumentSyncClientCapabilities(),
    ),
)


async def start_session(
    client: LanguageClient, capabilities: types.ClientCapabilities = CAPABILITIES, options: Any = None
) -> types.InitializeResult:
    """initialize + initialized, recording ``codegenLs/status``; wait until the model is loaded."""
    statuses = record_statuses(client)
    client.statuses = statuses  # type: ignore[attr-defined]
    result = await client.initialize_session(
        types.InitializeParams(capabilities=capabilities, initialization_options=options)
    )
    await wait_for(lambda: any(s["state"] in ("ready", "error") for s in statuses), "model load")
    return result


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=SERVER_CMD, server_env=server_env()))
async def client(lsp_client: LanguageClient):
    lsp_client.init_result = await start_session(lsp_client)  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(loop_scope="module", config=ClientServerConfig(server_command=SERVER_CMD, server_env=server_env()))
async def utf8_client(lsp_client: LanguageClient):
    caps = types.ClientCapabilities(
        general=types.GeneralClientCapabilities(
            position_encodings=[types.PositionEncodingKind.Utf8, types.PositionEncodingKind.Utf16]
        )
    )
    lsp_client.init_result = await start_session(  # type: ignore[attr-defined]
        lsp_client, caps, options={"codegenLs": {"numCandidates": 2, "maxNewTokens": 8}}
    )
    yield
    await lsp_client.shutdown_session()


# -- helpers --------------------------------------------------------------------------------------


def edit(
    client: LanguageClient, uri: str, version: int, start: tuple[int, int], end: tuple[int, int], text: str
) -> None:
    rng = types.Range(types.Position(*start), types.Position(*end))
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(uri=uri, version=version),
            [types.TextDocumentContentChangePartial(range=rng, text=text)],
        )
    )


async def server_text(client: LanguageClient, uri: str) -> str | None:
    reply = await client.protocol.send_request_async("codegenLs/debugDocument", {"uri": uri})
    return None if reply is None else reply.text  # pygls turns JSON objects into namedtuples


async def inline(
    client: LanguageClient, uri: str, line: int, character: int, **kw: Any
) -> list[types.InlineCompletionItem]:
    result = await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line, character),
            **kw,
        )
    )
    assert result is not None
    return list(result.items if isinstance(result, types.InlineCompletionList) else result)


offset = utf16_offset  # code points of a UTF-16 position, the way an editor counts


def check_applies(text: str, cursor: tuple[int, int], insert: str, rng: types.Range) -> str:
    """A suggestion continues the line at the cursor and applies exactly once: return the new text."""
    assert rng.start.line == rng.end.line == cursor[0], "range must stay on the cursor line"
    s, c, e = (
        offset(text, rng.start.line, rng.start.character),
        offset(text, *cursor),
        offset(text, rng.end.line, rng.end.character),
    )
    assert s <= c <= e, f"range {rng} must contain the cursor {cursor}"
    typed, replaced = text[s:c], text[c:e]
    assert insert.startswith(typed), f"{insert!r} must re-type {typed!r} (the text before the cursor in its range)"
    assert insert[len(typed) :], "an empty suggestion"
    rest = iter(insert[len(typed) :])  # what it replaces after the cursor is re-typed, in order
    assert all(ch in rest for ch in replaced if not ch.isspace()), f"{insert!r} drops {replaced!r}"
    applied = text[:s] + insert + text[e:]  # what the editor shows after accepting it once
    assert applied.startswith(text[:c]) and applied.endswith(text[e:])
    assert applied[c : len(applied) - len(text) + e] == insert[len(typed) :]
    return applied


# -- tests ----------------------------------------------------------------------------------------


async def test_initialize_advertises_features(client: LanguageClient):
    caps = client.init_result.capabilities  # type: ignore[attr-defined]
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    sync = caps.text_document_sync
    assert sync.change == types.TextDocumentSyncKind.Incremental and sync.open_close
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    assert client.init_result.server_info.name == "codegen-ls"  # type: ignore[attr-defined]


async def test_model_load_reports_progress_and_status(client: LanguageClient):
    states = [s["state"] for s in client.statuses]  # type: ignore[attr-defined]
    assert states[0] == "loading" and "ready" in states, states
    assert all({"state", "message", "model", "lastLatencyMs"} <= set(s) for s in client.statuses)
    # type: ignore[attr-defined]
    kinds = [[getattr(v, "kind", None) for v in reports] for reports in client.progress_reports.values()]
    assert ["begin", "end"] in kinds, kinds


async def test_incremental_edits_are_applied(client: LanguageClient):
    uri = "file:///edits.py"
    text = "def f(x):\n    return x\n"
    open_doc(client, uri, text)
    edits = [
        ((1, 11), (1, 12), "x + 1"),
        ((0, 0), (0, 0), "# 😀 ünïcode\n"),
        ((1, 4), (1, 5), "y"),
        ((3, 0), (3, 0), "\r\nprint(f(2))"),
        ((0, 2), (0, 6), ""),
    ]
    for version, (start, end, new) in enumerate(edits, start=2):
        edit(client, uri, version, start, end, new)
        a, b = offset(text, *start), offset(text, *end)
        text = text[:a] + new + text[b:]
    assert await server_text(client, uri) == text


async def test_inline_completions_continue_the_line(client: LanguageClient):
    uri = "file:///main.py"
    open_doc(client, uri, LSP_SOURCE)
    cursors = [
        (9, len("    words = text.")),
        (10, len("    return ")),
        (15, len("    for line in ")),
        (14, len("    lines = read_lines(")),
        (17, 0),
    ]
    answered = 0
    for line, col in cursors:
        items = await inline(client, uri, line, col)
        assert len(items) <= 3  # numCandidates default
        for item in items:
            assert isinstance(item.insert_text, str) and item.range is not None
            check_applies(LSP_SOURCE, (line, col), item.insert_text, item.range)
        answered += bool(items)
    assert answered >= 1, "the model suggested nothing at any of the positions"
    status = client.statuses[-1]  # type: ignore[attr-defined]
    assert status["state"] == "ready" and isinstance(status["lastLatencyMs"], (int, float))


async def test_completion_fallback_ranked_items(client: LanguageClient):
    uri = "file:///main.py"  # opened above
    result = await client.text_document_completion_async(
        types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(15, 8),
            context=types.CompletionContext(trigger_kind=types.CompletionTriggerKind.Invoked),
        )
    )
    assert isinstance(result, types.CompletionList) and result.is_incomplete
    keys = [item.sort_text or "" for item in result.items]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for item in result.items:
        assert isinstance(item.text_edit, types.TextEdit)
        check_applies(LSP_SOURCE, (15, 8), item.text_edit.new_text, item.text_edit.range)


async def test_cancel_request_is_answered(client: LanguageClient):
    uri = "file:///cancel.py"
    open_doc(client, uri, LSP_SOURCE * 4)
    params = types.InlineCompletionParams(  # the end of a ``def`` line: a long multi-line decode
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(54, 21),
    )
    pending = asyncio.ensure_future(  # sent now, not when awaited
        client.protocol.send_request_async(types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="to-cancel")
    )
    await asyncio.sleep(0.05)
    client.cancel_request(types.CancelParams(id="to-cancel"))
    with pytest.raises(JsonRpcException) as err:
        await asyncio.wait_for(pending, 30)
    assert err.value.code == types.LSPErrorCodes.RequestCancelled
    assert isinstance(await inline(client, uri, 37, 21), list)  # still serving


LINE_ENDS = [(3, 21), (4, 25), (8, 22), (9, 24), (13, 11), (15, 22)]  # the model runs at these


async def test_requests_at_one_version_are_all_answered(client: LanguageClient):
    """Only an edit supersedes a request (#23): at one version each cursor gets its own answer
    (tests/test_editor_seam.py: an edit ends the older version's requests)."""
    uri = "file:///supersede.py"
    open_doc(client, uri, LSP_SOURCE)
    futures = [
        client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(*pos),
            )
        )
        for pos in LINE_ENDS
    ]
    results = await asyncio.wait_for(asyncio.gather(*futures), 120)
    answers = [r.items for r in results if isinstance(r, types.InlineCompletionList)]
    assert len(answers) == len(results)
    again = await inline(client, uri, *LINE_ENDS[-1])  # the last cursor again: its answer, not a new run
    assert [i.insert_text for i in again] == [i.insert_text for i in answers[-1]]


async def test_settings_take_effect(client: LanguageClient):
    uri, pos = "file:///main.py", LINE_ENDS[-1]

    def configure(settings: Any) -> None:
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=settings))

    configure({"codegenLs": {"numCandidates": 1, "temperature": 0.0}})
    assert len(await inline(client, uri, *pos)) <= 1
    configure({"codegenLs": {"minConfidence": 1.0}})
    assert await inline(client, uri, *pos) == []
    configure({"codegenLs": {"debounceMs": 30, "numCandidates": 2}})
    assert len(await inline(client, uri, *pos)) <= 2
    shown = len(client.messages)
    configure({"codegenLs": {"numCandidates": 99, "bogus": True}})
    await wait_for(lambda: len(client.messages) > shown, "a showMessage about invalid settings")
    warnings = client.messages[shown:]
    assert len(warnings) == 1 and warnings[0].type == types.MessageType.Warning
    assert "numCandidates" in warnings[0].message or "bogus" in warnings[0].message
    assert len(await inline(client, uri, *pos)) <= 3  # defaults again
    client.set_configuration({"minConfidence": 1.0}, section="codegenLs")  # pull: workspace/configuration
    configure(None)
    for _ in range(100):
        if await inline(client, uri, *pos) == []:
            break
        await asyncio.sleep(0.05)
    assert await inline(client, uri, *pos) == []
    configure({"codegenLs": {}})


async def test_editor_indentation_is_taken_only_when_fixed() -> None:
    assert editor_indentation({"tabSize": 2, "insertSpaces": True, "detectIndentation": False}) == (2, True)
    assert editor_indentation({"tabSize": 8, "insertSpaces": False, "detectIndentation": False}) == (8, False)
    assert editor_indentation({"tabSize": 2, "insertSpaces": True}) is None  # detection on (the default)
    assert editor_indentation({"tabSize": "auto", "insertSpaces": True, "detectIndentation": False}) is None
    assert editor_indentation({"tabSize": 0, "insertSpaces": True, "detectIndentation": False}) is None
    assert editor_indentation(None) is None and editor_indentation([2]) is None


async def test_client_indentation_shapes_block_suggestions(client: LanguageClient):
    """The server asks for each opened document's ``editor`` settings (workspace/configuration);
    where the editor fixed 2-space indentation, a block suggestion is indented by 2, elsewhere by
    the file's own (here: none yet, so 4)."""
    text = "import os\n\n\ndef list_files(path):\n\n"
    fixed, guessed = "file:///indent_fixed.py", "file:///indent_guessed.py"
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(  # every suggestion: this tests
            settings={"codegenLs": {"minConfidence": 0}}
        )
    )  # indentation, not the default minConfidence
    client.set_configuration(
        {"tabSize": 2, "insertSpaces": True, "detectIndentation": False}, section="editor", scope_uri=fixed
    )
    open_doc(client, fixed, text)
    open_doc(client, guessed, text)
    await wait_for_async(lambda: debug_field(client, fixed, "indentation"), "the client's indentation")
    assert await debug_field(client, guessed, "indentation") is None
    firsts = {}
    for uri in (fixed, guessed):
        items = await inline(client, uri, 4, 0)
        assert items, f"no block suggestion for {uri}"
        firsts[uri] = str(items[0].insert_text).split("\n")[0]
    assert firsts[fixed].startswith("  ") and not firsts[fixed].startswith("   "), firsts
    assert firsts[guessed].startswith("    ") and not firsts[guessed].startswith("     "), firsts
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"codegenLs": {}}))


async def debug_field(client: LanguageClient, uri: str, name: str) -> Any:
    reply = await client.protocol.send_request_async("codegenLs/debugDocument", {"uri": uri})
    return None if reply is None else getattr(reply, name)


async def wait_for_async(probe: Any, what: str, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        if await probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_bad_requests_are_answered(client: LanguageClient):
    assert await inline(client, "file:///never-opened.py", 0, 0) == []
    assert await inline(client, "file:///main.py", 10_000, 0) == []
    assert isinstance(await inline(client, "file:///main.py", 3, 10_000), list)  # past the end: line end
    with pytest.raises(JsonRpcMethodNotFound):
        await client.protocol.send_request_async("codegenLs/noSuchMethod", {})
    assert await client.protocol.send_request_async("codegenLs/debugDocument", {"uri": 3}) is None
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(  # unknown document: logged, ignored
            types.VersionedTextDocumentIdentifier(uri="file:///nope.py", version=2),
            [types.TextDocumentContentChangeWholeDocument(text="x")],
        )
    )
    assert isinstance(await inline(client, "file:///main.py", 1, 0), list)


async def test_utf8_position_encoding(utf8_client: LanguageClient):
    client = utf8_client
    assert client.init_result.capabilities.position_encoding == types.PositionEncodingKind.Utf8
    # type: ignore[attr-defined]
    assert client.progress_reports == {}  # the client did not offer window.workDoneProgress
    uri = "file:///utf8.py"
    text = 'greeting = "héllo 😀"\nname = "wörld"\nprint(greeting + name'
    open_doc(client, uri, text)
    edit(client, uri, 2, (1, 11), (1, 11), "ü")  # byte 11: after 'ö', which is 2 bytes in UTF-8
    expected = text.replace("wörld", "wöürld")
    assert await server_text(client, uri) == expected
    line2 = expected.split("\n")[2]
    items = await inline(client, uri, 2, len(line2.encode()))
    assert len(items) <= 2  # numCandidates from initializationOptions
    for item in items:
        assert item.range is not None
        assert item.range.start.line == 2 and item.range.end.character == len(line2.encode())


async def test_tcp_transport():
    proc, port = await start_tcp()
    c = await RawClient.connect_tcp(proc, "127.0.0.1", port)
    try:
        reply = await c.initialize()
        assert "inlineCompletionProvider" in reply["result"]["capabilities"]
        await c.open("file:///tcp.py", LSP_SOURCE)
        reply = await c.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": "file:///tcp.py"},
                "position": {"line": 10, "character": 11},
                "context": {"triggerKind": 1},
            },
        )
        assert isinstance(reply["result"]["items"], list)
        await c.send_bytes(b"{oops")
        await c.wait_until(lambda: bool(c.null_id_errors), 10, "a parse error")
    finally:
        assert await c.close() == 0
    assert proc.stdout is not None and await proc.stdout.read() == b""  # the protocol went over TCP only
