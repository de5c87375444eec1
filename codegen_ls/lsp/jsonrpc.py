"""JSON-RPC and document hardening for pygls 2.1: every request answered, LSP line semantics.

pygls leaves a few holes that a server facing real editors (and fuzzers) must close:

* params that fail to deserialize are logged, but the request is never answered -> ``-32602``;
* requests after ``shutdown`` are dropped silently -> ``-32600`` (LSP: InvalidRequest);
* requests before ``initialize`` reach the handlers -> ``-32002`` (ServerNotInitialized);
* a body that is not JSON, or not a JSON-RPC object, is only logged -> ``-32700`` / ``-32600``
  with ``"id": null`` (JSON-RPC 2.0, section 5);
* documents split lines like :meth:`str.splitlines` (form feed, U+2028, ...), while LSP only
  knows ``\\n``, ``\\r\\n`` and ``\\r``: positions and incremental edits would drift;
* pygls' read loop goes deaf after one bad header; ours (:mod:`codegen_ls.lsp.framing`,
  :mod:`codegen_ls.lsp.transport`) resynchronises, and its problems are answered here (``-32700``);
* pygls applies an edit whatever its document version: an older one is ignored here (logged once
  a document), and one with ``version: null`` is applied (lsprotocol would refuse it);
* positions convert through pygls' codec loops, character by character in Python: documents
  here use :class:`~codegen_ls.lsp.convert.FastPositionCodec`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import attrs
import cattrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInternalError,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import JsonRPCNotification, JsonRPCRequestMessage, JsonRPCResponseMessage
from pygls.workspace import TextDocument, Workspace

from codegen_ls.lsp.convert import FastPositionCodec
from codegen_ls.lsp.framing import Problem

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Documents with LSP line semantics
# ---------------------------------------------------------------------------------------------

_EXOTIC_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines breaks there, LSP does not
_LSP_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def split_lines(text: str) -> tuple[str, ...]:
    """Lines with their terminators, split only at ``\\n``, ``\\r\\n`` and ``\\r`` (LSP)."""
    if not any(ch in text for ch in _EXOTIC_BREAKS):
        return tuple(text.splitlines(True))  # same result, much faster
    return tuple(_LSP_LINE.findall(text))


class LspTextDocument(TextDocument):
    """A pygls document whose ``lines`` follow LSP (cached until the text changes), and whose
    incremental edits are applied by offset: one slice instead of a copy line by line, with
    positions past a line's end clamped to it and lines past the end to the end (LSP).
    """

    _lines_of: tuple[str, tuple[str, ...]] | None = None  # (source, its lines)

    @property
    def lines(self) -> Sequence[str]:
        source = self.source
        if self._lines_of is None or self._lines_of[0] is not source:
            self._lines_of = (source, split_lines(source))
        return self._lines_of[1]

    def lsp_offset(self, position: types.Position) -> int:
        """Code-point offset of a client position, clamped into the document."""
        lines = self.lines
        if position.line >= len(lines):
            return len(self.source)
        width = self.position_codec.client_num_units(lines[position.line].rstrip("\r\n"))
        column = self.position_codec.position_from_client_units(
            lines, types.Position(position.line, min(position.character, width))
        ).character
        return sum(map(len, lines[: position.line])) + column  # C-speed; no per-document table kept

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        source, lines = self.source, self.lines
        start, end = self.lsp_offset(change.range.start), self.lsp_offset(change.range.end)
        end = max(start, end)
        self._source = text = source[:start] + change.text + source[end:]
        # Split again only the lines the edit touches, and one more each side (a "\r" and a "\n"
        # meeting there become one break): on a file of 600k lines a keystroke no longer splits
        # the whole text on the event loop.
        first = max(0, min(change.range.start.line, len(lines)) - 1)
        last = min(len(lines), max(change.range.start.line, change.range.end.line) + 2)
        lo = sum(map(len, lines[:first]))
        hi = lo + sum(map(len, lines[first:last]))
        if lo <= start and end <= hi:
            region = split_lines(text[lo : hi + len(change.text) - (end - start)])
            self._lines_of = (text, (*lines[:first], *region, *lines[last:]))


class LspWorkspace(Workspace):
    """A pygls workspace that creates :class:`LspTextDocument` documents, converting positions with
    :class:`~codegen_ls.lsp.convert.FastPositionCodec`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position_codec = FastPositionCodec(encoding=self._position_encoding)

    @classmethod
    def like(cls, other: Workspace) -> LspWorkspace:
        return cls(other.root_uri, other._sync_kind, list(other.folders.values()), other.position_encoding)

    def _create_text_document(
        self, doc_uri: str, source: str | None = None, version: int | None = None, language_id: str | None = None
    ) -> TextDocument:
        return LspTextDocument(
            doc_uri,
            source=source,
            version=version,
            language_id=language_id,
            sync_kind=self._sync_kind,
            position_codec=self.position_codec,
        )


