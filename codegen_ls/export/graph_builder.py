"""Our ONNX graphs of CodeGen, written out op by op for the engine's access pattern.

The optimum export takes the whole past as input and concatenates it with the new token's keys
and values every step: decode time grows with the context even where attention itself is cheap.
Both graphs here keep the prompt's KV in place instead. They share everything but attention:

Per layer: LayerNorm -> fused qkv MatMul (CodeGen's ``mp_num=4`` interleaved q/v/k layout is
reordered to plain q|k|v at build time) -> ``com.microsoft.RotaryEmbedding`` (interleaved,
partial ``rotary_dim``) on q and k -> attention -> out_proj; the MLP (fc_in, ``FastGelu`` =
gelu_new, fc_out) reads the same LayerNorm output, and both are added to the residual
(CodeGen's parallel block). ``logits_start`` slices the positions whose logits are computed
(prefill needs only the last one).

``gqa`` (the default): one cache per layer, ``past_key.L`` / ``past_value.L`` ``[1, H, cap, D]``;
the run's tokens go to positions ``total - S .. total - 1`` and attend to ``0 .. total - 1``
through an additive ``attention_bias`` ``[1, 1, S, total]`` (causal included). Batch is always
1: N candidates are N query positions of a step, and the bias lets each see only the prompt and
its own tokens (see :class:`codegen_ls.engine.backends.GqaBackend`). Quantized, the cache is **int8**
with static per-channel scales (from :func:`kv_scales`): a quarter of the fp32 cache's memory
and bandwidth, which at 2048 tokens of a 350M model is as large as its int8 weights. Each layer's
attention is an ``If`` on the ``prompt_path`` input: decode runs (a few rows) use
``com.microsoft.GroupQueryAttention`` (kv_num_heads = num_heads) on an fp32 cache and
``codegen_ls.DecodeAttention`` on an int8 one (our kernel, :mod:`codegen_ls.engine.kernels`, or where it
is not loaded the ONNX function of that name, whose body is GroupQueryAttention); the engine
binds ``present_*`` = ``past_*`` so the op writes the new keys and values in place; prompt
chunks use two MatMuls over the dequantized cache and return the chunk's quantized keys and values
(``present_*`` ``[1, S, E]``) for the engine to copy in (see :func:`_gqa_attention`). With
``kv_int4`` (``--kv-bits 4``) the cache is **4-bit** with a scale per token and head instead
(``past_key.L`` ``uint8 [1, H, cap, D/2]`` plus ``past_key_scale.L`` ``[1, H, cap, 1]``, the same
for values): half the int8 cache's bytes, decoded by ``codegen_ls.DecodeAttentionQ4``, which only
our kernel implements.

``flat``: the **prefix** (the prompt) is a preallocated buffer per layer the graph only reads:
``prefix_key.L`` ``[1, H, D, cap]`` (keys stored transposed) and ``prefix_value.L`` ``[1, H, cap,
D]``, ``prefix_bias`` ``[cap]`` (0 or -1e9) masking the unused tail; the engine writes new prompt
tokens into it. The **tail** (tokens generated in this request) is small and per row:
``tail_key.L`` ``[H, n, D, T]`` and ``tail_value.L`` ``[H, n, T, D]``, returned grown by the new
tokens (``tail_key_out.L``, ``tail_value_out.L``), masked by ``tail_bias`` ``[S, T+S]``; the n
candidate rows' queries are stacked into one MatMul against the shared prefix. With
``kv_fp16`` the prefix buffers and tails are float16 and the attention MatMuls run in float16;
masking and softmax stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from codegen_ls.engine import kvcache
from codegen_ls.engine.kernels import DOMAIN as KERNEL_DOMAIN
from codegen_ls.engine.kernels import DEQUANTIZE4_NAMES
from codegen_ls.engine.kernels import OP4_NAME as DECODE_ATTENTION_Q4
from codegen_ls.engine.kernels import OP_NAME as DECODE_ATTENTION

OPSET = 17
IR_VERSION = 9
MASKED = -1e9  # additive bias for masked positions (finite: a fully masked row never makes NaN)
KV_HEADROOM = 1.25  # int8 KV scales: the calibration's largest magnitude times this maps to 127


def prefix_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"prefix_key.{i}", f"prefix_value.{i}") for i in range(n_layer)]


def tail_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"tail_key.{i}", f"tail_value.{i}") for i in range(n_layer)]


def tail_out_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"tail_key_out.{i}", f"tail_value_out.{i}") for i in range(n_layer)]


def qkv_weight(w: np.ndarray, n_head: int, mp_num: int = 4) -> np.ndarray:
    """CodeGen's qkv_proj weight ``[3E, E]`` -> ``[3E, E]`` with rows q | k | v in head order.

    transformers reshapes the qkv output to ``[mp_num, 3E/mp_num]``, splits each block into
    query, value, key (that order) of ``E/mp_num`` each, and heads run ``mp block, then head``.
    """
    e = w.shape[1]
    if n_head % mp_num or w.shape[0] != 3 * e:
        raise ValueError(f"unexpected qkv_proj shape {w.shape} for {n_head} heads")
    blocks = w.reshape(mp_num, 3, e // mp_num, e)  # [mp, (q, v, k), local, in]
    q, v, k = (blocks[:, j].reshape(e, e) for j in range(3))
    return np.concatenate([q, k, v], axis=0)


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


class _Graph:
    """A tiny builder over onnx.helper: unique names, initializers, nodes."""

    def __init__(self, prefix: str = "") -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.prefix = prefix  # subgraphs (If branches) name their nodes apart from the main graph's
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        name = self.prefix + name
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def subgraph(self, name: str, outputs: list[tuple[str, int]]) -> Any:
        """This builder's nodes as an If branch (no inputs: it reads the outer scope)."""
        outs = [self.helper.make_tensor_value_info(o, t, None) for o, t in outputs]
        return self.helper.make_graph(self.nodes, name, [], outs, initializer=self.inits)

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, **attrs: Any) -> Any:
        self._n += 1
        node_name = self.prefix + (name or f"{op_type}_{self._n}")
        outs = outputs if isinstance(outputs, list) else [f"{node_name}_out{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def gqa_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"past_key.{i}", f"past_value.{i}") for i in range(n_layer)]


def gqa_out_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"present_key.{i}", f"present_value.{i}") for i in range(n_layer)]


