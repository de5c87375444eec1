"""What every backend shares: the interface the engine calls, cancellation between prefill chunks,
returning freed heap to the OS, and the position rounding of the in-place caches.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from codegen_ls.errors import Cancelled

CancelFn = Callable[[], bool] | None
LONG_PREFILL = 512  # tokens: after the last run of a prefill this long, its memory goes back


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Loading a session frees about a third of the model's size in scattered blocks that glibc
    otherwise keeps resident for the life of the process; a long prefill's activations too.
    About a millisecond.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PrefillCancelled(Cancelled):
    """Cancelled between prefill chunks; ``state`` covers the first ``length`` tokens fed so far,
    so the engine can cache them (the next request of the document continues from there)."""

    def __init__(self, state: Any, length: int) -> None:
        super().__init__("cancelled")
        self.state, self.length = state, length


def _check_cancel(cancel: CancelFn, state: Any, length: int) -> None:
    if cancel is not None and cancel():
        raise PrefillCancelled(state, length)


def _layer_key(name: str) -> tuple[int, int]:
    parts = name.split(".")  # past_key_values.<layer>.key|value
    return int(parts[1]), 0 if parts[2] == "key" else 1


class Backend:
    """What the engine needs from a graph; subclasses hold the session."""

    in_place = False  # True: prefill writes into the state it was given

    def __init__(self, session: Any, chunk: int) -> None:
        self.session = session
        self.chunk = chunk
        self.tokens_fed = 0
        self.session_ms = 0.0
        self.shrink_next = False  # the next run hands its memory back (the end of a long prefill)
        self._shrink: Any = None

    def _session_run(self, feed: dict[str, np.ndarray] | Any, n_tokens: int) -> list[Any]:
        """Run the session on ``feed``: a dict (returns the outputs' arrays), or an ``IOBinding``
        (returns its outputs as OrtValues, in binding order: nothing is copied)."""
        run_options = None
        if self.shrink_next:
            if self._shrink is None:
                import onnxruntime as ort

                self._shrink = ort.RunOptions()
                self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            run_options, self.shrink_next = self._shrink, False
        t = time.perf_counter()
        if isinstance(feed, dict):
            out = list(self.session.run(None, feed, run_options))
        else:
            self.session.run_with_iobinding(feed, run_options)
            out = list(feed.get_outputs())
        self.session_ms += (time.perf_counter() - t) * 1000
        self.tokens_fed += n_tokens
        if run_options is not None:  # the arena shrank: return the freed pages to the OS too
            release_free_heap()
        return out

    def prefill(
        self, state: Any, keep: int, ids: Sequence[int], logits_from: int, cancel: CancelFn
    ) -> tuple[np.ndarray, Any]:
        """Feed ``ids[keep:]`` after the first ``keep`` tokens of ``state`` (None: empty).

        Returns (logits ``[len(ids) - logits_from, vocab]``, state covering all of ``ids``).
        ``keep <= logits_from`` is the caller's promise.
        """
        raise NotImplementedError

    def begin(self, state: Any, length: int, n: int, max_new: int = 0) -> Any:
        """A decode of ``n`` rows continuing the ``length`` tokens of ``state`` (for up to
        ``max_new`` steps: a hint for the room to reserve)."""
        raise NotImplementedError

    def step(self, dec: Any, tokens: Sequence[int]) -> np.ndarray:
        """Feed one token per row; return the next-token logits ``[rows, vocab]``."""
        raise NotImplementedError

    def keep_rows(self, dec: Any, rows: np.ndarray) -> None:
        """Drop the decode rows not in ``rows`` (finished candidates)."""
        raise NotImplementedError


ROUND = 128  # in-place caches grow in steps of this many positions
MASKED = np.float32(-1e9)


def _round_up(n: int) -> int:
    return max(ROUND, -(-n // ROUND) * ROUND)
