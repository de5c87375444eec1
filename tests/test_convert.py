"""Position conversion (codegen_ls.lsp.convert): the same answers as pygls' codec, without its loops."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types
from pygls.workspace import PositionCodec, ServerTextPosition

from codegen_ls.lsp.convert import FastPositionCodec

ENCODINGS = [types.PositionEncodingKind.Utf16, types.PositionEncodingKind.Utf8, types.PositionEncodingKind.Utf32]
CHARS = st.sampled_from(["a", " ", "é", "€", "😀", "𝔘", "\ud800", "\udc00", "\x00", "\t"])
LINE = st.lists(CHARS, max_size=20).map("".join)


@settings(max_examples=400, deadline=None)
@given(line=LINE, end=st.sampled_from(["", "\n", "\r\n", "\r"]), encoding=st.sampled_from(ENCODINGS), data=st.data())
def test_same_positions_as_pygls(line: str, end: str, encoding: str, data: st.DataObject) -> None:
    ours, theirs = FastPositionCodec(encoding), PositionCodec(encoding)
    lines = ["x\n", line + end]
    width = theirs.client_num_units(line)
    assert ours.client_num_units(line) == width
    units = data.draw(st.integers(0, width))
    # pygls' own answer for an in-range client column (a column inside a character: after it)
    expected = theirs.position_from_client_units([line], types.Position(0, units)).character
    assert ours.position_from_client_units(lines, types.Position(1, units)) == ServerTextPosition(1, expected)
    column = data.draw(st.integers(0, len(line)))
    assert ours.position_to_client_units(lines, ServerTextPosition(1, column)) == theirs.position_to_client_units(
        lines, ServerTextPosition(1, column)
    )


def test_long_lines_convert_fast() -> None:
    """Figures only loosely bounded: a 5 MB line converts in well under a second (pygls: seconds)."""
    for text in ("a" * 5_000_000, ("a" * 99 + "😀") * 50_000):
        codec = FastPositionCodec(types.PositionEncodingKind.Utf16)
        lines = [text]
        t0 = time.perf_counter()
        width = codec.client_num_units(text)
        end = codec.position_from_client_units(lines, types.Position(0, width))
        back = codec.position_to_client_units(lines, end)
        assert end.character == len(text) and back.character == width
        assert time.perf_counter() - t0 < 2.0


# -- incremental edits keep the document's lines exact (LspTextDocument re-splits only around an edit)
PIECES = st.sampled_from(["a", "é", "😀", "\n", "\r", "\r\n", "\x0c", "\u2028", "\x85", " ", "def "])
TEXT = st.lists(PIECES, max_size=25).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=TEXT, data=st.data())
def test_edited_lines_equal_a_fresh_split(text: str, data: st.DataObject) -> None:
    from codegen_ls.lsp.jsonrpc import LspWorkspace, split_lines

    ws = LspWorkspace(None, types.TextDocumentSyncKind.Incremental, [], types.PositionEncodingKind.Utf16)
    ws.put_text_document(types.TextDocumentItem(uri="file:///t.py", language_id="python", version=1, text=text))
    doc = ws.get_text_document("file:///t.py")
    for version in range(2, 2 + data.draw(st.integers(1, 5))):
        n = max(1, len(doc.lines))
        a = types.Position(data.draw(st.integers(0, n)), data.draw(st.integers(0, 8)))
        b = types.Position(data.draw(st.integers(0, n)), data.draw(st.integers(0, 8)))
        ws.update_text_document(
            types.VersionedTextDocumentIdentifier(uri="file:///t.py", version=version),
            types.TextDocumentContentChangePartial(range=types.Range(a, b), text=data.draw(TEXT)),
        )
        assert tuple(doc.lines) == split_lines(doc.source)
