"""Local suggestion statistics: kept on this machine, never sent anywhere.

What is stored, exactly: one JSON file, ``$XDG_STATE_HOME/codegen-ls/stats.json`` (default
``~/.local/state/codegen-ls/stats.json``), holding counters and nothing else: no text, no file
names, no positions, no times of day. Each counter is keyed by

- the suggestion's source (``greedy``, ``sample``, ``typeahead``, ``prefetch``, ``lookup:line``,
  ``lookup:doc``, ``lookup:ngram``, each optionally ``+model``; anything else is ``other``),
- its confidence bucket (``0.0`` .. ``0.9``, tenths),
- the document's language id (lower case, at most ``MAX_LANGUAGES`` distinct ones, then ``other``),
- its latency bucket (``LATENCY_BUCKETS`` ms),

and counts four outcomes: shown, accepted (the whole suggestion: the edit inserts it, or the
editor runs the item's accept command), partially accepted (a proper
prefix of at least ``PARTIAL_MIN_CHARS`` characters inserted in one edit: a word or a line), and
dismissed (shown, then something else typed, or another cursor asked). Typing one character along
a suggestion is none of these: the next answer (the type-ahead cache's) is counted in its turn.
Plus ``since`` (when counting began, seconds since the epoch) and a format number. The key space
is bounded (sources x 10 x ``MAX_LANGUAGES + 1`` x buckets), so the file stays under a megabyte
however long it is used. Several servers (several editors) merge their counts into it under a
lock; ``codegen-ls stats`` prints acceptance rates, ``codegen-ls stats --reset`` deletes the file.

``adaptiveThreshold`` (opt-in) raises the effective ``minConfidence`` past the low confidence
buckets the user rarely accepts (:meth:`Stats.adaptive_threshold`). Knows nothing of LSP.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
SOURCES = ("greedy", "sample", "typeahead", "prefetch", "lookup:line", "lookup:doc", "lookup:ngram")
LATENCY_BUCKETS = (50, 100, 200, 500, 1000)  # upper edges, ms; a last bucket above
MAX_LANGUAGES = 16
PARTIAL_MIN_CHARS = 2
FLUSH_S = 30.0  # counts are merged into the file at most this often (and at shutdown)
ADAPTIVE_MIN_SHOWN = 40  # a confidence bucket is judged only with this many suggestions shown
ADAPTIVE_FLOOR = 0.10  # ... and skipped when fewer than this share of them were (partly) accepted
ADAPTIVE_MAX = 0.5  # the adaptive threshold never goes above this
_LANGUAGE = re.compile(r"[a-z0-9_+.#-]{1,32}")


class Outcome(enum.IntEnum):
    """The counters of one key, in this order in the file."""

    SHOWN = 0
    ACCEPTED = 1
    PARTIAL = 2
    DISMISSED = 3


def state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "codegen-ls" / "stats.json"


def source_name(source: str) -> str:
    base, plus, rest = source.partition("+")
    if base not in SOURCES or (plus and rest != "model"):
        return "other"
    return source


def confidence_bucket(confidence: float) -> str:
    return f"{min(9, max(0, int(confidence * 10))) / 10:.1f}"


def latency_bucket(ms: float) -> str:
    low = 0
    for edge in LATENCY_BUCKETS:
        if ms < edge:
            return f"{low}-{edge}"
        low = edge
    return f">={low}"


def edit_outcome(shown: str, inserted: str) -> Outcome | None:
    """What inserting ``inserted`` at a suggestion's position says about the suggestion ``shown``:
    accepted, partially accepted, typed along (None), or dismissed."""
    if not shown:
        return Outcome.DISMISSED
    if inserted == shown:
        return Outcome.ACCEPTED
    if shown.startswith(inserted) and inserted:
        return Outcome.PARTIAL if len(inserted) >= PARTIAL_MIN_CHARS else None
    return Outcome.DISMISSED


class Stats:
    """Counters in memory, merged into the state file every ``flush_s`` seconds and on ``close``."""

    def __init__(self, path: Path | None = None, flush_s: float = FLUSH_S) -> None:
        self.path = path or state_path()
        self.flush_s = flush_s
        self._pending: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._stored: dict[str, list[int]] | None = None  # the file's counts, read when first needed
        self._languages: set[str] = set()
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()

    def key(self, source: str, confidence: float, language: str, latency_ms: float) -> str:
        lang = (language or "").lower()
        if not _LANGUAGE.fullmatch(lang):
            lang = "other"
        with self._lock:
            known = self._languages | {k.split("|")[2] for k in (self._stored or {})}
        if lang not in known and len(known - {"other"}) >= MAX_LANGUAGES:
            lang = "other"
        self._languages.add(lang)
        return "|".join((source_name(source), confidence_bucket(confidence), lang, latency_bucket(latency_ms)))

    def record(
        self, outcome: Outcome, source: str, confidence: float, language: str, latency_ms: float, count: int = 1
    ) -> None:
        """Count one ``outcome`` (``count`` -1: take back one counted before, a verdict corrected)."""
        key = self.key(source, confidence, language, latency_ms)
        with self._lock:
            self._pending[key][outcome] += count
        if time.monotonic() - self._last_flush > self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Merge the pending counts into the file (under an exclusive lock; atomic rename)."""
        with self._lock:
            pending, self._pending = dict(self._pending), defaultdict(lambda: [0, 0, 0, 0])
            self._last_flush = time.monotonic()
        if not pending:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = read(self.path)
                counts = data["counts"]
                for key, values in pending.items():
                    counts[key] = [a + b for a, b in zip(counts.get(key, [0, 0, 0, 0]), values)]
                _write(self.path, data)
                with self._lock:
                    self._stored = {k: list(v) for k, v in counts.items()}
        except OSError as exc:  # a read-only state directory loses the counts, never the session
            log.warning("cannot store suggestion statistics in %s: %s", self.path, exc)

    def counts(self) -> dict[str, list[int]]:
        """The file's counts plus the pending ones."""
        with self._lock:
            if self._stored is None:
                self._stored = read(self.path)["counts"]
            total = {k: list(v) for k, v in self._stored.items()}
            for key, values in self._pending.items():
                total[key] = [a + b for a, b in zip(total.get(key, [0, 0, 0, 0]), values)]
        return total

    def adaptive_threshold(self) -> float:
        """The confidence below which this user's suggestions are rarely taken: the lower edge of
        the first confidence bucket (from 0.0 up) that was shown at least ``ADAPTIVE_MIN_SHOWN``
        times and (partly) accepted at least ``ADAPTIVE_FLOOR`` of them, or that has too few
        counts to judge; at most ``ADAPTIVE_MAX``."""
        by_bucket = group(self.counts().items(), 1)
        threshold = 0.0
        while threshold < ADAPTIVE_MAX:
            shown, accepted, partial, _ = by_bucket.get(f"{threshold:.1f}", [0, 0, 0, 0])
            if shown < ADAPTIVE_MIN_SHOWN or (accepted + partial) / shown >= ADAPTIVE_FLOOR:
                break
            threshold = round(threshold + 0.1, 1)
        return threshold

    def close(self) -> None:
        self.flush()


