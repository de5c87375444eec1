"""The moments a user waits, handled on the server side: warm-up, prefetch, continuation, statistics.

- **Warm-up**: when a document is opened, or edited after ``WARM_IDLE_S`` without edits (and no
  request for it follows within ``WARM_DELAY_S``: the request's own prefill does it), its prompt
  (at the edit, the last cursor asked about, or else the end of the document) is prefilled on the
  inference thread as a background job (:mod:`codegen_ls.lsp.worker`: it gives way to any request
  and stops between prefill chunks), so the first keystroke only extends the KV cache. A document
  no longer than the prompt budget is covered for any cursor: its prompt is the document's start.
- **Prefetch after accept**: while a suggestion is on screen, the completion as if it were accepted
  is computed as a background job (``Completer.complete_ahead``, llama.vim's speculative request)
  into a second type-ahead entry, so the request right after an accept is answered at once. If
  the accept comes first (a ``didChange`` inserting the text of the suggestion just shown, at its
  position, or any edit the item's ``codegenLs.accept`` command names as its accept), the
  completion at the new cursor starts then; a request for that cursor (same version) joins it
  instead of starting another.
- **Deadline-first continuation**: an answer whose top suggestion was cut by the latency target's
  new-token count or by the deadline is answered as it is; the same request then runs on as a
  background job with the full new-token count (``Completer.complete(more=True)``), and its longer
  suggestions serve the following keystrokes from the type-ahead cache.
- **Statistics** (:mod:`codegen_ls.stats`): the top suggestion of each answer is counted as shown;
  the edit after it decides accepted / partially accepted / dismissed, and the item's accept
  command, which names the item taken, overrules the edit (an item replacing a range, an editor
  splitting the insertion, the user cycling to another item), before or after it arrives. ``adaptiveThreshold`` reads
  them back into ``minConfidence``.

Positions here are the client's (line, units), as the requests and edits carry them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lsprotocol import types
from pygls.workspace import ServerTextPosition

from codegen_ls.stats import Outcome, Stats, edit_outcome
from codegen_ls.suggest.pipeline import CompletionRequest, CompletionResult
from codegen_ls.suggest.positions import EOL

if TYPE_CHECKING:
    from pygls.workspace import TextDocument

    from codegen_ls.lsp.server import CodegenLanguageServer
    from codegen_ls.settings import Settings

log = logging.getLogger(__name__)

Answer = tuple[str, "TextDocument", types.Position, tuple[int, int], CompletionRequest, "Settings", CompletionResult]
"""What ``answered`` takes, but the latency: (uri, document, position, cursor, request, settings, result)."""

AHEAD = "\x00ahead"  # the speculative job's worker key: the document's URI + this (an edit that accepts keeps it)
WARM_IDLE_S = 2.0  # an edit after this long without one warms the document again
WARM_DELAY_S = 0.15  # ... unless a request for it comes this soon (editors ask right after an edit)
THRESHOLD_REFRESH_S = 60.0  # the adaptive threshold is recomputed at most this often
# a model answer this many times over the plan's expected time: the machine is busy, no speculative work
BUSY_FACTOR = 4.0


@dataclass
class Shown:
    """The answer last given for a document: where, for which version, what, how fast."""

    version: int
    line: int
    character: int  # client units
    items: list[tuple[str, str, float]]  # (insert text, source, confidence), best first
    language: str
    latency_ms: float
    starts: list[types.Position] = field(default_factory=list)  # each item's range start (client units)
    result: CompletionResult | None = None  # the pipeline's result it shows (to learn its answer id)
    answer: int | None = None  # the answer id its items' accept command carries
    chosen: int | None = None  # the item the accept command named before the edit arrived


Recorded = tuple[Outcome, str, float]
"""An outcome counted for a shown answer, with the item's source and confidence."""


@dataclass
class Prefetch:
    version: int
    line: int
    character: int
    task: asyncio.Task[Any]


