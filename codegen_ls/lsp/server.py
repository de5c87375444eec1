"""The language server: ``textDocument/inlineCompletion`` (LSP 3.18), ``textDocument/completion``.

``codegen-ls serve`` speaks LSP over stdio (or ``--tcp HOST:PORT``); stdout carries nothing but
the protocol. State lives on :class:`CodegenLanguageServer`; handlers are thin: read the
document and settings, delegate to the :class:`~codegen_ls.suggest.pipeline.Completer` on the one
inference thread (:mod:`codegen_ls.lsp.worker`), convert the result. This module and its
``server_*`` helpers are the only places that speak lsprotocol; positions cross the border
(UTF-16 by default, UTF-8/UTF-32 when negotiated <-> code points) only through pygls' document
helpers.

Custom messages: the ``codegenLs/status`` notification (``state``: loading | ready | error,
``message``, ``model``, ``lastLatencyMs``) on every state change and after each completion, and
the ``codegenLs/debugDocument`` request (``{"uri"}`` -> ``{"text", "version"}``) for tests, answered
only by ``serve --debug-requests`` (it hands out a document's text).

Over ``--tcp`` exactly one client is served (:mod:`codegen_ls.lsp.transport`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import unquote

from lsprotocol import types
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.workspace import TextDocument

from codegen_ls import __version__
from codegen_ls.engine import kernels
from codegen_ls.engine.modeldir import resolve_model_dir
from codegen_ls.engine.remote import BackendUnavailable, RemoteEngine, RemoteOptions
from codegen_ls.errors import CodegenLsError
from codegen_ls.lsp import transport, workspace
from codegen_ls.lsp.events import ACCEPT_COMMAND, DID_PARTIALLY_ACCEPT, DID_SHOW, SuggestionEvents
from codegen_ls.lsp.items import _SURROGATE, _clean, cursor_position, editor_indentation, get_capability
from codegen_ls.lsp.jsonrpc import CodegenLsProtocol
from codegen_ls.lsp.perceived import Perceived
from codegen_ls.lsp.sharing import SharedCompletions
from codegen_ls.lsp.worker import InferenceWorker
from codegen_ls.settings import Settings, parse_settings
from codegen_ls.suggest.pipeline import Completer, CompletionRequest, CompletionResult, remote_options
from codegen_ls.suggest.repo import RepoIndex

log = logging.getLogger(__name__)

STATUS = "codegenLs/status"
DEBUG_DOCUMENT = "codegenLs/debugDocument"
CLIENT_TIMEOUT_S = 5.0  # for our requests to the client (progress create, configuration)
OTHER_DOCUMENTS = 8  # most recently edited open buffers handed to the pipeline ...
OTHER_DOCUMENT_CHARS = 1_000_000  # ... each at most this long


class CodegenLanguageServer(LanguageServer):
    """codegen-ls: settings, model state and the inference worker of one LSP session."""

    protocol: CodegenLsProtocol

    def __init__(self, model: str | None = None, completer: Completer | None = None, threads: int = 0) -> None:
        super().__init__(
            "codegen-ls",
            __version__,
            protocol_cls=CodegenLsProtocol,
            text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
        )
        self.cli_model, self.cli_threads = model, threads
        self.completer = completer or Completer()
        self.worker = InferenceWorker()
        self.repo = RepoIndex()  # the workspace folders' files (codegen_ls.lsp.workspace)
        self.last_prompt: dict[str, dict[str, Any]] = {}  # URI -> what went into its last prompt (debugDocument)
        self.perceived = Perceived(self)  # warm-up, prefetch after accept, continuations, statistics
        self.last_source: str | None = None  # the last answer's top source, or why it was empty
        self.shared = SharedCompletions(self)  # one run per cursor and version; waits for the model
        self.events = SuggestionEvents()  # shown / accepted, as the editor reports them
        self.kernel: str | None = None  # the decode-attention kernel's status line, once loaded
        self.settings = Settings()
        self.settings_problems: list[str] = []
        self.model_state = "loading"  # loading | ready | error
        self.model_message = "starting"
        self.model_dir: Path | None = None  # the directory loaded (or tried) last
        self.loaded_key: tuple[str, int] | None = None  # (model directory, threads) of that load
        self.loaded_remote: RemoteOptions | None = None  # the remote backend of that load (None: local)
        self.backend_down = False  # the remote backend failed the last request (state "error", still tried)
        self.last_latency_ms: float | None = None
        self.exit_code = 0
        self.initialized = False  # ``initialized`` received: the first model load has started
        self.recent: OrderedDict[str, None] = OrderedDict()  # open URIs, most recently edited last
        self.surrogates: set[str] = set()  # URIs whose text received a lone surrogate (checked per edit)
        self.indentation: dict[str, tuple[int, bool]] = {}  # URI -> (tab size, insert spaces) the client fixed
        self._shown_error: str | None = None
        self._loads = itertools.count(1)
        self._load_seq = 0
        self._tickets: dict[str, int] = {}  # per document: number of the newest request
        self._load_task: asyncio.Task[None] | None = None

    # -- settings ------------------------------------------------------------------------------
    def apply_settings(self, raw: Any) -> bool:
        """Take a ``codegenLs`` object; show ONE warning for invalid settings and use the defaults.

        Returns True when the model must be (re)loaded.
        """
        self.settings, problems = parse_settings(raw)
        if problems != self.settings_problems:  # codegenLs/status carries them (:checkhealth)
            self.settings_problems = problems
            self.send_status()
        if problems:
            log.warning("invalid settings: %s", "; ".join(problems))
            self.show(types.MessageType.Warning, f"codegen-ls: {'; '.join(problems)}. Using the default settings.")
        return (
            self.model_key() != self.loaded_key
            or remote_options(self.settings) != self.loaded_remote
            or self.model_state == "error"
        )

    def model_key(self) -> tuple[str, int]:
        """(model directory, onnxruntime threads) the settings and ``--model`` ask for."""
        return str(
            resolve_model_dir(self.settings.model_path or self.cli_model)
        ), self.settings.threads or self.cli_threads

    def effective_settings(self) -> Settings:
        """The settings, naming the model that was loaded, so the Completer never reloads by itself."""
        path, threads = self.loaded_key or self.model_key()
        return replace(
            self.settings, model_path=path, threads=threads, min_confidence=self.perceived.min_confidence(self.settings)
        )

    # -- model ---------------------------------------------------------------------------------
    async def load_model(self) -> None:
        """Load the wanted model on the worker thread, with ``$/progress`` and status updates."""
        seq = self._load_seq = next(self._loads)
        path, threads = self.loaded_key = self.model_key()
        target = self.model_dir = Path(path)
        remote = self.loaded_remote = remote_options(self.settings)
        self.backend_down = False
        self.set_state("loading", f"loading model {target}" if remote is None else f"connecting to {remote.url}")
        loaded = self.worker.submit(None, lambda cancel: self.completer.load(path, threads=threads, remote=remote))
        token = await self._progress_begin(f"Loading {target.name}")  # while the worker loads
        try:
            await loaded
            state, message = "ready", f"model {target.name} ready"
            self.kernel = kernels.status()  # for :checkhealth (codegenLs/status)
            if remote is not None:  # one look at the server: which it is, and whether it answers
                engine = cast(RemoteEngine, self.completer.engine)
                await self.worker.submit(None, lambda cancel: engine.probe(cancel=cancel))
                message = f"remote backend ready: {engine.description}"
        except BackendUnavailable as exc:  # loaded, but the server is down: requests keep trying it
            state, message, self.backend_down = "error", str(exc), True
        except CodegenLsError as exc:
            state, message = "error", str(exc)
        except Exception as exc:  # onnxruntime/tokenizers surprises: still one clear line
            log.exception("loading %s failed", target)
            state, message = "error", f"cannot load model {target}: {exc}"
        self._progress_end(token, message)
        if seq != self._load_seq:  # a newer load was started meanwhile; it reports
            return
        if state == "error":
            log.error("%s", message)
            if message != self._shown_error:  # once per distinct fault
                self._shown_error = message
                self.show(types.MessageType.Error, f"codegen-ls: {message}")
        else:
            self._shown_error = None
        self.set_state(state, message)

    def start_load(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self.load_model())  # keep a reference

    async def _progress_begin(self, title: str) -> str | None:
        if not get_capability(self.client_capabilities, "window", "work_done_progress"):
            return None
        token = f"codegen-ls/load/{self._load_seq}"
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(token), CLIENT_TIMEOUT_S)
        except Exception as exc:
            log.info("no progress: %r", exc)
            return None
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, cancellable=False))
        return token

    def _progress_end(self, token: str | None, message: str) -> None:
        if token is not None:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
            self.work_done_progress.tokens.pop(token, None)

    def set_state(self, state: str, message: str) -> None:
        self.model_state, self.model_message = state, message
        self.send_status()

    def send_status(self) -> None:
        self.protocol.notify(
            STATUS,
            {
                "state": self.model_state,
                "message": self.model_message,
                "model": str(self.model_dir or ""),
                "lastLatencyMs": self.last_latency_ms,
                "lastSource": self.last_source,
                "events": self.events.summary(),
                "settingsProblems": self.settings_problems,
                "kernel": self.kernel,
            },
        )

    def show(self, kind: types.MessageType, message: str) -> None:
        self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    # -- completions ---------------------------------------------------------------------------
    def document(self, uri: str) -> TextDocument | None:
        """An open document, or None (pygls' ``get_text_document`` would read unknown URIs from disk)."""
        return self.workspace.text_documents.get(unquote(uri))

    async def complete(
        self, uri: str, position: types.Position, explicit: bool, prefetch: bool = False
    ) -> tuple[TextDocument, CompletionResult] | None:
        """Run the pipeline for a cursor; None when there is nothing to do or it was superseded.

        ``prefetch``: started by the server after an accept (:mod:`codegen_ls.lsp.perceived`); a
        request for the same version and cursor joins it instead of running again."""
        doc = self.document(uri)
        cursor = cursor_position(doc, position) if doc is not None else None
        if doc is None or cursor is None or (self.model_state != "ready" and not self.backend_down):
            return None
        if not prefetch:
            self.perceived.asked(uri)  # a warm-up pending after an idle edit is not needed now
        joined = None if prefetch else self.perceived.join(uri, doc, position)
        if joined is not None:
            return await self._join(uri, doc, joined)
        ticket = self._tickets[uri] = self._tickets.get(uri, 0) + 1
        if self.settings.debounce_ms > 0:
            await asyncio.sleep(self.settings.debounce_ms / 1000)
            if self._tickets.get(uri) != ticket:  # a newer request for this document arrived
                return None
        source, settings, t0 = doc.source, self.effective_settings(), time.perf_counter()
        request = self._request(uri, doc, (cursor.line, cursor.character), explicit, settings)
        quick = None if prefetch else self.completer.quick(request, settings)  # typing along a suggestion: no waiting
        try:
            result = quick or await self.worker.submit(
                uri, lambda cancel: self.completer.complete(request, settings, cancel), version=doc.version
            )
        except BackendUnavailable as exc:  # the remote backend is down: one line in the status
            log.warning("%s", exc)
            self.backend_down = True
            self.set_state("error", str(exc))
            return None
        except Exception:  # a pipeline failure: logged, answered empty, the server keeps serving
            log.exception("completion failed at %s:%d:%d", uri, cursor.line, cursor.character)
            return None
        if result is None or doc.source is not source or self.document(uri) is not doc:
            return None  # superseded, or the document changed meanwhile
        self.last_prompt[uri] = result.prompt_info
        self.last_latency_ms = round((time.perf_counter() - t0) * 1000, 1)
        if self.backend_down:  # the remote backend answers again
            self.backend_down, self.model_state = False, "ready"
        self.model_message = f"{len(result.suggestions)} suggestion(s) in {self.last_latency_ms:.0f} ms"
        self.last_source = result.suggestions[0].source if result.suggestions else result.reason or result.mode
        answer = (uri, doc, position, (cursor.line, cursor.character), request, settings, result)
        if prefetch:  # shown only when a request joins it
            self.perceived.stash(uri, answer)
        else:
            self.send_status()
            self.perceived.answered(*answer, self.last_latency_ms)
        return doc, result

    async def _join(
        self, uri: str, doc: TextDocument, joined: asyncio.Task[Any]
    ) -> tuple[TextDocument, CompletionResult] | None:
        """The answer of the prefetch started after an accept, for this version and cursor."""
        t0 = time.perf_counter()
        found = await asyncio.shield(joined)
        if found is not None and self.document(uri) is doc:
            self.last_latency_ms = round((time.perf_counter() - t0) * 1000, 1)
            self.perceived.joined(uri, self.last_latency_ms)
        return found if self.document(uri) is doc else None  # type: ignore[no-any-return]

    def _request(
        self, uri: str, doc: TextDocument, cursor: tuple[int, int], explicit: bool, settings: Settings
    ) -> CompletionRequest:
        """The pipeline's request for a cursor (code points) of an open document."""
        tab_size, insert_spaces = self.indentation.get(uri, (None, None))
        return CompletionRequest(
            text=self.clean(uri, doc.source),
            line=cursor[0],
            character=cursor[1],
            uri=uri,
            language_id=doc.language_id or "",
            explicit=explicit,
            other_documents=self.other_documents(uri),
            tab_size=tab_size,
            insert_spaces=insert_spaces,
            repo=workspace.snapshot(self, settings),
        )

    async def pull_configuration(
        self, section: str, scope_uri: str | None = None, level: int = logging.WARNING
    ) -> tuple[bool, Any]:
        """(answered, value) of one ``workspace/configuration`` item; (False, None) when the client
        has no such capability or cannot answer in time (logged at ``level``)."""
        if not get_capability(self.client_capabilities, "workspace", "configuration"):
            return False, None
        try:
            items = types.ConfigurationParams(items=[types.ConfigurationItem(scope_uri=scope_uri, section=section)])
            return True, (
                await asyncio.wait_for(self.workspace_configuration_async(items), CLIENT_TIMEOUT_S) or [None]
            )[0]
        except Exception as exc:
            log.log(level, "workspace/configuration (%s) failed: %r", section, exc)
            return False, None

    async def fetch_indentation(self, uri: str) -> None:
        """Ask the client for the ``editor`` settings of ``uri``; keep its tab size and spaces/tabs
        when it has fixed them, else the file's own are guessed."""
        answered, raw = await self.pull_configuration("editor", uri, logging.DEBUG)  # the file decides
        fixed = editor_indentation(raw) if answered else None
        if fixed is not None and self.document(uri) is not None:
            self.indentation[uri] = fixed

    def other_documents(self, uri: str) -> dict[str, str]:
        others: dict[str, str] = {}
        for other in reversed(self.recent):
            doc = self.document(other)
            if other != uri and doc is not None and len(doc.source) <= OTHER_DOCUMENT_CHARS:
                others[other] = self.clean(other, doc.source)
                if len(others) == OTHER_DOCUMENTS:
                    break
        return others

    def clean(self, uri: str, source: str) -> str:
        """The text for the pipeline: lone surrogates replaced, scanned only for documents whose
        edits brought one (each edit is checked on arrival: O(edit), not O(document) per request)."""
        return _clean(source) if uri in self.surrogates else source

    def note_text(self, uri: str, text: str) -> None:
        if _SURROGATE.search(text):
            self.surrogates.add(uri)

    def touch(self, uri: str) -> None:
        self.recent.pop(uri, None)
        self.recent[uri] = None

    # -- transport -----------------------------------------------------------------------------
    def start_io(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        """pygls' ``start_io`` with our read loop: stdin on a daemon thread, framing that resynchronises."""
        stop = self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        source = transport.StdinSource(stdin or sys.stdin.buffer)
        self._run(transport.pump(source.read, self.protocol, stop))

    def start_tcp(self, host: str, port: int) -> None:
        """One client on ``host:port`` (its first message an ``initialize`` request), then exit."""
        stop = self._stop_event = threading.Event()
        self._run(transport.serve_tcp(host, port, self.protocol, stop))

    def _run(self, main: Any) -> None:
        try:
            code = asyncio.run(main)
            if isinstance(code, int):  # serve_tcp: how its client left
                self.exit_code = code
        except BrokenPipeError:
            log.info("the client closed the connection")
        except SystemExit as exc:  # the exit notification
            self.exit_code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def report_server_error(self, error: Exception, source: Any) -> None:
        """Log only: a notification that failed (bad params, unknown document) is ignored."""
        log.error("%s: %r", getattr(source, "__name__", source), error)

    def shutdown(self) -> None:
        self.worker.close(timeout=2.0)
        self.perceived.close()  # the statistics reach their file
        super().shutdown()


def create_server(
    model: str | None = None, completer: Completer | None = None, threads: int = 0, debug_requests: bool = False
) -> CodegenLanguageServer:
    """A server with every feature registered (one per session); ``debug_requests``: also
    ``codegenLs/debugDocument``, which hands out a document's text (tests only)."""
    from codegen_ls.lsp import handlers as h  # (imports this module: here, not at the top)

    ls = CodegenLanguageServer(model, completer, threads)
    ls.feature(types.INITIALIZE)(h.on_initialize)
    ls.feature(types.INITIALIZED)(h.on_initialized)
    ls.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(h.on_did_change_configuration)
    ls.feature(types.TEXT_DOCUMENT_DID_OPEN)(h.on_did_open)
    ls.feature(types.TEXT_DOCUMENT_DID_CHANGE)(h.on_did_change)
    ls.feature(types.TEXT_DOCUMENT_DID_CLOSE)(h.on_did_close)
    workspace.register(ls)
    ls.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())(h.on_inline_completion)
    ls.feature(
        types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", "[", ",", "=", ":"])
    )(h.on_completion)
    ls.command(ACCEPT_COMMAND)(h.on_accept)
    ls.feature(DID_SHOW)(h.on_did_show)
    ls.feature(DID_PARTIALLY_ACCEPT)(h.on_did_partially_accept)
    ls.feature(types.SHUTDOWN)(h.on_shutdown)
    ls.feature(types.EXIT)(h.on_exit)
    if debug_requests:
        ls.feature(DEBUG_DOCUMENT)(h.on_debug_document)
    return ls


# -------------------------------------------------------------------------------------------------
# Entry point
# -------------------------------------------------------------------------------------------------


def serve(
    tcp: tuple[str, int] | None = None, model: str | None = None, threads: int = 0, debug_requests: bool = False
) -> int:
    """Run the server until the client exits or goes away; return the process exit code.

    ``model`` and ``threads`` (``--model``, ``--threads``) apply while the client's settings
    leave ``modelPath`` / ``threads`` unset.

    Over stdio the protocol gets a private copy of the stdout descriptor and descriptor 1 is
    pointed at stderr, so a stray ``print`` or a native library's chatter cannot corrupt it.
    """
    ls = create_server(model, threads=threads, debug_requests=debug_requests)
    if tcp is not None:
        ls.start_tcp(*tcp)
    else:
        protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        sys.stdout = sys.stderr
        ls.start_io(sys.stdin.buffer, protocol_out)
    if not ls.worker.close(timeout=0.0):  # still inside onnxruntime (a model load): finalizing
        log.warning("exiting while the model is still loading")  # the interpreter now would abort
        logging.shutdown()
        os._exit(ls.exit_code)
    return ls.exit_code


if __name__ == "__main__":  # ``python -m codegen_ls.lsp.server [--tcp HOST:PORT] [--model DIR] ...``
    from codegen_ls.cli import main

    raise SystemExit(main(["serve", *sys.argv[1:]]))
