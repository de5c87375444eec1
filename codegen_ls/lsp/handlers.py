"""The LSP feature handlers: thin (read the document and settings, delegate to the server's
session, convert the result); :func:`codegen_ls.lsp.server.create_server` registers them."""

from __future__ import annotations

import logging
from typing import Any

from lsprotocol import types

from codegen_ls.lsp import workspace
from codegen_ls.lsp.events import EventKind
from codegen_ls.lsp.items import completion_items, get_capability, inline_items
from codegen_ls.lsp.jsonrpc import LspWorkspace
from codegen_ls.lsp.server import CodegenLanguageServer  # pygls reads the handlers' type hints at run time
from codegen_ls.settings import NAMESPACE, parse_settings

log = logging.getLogger(__name__)


def _settings_in(raw: Any) -> tuple[bool, Any]:
    """Find the ``codegenLs`` object in ``{"settings": {"codegenLs": ..}}`` or ``{"codegenLs": ..}``."""
    if isinstance(raw, dict) and isinstance(raw.get("settings"), dict) and NAMESPACE in raw["settings"]:
        return True, raw["settings"][NAMESPACE]
    if isinstance(raw, dict) and NAMESPACE in raw:
        return True, raw[NAMESPACE]
    return False, None


def on_initialize(ls: CodegenLanguageServer, params: types.InitializeParams) -> None:
    ls.protocol._workspace = LspWorkspace.like(ls.workspace)  # LSP line breaks (server_protocol)
    found, raw = _settings_in(params.initialization_options)
    ls.settings, ls.settings_problems = parse_settings(raw if found else params.initialization_options)
    workspace.index_folders(ls, params)  # on the index's own thread


async def on_initialized(ls: CodegenLanguageServer, params: types.InitializedParams) -> None:
    if ls.initialized:  # a second ``initialized``: the model is already (being) loaded
        return
    ls.initialized = True
    if ls.settings_problems:  # shown now: the client is ready for messages
        ls.show(
            types.MessageType.Warning, f"codegen-ls: {'; '.join(ls.settings_problems)}. Using the default settings."
        )
    ls.start_load()
    await workspace.watch_sources(ls)


async def on_did_change_configuration(ls: CodegenLanguageServer, params: types.DidChangeConfigurationParams) -> None:
    found, raw = _settings_in(params.settings)
    if not found and get_capability(ls.client_capabilities, "workspace", "configuration"):
        # pull model: the client sends an empty notification and answers workspace/configuration
        answered, raw = await ls.pull_configuration(NAMESPACE)
        if not answered:
            return
    if ls.apply_settings(raw) and ls.initialized:
        ls.start_load()


async def on_did_open(ls: CodegenLanguageServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.touch(params.text_document.uri)
    ls.surrogates.discard(params.text_document.uri)
    ls.note_text(params.text_document.uri, params.text_document.text)
    ls.repo.set_open(params.text_document.uri, params.text_document.text)  # open documents override the disk
    ls.perceived.opened(params.text_document.uri)  # warm-up: prefill its prompt in the background
    await ls.fetch_indentation(params.text_document.uri)


def on_did_change(ls: CodegenLanguageServer, params: types.DidChangeTextDocumentParams) -> None:
    ls.touch(params.text_document.uri)
    ls.worker.supersede(params.text_document.uri)  # work for the old text is stale
    for change in params.content_changes:
        ls.note_text(params.text_document.uri, change.text)
    ls.perceived.changed(params.text_document.uri, params)  # an accept (prefetch), a dismissal, a pause ended (warm-up)


def on_did_close(ls: CodegenLanguageServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.recent.pop(uri, None)
    ls.shared.forget(uri)
    ls.surrogates.discard(uri)
    ls.indentation.pop(uri, None)
    ls.repo.set_open(uri, None)
    ls.last_prompt.pop(uri, None)
    ls.perceived.closed(uri)
    ls.worker.supersede(uri)
    ls.worker.submit(None, lambda cancel: ls.completer.forget(uri))  # its caches, on the worker thread


async def on_inline_completion(
    ls: CodegenLanguageServer, params: types.InlineCompletionParams
) -> types.InlineCompletionList:
    explicit = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    answer = await ls.shared.complete(params.text_document.uri, params.position, explicit)
    return types.InlineCompletionList(items=inline_items(answer.doc, answer.result, answer) if answer else [])


async def on_completion(ls: CodegenLanguageServer, params: types.CompletionParams) -> types.CompletionList:
    explicit = params.context is None or params.context.trigger_kind == types.CompletionTriggerKind.Invoked
    mode = ls.settings.completion_fallback  # auto: the menu only for editors without inline completion
    if mode == "never" or (
        mode == "auto" and get_capability(ls.client_capabilities, "text_document", "inline_completion")
    ):
        return types.CompletionList(is_incomplete=True, items=[])
    answer = await ls.shared.complete(params.text_document.uri, params.position, explicit)
    return types.CompletionList(is_incomplete=True, items=completion_items(answer.doc, answer.result) if answer else [])


def on_accept(ls: CodegenLanguageServer, *arguments: Any) -> None:
    """``workspace/executeCommand`` ``codegenLs.accept``: the editor accepted an item whole
    (statistics and the prefetch after an accept learn which one: :mod:`codegen_ls.lsp.perceived`)."""
    ref = arguments[0] if arguments else None
    ls.perceived.accept_command(ref)
    if ls.events.record(EventKind.ACCEPTED, ref):
        ls.send_status()


def on_did_show(ls: CodegenLanguageServer, params: Any) -> None:
    ls.events.record(EventKind.SHOWN, getattr(params, "item", None))


def on_did_partially_accept(ls: CodegenLanguageServer, params: Any) -> None:
    kind = {"word": EventKind.ACCEPTED_WORD, "line": EventKind.ACCEPTED_LINE}.get(str(getattr(params, "kind", "")))
    if kind is not None and ls.events.record(
        kind, getattr(params, "item", None), getattr(params, "acceptedLength", None)
    ):
        ls.send_status()


def on_shutdown(ls: CodegenLanguageServer, params: None) -> None:
    ls.worker.close()
    ls.repo.close()


def on_exit(ls: CodegenLanguageServer, params: None) -> None:
    log.info("exit (%s shutdown)", "after" if ls.protocol._shutdown else "without")


def on_debug_document(ls: CodegenLanguageServer, params: Any) -> dict[str, Any] | None:
    uri = params.get("uri") if isinstance(params, dict) else getattr(params, "uri", None)
    doc = ls.document(uri) if isinstance(uri, str) else None
    if doc is None:
        return None
    return {
        "text": doc.source,
        "version": doc.version,
        "indentation": ls.indentation.get(doc.uri),
        "lastPrompt": ls.last_prompt.get(doc.uri),
        "workspace": workspace.info(ls),
        "cachedTokens": ls.completer.cached_tokens(doc.uri),
        "perceived": {
            "warmups": ls.perceived.warmups,
            "prefetched": ls.perceived.prefetched,
            "joins": ls.perceived.joins,
        },
    }
