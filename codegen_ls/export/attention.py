"""The attention subgraph of our ``gqa`` CodeGen graph (:mod:`codegen_ls.export.graph_builder` calls it).

One ``If(prompt_path)`` per layer::

                    ┌ then (prompt chunks, long drafts): cached rows dequantized ++ the chunk's own,
    q, k, v ── If ──┤      two MatMuls with attention_bias; returns the chunk's rows packed like the cache
                    └ else (decode, a few rows): DecodeAttention[Q4] / GroupQueryAttention, which writes
                           the new rows into the cache in place (present_* is bound to past_*)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from codegen_ls.engine import kvcache
from codegen_ls.engine.kernels import DEQUANTIZE4_NAMES, DOMAIN, OP4_NAME, OP_NAME

if TYPE_CHECKING:
    from codegen_ls.export.graph_builder import ModelBuilder
    from codegen_ls.export.onnx_writer import GraphWriter

OPSET = 17


def make_gqa_attention(b: ModelBuilder, i: int, q: str, k: str, v: str) -> str:
    """Layer ``i``'s attention in the ``gqa`` graph; ``q``, ``k``, ``v`` ``[1, S, E]`` (after
    rotary) -> ``[1, S, E]``. The cache: fp32, int8 with static per-channel scales
    (``b.kv_int8[i]``), or 4-bit with a scale per token and head (:mod:`codegen_ls.engine.kvcache`:
    rows in the kernel's layout, keys stored rotated, kR; both branches rotate, the kernel inside
    its op). A prompt goes the MatMul way: GroupQueryAttention's int8 path is fast for one query
    row but costs several times a MatMul's work per (query, key) pair.
    """
    from onnx import TensorProto

    path = f"/model/layers.{i}/attn"
    names = b.cache_names(i)
    then_branch, then_out = _prompt_branch(b, i, q, k, v)
    else_branch, else_out = _decode_branch(b, i, q, k, v)
    kinds = [TensorProto.FLOAT, b.cache_type, b.cache_type] + [TensorProto.FLOAT16] * (len(then_out) - 3)
    outs = [f"{path}/output_0", *names.present]
    return str(
        b.g.op(
            "If",
            ["prompt_path"],
            f"{path}/If",
            outs,
            then_branch=then_branch.subgraph(f"{path}/prompt", list(zip(then_out, kinds))),
            else_branch=else_branch.subgraph(f"{path}/decode", list(zip(else_out, kinds))),
        )[0]
    )


def _decode_branch(b: ModelBuilder, i: int, q: str, k: str, v: str) -> tuple[GraphWriter, list[str]]:
    """A few query rows: one op attends over the cache and writes the new rows into it."""
    path = f"/model/layers.{i}/attn/decode"
    g, names = b.g.branch(), b.cache_names(i)
    n_out = 5 if b.kv_int4 else 3
    outs = [f"{path}/output_{j}" for j in range(n_out)]
    common = [q, k, v, *names.past]
    if b.kv_int4:  # only our kernel implements it
        g.op(
            OP4_NAME,
            [*common, *names.past_scale, "seqlens_k", "total_sequence_length", "attention_bias", "key_rotation"],
            f"{path}/{OP4_NAME}",
            outs,
            domain=DOMAIN,
        )
    elif b.kv_int8 is not None:  # our kernel where the engine loads it, else the function's body (GQA)
        k_scale, v_scale = b.kv_int8[i]
        scales = [
            g.const(f"model.layers.{i}.attn.k_cache_scale", k_scale),
            g.const(f"model.layers.{i}.attn.v_cache_scale", v_scale),
        ]
        g.op(
            OP_NAME,
            [*common, "seqlens_k", "total_sequence_length", "attention_bias", *scales],
            f"{path}/{OP_NAME}",
            outs,
            domain=DOMAIN,
        )
    else:
        g.op(
            "GroupQueryAttention",
            [*common, "seqlens_k", "total_sequence_length", "", "", "", "attention_bias"],
            f"{path}/GroupQueryAttention",
            outs,
            domain="com.microsoft",
            num_heads=b.n_head,
            kv_num_heads=b.n_head,
        )
    return g, outs


def _prompt_branch(b: ModelBuilder, i: int, q: str, k: str, v: str) -> tuple[GraphWriter, list[str]]:
    """Prompt chunks: the cache's first ``past_len`` rows ++ the chunk's, attention by MatMuls;
    returns the chunk's rows ``[1, S, E]`` (``[1, S, E/2]`` packed and scales ``[1, S, H]`` for
    the 4-bit cache) for the engine to write into the cache."""
    path = f"/model/layers.{i}/attn/prompt"
    g = b.g.branch()
    if b.kv_int4:  # the cache holds kR, the scores use qR
        q, k = (_rotate(b, g, x, path, n) for x, n in ((q, "q"), (k, "k")))
    scales = b.kv_int8[i] if b.kv_int8 is not None else (None, None)
    keys = g.op(
        "Concat", [_cached(b, g, i, 0, scales[0]), _heads(b, g, k, f"{path}/key_heads")], f"{path}/keys/Concat", axis=2
    )
    values = g.op(
        "Concat",
        [_cached(b, g, i, 1, scales[1]), _heads(b, g, v, f"{path}/value_heads")],
        f"{path}/values/Concat",
        axis=2,
    )  # [1, H, past_len + S, D]
    qh = g.op(
        "Mul",
        [_heads(b, g, q, f"{path}/query_heads"), b.const("attn_scale", np.array(1.0 / np.sqrt(b.d), np.float32))],
        f"{path}/query_scale/Mul",
    )  # [1, H, S, D]
    kt = g.op("Transpose", [keys], f"{path}/keys/Transpose", perm=[0, 1, 3, 2])  # [1, H, D, T]
    scores = g.op(
        "Add", [g.op("MatMul", [qh, kt], f"{path}/qk/MatMul"), "attention_bias"], f"{path}/bias/Add"
    )  # [1, H, S, T]
    o = g.op(
        "MatMul", [g.op("Softmax", [scores], f"{path}/Softmax", axis=-1), values], f"{path}/pv/MatMul"
    )  # [1, H, S, D]
    o = g.op(
        "Reshape",
        [
            g.op("Transpose", [o], f"{path}/merge/Transpose", perm=[0, 2, 1, 3]),
            b.const("shape_bse", np.array([0, 0, b.e], np.int64)),
        ],
        f"{path}/merge/Reshape",
    )  # [1, S, E]
    outs = [o]
    for j, (x, name) in enumerate(((k, "key"), (v, "value"))):
        outs.append(_pack_rows(b, g, x, scales[j], f"{path}/new_{name}"))
    if b.kv_int4:
        outs += [_scales_out(b, g, x, f"{path}/new_{n}") for x, n in ((k, "key"), (v, "value"))]
    return g, outs


def _heads(b: ModelBuilder, g: GraphWriter, x: str, path: str) -> str:
    """``[1, S, E]`` -> ``[1, H, S, D]``."""
    return g.op(
        "Transpose",
        [g.op("Reshape", [x, b.const("shape_bshd", np.array([0, 0, b.n_head, b.d], np.int64))], f"{path}/Reshape")],
        f"{path}/Transpose",
        perm=[0, 2, 1, 3],
    )


def _rotate(b: ModelBuilder, g: GraphWriter, x: str, path: str, name: str) -> str:
    """``[1, S, E]`` -> each head's vector times ``key_rotation`` ``[D, D]`` (node ``rotate_{name}``),
    back to ``[1, S, E]``."""
    rows = g.op(
        "Reshape", [x, b.const("shape_bshd", np.array([0, 0, b.n_head, b.d], np.int64))], f"{path}/{name}_rows/Reshape"
    )
    rotated = g.op(
        "MatMul", [rows, "key_rotation"], f"{path}/rotate_{name}/MatMul"
    )  # [1, S, H, D]; fp32, never quantized
    return str(
        g.op(
            "Reshape",
            [rotated, b.const("shape_bse", np.array([0, 0, b.e], np.int64))],
            f"{path}/{name}_rotated/Reshape",
        )
    )


def _cached(b: ModelBuilder, g: GraphWriter, i: int, which: int, scale: np.ndarray | None) -> str:
    """The cache's first ``past_len`` rows (keys: ``which`` 0, values: 1) as float ``[1, H, past_len, D]``."""
    names = b.cache_names(i)
    path = f"/model/layers.{i}/attn/prompt/cached_{('key', 'value')[which]}"
    if b.kv_int4:  # our op: (nibble - 8) * scale in one pass (elementwise ONNX ops took eight)
        return str(
            g.op(
                DEQUANTIZE4_NAMES[which],
                [names.past[which], names.past_scale[which], "past_len"],
                f"{path}/{DEQUANTIZE4_NAMES[which]}",
                domain=DOMAIN,
            )
        )
    rows = g.op(
        "Slice",
        [
            names.past[which],
            b.const("zero_1", np.array([0], np.int64)),
            "past_len",
            b.const("axis2", np.array([2], np.int64)),
        ],
        f"{path}/Slice",
    )
    if scale is None:
        return str(rows)
    from onnx import TensorProto

    return str(
        g.op(
            "Mul",
            [
                g.op("Cast", [rows], f"{path}/Cast", to=TensorProto.FLOAT),
                g.const(f"model.layers.{i}.attn.{('k', 'v')[which]}_dequant_scale", scale),
            ],
            f"{path}/Mul",
        )
    )


