"""The document's indentation style: tabs or spaces and the width, given by the client or guessed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_INDENT_WIDTH = 4


@dataclass(frozen=True)
class Indent:
    """The document's indentation style."""

    use_tabs: bool = False
    width: int = DEFAULT_INDENT_WIDTH  # columns per level (also the tab stop)

    @property
    def unit(self) -> str:
        return "\t" if self.use_tabs else " " * self.width

    def columns(self, ws: str) -> int:
        """Visual width of leading whitespace (tabs advance to the next tab stop)."""
        col = 0
        for ch in ws:
            col = (col // self.width + 1) * self.width if ch == "\t" else col + 1
        return col

    def render(self, columns: int) -> str:
        """Leading whitespace of ``columns`` in this style."""
        columns = max(0, columns)
        if self.use_tabs:
            return "\t" * (columns // self.width) + " " * (columns % self.width)
        return " " * columns


def guess_indent(lines: Sequence[str], tab_size: int | None = None, insert_spaces: bool | None = None) -> Indent:
    """Tabs vs spaces and the width, from the client's options, else from the lines given."""
    tabs = spaces = 0
    steps: Counter[int] = Counter()
    prev = 0
    for ln in lines:
        body = ln.lstrip(" \t")
        if not body or body.startswith("#"):
            continue
        ws = ln[: len(ln) - len(body)]
        if ws.startswith("\t"):
            tabs += 1
            continue
        if ws:
            spaces += 1
        if len(ws) > prev:  # an indentation step between two space-indented lines
            steps[len(ws) - prev] += 1
        prev = len(ws)
    use_tabs = (not insert_spaces) if insert_spaces is not None else tabs > spaces
    common = [w for w, _ in steps.most_common(3) if 2 <= w <= 8]
    width = tab_size if tab_size and tab_size > 0 else (common[0] if common else DEFAULT_INDENT_WIDTH)
    return Indent(use_tabs, width)


__all__ = ["DEFAULT_INDENT_WIDTH", "Indent", "guess_indent"]
