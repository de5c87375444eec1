"""The 4-bit KV cache's format: its one owner (layout, rotation, reference quantizer, manifest tags).

A token's row (one head) of D values is D/2 bytes: byte j holds value j in its low nibble and
value j + D/2 in its high one, each stored as ``round(x / scale) + 8`` (0 .. 15), with ``scale =
max|x| / 7`` over the row, clamped to float16's normal range and kept beside the cache as a
float16 (one per token and head; the rounding uses the float scale). Keys are stored rotated, kR
(:func:`key_rotation`; the scores use qR). A head's cache keeps its rows in the order the
kernel's passes read them (:func:`layout4`): keys in blocks of :data:`BLOCK` tokens, values in
quads of :data:`QUAD`; so its positions are a multiple of :data:`BLOCK` (:func:`whole_blocks`).

Everything else calls this module: the graph builder (the rotation, the prompt path's
quantization constants), ``kv_check`` (the fake quantization's constants), the backends (block
rounding, layout), the engine (:func:`manifest_ok`), the export (:func:`manifest_flags`), tests
and benchmarks (:func:`quantize4`, :func:`dequantize4`). The C side (``csrc/attend4.h``) keeps its
own constants for the kernel; ``tests/test_kv4.py`` checks that they agree with these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK = 16  # the keys' blocks of tokens: a cache's positions are a multiple of this
QUAD = 4  # the values' groups of tokens
LEVELS = 7  # the grid's top level: values round to -8 .. 7, stored + 8
OFFSET = 8  # the stored nibble is the level + 8
SCALE_MIN = 2.0**-14  # float16's least normal number (csrc/attend4.h CGLS_SCALE4_MIN)
SCALE_MAX = 65504.0  # float16's largest (CGLS_SCALE4_MAX)
TINY = 1e-30  # max|x| below this counts as this
MAX_HEAD_DIM = 256
# the layout's tag, recorded in the manifest's extra.kv4_layout: rows in the order the kernel's
# passes read them (keys in blocks of 16 tokens, values in quads), the per-token scales float16
LAYOUT = "blocked-16-4, float16 scales"
MANIFEST_ROTATION = "key_rotation"  # extra.key_rotation: True, the keys are stored as kR
MANIFEST_LAYOUT = "kv4_layout"  # extra.kv4_layout: LAYOUT


def fits(head_dim: int) -> bool:
    """Whether heads of ``head_dim`` can have the 4-bit cache (a multiple of 8, at most 256)."""
    return head_dim % 8 == 0 and 0 < head_dim <= MAX_HEAD_DIM


def whole_blocks(n: int) -> int:
    """``n`` positions rounded up to the cache's blocks of :data:`BLOCK`."""
    return -(-n // BLOCK) * BLOCK


def block_start(n: int) -> int:
    """``n`` positions rounded down to the cache's blocks of :data:`BLOCK`."""
    return n // BLOCK * BLOCK


def key_rotation(d: int, seed: int = 0) -> np.ndarray:
    """A fixed random orthogonal ``[d, d]`` matrix R (QR of a seeded Gaussian; float32).

    The 4-bit cache stores keys and queries as kR and qR: (qR).(kR) = q.k, but a row's scale is
    its largest magnitude, and keys have outlier channels (in the embedded model up to 7x a head's
    median channel) which, unrotated, leave the other channels a few levels. R spreads each
    channel over all of them: on the embedded model it cuts the scores' quantization error
    (relative mean square) by 1.1-1.8x per layer. Values have no such channels and are not rotated."""
    a = np.random.default_rng(seed).standard_normal((d, d))
    qm, r = np.linalg.qr(a)
    return (qm * np.sign(np.diag(r))).astype(np.float32)


def quantize4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference quantizer: ``[..., D]`` float32 -> (rows ``[..., D/2]`` uint8, scales ``[...]``
    float16), the rounding with the float scale, clamped to float16's normal range (the kernel's
    and the graph's prompt path do the same, op for op)."""
    half = x.shape[-1] // 2
    amax = np.maximum(np.abs(x).max(axis=-1), np.float32(TINY))
    scale = np.clip(amax / np.float32(LEVELS), np.float32(SCALE_MIN), np.float32(SCALE_MAX)).astype(np.float32)
    q = (np.clip(np.rint(x / scale[..., None]), -LEVELS - 1, LEVELS) + OFFSET).astype(np.uint8)
    return (q[..., :half] | (q[..., half:] << 4)).astype(np.uint8), scale.astype(np.float16)


def dequantize4(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Rows ``[..., D/2]`` uint8 with their scales ``[...]`` -> ``[..., D]`` float32: (nibble - 8) * scale."""
    vals = np.concatenate([rows & 15, rows >> 4], axis=-1).astype(np.float32) - OFFSET
    return vals * scale[..., None].astype(np.float32)


def layout4(rows: np.ndarray, values: bool) -> np.ndarray:
    """Rows of the 4-bit cache ``[..., T, D/2]`` (T a multiple of :data:`BLOCK`) -> the same bytes
    in the cache's layout (csrc/attend4.h): keys in blocks of 16 tokens ``[D/8][16][4]``, values in
    quads of 4 tokens ``[D/2][4]``. Either way a group of rows keeps its place, so the result has
    the rows' shape."""
    *lead, t, half = rows.shape
    if values:
        x = rows.reshape(*lead, t // QUAD, QUAD, half).swapaxes(-1, -2)
    else:
        x = rows.reshape(*lead, t // BLOCK, BLOCK, half // 4, 4).swapaxes(-2, -3)
    return np.ascontiguousarray(x).reshape(rows.shape)


def rows4(cache: np.ndarray, values: bool) -> np.ndarray:
    """The inverse of :func:`layout4`: a cache's bytes ``[..., T, D/2]`` -> its rows."""
    *lead, t, half = cache.shape
    if values:
        x = cache.reshape(*lead, t // QUAD, half, QUAD).swapaxes(-1, -2)
    else:
        x = cache.reshape(*lead, t // BLOCK, half // 4, BLOCK, 4).swapaxes(-2, -3)
    return np.ascontiguousarray(x).reshape(cache.shape)


def manifest_flags() -> dict[str, Any]:
    """What a 4-bit export records in its manifest's ``extra`` (besides the op's name)."""
    return {MANIFEST_ROTATION: True, MANIFEST_LAYOUT: LAYOUT}


def manifest_ok(extra: dict[str, Any]) -> bool:
    """Whether a manifest's ``extra`` describes this version's 4-bit format (earlier exports:
    keys not rotated, or rows not in the kernel's blocks)."""
    return bool(extra.get(MANIFEST_ROTATION)) and extra.get(MANIFEST_LAYOUT) == LAYOUT