class Perceived:
    """Per-session state of the features above; the server's handlers call in."""

    def __init__(self, ls: CodegenLanguageServer, stats: Stats | None = None) -> None:
        self.ls = ls
        self.stats = stats or Stats()
        self.shown: dict[str, Shown] = {}
        self.prefetches: dict[str, Prefetch] = {}
        self.stashed: dict[str, Answer] = {}  # a prefetch's answer, until a request joins it
        self.ahead: dict[str, tuple[str, asyncio.Future[Any]]] = {}  # uri -> (the text it assumes accepted, its job)
        self.judged: dict[str, tuple[Shown, Recorded | None]] = {}  # the last edit's verdict, until the command
        self.last_edit: dict[str, float] = {}
        self.cursor: dict[str, tuple[int, int]] = {}  # last cursor asked about (code points)
        self.pending: dict[str, asyncio.TimerHandle] = {}  # warm-ups after an idle edit, not started yet
        self.warmups = self.prefetched = self.joins = self.busy_skips = 0  # counted for logs and tests
        self._threshold = (0.0, -1e9)  # (value, when computed)

    # -- warm-up -------------------------------------------------------------------------------
    def warm(self, uri: str, cursor: tuple[int, int] | None = None) -> None:
        """Prefill ``uri``'s prompt at ``cursor`` (code points; default: the last cursor asked
        about, else the end of the document) as a background job."""
        ls = self.ls
        doc = ls.document(uri)
        if doc is None or ls.model_state != "ready":
            return
        if cursor is None:
            cursor = self.cursor.get(uri)
        text = ls.clean(uri, doc.source)
        if cursor is None:  # the very end (after a last line break: where the user appends)
            lines = EOL.split(text)
            cursor = (len(lines) - 1, len(lines[-1]))
        request = CompletionRequest(
            text=text,
            line=cursor[0],
            character=cursor[1],
            uri=uri,
            language_id=doc.language_id or "",
        )
        settings = ls.effective_settings()
        self.warmups += 1
        future = ls.worker.submit(uri, lambda cancel: ls.completer.warm(request, settings, cancel), background=True)
        future.add_done_callback(_log_failure)

    def opened(self, uri: str) -> None:
        self.last_edit[uri] = time.monotonic()
        self.warm(uri)

    # -- edits ---------------------------------------------------------------------------------
    def changed(self, uri: str, params: types.DidChangeTextDocumentParams) -> None:
        """Decide what the edit says about the suggestion shown; prefetch after an accept; warm
        a document edited again after a pause."""
        now = time.monotonic()
        idle = now - self.last_edit.get(uri, now)
        self.last_edit[uri] = now
        self.prefetches.pop(uri, None)
        self.stashed.pop(uri, None)
        self.asked(uri)  # (a warm-up pending from an earlier edit is for older text)
        shown = self.shown.pop(uri, None)
        ahead = self.ahead.pop(uri, None)
        self.judged.pop(uri, None)
        changes = params.content_changes
        accepted, start, recorded = self._judge(uri, shown, params) if shown is not None else (None, None, None)
        if shown is not None:
            self.judged[uri] = (shown, recorded)
        at_cursor = shown is not None and start == types.Position(shown.line, shown.character)
        if ahead is not None and (ahead[0] != accepted or not at_cursor):  # its guess did not happen
            self.ls.worker.supersede(uri + AHEAD)
            ahead = None
        if accepted is not None and start is not None:
            self._prefetch(uri, start, accepted, ahead[1] if ahead is not None else None)
            return
        if idle >= WARM_IDLE_S and changes and isinstance(changes[-1], types.TextDocumentContentChangePartial):
            doc = self.ls.document(uri)
            if doc is not None:  # the edit's end, in code points
                change = changes[-1]
                end = _after(doc, change.range.start, change.text)
                pos = doc.position_from_client_units(end)
                self.pending[uri] = asyncio.get_running_loop().call_later(
                    WARM_DELAY_S, self._warm_later, uri, (pos.line, pos.character)
                )

    def _warm_later(self, uri: str, cursor: tuple[int, int]) -> None:
        self.pending.pop(uri, None)
        self.warm(uri, cursor)

    def asked(self, uri: str) -> None:
        """A request for ``uri`` arrived: it prefills what a pending warm-up would have."""
        handle = self.pending.pop(uri, None)
        if handle is not None:
            handle.cancel()

    def _judge(
        self, uri: str, shown: Shown, params: types.DidChangeTextDocumentParams
    ) -> tuple[str | None, types.Position | None, Recorded | None]:
        """Count the outcome of ``shown``: (the text accepted whole and where it starts, or Nones;
        the outcome counted, None when none was). An item named by its accept command before the
        edit is accepted where the document now holds its text."""
        if shown.chosen is not None:
            text, source, confidence = shown.items[shown.chosen]
            start = shown.starts[shown.chosen] if shown.chosen < len(shown.starts) else None
            doc = self.ls.document(uri)
            if start is not None and doc is not None and _holds(doc, start, text):
                self.stats.record(Outcome.ACCEPTED, source, confidence, shown.language, shown.latency_ms)
                return text, start, (Outcome.ACCEPTED, source, confidence)
        changes = params.content_changes
        change = changes[0] if len(changes) == 1 else None
        at = (
            isinstance(change, types.TextDocumentContentChangePartial)
            and change.range.start == change.range.end
            and (change.range.start.line, change.range.start.character) == (shown.line, shown.character)
            and params.text_document.version == shown.version + 1
        )
        inserted = change.text if at and change is not None else None
        outcomes = (
            [(edit_outcome(text, inserted), source, confidence) for text, source, confidence in shown.items]
            if inserted is not None
            else []
        )
        for wanted in (Outcome.ACCEPTED, Outcome.PARTIAL):  # the user may have cycled to another item
            for outcome, source, confidence in outcomes:
                if outcome is wanted:
                    self.stats.record(outcome, source, confidence, shown.language, shown.latency_ms)
                    whole = outcome is Outcome.ACCEPTED
                    where = types.Position(shown.line, shown.character) if whole else None
                    return (inserted if whole else None), where, (outcome, source, confidence)
        if any(outcome is None for outcome, _, _ in outcomes):  # one character typed along: the next answer counts
            return None, None, None
        _, source, confidence = shown.items[0]
        self.stats.record(Outcome.DISMISSED, source, confidence, shown.language, shown.latency_ms)
        return None, None, (Outcome.DISMISSED, source, confidence)

    # -- the accept command --------------------------------------------------------------------
    def identify(self, uri: str, result: CompletionResult, answer: int) -> None:
        """The answer id the items of ``result`` (shown for ``uri``) carry in their accept command."""
        shown = self.shown.get(uri)
        if shown is not None and shown.result is result:
            shown.answer = answer

    def accept_command(self, ref: Any) -> bool:
        """``codegenLs.accept``: the editor says which item of which answer the user took. Before
        its edit arrives, the edit will be judged as that item's accept whatever its shape; after
        it, a verdict that missed the accept is corrected and the prefetch starts. True when the
        reference named an answer still known."""
        if hasattr(ref, "_asdict"):  # pygls hands JSON objects over as namedtuples
            ref = ref._asdict()
        if not isinstance(ref, dict) or type(ref.get("id")) is not int or type(ref.get("index")) is not int:
            return False
        answer, index = ref["id"], ref["index"]
        for shown in self.shown.values():
            if shown.answer == answer and 0 <= index < len(shown.items):
                shown.chosen = index
                return True
        for uri, (shown, recorded) in list(self.judged.items()):
            if shown.answer == answer and 0 <= index < len(shown.items):
                del self.judged[uri]
                self._accepted_after(uri, shown, index, recorded)
                return True
        return False

    def _accepted_after(self, uri: str, shown: Shown, index: int, recorded: Recorded | None) -> None:
        text, source, confidence = shown.items[index]
        if recorded is not None and recorded[0] is Outcome.ACCEPTED and recorded[1:] == (source, confidence):
            return  # the edit said so already
        if recorded is not None:
            self.stats.record(recorded[0], recorded[1], recorded[2], shown.language, shown.latency_ms, -1)
        self.stats.record(Outcome.ACCEPTED, source, confidence, shown.language, shown.latency_ms)
        doc = self.ls.document(uri)
        start = shown.starts[index] if index < len(shown.starts) else None
        if doc is not None and start is not None and uri not in self.prefetches and _holds(doc, start, text):
            self._prefetch(uri, start, text)

    def _prefetch(
        self, uri: str, start: types.Position, inserted: str, ahead: asyncio.Future[Any] | None = None
    ) -> None:
        """Start the completion at the cursor after the text accepted at ``start``, for the request
        to join; after the speculative job for exactly this text (``ahead``), whose answer it then finds."""
        doc = self.ls.document(uri)
        if doc is None:
            return
        end = _after(doc, start, inserted)

        async def prefetch() -> Any:
            if ahead is not None:
                await asyncio.wait([ahead])  # its outcome is in the type-ahead cache, or it gave way
            return await self.ls.complete(uri, end, False, prefetch=True)

        task = asyncio.get_running_loop().create_task(prefetch())
        self.prefetched += 1
        self.prefetches[uri] = Prefetch(doc.version or 0, end.line, end.character, task)

    def join(self, uri: str, doc: TextDocument, position: types.Position) -> asyncio.Task[Any] | None:
        """The prefetch running (or done) for exactly this version and cursor, if any."""
        p = self.prefetches.get(uri)
        if p is None or p.version != (doc.version or 0) or (p.line, p.character) != (position.line, position.character):
            return None
        return p.task

    def stash(self, uri: str, answer: Answer) -> None:
        self.stashed[uri] = answer

    def joined(self, uri: str, latency_ms: float) -> None:
        """A request got the prefetch's answer: it is shown now."""
        answer = self.stashed.pop(uri, None)
        self.joins += 1
        if answer is not None:
            self.answered(*answer, latency_ms)

    def closed(self, uri: str) -> None:
        shown = self.shown.pop(uri, None)
        if shown is not None:
            _, source, confidence = shown.items[0]
            self.stats.record(Outcome.DISMISSED, source, confidence, shown.language, shown.latency_ms)
        if self.ahead.pop(uri, None) is not None:
            self.ls.worker.supersede(uri + AHEAD)
        self.asked(uri)
        for table in (self.prefetches, self.stashed, self.last_edit, self.cursor, self.judged):
            table.pop(uri, None)  # type: ignore[attr-defined]

    # -- answers -------------------------------------------------------------------------------
    def answered(
        self,
        uri: str,
        doc: TextDocument,
        position: types.Position,
        cursor: tuple[int, int],
        request: CompletionRequest,
        settings: Settings,
        result: CompletionResult,
        latency_ms: float,
    ) -> None:
        """An answer went out: count it, remember it for the next edit, continue it if it was cut."""
        self.cursor[uri] = cursor
        previous = self.shown.pop(uri, None)
        if previous is not None:  # asked again elsewhere (or the same place) without an edit
            _, source, confidence = previous.items[0]
            self.stats.record(Outcome.DISMISSED, source, confidence, previous.language, previous.latency_ms)
        if not result.suggestions:
            return
        items = [(s.insert_text, s.source, s.confidence) for s in result.suggestions]
        starts = [doc.position_to_client_units(ServerTextPosition(*s.start)) for s in result.suggestions]
        language = doc.language_id or request.language_id or ""
        self.shown[uri] = Shown(
            doc.version or 0, position.line, position.character, items, language, latency_ms, starts, result
        )
        self.stats.record(Outcome.SHOWN, items[0][1], items[0][2], language, latency_ms)
        ls = self.ls
        if self.busy(settings, result, latency_ms):  # background work would only take CPU from the next request
            self.busy_skips += 1
            return
        top = result.suggestions[0].insert_text
        if top.strip():  # the answer after accepting it, computed while the user reads it
            future = ls.worker.submit(
                uri + AHEAD, lambda cancel: ls.completer.complete_ahead(request, settings, top, cancel), background=True
            )
            future.add_done_callback(_log_failure)
            self.ahead[uri] = (top, future)
        if result.more:  # then the rest of a suggestion cut short, for typing along it
            future = ls.worker.submit(
                uri, lambda cancel: ls.completer.complete(request, settings, cancel, more=True), background=True
            )
            future.add_done_callback(_log_failure)

    def busy(self, settings: Settings, result: CompletionResult, latency_ms: float) -> bool:
        """A model answer took over ``BUSY_FACTOR`` times what the latency plan expects on this
        machine: other work has the CPU, and speculative jobs would slow the next request (at
        load average 20 on 2 cores they made the 350M shape's requests 30 % slower)."""
        speeds = self.ls.completer.speeds
        if speeds is None or settings.latency_target_ms <= 0 or result.reason == "typeahead":
            return False
        from codegen_ls.engine.latency import plan

        engine = self.ls.completer.engine
        expected = plan(speeds, settings.latency_target_ms, settings.num_candidates, engine.context_length).keystroke_ms
        return latency_ms > BUSY_FACTOR * max(expected, 1.0)

    def min_confidence(self, settings: Settings) -> float:
        """``minConfidence``, raised by ``adaptiveThreshold`` where the statistics say so."""
        if not settings.adaptive_threshold:
            return settings.min_confidence
        value, when = self._threshold
        if time.monotonic() - when > THRESHOLD_REFRESH_S:
            value = self.stats.adaptive_threshold()
            self._threshold = (value, time.monotonic())
        return max(settings.min_confidence, value)

    def close(self) -> None:
        for uri in list(self.shown):
            self.closed(uri)
        self.stats.close()


def _after(doc: TextDocument, start: types.Position, text: str) -> types.Position:
    """The position (client units) just after ``text`` inserted at ``start``."""
    lines = text.split("\n")
    units = doc.position_codec.client_num_units(lines[-1].replace("\r", ""))
    if len(lines) == 1:
        return types.Position(start.line, start.character + units)
    return types.Position(start.line + len(lines) - 1, units)


def _holds(doc: TextDocument, start: types.Position, text: str) -> bool:
    """Whether the document holds ``text`` at ``start`` (client units)."""
    try:
        offset = doc.offset_at_position(start)
    except (IndexError, ValueError):
        return False
    return doc.source[offset : offset + len(text)] == text


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("background job failed: %r", future.exception())
