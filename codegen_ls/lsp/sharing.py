"""One computation per cursor: the requests for one cursor of one document version share it.

VS Code registers both providers, so after a trigger character (``.``, ``(``, ...)
``textDocument/inlineCompletion`` and ``textDocument/completion`` arrive for the same cursor. They
share one pipeline run and get the same suggestions; the answer stays on hand for that cursor and
version, so a request arriving just after the run gets it too (not a resampled set). A request
does not end another one at the same version; ``didChange`` supersedes the work for older
versions (:mod:`codegen_ls.lsp.worker`).

Requests that arrive while the model loads wait for the load, up to ``deadlineMs``, instead of
answering empty at once.

Knows the server only through :meth:`CodegenLanguageServer.complete` and its model state.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lsprotocol import types

from codegen_ls.suggest.pipeline import CompletionResult

if TYPE_CHECKING:
    from pygls.workspace import TextDocument

    from codegen_ls.lsp.server import CodegenLanguageServer
    from codegen_ls.settings import Settings

Key = tuple[str, "int | None", int, int]  # (uri, document version, line, character in client units)


@dataclass
class Answer:
    """A finished run: the document it read, the pipeline's result, an id for the items'
    commands (:mod:`codegen_ls.lsp.events`), and how long it took."""

    doc: TextDocument
    result: CompletionResult
    id: int
    latency_ms: float | None


@dataclass
class _Flight:
    task: asyncio.Task[Answer | None]
    waiters: int = field(default=0)


class SharedCompletions:
    """The runs in flight, by cursor, and the last answer of each document."""

    def __init__(self, ls: CodegenLanguageServer) -> None:
        self.ls = ls
        self._flights: dict[Key, _Flight] = {}
        self._last: dict[str, tuple[Key, Settings, Answer]] = {}  # per document: its last answer
        self._ids = itertools.count(1)
        self.shared = 0  # requests answered by another request's run (figures for logs and tests)

    async def complete(self, uri: str, position: types.Position, explicit: bool) -> Answer | None:
        """The answer for this cursor: the last one if it is for this version, else the run in
        flight for it, else a new run. None: nothing to suggest, superseded, or no model in time.

        A caller cancelled (``$/cancelRequest``) stops waiting; the run stops only when nobody
        waits for it any more."""
        doc = self.ls.document(uri)
        if doc is None:
            return None
        key: Key = (uri, doc.version, position.line, position.character)
        last = self._last.get(uri)
        if last is not None and last[0] == key and last[1] is self.ls.settings:  # (new settings: new run)
            self.shared += 1
            return last[2]
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(asyncio.ensure_future(self._run(key, position, explicit)))
            flight.task.add_done_callback(functools.partial(self._landed, key, flight))
        else:
            self.shared += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()  # everyone who asked has gone

    def forget(self, uri: str) -> None:
        """The document was closed."""
        self._last.pop(uri, None)

    def _landed(self, key: Key, flight: _Flight, _task: object = None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _run(self, key: Key, position: types.Position, explicit: bool) -> Answer | None:
        if not await self.model_loaded():
            return None
        settings = self.ls.settings
        found = await self.ls.complete(key[0], position, explicit)
        if found is None:
            return None
        doc, result = found
        answer = Answer(doc, result, next(self._ids), self.ls.last_latency_ms)
        self.ls.perceived.identify(key[0], result, answer.id)  # the id its items' accept command carries
        if doc.version == key[1]:
            self._last[key[0]] = (key, settings, answer)
        return answer

    async def model_loaded(self) -> bool:
        """Wait while the model loads, up to ``deadlineMs``; whether it is ready (or the server
        can answer otherwise: a remote backend marked down is retried by ``complete``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ls.settings.deadline_ms / 1000
        while self.ls.model_state == "loading":
            left = deadline - loop.time()
            if left <= 0:
                return False
            task = self.ls._load_task
            if task is None or task.done():  # the load has not started yet (or just ended)
                await asyncio.sleep(min(0.02, left))
                continue
            try:
                await asyncio.wait_for(asyncio.shield(task), left)
            except asyncio.TimeoutError:
                return False
            except Exception:  # the load failed: model_state says so
                pass
        return True
