"""``graph: flat``: the prompt's keys and values live in preallocated per-document buffers the
engine writes in place; a decode step reads them and carries only the tokens generated in this
request. N candidate rows share one prefix buffer, never copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codegen_ls.engine.backends.base import (
    LONG_PREFILL,
    MASKED,
    ROUND,
    Backend,
    CancelFn,
    _check_cancel,
    _round_up,
)
from codegen_ls.errors import ModelError


# -- flat: shared prefix buffers written in place, per-request tails -------------------------------
@dataclass
class FlatState:
    """A document's prompt KV: keys ``[1, H, D, cap]`` (transposed), values ``[1, H, cap, D]``.

    Each is a view of the first positions' worth of a flat per-layer buffer (``buffers``, keys
    then values, ``room`` positions each), so ``cap`` can grow up to ``room`` in place.
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]
    length: int = 0  # valid positions
    buffers: list[np.ndarray] = field(default_factory=list)
    room: int = 0

    @property
    def cap(self) -> int:
        return int(self.keys[0].shape[3])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.buffers)


@dataclass
class FlatDecode:
    state: FlatState
    length: int
    bias: np.ndarray
    tails: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    steps: int = 0


class FlatBackend(Backend):
    in_place = True

    def __init__(self, session: Any, chunk: int, n_head: int, n_layer: int) -> None:
        super().__init__(session, chunk)
        inputs = {i.name: i for i in session.get_inputs()}
        self.prefix = [(f"prefix_key.{i}", f"prefix_value.{i}") for i in range(n_layer)]
        self.tail = [(f"tail_key.{i}", f"tail_value.{i}") for i in range(n_layer)]
        needed = {"input_ids", "position_ids", "prefix_bias", "tail_bias", "logits_start"}
        needed |= {n for pair in self.prefix + self.tail for n in pair}
        if not needed <= set(inputs) or len([n for n in inputs if n.startswith("prefix_key.")]) != n_layer:
            raise ModelError("ONNX model is not a flat graph of this manifest (inputs/layers differ)")
        shape = inputs["prefix_key.0"].shape
        self.n_head, self.head_dim = int(shape[1]), int(shape[2])
        self.kv_dtype = np.float16 if "float16" in inputs["prefix_key.0"].type else np.float32
        if self.n_head != n_head:
            raise ModelError("manifest does not match the ONNX model (heads)")
        self.out_index = {o.name: i for i, o in enumerate(session.get_outputs())}
        self.tail_out = [
            (self.out_index[f"tail_key_out.{i}"], self.out_index[f"tail_value_out.{i}"]) for i in range(n_layer)
        ]

    def _views(self, state: FlatState, cap: int) -> None:
        h, d, n = self.n_head, self.head_dim, len(self.prefix)
        state.keys = [b[: h * d * cap].reshape(1, h, d, cap) for b in state.buffers[:n]]
        state.values = [b[: h * d * cap].reshape(1, h, cap, d) for b in state.buffers[n:]]

    def _alloc(self, room: int, cap: int = 1) -> FlatState:
        size = self.n_head * self.head_dim * room
        state = FlatState(
            [], [], buffers=[np.zeros(size, self.kv_dtype) for _ in range(2 * len(self.prefix))], room=room
        )
        self._views(state, cap)
        return state

    def _reserve(self, state: FlatState, end: int) -> FlatState:
        """A state with room for ``end`` positions holding ``state``'s first ``length``: ``state``
        itself, or (room short, or much larger than needed) a new one that replaces it."""
        want = _round_up(end)
        if want <= state.room <= want + 4 * ROUND:
            return state
        n = state.length
        new = self._alloc(want, _round_up(n) if n > 0 else 1)
        for old, dst in zip(state.keys, new.keys):
            dst[:, :, :, :n] = old[:, :, :, :n]
        for old, dst in zip(state.values, new.values):
            dst[:, :, :n, :] = old[:, :, :n, :]
        new.length = n
        return new

    def _fit(self, state: FlatState, end: int) -> None:
        """Make the views ``end`` positions wide (rounded up), keeping ``length``: the valid
        positions move in place within the buffers. Nothing before the first token: an empty
        prefix is one masked column. Views up to one ``ROUND`` wider than needed stay as they
        are: a draft that crossed a boundary and the next keystroke's shorter prompt would
        otherwise move the whole cache twice (for a 350M model at 2048 tokens, 335 MB each)."""
        want = _round_up(end) if end > 0 else 1
        cap, n = state.cap, state.length
        if want == cap or (end > 0 and want < cap <= want + ROUND):
            return
        assert want <= state.room
        hd, h, d = self.n_head * self.head_dim, self.n_head, self.head_dim
        half = len(self.prefix)
        for b in state.buffers[:half]:  # keys: H*D rows of cap positions
            b[: hd * want].reshape(hd, want)[:, :n] = b[: hd * cap].reshape(hd, cap)[:, :n]
        for b in state.buffers[half:]:  # values: H rows of cap*D
            b[: hd * want].reshape(h, want * d)[:, : n * d] = b[: hd * cap].reshape(h, cap * d)[:, : n * d]
        self._views(state, want)

    def _empty_tails(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        h, d = self.n_head, self.head_dim
        return [(np.zeros((h, n, d, 0), self.kv_dtype), np.zeros((h, n, 0, d), self.kv_dtype)) for _ in self.tail]

    def _run(
        self,
        state: FlatState,
        valid: int,
        bias: np.ndarray | None,
        ids: np.ndarray,
        pos: int,
        tails: list[tuple[np.ndarray, np.ndarray]],
        logits_start: int,
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        rows, s = ids.shape
        t = tails[0][0].shape[3]
        if bias is None:
            bias = np.zeros(state.cap, np.float32)
            bias[valid:] = MASKED
        tail_bias = np.zeros((s, t + s), np.float32)
        if s > 1:
            tail_bias[:, t:] = np.triu(np.full((s, s), MASKED, np.float32), 1)
        feed: dict[str, np.ndarray] = {
            "input_ids": ids.astype(np.int64),
            "position_ids": np.broadcast_to(np.arange(pos, pos + s, dtype=np.int64), (rows, s)).copy(),
            "prefix_bias": bias,
            "tail_bias": tail_bias,
            "logits_start": np.array([logits_start], np.int64),
        }
        for (pk, pv), (tk, tv), k, v, (tk_arr, tv_arr) in zip(self.prefix, self.tail, state.keys, state.values, tails):
            feed[pk], feed[pv], feed[tk], feed[tv] = k, v, tk_arr, tv_arr
        out = self._session_run(feed, rows * s)
        return out[0], [(out[i], out[j]) for i, j in self.tail_out]

    def prefill(
        self, state: FlatState | None, keep: int, ids: Sequence[int], logits_from: int, cancel: CancelFn
    ) -> tuple[np.ndarray, FlatState]:
        if state is None:
            state, keep = self._alloc(_round_up(len(ids))), 0
        state.length = keep
        state = self._reserve(state, len(ids))  # the whole prompt's room at once: no regrowth
        chunks = []
        pos = keep
        while pos < len(ids):
            _check_cancel(cancel, state, pos)
            end = min(len(ids), pos + self.chunk)
            self._fit(state, pos)  # the run reads only the valid prefix (+ < ROUND masked columns)
            start = max(0, min(end - pos - 1, logits_from - pos))  # logits only where asked
            self.shrink_next = end == len(ids) and end - keep > LONG_PREFILL
            logits, tails = self._run(state, pos, None, np.asarray([ids[pos:end]]), pos, self._empty_tails(1), start)
            self._fit(state, end)
            for k, v, (tk, tv) in zip(state.keys, state.values, tails):
                k[0, :, :, pos:end] = tk[:, 0]
                v[0, :, pos:end, :] = tv[:, 0]
            state.length = end
            if end > logits_from:
                chunks.append(logits[0, max(0, logits_from - pos) - start :])
            pos = end
        return np.concatenate(chunks, axis=0), state

    def begin(self, state: FlatState, length: int, n: int, max_new: int = 0) -> FlatDecode:
        bias = np.zeros(state.cap, np.float32)
        bias[length:] = MASKED
        return FlatDecode(state, length, bias, self._empty_tails(n))

    def step(self, dec: FlatDecode, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        logits, dec.tails = self._run(dec.state, dec.length, dec.bias, ids, dec.length + dec.steps, dec.tails, 0)
        dec.steps += 1
        return logits[:, -1]

    def keep_rows(self, dec: FlatDecode, rows: np.ndarray) -> None:
        dec.tails = [(np.ascontiguousarray(k[:, rows]), np.ascontiguousarray(v[:, rows])) for k, v in dec.tails]