def gqa_scale_names(n_layer: int) -> list[tuple[str, str]]:
    """The 4-bit cache's per-token scales ``[1, H, cap, 1]`` (inputs; outputs: ``present_``)."""
    return [(f"past_key_scale.{i}", f"past_value_scale.{i}") for i in range(n_layer)]


def gqa_scale_out_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"present_key_scale.{i}", f"present_value_scale.{i}") for i in range(n_layer)]


def kv_scales(model: Any, batches: list[list[int]], headroom: float = KV_HEADROOM) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-layer int8 scales ``[1, H, 1, D]`` of the rotated keys and of the values (the ``gqa``
    graph's static ``PER_CHANNEL`` cache quantization): each channel's largest magnitude over
    the calibration token ``batches``, times ``headroom``, maps to 127. Runs the torch model."""
    import torch

    peak: list[list[np.ndarray]] = []
    with torch.no_grad():
        for ids in batches:
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
            for i in range(model.config.n_layer):
                k, v = cache[i][0], cache[i][1]  # [1, H, T, D], keys after rotary
                amax = [t.abs().amax(dim=(0, 2)).float().numpy() for t in (k, v)]
                if len(peak) <= i:
                    peak.append(amax)
                else:
                    peak[i] = [np.maximum(a, b) for a, b in zip(peak[i], amax)]
    scales = []
    for k_max, v_max in peak:
        pair = [np.maximum(m * headroom, 1e-6) / 127.0 for m in (k_max, v_max)]
        scales.append((pair[0][None, :, None, :].astype(np.float32), pair[1][None, :, None, :].astype(np.float32)))
    return scales


def build_graph(model: Any, *, int8_embedding: bool = False, int4_block: int = 0,
                kv_fp16: bool = False, graph: str = "flat",
                kv_int8: list[tuple[np.ndarray, np.ndarray]] | None = None, kv_int4: bool = False) -> tuple[Any, list[str]]:
    """An ONNX ModelProto of ``model`` (a transformers ``CodeGenForCausalLM``, fp32, eval).

    ``graph``: ``flat`` (the shared-prefix layout above) or ``gqa`` (one BNSH cache per layer
    written in place by ``com.microsoft.GroupQueryAttention``; ``kv_int8``: the per-layer
    scales of :func:`kv_scales` make that cache int8; ``kv_int4``: a 4-bit cache with a scale per
    token and head instead, see :func:`_gqa_attention`).

    ``int8_embedding``: the token embedding as int8 rows with one scale each (a quarter of the
    memory; the fp32 table is most of an int8 model's RSS otherwise). ``int4_block``: the layers'
    linear weights (not lm_head) as 4-bit ``MatMulNBits`` blocks of that size (int8 compute).
    ``kv_fp16``: keys and values (prefix buffers and tails) stored as float16 and the four
    attention MatMuls run in float16 (half the KV cache's memory and bandwidth); the scores are
    masked and soft-maxed in float32.
    Returns (model proto, names of the nodes that must stay fp32 when the rest is int8-quantized:
    the attention MatMuls, which are activation x activation).
    """
    from onnx import TensorProto, helper

    cfg = model.config
    e, n_head, n_layer = int(cfg.n_embd), int(cfg.n_head), int(cfg.n_layer)
    d = e // n_head
    rd = int(cfg.rotary_dim or d)
    eps = float(cfg.layer_norm_epsilon)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    g = _Graph()
    attention_matmuls: list[str] = []

    # rotary tables exactly as transformers computes them: embed_positions = [sin | cos]
    sincos = model.transformer.h[0].attn.embed_positions.detach().float().cpu().numpy()
    g.const("rope_sin", sincos[:, : rd // 2])
    g.const("rope_cos", sincos[:, rd // 2:])
    wte = sd["transformer.wte.weight"]
    if int8_embedding:
        row_scale = np.maximum(np.abs(wte).max(axis=1, keepdims=True), 1e-12) / 127.0
        g.const("wte_int8", np.rint(wte / row_scale).astype(np.int8))
        g.const("wte_scale", row_scale.astype(np.float32))
    else:
        g.const("wte", wte)
    g.const("axis1", np.array([1], np.int64))
    g.const("int64_max", np.array([np.iinfo(np.int64).max], np.int64))

    if (graph not in ("flat", "gqa") or (graph == "gqa" and kv_fp16) or (graph == "flat" and (kv_int8 is not None or kv_int4))
            or (kv_int4 and (kv_int8 is not None or d % 2))):
        raise ValueError(f"unsupported graph options: {graph}, kv_fp16={kv_fp16}, kv_int8={kv_int8 is not None}, kv_int4={kv_int4}")
    if kv_int4:
        g.const("key_rotation", kvcache.key_rotation(d))
    if graph == "gqa":  # positions already in the cache before this run: total - S
        s_len = g.op("Shape", ["input_ids"], start=1, end=2, name="shape_s")
        total = g.op("Reshape", [g.op("Cast", ["total_sequence_length"], to=TensorProto.INT64, name="total_i64"),
                                 g.const("shape_1", np.array([1], np.int64))], name="total_1")
        g.op("Sub", [total, s_len], ["past_len"], name="past_len")
    if graph == "flat":
        g.const("shape_nshd", np.array([0, 0, n_head, d], np.int64))
        g.const("shape_nse", np.array([0, 0, e], np.int64))
        g.const("shape_1h_d", np.array([1, n_head, -1, d], np.int64))
        g.const("shape_1h_0", np.array([1, n_head, -1, 0], np.int64))
        g.const("const_h", np.array([n_head], np.int64))
        g.const("const_d", np.array([d], np.int64))
        g.const("const_m1", np.array([-1], np.int64))
        g.const("scale", np.array(1.0 / np.sqrt(d), np.float32))
        n_s = g.op("Shape", ["input_ids"], name="shape_ns")  # [n, S]
        shape_hns_m1 = g.op("Concat", ["const_h", n_s, "const_m1"], axis=0, name="shape_hns_m1")
        shape_hnsd = g.op("Concat", ["const_h", n_s, "const_d"], axis=0, name="shape_hnsd")
        split_sizes = g.op("Concat", [g.op("Shape", ["prefix_bias"]), g.op("Shape", ["tail_bias"], start=1)],
                           axis=0, name="split_sizes")
    if int8_embedding:
        rows = g.op("Cast", [g.op("Gather", ["wte_int8", "input_ids"], axis=0, name="embed")], to=TensorProto.FLOAT)
        h = g.op("Mul", [rows, g.op("Gather", ["wte_scale", "input_ids"], axis=0, name="embed_scale")])
    else:
        h = g.op("Gather", ["wte", "input_ids"], axis=0, name="embed")

    kv_type = TensorProto.FLOAT16 if kv_fp16 else TensorProto.FLOAT

    def kv(x: str) -> str:
        """``x`` in the KV cache's type (a Cast only for fp16)."""
        return g.op("Cast", [x], to=kv_type) if kv_fp16 else x

    def f32(x: str) -> str:
        return g.op("Cast", [x], to=TensorProto.FLOAT) if kv_fp16 else x

    def linear(x: str, w: np.ndarray, name: str) -> str:
        """x @ w (``w`` is ``[in, out]``), as MatMulNBits when asked and the shape allows."""
        k, n = w.shape
        if int4_block and k % int4_block == 0 and int4_block % 2 == 0:
            packed, scales = pack_int4(w, int4_block)
            return g.op("MatMulNBits", [x, g.const(f"{name}.q4", packed), g.const(f"{name}.scales", scales)],
                        domain="com.microsoft", name=name, K=k, N=n, bits=4, block_size=int4_block, accuracy_level=4)
        return g.op("MatMul", [x, g.const(f"{name}.w", np.ascontiguousarray(w))], name=name)

    for i in range(n_layer):
        p = f"transformer.h.{i}."
        ln_w = g.const(f"ln1_w.{i}", sd[p + "ln_1.weight"])
        ln_b = g.const(f"ln1_b.{i}", sd[p + "ln_1.bias"])
        b_in = g.const(f"b_fc_in.{i}", sd[p + "mlp.fc_in.bias"])
        b_fo = g.const(f"b_fc_out.{i}", sd[p + "mlp.fc_out.bias"])

        x = g.op("LayerNormalization", [h, ln_w, ln_b], axis=-1, epsilon=eps, name=f"ln1.{i}")
        qkv = linear(x, qkv_weight(sd[p + "attn.qkv_proj.weight"], n_head).T, f"qkv.{i}")
        q, k, v = g.op("Split", [qkv, g.const(f"qkv_split.{i}", np.array([e, e, e], np.int64))], 3, axis=-1,
                       name=f"split_qkv.{i}")
        rope: dict[str, Any] = dict(domain="com.microsoft", interleaved=1, rotary_embedding_dim=rd, num_heads=n_head)
        q = g.op("RotaryEmbedding", [q, "position_ids", "rope_cos", "rope_sin"], name=f"rope_q.{i}", **rope)
        k = g.op("RotaryEmbedding", [k, "position_ids", "rope_cos", "rope_sin"], name=f"rope_k.{i}", **rope)

        if graph == "gqa":
            o = _gqa_attention(g, i, n_layer, n_head, d, q, k, v, None if kv_int8 is None else kv_int8[i], kv_int4)
            attention_matmuls += [f"pre{i}.rotate_q", f"pre{i}.rotate_k"] if kv_int4 else []
        else:
            qh = g.op("Transpose", [g.op("Reshape", [q, "shape_nshd"])], perm=[2, 0, 1, 3])  # [H, n, S, D]
            qh = kv(g.op("Mul", [qh, "scale"]))
            kt = kv(g.op("Transpose", [g.op("Reshape", [k, "shape_nshd"])], perm=[2, 0, 3, 1]))  # [H, n, D, S]
            vh = kv(g.op("Transpose", [g.op("Reshape", [v, "shape_nshd"])], perm=[2, 0, 1, 3]))  # [H, n, S, D]
            tk_out, tv_out = tail_out_names(n_layer)[i]
            tk_in, tv_in = tail_names(n_layer)[i]
            pk_in, pv_in = prefix_names(n_layer)[i]
            kt_all = g.op("Concat", [tk_in, kt], [tk_out], axis=3, name=f"tail_k.{i}")  # [H, n, D, T+S]
            vh_all = g.op("Concat", [tv_in, vh], [tv_out], axis=2, name=f"tail_v.{i}")  # [H, n, T+S, D]

            # prefix: all rows' queries in one MatMul against the shared buffer
            qp = g.op("Reshape", [qh, "shape_1h_d"])  # [1, H, n*S, D]
            sp = g.op("MatMul", [qp, pk_in], name=f"attn_qk_prefix.{i}")  # [1, H, n*S, cap]
            sp = g.op("Add", [g.op("Reshape", [f32(sp), shape_hns_m1]), "prefix_bias"])  # [H, n, S, cap]
            st = g.op("MatMul", [qh, kt_all], name=f"attn_qk_tail.{i}")  # [H, n, S, T+S]
            st = g.op("Add", [f32(st), "tail_bias"])
            probs = g.op("Softmax", [g.op("Concat", [sp, st], axis=-1)], axis=-1)
            pp, pt = g.op("Split", [probs, split_sizes], 2, axis=-1)
            op_ = g.op("MatMul", [kv(g.op("Reshape", [pp, "shape_1h_0"])), pv_in], name=f"attn_pv_prefix.{i}")
            ot = g.op("MatMul", [kv(pt), vh_all], name=f"attn_pv_tail.{i}")  # [H, n, S, D]
            o = f32(g.op("Add", [g.op("Reshape", [op_, shape_hnsd]), ot]))
            o = g.op("Reshape", [g.op("Transpose", [o], perm=[1, 2, 0, 3]), "shape_nse"])  # [n, S, E]
            attention_matmuls += [f"attn_qk_prefix.{i}", f"attn_qk_tail.{i}", f"attn_pv_prefix.{i}", f"attn_pv_tail.{i}"]
        attn = linear(o, sd[p + "attn.out_proj.weight"].T, f"out_proj.{i}")

        m = linear(x, sd[p + "mlp.fc_in.weight"].T, f"fc_in.{i}")
        m = g.op("FastGelu", [m, b_in], domain="com.microsoft", name=f"gelu.{i}")
        m = g.op("Add", [linear(m, sd[p + "mlp.fc_out.weight"].T, f"fc_out.{i}"), b_fo])
        h = g.op("Add", [g.op("Add", [h, attn]), m], name=f"residual.{i}")

    h = g.op("Slice", [h, "logits_start", "int64_max", "axis1"], name="logits_positions")
    h = g.op("LayerNormalization", [h, g.const("lnf_w", sd["transformer.ln_f.weight"]),
                                     g.const("lnf_b", sd["transformer.ln_f.bias"])], axis=-1, epsilon=eps, name="ln_f")
    logits = g.op("MatMul", [h, g.const("w_lm", sd["lm_head.weight"].T)], name="lm_head")
    g.op("Add", [logits, g.const("b_lm", sd["lm_head.bias"])], ["logits"], name="lm_head_bias")

    i64 = TensorProto.INT64
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logits_seq", int(cfg.vocab_size)])]
    if graph == "gqa":
        cache_type = TensorProto.UINT8 if kv_int4 else TensorProto.INT8 if kv_int8 is not None else TensorProto.FLOAT
        inputs = [
            helper.make_tensor_value_info("input_ids", i64, [1, "seq"]),
            helper.make_tensor_value_info("position_ids", i64, [1, "seq"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, [1, 1, "seq", "total"]),
            helper.make_tensor_value_info("logits_start", i64, [1]),
            helper.make_tensor_value_info("prompt_path", TensorProto.BOOL, []),
        ]
        for i, ((pk, pv), (ok, ov)) in enumerate(zip(gqa_names(n_layer), gqa_out_names(n_layer))):
            inputs += [helper.make_tensor_value_info(x, cache_type, [1, n_head, "cap", d // 2 if kv_int4 else d]) for x in (pk, pv)]
            outputs += [helper.make_tensor_value_info(x, cache_type, None) for x in (ok, ov)]
            if kv_int4:
                inputs += [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [1, n_head, "cap", 1]) for x in gqa_scale_names(n_layer)[i]]
                outputs += [helper.make_tensor_value_info(x, TensorProto.FLOAT16, None) for x in gqa_scale_out_names(n_layer)[i]]
        functions = [decode_attention_function(helper, n_head)] if kv_int8 is not None else None
        return _finish(helper, g, inputs, outputs, graph, functions), attention_matmuls
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("prefix_bias", TensorProto.FLOAT, ["cap"]),
        helper.make_tensor_value_info("tail_bias", TensorProto.FLOAT, ["seq", "tail_seq"]),
        helper.make_tensor_value_info("logits_start", i64, [1]),
    ]
    for (pk, pv), (tk, tv), (ok, ov) in zip(prefix_names(n_layer), tail_names(n_layer), tail_out_names(n_layer)):
        inputs += [helper.make_tensor_value_info(pk, kv_type, [1, n_head, d, "cap"]),
                   helper.make_tensor_value_info(pv, kv_type, [1, n_head, "cap", d])]
        inputs += [helper.make_tensor_value_info(tk, kv_type, [n_head, "batch", d, "past_tail"]),
                   helper.make_tensor_value_info(tv, kv_type, [n_head, "batch", "past_tail", d])]
        outputs += [helper.make_tensor_value_info(ok, kv_type, [n_head, "batch", d, "tail_seq"]),
                    helper.make_tensor_value_info(ov, kv_type, [n_head, "batch", "tail_seq", d])]
    return _finish(helper, g, inputs, outputs, graph), attention_matmuls


def _gqa_attention(g: _Graph, i: int, n_layer: int, n_head: int, d: int, q: str, k: str, v: str,
                   scales: tuple[np.ndarray, np.ndarray] | None, int4: bool = False) -> str:
    """Layer ``i``'s attention in the ``gqa`` graph: ``If(prompt_path)``.

    else (decode: a few query rows): ``DecodeAttention`` (int8 cache; see
    :func:`decode_attention_function`) or ``GroupQueryAttention`` (fp32) writes the new keys and
    values into the cache in place (``present_*`` is bound to the ``past_*`` buffer) and attends
    over it;
    then (prompt chunks and long drafts): the cache's first ``past_len`` positions dequantized,
    the chunk's own keys and values appended, two MatMuls with ``attention_bias`` (causal there);
    it returns the chunk's keys and values ``[1, S, E]`` (quantized like the cache) for the engine
    to write. GroupQueryAttention's int8 path is fast for one query row but costs several times
    a MatMul's work per (query, key) pair, so a prompt goes the MatMul way.

    ``int4``: the cache is 4-bit with a scale per token and head (``csrc/attend4.h``: a row of D
    values is D/2 bytes, value j in the low nibble of byte j and value j + D/2 in the high one,
    as round(x / scale) + 8, scale = max|x| / 7 clamped to float16's normal range; the buffers
    ``uint8 [1, H, cap, D/2]`` hold the rows in the kernel's blocks,
    :func:`codegen_ls.engine.kvcache.layout4`; the scales are float16, ``past_key_scale.L`` /
    ``past_value_scale.L`` ``[1, H, cap, 1]``), and it holds the keys
    rotated, kR (``key_rotation``; the scores use qR). Both branches rotate (the kernel inside
    its op: a few thousand multiply-adds a row, cheaper there than two more graph nodes a layer
    every decode step). Its decode branch is ``DecodeAttentionQ4``, which only our kernel
    implements (no ONNX function: onnxruntime has no attention that reads this format); its
    prompt branch reads the cache through our ``DequantizeKeys4`` / ``DequantizeValues4`` (one
    pass; elementwise ONNX ops took eight), packs the chunk's rows with elementwise ops and
    returns them (rows, for the engine to put in the layout) with their scales as ``[1, S, H]``.
    """
    from onnx import TensorProto

    (pk_in, pv_in), (pk_out, pv_out) = gqa_names(n_layer)[i], gqa_out_names(n_layer)[i]
    e = n_head * d
    k_scale, v_scale = scales if scales is not None else (None, None)

    dec = _Graph(f"dec{i}.")
    dec_out = [f"dec{i}.attn", f"dec{i}.present_key", f"dec{i}.present_value"]
    (ps_k, ps_v), (os_k, os_v) = gqa_scale_names(n_layer)[i], gqa_scale_out_names(n_layer)[i]
    if int4:
        dec_out += [f"dec{i}.present_key_scale", f"dec{i}.present_value_scale"]
        dec.op(DECODE_ATTENTION_Q4, [q, k, v, pk_in, pv_in, ps_k, ps_v, "seqlens_k", "total_sequence_length",
                                     "attention_bias", "key_rotation"], dec_out, domain=KERNEL_DOMAIN, name="decode_attention")
    elif scales is not None:  # our kernel where the engine loads it, else the function's body (GQA)
        scale_in = [dec.const("k_scale", scales[0]), dec.const("v_scale", scales[1])]
        dec.op(DECODE_ATTENTION, [q, k, v, pk_in, pv_in, "seqlens_k", "total_sequence_length", "attention_bias",
                                  *scale_in], dec_out, domain=KERNEL_DOMAIN, name="decode_attention")
    else:
        dec.op("GroupQueryAttention", [q, k, v, pk_in, pv_in, "seqlens_k", "total_sequence_length", "", "", "",
                                       "attention_bias"], dec_out, domain="com.microsoft", name="gqa",
               num_heads=n_head, kv_num_heads=n_head)

    pre = _Graph(f"pre{i}.")
    if not int4:  # the int8 / fp32 cache's first past_len rows are a Slice (the 4-bit one: DequantizeKeys4 / DequantizeValues4)
        zero, axis2 = pre.const("zero", np.array([0], np.int64)), pre.const("axis2", np.array([2], np.int64))
    bshd = pre.const("shape_bshd", np.array([0, 0, n_head, d], np.int64))

    def cached(buf: str, scale: np.ndarray | None) -> str:  # [1, H, past_len, D] float
        if int4:  # our op: the first past_len rows as (nibble - 8) * scale, one pass (csrc/attend4.c)
            return pre.op(DEQUANTIZE4_NAMES[buf != pk_in], [buf, ps_k if buf == pk_in else ps_v, "past_len"], domain=KERNEL_DOMAIN,
                          name=f"dequantize_{'key' if buf == pk_in else 'value'}")
        x = pre.op("Slice", [buf, zero, "past_len", axis2])
        if scale is None:
            return x
        return pre.op("Mul", [pre.op("Cast", [x], to=TensorProto.FLOAT), pre.const(f"scale_{buf}", scale)])

    def heads(x: str) -> str:  # [1, S, E] -> [1, H, S, D]
        return pre.op("Transpose", [pre.op("Reshape", [x, bshd])], perm=[0, 2, 1, 3])

    if int4:  # the cache holds kR, the scores use qR (key_rotation): [1, S, H, D] @ R, back to [1, S, E]
        shape_bse = pre.const("shape_bse_rot", np.array([0, 0, e], np.int64))
        q, k = (pre.op("Reshape", [pre.op("MatMul", [pre.op("Reshape", [x, bshd]), "key_rotation"], name=f"rotate_{n}"), shape_bse])
                for x, n in ((q, "q"), (k, "k")))
    keys = pre.op("Concat", [cached(pk_in, k_scale), heads(k)], axis=2)
    values = pre.op("Concat", [cached(pv_in, v_scale), heads(v)], axis=2)
    qh = pre.op("Mul", [heads(q), pre.const("scale", np.array(1.0 / np.sqrt(d), np.float32))])
    scores = pre.op("Add", [pre.op("MatMul", [qh, pre.op("Transpose", [keys], perm=[0, 1, 3, 2])], name="attn_qk"),
                            "attention_bias"])
    o = pre.op("MatMul", [pre.op("Softmax", [scores], axis=-1), values], name="attn_pv")
    pre_attn = pre.op("Reshape", [pre.op("Transpose", [o], perm=[0, 2, 1, 3]),
                                  pre.const("shape_bse", np.array([0, 0, e], np.int64))], [f"pre{i}.attn"])
    new_kv, new_scales = [], []
    for x, scale, name in ((k, k_scale, "key"), (v, v_scale, "value")):
        out = f"pre{i}.new_{name}"
        if int4:  # per token and head: scale = max|x| / 7, round(x / scale) + 8, two a byte
            rows = pre.op("Reshape", [x, bshd])  # [1, S, H, D]
            amax = pre.op("Max", [pre.op("ReduceMax", [pre.op("Abs", [rows])], axes=[-1], keepdims=1),
                                  pre.const(f"{name}_tiny", np.array(kvcache.TINY, np.float32))])
            row_scale = pre.op("Clip", [pre.op("Div", [amax, pre.const(f"{name}_seven", np.array(kvcache.LEVELS, np.float32))]),
                                        pre.const(f"{name}_scale_min", np.array(kvcache.SCALE_MIN, np.float32)),
                                        pre.const(f"{name}_scale_max", np.array(kvcache.SCALE_MAX, np.float32))])  # [1, S, H, 1]
            qv = pre.op("Clip", [pre.op("Round", [pre.op("Div", [rows, row_scale])]),
                                 pre.const(f"{name}_lo4", np.array(-kvcache.LEVELS - 1, np.float32)),
                                 pre.const(f"{name}_hi4", np.array(kvcache.LEVELS, np.float32))])
            qv = pre.op("Add", [qv, pre.const(f"{name}_eight", np.array(kvcache.OFFSET, np.float32))])
            lo, hi = pre.op("Split", [qv, pre.const(f"{name}_halves", np.array([d // 2, d // 2], np.int64))], 2, axis=-1)
            packed = pre.op("Add", [lo, pre.op("Mul", [hi, pre.const(f"{name}_sixteen", np.array(16, np.float32))])])
            pre.op("Reshape", [pre.op("Cast", [packed], to=TensorProto.UINT8), pre.const(f"{name}_shape_packed", np.array([0, 0, e // 2], np.int64))], [out])
            new_scales.append(pre.op("Reshape", [pre.op("Cast", [row_scale], to=TensorProto.FLOAT16),
                                                 pre.const(f"{name}_shape_scale", np.array([0, 0, n_head], np.int64))],
                                     [f"pre{i}.new_{name}_scale"]))
        elif scale is None:
            pre.op("Identity", [x], [out])
        else:  # the cache's own quantization: per channel, symmetric, saturating (elementwise ops:
            # onnxruntime's per-axis QuantizeLinear is ~50x slower here)
            scaled = pre.op("Round", [pre.op("Mul", [x, pre.const(f"{name}_inv_scale", (1.0 / scale).reshape(-1))])])
            clipped = pre.op("Clip", [scaled, pre.const(f"{name}_lo", np.array(-128, np.float32)),
                                      pre.const(f"{name}_hi", np.array(127, np.float32))])
            pre.op("Cast", [clipped], [out], to=TensorProto.INT8)
        new_kv.append(out)
    f32: int = TensorProto.FLOAT
    cache: int = TensorProto.UINT8 if int4 else TensorProto.FLOAT if scales is None else TensorProto.INT8
    f16: int = TensorProto.FLOAT16  # the 4-bit cache's scales
    then_out: list[tuple[str, int]] = [(pre_attn, f32), (new_kv[0], cache), (new_kv[1], cache)] + [(x, f16) for x in new_scales]
    else_out: list[tuple[str, int]] = [(dec_out[0], f32), (dec_out[1], cache), (dec_out[2], cache)] + [(x, f16) for x in dec_out[3:]]
    outs = [f"attn.{i}", pk_out, pv_out] + ([os_k, os_v] if int4 else [])
    return str(g.op("If", ["prompt_path"], outs, name=f"attention.{i}", then_branch=pre.subgraph(f"prompt{i}", then_out),
                    else_branch=dec.subgraph(f"decode{i}", else_out))[0])


def decode_attention_function(helper: Any, n_head: int) -> Any:
    """``codegen_ls.DecodeAttention`` as an ONNX function whose body is onnxruntime's
    ``GroupQueryAttention`` on the int8 cache (static per-channel scales). onnxruntime inlines it
    unless a registered kernel claims the node: the engine registers ours
    (:mod:`codegen_ls.engine.kernels`) where it was built, so the same file runs with or without it."""
    inputs = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
              "attention_bias", "k_scale", "v_scale"]
    outputs = ["output", "present_key", "present_value"]
    body = helper.make_node("GroupQueryAttention", inputs[:7] + ["", "", "", "attention_bias", "", "k_scale", "v_scale"],
                            outputs, domain="com.microsoft", num_heads=n_head, kv_num_heads=n_head,
                            k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    return helper.make_function(KERNEL_DOMAIN, DECODE_ATTENTION, inputs, outputs, [body],
                                opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])


def _finish(helper: Any, g: _Graph, inputs: list[Any], outputs: list[Any], kind: str, functions: list[Any] | None = None) -> Any:
    graph = helper.make_graph(g.nodes, f"codegen_{kind}", inputs, outputs, initializer=g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if functions:
        opsets.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    proto = helper.make_model(graph, opset_imports=opsets, functions=functions or [], ir_version=IR_VERSION,
                              producer_name="codegen-ls")
    proto.metadata_props.add(key="codegen_ls.graph", value=kind)
    return proto


def save(proto: Any, path: Path, external: bool) -> None:
    """Save ``proto``; ``external`` puts the weights in ``<name>.data`` (needed past 2 GB)."""
    import onnx

    if external:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(proto, str(path))
