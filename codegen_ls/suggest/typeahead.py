"""The type-ahead cache: suggestions already made, answered again as the user types along them.

Per document it keeps the last model answer and the answer computed as if its top suggestion
were accepted (:meth:`codegen_ls.suggest.pipeline.Completer.complete_ahead`). Typing (or erasing)
characters along a suggestion, on the same line with the same text around, is answered with the
rest of it and no model call (source ``typeahead``). Thread-safe: the server answers type-ahead
keystrokes off the inference thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from codegen_ls.kinds import Source
from codegen_ls.suggest.context import Context
from codegen_ls.suggest.request import Suggestion

DOCUMENTS = 64  # documents whose last suggestions are kept


@dataclass
class Shown:
    """The last model answer for a document, where it was made."""

    line: int
    line_prefix: str
    line_suffix: str
    before: str  # text before the cursor line (tail)
    after: str  # text after the cursor line
    suggestions: list[Suggestion]


class TypeAhead:
    """The last answer and the answer after accepting it, per document (the newest ``DOCUMENTS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shown: OrderedDict[str, Shown] = OrderedDict()
        self._ahead: OrderedDict[str, Shown] = OrderedDict()  # the answer as if the top suggestion were accepted

    def remember(
        self, uri: str, ctx: Context, suggestions: list[Suggestion], ahead: bool = False, keep_ahead: bool = False
    ) -> None:
        """Keep ``suggestions`` made at ``ctx``: the document's answer (which makes the answer after
        accepting the previous one stale, unless ``keep_ahead``: a continuation of the same answer),
        or with ``ahead`` its answer after an accept."""
        with self._lock:
            table = self._ahead if ahead else self._shown
            if not keep_ahead:
                self._ahead.pop(uri, None)
            if not suggestions:
                table.pop(uri, None)
                return
            table[uri] = Shown(ctx.line, ctx.line_prefix, ctx.line_suffix, ctx.before_line, ctx.after_line, suggestions)
            table.move_to_end(uri)
            while len(table) > DOCUMENTS:
                table.popitem(last=False)

    def answer(self, uri: str, ctx: Context, min_confidence: float) -> list[Suggestion]:
        """The rest of the last suggestions when the user typed (or erased) along them on the line;
        else of the answer computed as if the last suggestion were accepted."""
        with self._lock:
            entries = [self._shown.get(uri), self._ahead.get(uri)]
        for shown in entries:
            out = _rest(shown, ctx, min_confidence) if shown is not None and _along(shown, ctx) else []
            if out:
                return out
        return []

    def forget(self, uri: str) -> None:
        with self._lock:
            self._shown.pop(uri, None)
            self._ahead.pop(uri, None)

    def clear(self) -> None:
        with self._lock:
            self._shown.clear()
            self._ahead.clear()


def _rest(shown: Shown, ctx: Context, min_confidence: float) -> list[Suggestion]:
    """``shown``'s suggestions less what was typed since they were made."""
    typed = ctx.line_prefix[len(shown.line_prefix) :]
    return [
        replace(
            s,
            insert_text=s.insert_text[len(typed) :],
            start=(ctx.line, ctx.character),
            end=(ctx.line, ctx.character),
            source=Source.TYPEAHEAD,
        )
        for s in shown.suggestions
        if s.insert_text.startswith(typed) and len(s.insert_text) > len(typed) and s.confidence >= min_confidence
    ]


def _along(shown: Shown, ctx: Context) -> bool:
    """The cursor is on ``shown``'s line, after its start, with the same text around."""
    return (
        shown.line == ctx.line
        and shown.line_suffix == ctx.line_suffix
        and ctx.line_prefix.startswith(shown.line_prefix)
        and shown.after == ctx.after_line
        and _same_tail(shown.before, ctx.before_line)
    )


def _same_tail(a: str, b: str) -> bool:
    """Equal text before the cursor line (the window may have moved: compare the common tail)."""
    n = min(len(a), len(b))
    return a[len(a) - n :] == b[len(b) - n :]