# ---------------------------------------------------------------------------------------------
# JSON-RPC
# ---------------------------------------------------------------------------------------------


def _valid_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _first_line(exc: BaseException) -> str:
    """One short line for an error message; cattrs errors say which field is wrong."""
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc, path="$")[:3])[:300]
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class CodegenLsProtocol(LanguageServerProtocol):
    """pygls' LSP protocol, answering every request whatever arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_received = False
        self._version_noted: set[str] = set()  # documents whose out-of-order edit was logged

    def structure_message(self, data: dict[str, Any]) -> Any:
        # ``json.loads`` calls this hook for every object, innermost first: keep plain dicts and
        # structure the whole message once, in handle_message, where failures can be answered.
        return data

    def handle_message(self, message: Any) -> None:  # noqa: C901 - one decision table
        if not isinstance(message, dict):
            self.reply_error(None, JsonRpcInvalidRequest("Invalid Request: expected a JSON object"))
            return
        has_id, msg_id, method = "id" in message, message.get("id"), message.get("method")
        if (
            message.get("jsonrpc") != "2.0"
            or (has_id and not _valid_id(msg_id))
            or ("method" in message and not isinstance(method, str))
        ):
            self.reply_error(
                msg_id if _valid_id(msg_id) else None,
                JsonRpcInvalidRequest("Invalid Request: not a JSON-RPC 2.0 message"),
            )
            return
        if method is None:  # a response to one of our requests
            if has_id and ("result" in message or "error" in message):
                self._handle_client_response(message)
            else:
                self.reply_error(msg_id, JsonRpcInvalidRequest("Invalid Request: no method"))
            return
        if not self._lifecycle_allows(method, msg_id if has_id else None, has_id):
            return
        if has_id and self._is_notification(method):
            self.reply_error(msg_id, JsonRpcInvalidRequest(f"Invalid Request: {method} is a notification"))
            return
        unversioned = method == types.TEXT_DOCUMENT_DID_CHANGE and self._null_version(message)
        try:
            structured = self._structure(message)
        except Exception as exc:
            if has_id:
                self.reply_error(msg_id, JsonRpcInvalidParams(f"Invalid params for {method}: {_first_line(exc)}"))
            else:
                log.warning("ignoring %s notification with invalid params: %s", method, _first_line(exc))
            return
        if method == types.INITIALIZE:
            self.initialize_received = True
        if method == types.TEXT_DOCUMENT_DID_CHANGE and not unversioned and self._stale_edit(structured.params):
            return
        try:
            super().handle_message(structured)
        except Exception as exc:  # a handler failed before pygls could answer
            log.exception("failed to handle %s", method)
            if has_id:
                self.reply_error(msg_id, JsonRpcInternalError(f"Internal error: {_first_line(exc)}"))

    def _lifecycle_allows(self, method: str, msg_id: Any, is_request: bool) -> bool:
        """LSP lifecycle: nothing before ``initialize``, only ``exit`` after ``shutdown``."""
        if method == types.EXIT:
            return True
        if self._shutdown:
            if is_request:
                self.reply_error(msg_id, JsonRpcInvalidRequest("Invalid Request: the server is shutting down"))
            return False
        if not self.initialize_received and method != types.INITIALIZE:
            if is_request:
                self.reply_error(msg_id, JsonRpcServerNotInitialized("Server not initialized"))
            else:
                log.info("ignoring %s before initialize", method)
            return False
        if method == types.INITIALIZE and self.initialize_received:
            if is_request:
                self.reply_error(msg_id, JsonRpcInvalidRequest("Invalid Request: initialize was already received"))
            return False
        return True

    def _null_version(self, message: dict[str, Any]) -> bool:
        """A didChange with ``"version": null`` gets the document's own version (lsprotocol wants an
        integer): the edit is applied, the version kept. True when it was null."""
        params = message.get("params")
        if not isinstance(params, dict):
            return False
        doc_id = params.get("textDocument")
        if not (
            isinstance(doc_id, dict)
            and "version" in doc_id
            and doc_id["version"] is None
            and isinstance(doc_id.get("uri"), str)
        ):
            return False
        doc = self.workspace.text_documents.get(unquote(doc_id["uri"]))
        version = doc.version if doc is not None and isinstance(doc.version, int) else 0
        message["params"] = {**params, "textDocument": {**doc_id, "version": version}}
        self._note_version(doc_id["uri"], "an edit without a version (null): applied, the version kept")
        return True

    def _stale_edit(self, params: types.DidChangeTextDocumentParams) -> bool:
        """Whether an edit is for an older version than the document's (it is ignored)."""
        doc = self.workspace.text_documents.get(unquote(params.text_document.uri))
        if doc is None or not isinstance(doc.version, int) or params.text_document.version >= doc.version:
            return False
        self._note_version(
            params.text_document.uri,
            f"ignoring edits for version {params.text_document.version}, older than the document's {doc.version}",
        )
        return True

    def _note_version(self, uri: str, what: str) -> None:
        if uri not in self._version_noted:  # once a document: a confused client would flood the log
            self._version_noted.add(uri)
            log.warning("%s: %s (logged once a document)", uri, what)

    def _is_notification(self, method: str) -> bool:
        message_type = self.get_message_type(method)
        return message_type is not None and attrs.has(message_type) and "id" not in attrs.fields_dict(message_type)

    def _structure(self, message: dict[str, Any]) -> Any:
        """pygls' ``structure_message`` without its error logging (callers answer instead)."""
        if "method" in message:
            message_type = self.get_message_type(message["method"])
            if message_type is None:  # a method lsprotocol does not know: params are optional
                message_type = JsonRPCRequestMessage if "id" in message else JsonRPCNotification
                message = {"params": None, **message}
            return self._converter.structure(message, message_type)
        if "error" in message:
            return self._converter.structure(message, types.ResponseErrorMessage)
        result_type = self._result_types.pop(message["id"], None) or JsonRPCResponseMessage
        return self._converter.structure(message, result_type)

    def _handle_client_response(self, message: dict[str, Any]) -> None:
        try:
            structured = self._structure(message)
        except Exception as exc:  # fail the waiting future instead of leaving it pending
            log.warning("malformed response from the client: %s", _first_line(exc))
            future = self._request_futures.pop(message["id"], None)
            self._result_types.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_exception(JsonRpcInvalidParams(f"malformed response: {_first_line(exc)}"))
            return
        super().handle_message(structured)

    def reply_error(self, msg_id: Any, error: JsonRpcException) -> None:
        """Send an error response; ``msg_id`` None is written as ``"id": null``."""
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": error.code, "message": error.message}})

    def framing_error(self, problem: Problem) -> None:
        """Bytes the framing reader could not take as a message: a refused request with a known id
        gets its own error (-32600), anything else a Parse error with ``"id": null``."""
        log.warning("framing: %s", problem.message)
        if problem.msg_id is not None:
            self.reply_error(problem.msg_id, JsonRpcInvalidRequest(f"Invalid Request: {problem.message}"))
        else:
            self.reply_error(None, JsonRpcParseError(f"Parse error: {problem.message}"))

    def on_transport_error(self, error: Exception, source: Any = None) -> None:
        """Error handler of the read loop: a body that is not JSON gets a Parse error."""
        if isinstance(error, (ValueError, RecursionError)):
            log.warning("unparsable message: %s", _first_line(error))
            self.reply_error(None, JsonRpcParseError(f"Parse error: {_first_line(error)}"))
        else:
            log.error("transport error: %r", error)
