"""``graph: gqa`` (the default export): one KV cache per layer, read and written in place by our
decode-attention op or GroupQueryAttention; prompt chunks take the graph's MatMul path and are
copied in; N candidates are N query positions of one run, sharing the prompt's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codegen_ls.engine import kvcache
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


# -- gqa: one in-place cache per layer (GroupQueryAttention), candidate rows interleaved --------------
@dataclass
class GqaState:
    """A document's KV cache: the buffers GroupQueryAttention (or our kernel) reads and writes in
    place, in the graph's order, each ``[1, H, room, X]``: per layer keys and values (X = D: int8
    or fp32; a 4-bit cache: X = D/2 bytes, then its per-token key and value scales, float16, X = 1).
    Positions ``[0, length)`` hold the prompt; a decode writes its rows' tokens after them
    (scratch, overwritten by the next prompt).
    """

    buffers: list[np.ndarray]
    length: int = 0
    # IO bindings of these buffers, by path: decode (in and out) and prompt (True: as inputs only)
    bindings: dict[bool, Any] = field(default_factory=dict, repr=False)

    @property
    def room(self) -> int:
        return int(self.buffers[0].shape[2])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.buffers)


@dataclass
class GqaDecode:
    state: GqaState
    length: int  # prompt positions every row attends to
    end: int  # buffer positions written: the prompt, then every row's tokens, interleaved
    bias: np.ndarray  # [rows, room]: 0 where a row may attend (prompt, its own tokens), MASKED elsewhere
    steps: int = 0


DECODE_ROOM = 2 * ROUND  # positions a prefill reserves after the prompt for a decode's rows (3 x 48 fit)
PROMPT_PATH_MIN = 16  # runs of this many tokens take the graph's MatMul path (prompt chunks, long drafts)


class GqaBackend(Backend):
    """``graph: gqa``: batch 1 always. N candidate rows are N query positions of one run: each
    step writes their tokens side by side after the prompt, and an attention bias lets each row
    see the prompt and its own earlier tokens only, so the rows share the one prompt cache
    (never copied) and a decode step is one ``S = rows`` run. The caches are bound to the
    session by pointer (IO binding) as both input and output: nothing is copied per step."""

    in_place = True

    def __init__(self, session: Any, chunk: int, n_head: int, n_layer: int) -> None:
        super().__init__(session, chunk)
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        four_bit = "past_key_scale.0" in inputs  # a 4-bit cache: its per-token scales are buffers too
        kinds = ["key", "value"] + (["key_scale", "value_scale"] if four_bit else [])
        # (input, output) names of every cache buffer, layer by layer
        self.caches = [(f"past_{k}.{i}", f"present_{k}.{i}") for i in range(n_layer) for k in kinds]
        needed = {
            "input_ids",
            "position_ids",
            "seqlens_k",
            "total_sequence_length",
            "attention_bias",
            "logits_start",
            "prompt_path",
        } | {name for name, _ in self.caches}
        if (
            not needed <= set(inputs)
            or len([n for n in inputs if n.startswith("past_key.")]) != n_layer
            or not {out for _, out in self.caches} <= outputs
        ):
            raise ModelError("ONNX model is not a gqa graph of this manifest (inputs/layers differ)")
        shape = inputs["past_key.0"].shape
        self.n_head = int(shape[1])
        types = {
            "tensor(int8)": np.int8,
            "tensor(uint8)": np.uint8,
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
        }
        self.layout = [(types[inputs[name].type], int(inputs[name].shape[3])) for name, _ in self.caches]  # dtype, X
        self.head_dim = 2 * int(shape[3]) if four_bit else int(shape[3])
        # per buffer: None, or (a 4-bit cache's keys or values) whether its rows are values, for
        # kvcache.layout4: the kernel keeps them in its own blocks of positions
        self.packed = [
            (kind == "value" if four_bit and kind in ("key", "value") else None)
            for _ in range(n_layer)
            for kind in kinds
        ]
        if self.n_head != n_head:
            raise ModelError("manifest does not match the ONNX model (heads)")
        self.logits_name = session.get_outputs()[0].name

    def _alloc(self, room: int) -> GqaState:
        return GqaState([np.zeros((1, self.n_head, room, x), dtype) for dtype, x in self.layout])

    def _fit(self, state: GqaState, end: int, keep: int, shrink: bool = True) -> None:
        """Give ``state`` room for ``end`` positions (rounded up; ``shrink``: also much less room
        when far more was left), keeping its first ``keep`` positions. In place: the engine's
        snapshot holds this same object."""
        want = _round_up(end)
        if want <= state.room and (not shrink or state.room <= want + 4 * ROUND):
            return
        new = self._alloc(want)
        keep = kvcache.whole_blocks(keep)  # rooms are multiples of ROUND
        for old, dst in zip(state.buffers, new.buffers):
            dst[:, :, :keep, :] = old[:, :, :keep, :]
        state.buffers, state.bindings = new.buffers, {}

    def _run(
        self, state: GqaState, ids: np.ndarray, positions: np.ndarray, past: int, bias: np.ndarray, logits_start: int
    ) -> np.ndarray:
        """Feed ``ids`` (one run, S tokens) written at buffer positions ``past .. past+S-1``;
        ``bias`` ``[S, past + S]``, complete (causal included). Returns logits ``[S - logits_start,
        vocab]``. A few tokens: GroupQueryAttention writes their keys and values in place; from
        ``PROMPT_PATH_MIN`` tokens on, the graph's MatMul path returns them and they are copied in."""
        s = ids.shape[0]
        prompt = s >= PROMPT_PATH_MIN
        io = state.bindings.get(prompt)
        if io is None:  # bound once per buffer set, by pointer: the caches as inputs (and decode's outputs)
            io = state.bindings[prompt] = self.session.io_binding()
            io.bind_output(self.logits_name, "cpu")  # first: get_outputs()[0]
            for (name, out), buf in zip(self.caches, state.buffers):
                io.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                if prompt:
                    io.bind_output(out, "cpu")
                else:
                    io.bind_output(out, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        feed = {
            "input_ids": ids.astype(np.int64)[None],
            "position_ids": positions.astype(np.int64)[None],
            "seqlens_k": np.array([past + s - 1], np.int32),
            "total_sequence_length": np.array(past + s, np.int32),
            "attention_bias": np.ascontiguousarray(bias, np.float32)[None, None],
            "logits_start": np.array([logits_start], np.int64),
            "prompt_path": np.array(prompt),
        }
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.logits_name, "cpu")  # fresh outputs each run: their shapes vary
        if prompt:
            for _, out in self.caches:
                io.bind_output(out, "cpu")
        outs = self._session_run(io, s)
        if prompt:  # the chunk's rows [1, S, H*X] -> the buffer's [H, S, X] at past
            for j, buf in enumerate(state.buffers):
                rows = outs[1 + j].numpy()[0].reshape(s, self.n_head, -1).transpose(1, 0, 2)
                values = self.packed[j]
                if values is None:
                    buf[0, :, past : past + s, :] = rows
                else:  # the 4-bit cache: the whole blocks the chunk touches, in rows, then back in the layout
                    a, b = kvcache.block_start(past), kvcache.whole_blocks(past + s)
                    span = kvcache.rows4(buf[0, :, a:b, :], values)
                    span[:, past - a : past - a + s, :] = rows
                    buf[0, :, a:b, :] = kvcache.layout4(span, values)
        return np.asarray(outs[0].numpy()[0])

    def prefill(
        self, state: GqaState | None, keep: int, ids: Sequence[int], logits_from: int, cancel: CancelFn
    ) -> tuple[np.ndarray, GqaState]:
        if state is None:
            state, keep = self._alloc(_round_up(len(ids) + DECODE_ROOM)), 0
        self._fit(state, len(ids) + DECODE_ROOM, keep)  # the whole prompt's room (and a decode's) at once
        state.length = keep
        chunks = []
        pos = keep
        while pos < len(ids):
            _check_cancel(cancel, state, pos)
            end = min(len(ids), pos + self.chunk)
            start = max(0, min(end - pos - 1, logits_from - pos))  # logits only where asked
            self.shrink_next = end == len(ids) and end - keep > LONG_PREFILL
            bias = np.zeros((end - pos, end), np.float32)
            bias[:, pos:] = np.triu(np.full((end - pos, end - pos), MASKED, np.float32), 1)  # causal
            logits = self._run(state, np.asarray(ids[pos:end]), np.arange(pos, end), pos, bias, start)
            state.length = end
            if end > logits_from:
                chunks.append(logits[max(0, logits_from - pos) - start :])
            pos = end
        return np.concatenate(chunks, axis=0), state

    def begin(self, state: GqaState, length: int, n: int, max_new: int = 0) -> GqaDecode:
        self._fit(state, length + n * max(1, max_new), length, shrink=False)
        bias = np.full((n, state.room), MASKED, np.float32)
        bias[:, :length] = 0
        return GqaDecode(state, length, length, bias)

    def step(self, dec: GqaDecode, tokens: Sequence[int]) -> np.ndarray:
        s, state = len(tokens), dec.state
        if dec.end + s > state.room:  # more steps than begin reserved for
            self._fit(state, dec.end + s + ROUND, dec.end, shrink=False)
            dec.bias = np.concatenate(
                [dec.bias, np.full((s, state.room - dec.bias.shape[1]), MASKED, np.float32)], axis=1
            )
        rows = np.arange(s)
        dec.bias[rows, dec.end + rows] = 0  # each row sees its own new token
        logits = self._run(
            state, np.asarray(tokens), np.full(s, dec.length + dec.steps), dec.end, dec.bias[:, : dec.end + s], 0
        )
        dec.end += s
        dec.steps += 1
        return logits

    def keep_rows(self, dec: GqaDecode, rows: np.ndarray) -> None:
        dec.bias = dec.bias[rows]
