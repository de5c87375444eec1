"""Position conversion (client UTF-16 / UTF-8 / UTF-32 units <-> code points) without Python loops.

pygls' :class:`~pygls.workspace.PositionCodec` walks a line character by character in Python,
several times per edit and request: a 5 MB line cost seconds a keystroke, on the event loop.
:class:`FastPositionCodec` gives the same answers (a column inside a character rounds up to
after it, as pygls does) in O(1) for ASCII lines (``str.isascii`` reads a flag CPython keeps)
and with C-speed codecs otherwise. Documents use it through pygls' own helpers
(``position_from_client_units``, ``range_to_client_units``): the server never converts by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lsprotocol import types
from pygls.workspace import PositionCodec, ServerTextPosition

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # two UTF-16 units each
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 bytes that do not start a character
_UTF8, _UTF32 = types.PositionEncodingKind.Utf8, types.PositionEncodingKind.Utf32


def _content(line: str) -> str:
    """A line without its terminator (LSP columns never count it)."""
    return line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith(("\n", "\r")) else line


class FastPositionCodec(PositionCodec):
    """pygls' codec with its per-character loops replaced; same results for positions in range."""

    def client_num_units(self, string: str) -> int:
        return self._units(string, len(string))

    def _units(self, line: str, column: int) -> int:
        """Client units of ``line[:column]``."""
        if line.isascii() or self.encoding == _UTF32:
            return min(column, len(line))
        if self.encoding == _UTF8:
            return len(line[:column].encode("utf-8", "surrogatepass"))
        return len(line[:column].encode("utf-16-le", "surrogatepass")) // 2

    def _column(self, line: str, units: int) -> int:
        """Code points of ``line`` before client offset ``units`` (inside a character: after it)."""
        units = max(0, units)
        if line.isascii() or self.encoding == _UTF32:
            return min(units, len(line))
        if self.encoding == _UTF8:
            head = line.encode("utf-8", "surrogatepass")[:units]
            return len(head.translate(None, _CONTINUATION))  # the characters starting before it
        shift = 0  # UTF-16: each astral character before the offset takes one unit more
        for found in _ASTRAL.finditer(line):
            start = found.start() + shift
            if start >= units:
                break
            if units == start + 1:  # between the two halves of a surrogate pair
                return found.start() + 1
            shift += 1
        return min(units - shift, len(line))

    def position_from_client_units(self, lines: Sequence[str], position: types.Position) -> ServerTextPosition:
        if len(lines) == 0:
            return ServerTextPosition(0, 0)
        if position.line >= len(lines):
            return ServerTextPosition(len(lines) - 1, self.client_num_units(lines[-1]))
        line = _content(lines[position.line])
        return ServerTextPosition(position.line, self._column(line, position.character))

    def position_to_client_units(
        self, lines: Sequence[str], position: ServerTextPosition | types.Position
    ) -> types.Position:
        if not 0 <= position.line < len(lines):
            return types.Position(line=len(lines), character=0)
        return types.Position(line=position.line, character=self._units(lines[position.line], position.character))
