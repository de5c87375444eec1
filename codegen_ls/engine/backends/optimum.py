"""``graph: optimum``, the reference: optimum's export, the whole past in and ``past + new`` out
every run. A state is that list of arrays; a prefix is a slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codegen_ls.engine.backends.base import (
    LONG_PREFILL,
    Backend,
    CancelFn,
    _check_cancel,
    _layer_key,
)
from codegen_ls.errors import ModelError


# -- optimum: past in, past + new out ---------------------------------------------------------------
@dataclass
class PastState:
    past: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.past)


class OptimumBackend(Backend):
    def __init__(self, session: Any, chunk: int, n_head: int, n_layer: int) -> None:
        super().__init__(session, chunk)
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_key)
        present = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        if "input_ids" not in inputs or not self.past_names or len(self.past_names) != len(present):
            raise ModelError("ONNX model has no input_ids/past_key_values inputs (export with past)")
        shape = inputs[self.past_names[0]].shape
        self.n_kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.kv_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        if self.n_kv_heads != n_head or len(self.past_names) != 2 * n_layer:
            raise ModelError("manifest does not match the ONNX model (layers/heads)")

    def _empty(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def _run(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        batch, n = ids.shape
        past_len = past[0].shape[2]
        feed: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int64)}
        if self.has_mask:
            feed["attention_mask"] = np.ones((batch, past_len + n), np.int64)
        if self.has_positions:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + n, dtype=np.int64), (batch, n)).copy()
        feed.update(zip(self.past_names, past))
        out = self._session_run(feed, batch * n)
        return out[0], out[1:]

    def prefill(
        self, state: PastState | None, keep: int, ids: Sequence[int], logits_from: int, cancel: CancelFn
    ) -> tuple[np.ndarray, PastState]:
        past = [a[:, :, :keep, :] for a in state.past] if state is not None and keep > 0 else self._empty()
        chunks = []
        pos = keep
        while pos < len(ids):
            _check_cancel(cancel, PastState(past), pos)
            end = min(len(ids), pos + self.chunk)
            self.shrink_next = end == len(ids) and end - keep > LONG_PREFILL
            logits, past = self._run(np.asarray([ids[pos:end]]), past)
            chunks.append(logits[0])
            pos = end
        return np.concatenate(chunks, axis=0)[logits_from - keep :], PastState(past)

    def begin(self, state: PastState, length: int, n: int, max_new: int = 0) -> PastState:
        return PastState([np.repeat(a, n, axis=0) for a in state.past] if n > 1 else state.past)

    def step(self, dec: PastState, tokens: Sequence[int]) -> np.ndarray:
        logits, dec.past = self._run(np.asarray(tokens, dtype=np.int64)[:, None], dec.past)
        return logits[:, -1]

    def keep_rows(self, dec: PastState, rows: np.ndarray) -> None:
        dec.past = [a[rows] for a in dec.past]
