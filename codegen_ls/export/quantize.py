"""Weight quantization of our graphs, one matrix at a time and in row chunks (bounded memory).

* :func:`int8_per_tensor`: what ``onnxruntime.quantization.quantize_dynamic`` (QInt8,
  per-tensor, symmetric) stores for a MatMul weight, computed with its own functions
  (``compute_data_quant_params``, ``quantize_nparray``) chunk by chunk: the same bytes, scale and
  zero point, without holding a float copy of the whole matrix;
* :func:`int8_rows`: the token embedding as int8 rows with a float32 scale each;
* :func:`pack_int4`: ``MatMulNBits`` 4-bit blocks (``--int4``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK_BYTES = 64 << 20  # float32 work per chunk


def _row_chunks(rows: int, row_bytes: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def int8_per_tensor(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` (float32, any shape) -> (int8 array of its shape, scale float32 [], zero point int8 [])
    exactly as ``quantize_dynamic`` quantizes a MatMul weight (symmetric QInt8, one scale)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    flat = w.reshape(-1)
    rmin = min(float(flat[s].min()) for s in _row_chunks(flat.size, 4))
    rmax = max(float(flat[s].max()) for s in _row_chunks(flat.size, 4))
    zero_point, scale = compute_data_quant_params(
        flat[:1], TensorProto.INT8, True, rmin_override=rmin, rmax_override=rmax
    )
    out = np.empty(w.shape, np.int8)
    out_flat = out.reshape(-1)
    for s in _row_chunks(flat.size, 4):
        out_flat[s] = quantize_nparray(TensorProto.INT8, flat[s], scale, zero_point)
    return out, np.asarray(scale, np.float32), np.asarray(zero_point, np.int8)


def int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An embedding ``[V, E]`` as int8 rows and a scale per row ``[V, 1]`` (max |row| / 127)."""
    q = np.empty(table.shape, np.int8)
    scales = np.empty((table.shape[0], 1), np.float32)
    for s in _row_chunks(table.shape[0], 4 * table.shape[1]):
        rows = table[s]
        scale = np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12) / 127.0
        q[s] = np.rint(rows / scale).astype(np.int8)
        scales[s] = scale
    return q, scales


def pack_int4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` ``[K, N]`` -> ``MatMulNBits`` operands: 4-bit blocks along K, symmetric (zero point 8).

    Returns (B ``uint8 [N, K/block, block/2]``, two values a byte, low nibble first; scales
    ``float32 [N * K/block]``).
    """
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=-1) / 7.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale.astype(np.float32).reshape(-1)
