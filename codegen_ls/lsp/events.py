"""What the editor did with the suggestions, as the editor reports it: shown, accepted, partly
accepted. The base for statistics and prefetch; kept in memory, counted in ``codegenLs/status``
(``events``).

- Each inline item carries the LSP command ``codegenLs.accept`` with one argument, the item's
  reference ``{"id", "index", "source", "latencyMs", "tokens"}`` (``id``: the answer; ``index``:
  the item's rank). The editor runs it when the user accepts the item (VS Code does so itself;
  Neovim's client, and 0.12's ``vim.lsp.inline_completion``, run the item's command too):
  ``workspace/executeCommand``.
- ``codegenLs/didShowCompletion`` ``{"item": reference}``: the editor drew the item.
- ``codegenLs/didPartiallyAcceptCompletion`` ``{"item": reference, "kind": "word" | "line",
  "acceptedLength": characters of insertText accepted so far}``.

(Copilot's language server has the same three: the item's command, ``didShowCompletion``,
``didPartiallyAcceptCompletion``.) Knows nothing of LSP types.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ACCEPT_COMMAND = "codegenLs.accept"
DID_SHOW = "codegenLs/didShowCompletion"
DID_PARTIALLY_ACCEPT = "codegenLs/didPartiallyAcceptCompletion"
KEEP = 1000  # events kept in memory, newest


class EventKind(str, enum.Enum):
    SHOWN = "shown"
    ACCEPTED = "accepted"
    ACCEPTED_WORD = "acceptedWord"
    ACCEPTED_LINE = "acceptedLine"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    answer: int  # the answer's id
    index: int  # the item's rank in it
    source: str  # the suggestion's source (greedy, sample, lookup:..., typeahead)
    at: float  # time.time()
    accepted_length: int | None = None  # partial accepts: characters accepted so far


def reference(answer: int, index: int, source: str, latency_ms: float | None, tokens: float | None) -> dict[str, Any]:
    """The argument of an item's command (also what the editor sends back with the notifications)."""
    ref: dict[str, Any] = {"id": answer, "index": index, "source": source}
    if latency_ms is not None:
        ref["latencyMs"] = round(latency_ms)
    if tokens is not None:
        ref["tokens"] = int(tokens)
    return ref


class SuggestionEvents:
    """The events of one session, newest ``KEEP``, and their counts since the start."""

    def __init__(self) -> None:
        self.events: deque[Event] = deque(maxlen=KEEP)
        self.counts: Counter[EventKind] = Counter()

    def record(self, kind: EventKind, ref: Any, accepted_length: Any = None) -> Event | None:
        """Record an event for the item ``ref`` names; None (logged) for a malformed reference."""
        if hasattr(ref, "_asdict"):  # pygls hands JSON objects over as namedtuples
            ref = ref._asdict()
        if not isinstance(ref, dict) or type(ref.get("id")) is not int or type(ref.get("index")) is not int:
            log.info("ignored %s event with reference %r", kind.value, ref)
            return None
        length = accepted_length if type(accepted_length) is int and accepted_length >= 0 else None
        event = Event(kind, ref["id"], ref["index"], str(ref.get("source", "")), time.time(), length)
        self.events.append(event)
        self.counts[kind] += 1
        return event

    def summary(self) -> dict[str, int]:
        """The counts for ``codegenLs/status``: ``{"shown", "accepted", "acceptedWord", "acceptedLine"}``."""
        return {kind.value: self.counts[kind] for kind in EventKind}