def _pack_rows(b: ModelBuilder, g: GraphWriter, x: str, scale: np.ndarray | None, path: str) -> str:
    """The chunk's new keys or values ``[1, S, E]`` as the cache stores them."""
    from onnx import TensorProto

    if b.kv_int4:
        return _pack4(b, g, x, path)
    if scale is None:
        return str(g.op("Identity", [x], f"{path}/Identity"))
    # the int8 cache's quantization: per channel, symmetric, saturating (elementwise ops:
    # onnxruntime's per-axis QuantizeLinear is ~50x slower here)
    scaled = g.op(
        "Round",
        [g.op("Mul", [x, g.const(f"{path}/inv_scale", (1.0 / scale).reshape(-1))], f"{path}/Mul")],
        f"{path}/Round",
    )
    clipped = g.op(
        "Clip",
        [scaled, b.const("int8_lo", np.array(-128, np.float32)), b.const("int8_hi", np.array(127, np.float32))],
        f"{path}/Clip",
    )
    return str(g.op("Cast", [clipped], f"{path}/Cast", to=TensorProto.INT8))


def _pack4(b: ModelBuilder, g: GraphWriter, x: str, path: str) -> str:
    """The 4-bit cache's rows: per token and head round(x / scale) + 8, value j in the low nibble
    and j + D/2 in the high one, ``[1, S, E/2]`` uint8."""
    from onnx import TensorProto

    qv = g.op(
        "Add",
        [
            g.op(
                "Clip",
                [
                    g.op(
                        "Round",
                        [g.op("Div", [_rows(b, g, x, path), _row_scale(b, g, x, path)], f"{path}/Div")],
                        f"{path}/Round",
                    ),
                    b.const("kv4_lo", np.array(-kvcache.LEVELS - 1, np.float32)),
                    b.const("kv4_hi", np.array(kvcache.LEVELS, np.float32)),
                ],
                f"{path}/Clip",
            ),
            b.const("kv4_offset", np.array(kvcache.OFFSET, np.float32)),
        ],
        f"{path}/offset/Add",
    )  # [1, S, H, D]
    lo, hi = g.op(
        "Split", [qv, b.const("kv4_halves", np.array([b.d // 2, b.d // 2], np.int64))], f"{path}/Split", 2, axis=-1
    )
    packed = g.op(
        "Add",
        [lo, g.op("Mul", [hi, b.const("kv4_sixteen", np.array(16, np.float32))], f"{path}/high/Mul")],
        f"{path}/pack/Add",
    )
    return str(
        g.op(
            "Reshape",
            [
                g.op("Cast", [packed], f"{path}/Cast", to=TensorProto.UINT8),
                b.const("shape_packed", np.array([0, 0, b.e // 2], np.int64)),
            ],
            f"{path}/Reshape",
        )
    )


def _rows(b: ModelBuilder, g: GraphWriter, x: str, path: str) -> str:
    """``[1, S, E]`` -> ``[1, S, H, D]`` (shared by the row's scale and its quantization)."""
    name = f"{path}/rows/Reshape"
    if name not in g.names:
        g.op("Reshape", [x, b.const("shape_bshd", np.array([0, 0, b.n_head, b.d], np.int64))], name)
    return f"{name}/output_0"


def _row_scale(b: ModelBuilder, g: GraphWriter, x: str, path: str) -> str:
    """A 4-bit row's scale ``[1, S, H, 1]``: max|x| / 7, clamped to float16's normal range."""
    name = f"{path}/scale/Clip"
    if name in g.names:
        return f"{name}/output_0"
    amax = g.op(
        "Max",
        [
            g.op(
                "ReduceMax",
                [g.op("Abs", [_rows(b, g, x, path)], f"{path}/Abs")],
                f"{path}/ReduceMax",
                axes=[-1],
                keepdims=1,
            ),
            b.const("kv4_tiny", np.array(kvcache.TINY, np.float32)),
        ],
        f"{path}/Max",
    )
    return str(
        g.op(
            "Clip",
            [
                g.op("Div", [amax, b.const("kv4_levels", np.array(kvcache.LEVELS, np.float32))], f"{path}/scale/Div"),
                b.const("kv4_scale_min", np.array(kvcache.SCALE_MIN, np.float32)),
                b.const("kv4_scale_max", np.array(kvcache.SCALE_MAX, np.float32)),
            ],
            name,
        )
    )


def _scales_out(b: ModelBuilder, g: GraphWriter, x: str, path: str) -> str:
    """The chunk's 4-bit scales as the cache keeps them: float16 ``[1, S, H]``."""
    from onnx import TensorProto

    half = g.op("Cast", [_row_scale(b, g, x, path)], f"{path}/scale/Cast", to=TensorProto.FLOAT16)
    return str(
        g.op("Reshape", [half, b.const("shape_bsh", np.array([0, 0, b.n_head], np.int64))], f"{path}/scale/Reshape")
    )


def decode_attention_function(helper: Any, n_head: int) -> Any:
    """``codegen_ls.DecodeAttention`` as an ONNX function whose body is onnxruntime's
    ``GroupQueryAttention`` on the int8 cache (static per-channel scales). onnxruntime inlines it
    unless a registered kernel claims the node: the engine registers ours
    (:mod:`codegen_ls.engine.kernels`) where it was built, so the same file runs with or without it."""
    inputs = [
        "query",
        "key",
        "value",
        "past_key",
        "past_value",
        "seqlens_k",
        "total_sequence_length",
        "attention_bias",
        "k_scale",
        "v_scale",
    ]
    outputs = ["output", "present_key", "present_value"]
    body = helper.make_node(
        "GroupQueryAttention",
        inputs[:7] + ["", "", "", "attention_bias", "", "k_scale", "v_scale"],
        outputs,
        domain="com.microsoft",
        num_heads=n_head,
        kv_num_heads=n_head,
        k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL",
        kv_cache_bit_width=8,
    )
    return helper.make_function(
        DOMAIN,
        OP_NAME,
        inputs,
        outputs,
        [body],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