def read(path: Path) -> dict[str, Any]:
    """The file's content, or an empty one (missing, damaged, or another format)."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("counts"), dict):
            data["counts"] = {
                k: [int(x) for x in v][:4]
                for k, v in data["counts"].items()
                if isinstance(k, str) and k.count("|") == 3 and isinstance(v, list) and len(v) == 4
            }
            return data
    except (OSError, ValueError, TypeError):
        pass
    return {"format": FORMAT, "since": int(time.time()), "counts": {}}


def _write(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".stats-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def group(items: Iterable[tuple[str, list[int]]], field: int) -> dict[str, list[int]]:
    """Counts summed by one part of the key (0 source, 1 confidence, 2 language, 3 latency)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for key, values in items:
        part = key.split("|")[field]
        out[part] = [a + b for a, b in zip(out[part], values)]
    return dict(out)


def report(path: Path | None = None) -> list[str]:
    """``codegen-ls stats``: acceptance by source, confidence, language and latency."""
    path = path or state_path()
    data = read(path)
    counts = data["counts"]
    total = [sum(v[i] for v in counts.values()) for i in range(4)]
    lines = [
        f"suggestion statistics in {path} (local only; counting since "
        f"{time.strftime('%Y-%m-%d', time.localtime(data['since']))})"
    ]
    if not total[Outcome.SHOWN]:
        return lines + ["no suggestions shown yet"]

    def row(name: str, v: list[int]) -> str:
        shown = max(1, v[0])
        return (
            f"  {name:<16} shown {v[0]:>7}  accepted {v[1] / shown:>6.1%}  partly {v[2] / shown:>6.1%}  "
            f"dismissed {v[3] / shown:>6.1%}"
        )

    lines.append(row("all", total))
    order = {1: lambda k: float(k), 3: lambda k: float(k.split("-")[0].lstrip(">="))}
    for field, title in ((0, "by source"), (1, "by confidence"), (2, "by language"), (3, "by latency (ms)")):
        lines.append(title)
        groups = group(counts.items(), field)
        for name in sorted(groups, key=order.get(field, lambda k: (-groups[k][0], k))):
            lines.append(row(name, groups[name]))
    lines.append(f"adaptiveThreshold would set minConfidence to at least {Stats(path).adaptive_threshold():.1f}")
    return lines
