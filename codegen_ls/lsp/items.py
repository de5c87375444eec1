"""Conversions between the pipeline's suggestions and LSP: the cursor and ranges (code points <->
the client's units, only through pygls' document helpers), inline and completion items, the
editor's indentation settings, client capabilities, lone surrogates."""

from __future__ import annotations

import re
from typing import Any

from lsprotocol import types
from pygls.workspace import ServerTextPosition, ServerTextRange, TextDocument

from codegen_ls.lsp.events import ACCEPT_COMMAND, reference
from codegen_ls.lsp.sharing import Answer
from codegen_ls.suggest.pipeline import CompletionResult, Suggestion

_SURROGATE = re.compile("[\ud800-\udfff]")


def cursor_position(doc: TextDocument, position: types.Position) -> ServerTextPosition | None:
    """The cursor in code points; a column past the line end means the end (LSP); None if no line."""
    lines = doc.lines
    if position.line >= len(lines):
        at_end = position.line == len(lines) and (not lines or lines[-1].endswith(("\n", "\r")))
        return ServerTextPosition(position.line, 0) if at_end else None
    width = doc.position_codec.client_num_units(lines[position.line].rstrip("\r\n"))
    return doc.position_from_client_units(types.Position(position.line, min(position.character, width)))


def suggestion_range(doc: TextDocument, s: Suggestion) -> types.Range | None:
    if s.start[0] != s.end[0]:  # inline items and completion edits must stay on one line
        return None
    return doc.range_to_client_units(ServerTextRange(ServerTextPosition(*s.start), ServerTextPosition(*s.end)))


def inline_items(
    doc: TextDocument, result: CompletionResult, answer: Answer | None = None
) -> list[types.InlineCompletionItem]:
    """The items; with ``answer``, each carries the command the editor runs on accept
    (:mod:`codegen_ls.lsp.events`)."""
    items = []
    for rank, s in enumerate(result.suggestions):
        rng = suggestion_range(doc, s)
        if rng is None:
            continue
        command = None
        if answer is not None:
            ref = reference(answer.id, rank, s.source, answer.latency_ms, result.stats.get("new_tokens"))
            command = types.Command(title="codegen-ls: accepted", command=ACCEPT_COMMAND, arguments=[ref])
        items.append(types.InlineCompletionItem(insert_text=s.insert_text, range=rng, command=command))
    return items


def completion_items(doc: TextDocument, result: CompletionResult) -> list[types.CompletionItem]:
    items = []
    for rank, s in enumerate(result.suggestions):
        rng = suggestion_range(doc, s)
        if rng is None:
            continue
        first = next((line.strip() for line in s.insert_text.splitlines() if line.strip()), s.insert_text)
        items.append(
            types.CompletionItem(
                label=first[:80] or "(whitespace)",
                kind=types.CompletionItemKind.Text,
                preselect=rank == 0,
                sort_text=f"{rank:03d}",
                filter_text=s.insert_text,
                detail=f"codegen-ls · {s.confidence:.0%} · {s.source}",
                documentation=s.insert_text if "\n" in s.insert_text else None,
                insert_text_format=types.InsertTextFormat.PlainText,
                text_edit=types.TextEdit(range=rng, new_text=s.insert_text),
            )
        )
    return items


def editor_indentation(raw: Any) -> tuple[int, bool] | None:
    """(tab size, insert spaces) from a client's ``editor`` settings (VS Code's names), or None
    when they are missing, invalid, or left to detection (``detectIndentation`` not false)."""
    if hasattr(raw, "_asdict"):  # pygls hands JSON objects over as namedtuples
        raw = raw._asdict()
    if not isinstance(raw, dict) or raw.get("detectIndentation", True) is not False:
        return None
    size, spaces = raw.get("tabSize"), raw.get("insertSpaces")
    if type(size) is not int or not 1 <= size <= 16 or not isinstance(spaces, bool):
        return None
    return size, spaces


def get_capability(caps: Any, *path: str) -> Any:
    for name in path:
        caps = getattr(caps, name, None)
    return caps


def _clean(text: str) -> str:
    """Lone surrogates (JSON ``"\\ud800"``) become U+FFFD: one code point for one, so positions hold."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text
