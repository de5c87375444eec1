"""The per-document prompt cache: one KV snapshot per document key, least recently used evicted
past a byte budget, and how many bytes a prompt position takes in the manifest's cache format."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from codegen_ls.engine.modeldir import Manifest

AUTO_CACHE_DOCUMENTS = 8  # promptCacheMb 0: room for this many documents' snapshots at the context budget
SNAPSHOT_ROOM = 256  # positions a snapshot holds past its prompt (the candidates' rows, rounding)


@dataclass
class _Snapshot:
    """A document's prompt ids and the backend state (KV) that covers exactly them."""

    ids: list[int]
    past: Any  # the backend's state: PastState | GqaState (anything with ``nbytes``)

    @property
    def nbytes(self) -> int:
        return int(self.past.nbytes)


def kv_bytes_per_token(manifest: Manifest) -> int:
    """Bytes one prompt position takes in a document's KV snapshot: keys and values of every layer
    and head, in the cache type the manifest names (a 4-bit cache adds a float16 scale per token
    and head to each)."""
    kind = str(manifest.extra.get("kv_dtype", "float32"))
    value_bytes = {"int8": 1.0, "int4": 0.5}.get(kind, 4.0)
    scales = 2 * 2 if kind == "int4" else 0
    return int(manifest.n_layer * manifest.n_head * (2 * manifest.head_dim * value_bytes + scales))


class PromptCache:
    """One KV snapshot per document key, least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _Snapshot] = OrderedDict()

    def get(self, key: str) -> _Snapshot | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap

    def put(self, key: str, snap: _Snapshot) -> None:
        self._items[key] = snap
        self._items.move_to_end(key)
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            self._items.popitem(last=False)
        if self.nbytes > self.max_bytes:  # a single snapshot over budget is not kept
            self._items.clear()

    def drop(self, key: str) -> None:
        self._items.pop(key, None)

    def resize(self, max_bytes: int) -> None:
        """A new limit: least recently used snapshots go until the rest fit (as in :meth:`put`)."""
        self.max_bytes = max_bytes
        while self.nbytes > max_bytes and len(self._items) > 1:
            self._items.popitem(last=False)
        if self.nbytes > max_bytes:
            self._items.clear()

    def peek(self, key: str) -> _Snapshot | None:
        """The snapshot, leaving the order alone (safe to call from another thread)."""
        return self._items.get(key)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
