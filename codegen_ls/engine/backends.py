"""The engine's ways of running a CodeGen ONNX graph, chosen by the manifest's graph kind.

* :class:`GqaBackend` (``graph: gqa``, the default export, see :mod:`codegen_ls.export.graph_builder`):
  one KV cache per layer (int8 when quantized) that GroupQueryAttention reads and writes in
  place when decoding (prompt chunks take the graph's MatMul path and are copied in); N
  candidates are N query positions of one run, sharing the prompt's cache.
* :class:`FlatBackend` (``graph: flat``): the prompt's keys and values live in preallocated
  per-document buffers the engine writes in place; a decode step reads them and carries only
  the tokens generated in this request. N candidate rows share one prefix buffer, never copied.
* :class:`OptimumBackend` (``graph: optimum``, the reference): optimum's export, the whole past
  in and ``past + new`` out every run. A state is that list of arrays; a prefix is a slice.

All expose the same four calls to the engine: ``prefill`` (feed prompt tokens on top of the
first ``keep`` tokens of a state; cancelled between chunks it raises :class:`PrefillCancelled`
with the state fed so far), ``begin`` / ``step`` / ``keep_rows`` (batched decode), and count
``tokens_fed`` and ``session_ms``. Input and output names are read from the session.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from codegen_ls.engine import kvcache
from codegen_ls.errors import Cancelled, ModelError

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

    def prefill(self, state: Any, keep: int, ids: Sequence[int], logits_from: int,
                cancel: CancelFn) -> tuple[np.ndarray, Any]:
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

    def prefill(self, state: PastState | None, keep: int, ids: Sequence[int], logits_from: int,
                cancel: CancelFn) -> tuple[np.ndarray, PastState]:
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
        return np.concatenate(chunks, axis=0)[logits_from - keep:], PastState(past)

    def begin(self, state: PastState, length: int, n: int, max_new: int = 0) -> PastState:
        return PastState([np.repeat(a, n, axis=0) for a in state.past] if n > 1 else state.past)

    def step(self, dec: PastState, tokens: Sequence[int]) -> np.ndarray:
        logits, dec.past = self._run(np.asarray(tokens, dtype=np.int64)[:, None], dec.past)
        return logits[:, -1]

    def keep_rows(self, dec: PastState, rows: np.ndarray) -> None:
        dec.past = [a[rows] for a in dec.past]


# -- flat: shared prefix buffers written in place, per-request tails -------------------------------
ROUND = 128  # prefix buffers grow in steps of this many positions
MASKED = np.float32(-1e9)


def _round_up(n: int) -> int:
    return max(ROUND, -(-n // ROUND) * ROUND)


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
        self.tail_out = [(self.out_index[f"tail_key_out.{i}"], self.out_index[f"tail_value_out.{i}"])
                         for i in range(n_layer)]

    def _views(self, state: FlatState, cap: int) -> None:
        h, d, n = self.n_head, self.head_dim, len(self.prefix)
        state.keys = [b[: h * d * cap].reshape(1, h, d, cap) for b in state.buffers[:n]]
        state.values = [b[: h * d * cap].reshape(1, h, cap, d) for b in state.buffers[n:]]

    def _alloc(self, room: int, cap: int = 1) -> FlatState:
        size = self.n_head * self.head_dim * room
        state = FlatState([], [], buffers=[np.zeros(size, self.kv_dtype) for _ in range(2 * len(self.prefix))], room=room)
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

    def _run(self, state: FlatState, valid: int, bias: np.ndarray | None, ids: np.ndarray, pos: int,
             tails: list[tuple[np.ndarray, np.ndarray]], logits_start: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
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

    def prefill(self, state: FlatState | None, keep: int, ids: Sequence[int], logits_from: int,
                cancel: CancelFn) -> tuple[np.ndarray, FlatState]:
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
                chunks.append(logits[0, max(0, logits_from - pos) - start:])
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
        needed = {"input_ids", "position_ids", "seqlens_k", "total_sequence_length", "attention_bias", "logits_start",
                  "prompt_path"} | {name for name, _ in self.caches}
        if (not needed <= set(inputs) or len([n for n in inputs if n.startswith("past_key.")]) != n_layer
                or not {out for _, out in self.caches} <= outputs):
            raise ModelError("ONNX model is not a gqa graph of this manifest (inputs/layers differ)")
        shape = inputs["past_key.0"].shape
        self.n_head = int(shape[1])
        types = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.layout = [(types[inputs[name].type], int(inputs[name].shape[3])) for name, _ in self.caches]  # dtype, X
        self.head_dim = 2 * int(shape[3]) if four_bit else int(shape[3])
        # per buffer: None, or (a 4-bit cache's keys or values) whether its rows are values, for
        # kvcache.layout4: the kernel keeps them in its own blocks of positions
        self.packed = [(kind == "value" if four_bit and kind in ("key", "value") else None)
                       for _ in range(n_layer) for kind in kinds]
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

    def _run(self, state: GqaState, ids: np.ndarray, positions: np.ndarray, past: int, bias: np.ndarray,
             logits_start: int) -> np.ndarray:
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
                    buf[0, :, past:past + s, :] = rows
                else:  # the 4-bit cache: the whole blocks the chunk touches, in rows, then back in the layout
                    a, b = kvcache.block_start(past), kvcache.whole_blocks(past + s)
                    span = kvcache.rows4(buf[0, :, a:b, :], values)
                    span[:, past - a:past - a + s, :] = rows
                    buf[0, :, a:b, :] = kvcache.layout4(span, values)
        return np.asarray(outs[0].numpy()[0])

    def prefill(self, state: GqaState | None, keep: int, ids: Sequence[int], logits_from: int,
                cancel: CancelFn) -> tuple[np.ndarray, GqaState]:
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
                chunks.append(logits[max(0, logits_from - pos) - start:])
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
            dec.bias = np.concatenate([dec.bias, np.full((s, state.room - dec.bias.shape[1]), MASKED, np.float32)], axis=1)
        rows = np.arange(s)
        dec.bias[rows, dec.end + rows] = 0  # each row sees its own new token
        logits = self._run(state, np.asarray(tokens), np.full(s, dec.length + dec.steps), dec.end,
                           dec.bias[:, : dec.end + s], 0)
        dec.end += s
        dec.steps += 1
        return logits

    def keep_rows(self, dec: GqaDecode, rows: np.ndarray) -> None:
        dec.bias = dec.bias[rows]
