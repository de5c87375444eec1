"""The language server's ONE inference thread: model loads and completions, newest work first.

Handlers on the event loop submit jobs and await an asyncio future; the worker thread runs one
job at a time. A job carries a ``key`` (the document URI for completions, ``None`` for model
loads) and may carry the document ``version`` it read. Submitting a job for a key answers every
not-yet-started job with the same key and an older (or no) version at once (result ``None``) and
asks such a running one to stop: its cancel callable turns true and the engine raises
:class:`~codegen_ls.errors.Cancelled` at its next decode step; ``supersede(key)`` (an edit, a
close) does so for every version. So work for old text is never queued behind fresh work, while
requests for one version (two cursors; an inline and a completion request share one job
upstream, :mod:`codegen_ls.lsp.sharing`) do not end each other.

Background jobs (``background=True``: warm-ups, continuations) run only when no other job waits;
submitting any other job stops a running background job at its next check (a prefill chunk or a
decode step) and runs first. At most ``BACKGROUND_QUEUE`` background jobs wait (the oldest answered
``None``): they are guesses about what the user does next, and only the newest are worth the CPU.

Knows nothing of LSP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from codegen_ls.errors import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKGROUND_QUEUE = 4
CancelFn = Callable[[], bool]


@dataclass(eq=False)
class _Job(Generic[T]):
    key: str | None
    fn: Callable[[CancelFn], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T | None]
    stop: threading.Event = field(default_factory=threading.Event)
    background: bool = False
    version: int | None = None  # of the document ``key`` names; None: any

    def cancelled(self) -> bool:
        return self.stop.is_set()

    def resolve(self, value: T | None = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the event loop (from any thread); a closed loop is ignored."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, value, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class InferenceWorker:
    """One daemon thread running submitted jobs in order, superseding stale ones per key."""

    def __init__(self, name: str = "codegen-ls-inference") -> None:
        self._cond = threading.Condition()
        self._queue: list[_Job[Any]] = []
        self._running: _Job[Any] | None = None
        self._closed = False
        self.superseded = 0  # jobs answered without running (figures for logs and tests)
        self.cancelled = 0  # jobs stopped while running
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, key: str | None, fn: Callable[[CancelFn], T], background: bool = False, version: int | None = None
    ) -> asyncio.Future[T | None]:
        """Queue ``fn(cancel)``; the future resolves to its result, or ``None`` if superseded.

        ``version``: of the document ``key`` names; the job then supersedes only that key's jobs
        for older versions (or none given), so two requests at one version both run.

        Call from the event loop. Cancelling the returned future (``$/cancelRequest`` cancels the
        handler task awaiting it) stops the job between decode steps. ``background``: run only when
        nothing else waits, and give way to any other job (see the module docstring).
        """
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(key, fn, loop, loop.create_future(), background=background, version=version)
        job.future.add_done_callback(lambda f: job.stop.set() if f.cancelled() else None)
        with self._cond:
            if self._closed:
                job.resolve(None)
                return job.future
            if key is not None:
                self._supersede_locked(key, version, only_background=background)  # a guess never ends a request
            if background:
                waiting = [j for j in self._queue if j.background]
                for old in waiting[: max(0, len(waiting) + 1 - BACKGROUND_QUEUE)]:
                    self._queue.remove(old)
                    old.resolve(None)
                    self.superseded += 1
                self._queue.append(job)
            else:  # ahead of every waiting background job; a running one gives way
                at = next((i for i, j in enumerate(self._queue) if j.background), len(self._queue))
                self._queue.insert(at, job)
                if self._running is not None and self._running.background:
                    self._running.stop.set()
            self._cond.notify()
        return job.future

    def supersede(self, key: str) -> None:
        """Answer queued jobs for ``key`` with ``None`` and stop the running one (document edited)."""
        with self._cond:
            self._supersede_locked(key)

    def _supersede_locked(self, key: str, version: int | None = None, only_background: bool = False) -> None:
        def stale(job: _Job[Any]) -> bool:  # an older version, or no version to compare
            older = version is None or job.version is None or job.version < version
            return job.key == key and older and (job.background or not only_background)

        for job in [j for j in self._queue if stale(j)]:
            self._queue.remove(job)
            job.stop.set()
            job.resolve(None)
            self.superseded += 1
        if self._running is not None and stale(self._running):
            self._running.stop.set()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 0.0) -> bool:
        """Stop taking work, answer what is queued, stop the running job; wait up to ``timeout``.

        Returns True when the thread has finished (a model load is not interruptible).
        """
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.stop.set()
                job.resolve(None)
            self._queue.clear()
            if self._running is not None:
                self._running.stop.set()
            self._cond.notify_all()
        if timeout > 0 and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.pop(0)
                self._running = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: _Job[Any]) -> None:
        if job.cancelled():  # cancelled after it was queued
            job.resolve(None)
            return
        try:
            value = job.fn(job.cancelled)
        except Cancelled:
            self.cancelled += 1
            job.resolve(None)
        except Exception as exc:  # handed to the awaiting handler, which maps it
            job.resolve(error=exc)
        except BaseException as exc:  # never leave a handler waiting forever
            job.resolve(error=RuntimeError(f"inference thread interrupted: {exc!r}"))
        else:
            job.resolve(value)
