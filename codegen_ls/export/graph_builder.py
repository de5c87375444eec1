"""Our ONNX graph of CodeGen (``gqa``), built from the checkpoint one weight at a time (onnxruntime-genai's
model builder is the model: a ``make_*`` function per subgraph, nodes named by their place).

The optimum export takes the whole past as input and concatenates it with the new token's keys
and values every step: decode time grows with the context even where attention itself is cheap.
This graph keeps the prompt's KV in place instead (attention: :mod:`codegen_ls.export.attention`)::

    input_ids ─ embed_tokens ─┬─ ln_1 ─┬─ qkv ─ rotary(q, k) ─ attention ─ out_proj ─┐
                              │        └─ fc_in ─ gelu ─ fc_out ─────────────────────┤  (CodeGen's
                              └──────────────────────────────────────────────────── + ─▶ next layer
    ... ─ Slice(logits_start) ─ ln_f ─ lm_head ─▶ logits                                parallel block)

The qkv weight is CodeGen's ``mp_num=4`` interleaved q/v/k layout reordered to q|k|v here
(:func:`qkv_weight`); rotary is ``com.microsoft.RotaryEmbedding`` (interleaved, partial
``rotary_dim``, the tables transformers computes); ``logits_start`` slices the positions whose
logits are computed (prefill needs only the last one).

One cache per layer, ``past_key.L`` / ``past_value.L`` ``[1, H, cap, D]``;
the run's tokens go to positions ``total - S .. total - 1`` and attend to ``0 .. total - 1``
through an additive ``attention_bias`` ``[1, 1, S, total]`` (causal included). Batch is always
1: N candidates are N query positions of a step, and the bias lets each see only the prompt and
its own tokens (see :class:`codegen_ls.engine.backends.GqaBackend`). Quantized, the cache is
**int8** with static per-channel scales (:func:`codegen_ls.export.calibrate.kv_scales`), or
**4-bit** with a scale per token and head (``kv_int4``, :mod:`codegen_ls.engine.kvcache`:
``past_key.L`` ``uint8 [1, H, cap, D/2]`` plus ``past_key_scale.L`` float16 ``[1, H, cap, 1]``).

An earlier ``flat`` graph (a read-only prompt buffer plus per-candidate tails) was retired: gqa
is faster at every context and lighter (benchmarks/README.md), and ``--no-quantize`` covers an
fp32 cache.

Weights: ``int8`` stores each MatMul weight as ``quantize_dynamic`` would (per tensor, symmetric,
``DynamicQuantizeLinear`` + ``MatMulInteger`` on the activations, :mod:`codegen_ls.export.quantize`)
and the token embedding as int8 rows; ``int4_block`` makes the layers' weights ``MatMulNBits``.
Large weights go to ``model.onnx.data`` as they are made (:mod:`codegen_ls.export.onnx_writer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codegen_ls.engine import kvcache
from codegen_ls.errors import ModelError
from codegen_ls.export import attention, quantize
from codegen_ls.export.onnx_writer import ExternalData, GraphWriter
from codegen_ls.export.source import CheckpointSource

GRAPH = "gqa"  # the manifest's extra.graph for this builder's graph (the engine picks its backend by it)
OPSET = attention.OPSET
IR_VERSION = 9
MASKED = -1e9  # additive bias for masked positions (finite: a fully masked row never makes NaN)
KV_HEADROOM = 1.25  # int8 KV scales: the calibration's largest magnitude times this maps to 127
GELU_TANH = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # FastGelu
ACTIVATIONS = (*GELU_TANH, "gelu", "relu")


def gqa_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"past_key.{i}", f"past_value.{i}") for i in range(n_layer)]


def gqa_out_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"present_key.{i}", f"present_value.{i}") for i in range(n_layer)]


def gqa_scale_names(n_layer: int) -> list[tuple[str, str]]:
    """The 4-bit cache's per-token scales ``[1, H, cap, 1]`` (inputs; outputs: ``present_``)."""
    return [(f"past_key_scale.{i}", f"past_value_scale.{i}") for i in range(n_layer)]


def gqa_scale_out_names(n_layer: int) -> list[tuple[str, str]]:
    return [(f"present_key_scale.{i}", f"present_value_scale.{i}") for i in range(n_layer)]


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


def kv_scales(
    model: Any, batches: list[list[int]], headroom: float = KV_HEADROOM
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-layer int8 scales ``[1, H, 1, D]`` of the keys (after rotary) and the values, from a
    whole transformers model (the reference for :func:`codegen_ls.export.calibrate.kv_scales`,
    which the export runs layer by layer): each channel's largest magnitude over the calibration
    token ``batches``, times ``headroom``, maps to 127."""
    import torch

    peak: list[list[np.ndarray]] = []
    with torch.no_grad():
        for ids in batches:
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
            for i in range(model.config.n_layer):
                amax = [t.abs().amax(dim=(0, 2)).float().numpy() for t in (cache[i][0], cache[i][1])]  # [H, D]
                if len(peak) <= i:
                    peak.append(amax)
                else:
                    peak[i] = [np.maximum(a, b) for a, b in zip(peak[i], amax)]
    return [scales_from_peaks(k, v, headroom) for k, v in peak]


def scales_from_peaks(
    k_max: np.ndarray, v_max: np.ndarray, headroom: float = KV_HEADROOM
) -> tuple[np.ndarray, np.ndarray]:
    """A layer's ``[H, D]`` largest magnitudes -> its int8 cache scales ``[1, H, 1, D]``."""
    pair = [np.maximum(m * headroom, 1e-6) / 127.0 for m in (k_max, v_max)]
    return pair[0][None, :, None, :].astype(np.float32), pair[1][None, :, None, :].astype(np.float32)


@dataclass(frozen=True)
class CacheNames:
    """A gqa layer's cache inputs and outputs (the 4-bit cache's scales too)."""

    past: tuple[str, str]
    present: tuple[str, ...]
    past_scale: tuple[str, str]


@dataclass
class GraphOptions:
    """What to build: ``int8`` weights (and embedding rows); ``int4_block`` layer weights as
    MatMulNBits; the KV cache: ``kv_int8`` (per-layer scales) or ``kv_int4``; otherwise fp32."""

    int8: bool = False
    int4_block: int = 0
    kv_int8: list[tuple[np.ndarray, np.ndarray]] | None = None
    kv_int4: bool = False

    def check(self, head_dim: int) -> None:
        if self.kv_int4 and (self.kv_int8 is not None or head_dim % 2):
            raise ValueError(f"unsupported graph options: kv_int8={self.kv_int8 is not None}, kv_int4={self.kv_int4}")


@dataclass
class ModelBuilder:
    """Builds one graph from ``source``: the ``make_*`` methods each add one subgraph to ``g``."""

    source: CheckpointSource
    g: GraphWriter
    options: GraphOptions
    attention_matmuls: list[str] = field(default_factory=list)  # activation x activation MatMuls
    _consts: dict[str, str] = field(default_factory=dict)
    _quantized_inputs: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.source.config
        self.e, self.n_head, self.n_layer = int(cfg["n_embd"]), int(cfg["n_head"]), int(cfg["n_layer"])
        self.d = self.e // self.n_head
        self.rotary_dim = int(cfg.get("rotary_dim") or self.d)
        self.eps = float(cfg.get("layer_norm_epsilon", 1e-5))
        self.vocab = int(cfg["vocab_size"])
        self.n_positions = int(cfg.get("n_positions") or cfg.get("n_ctx") or 2048)
        self.activation = str(cfg.get("activation_function", "gelu_new"))
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"activation_function '{self.activation}' is not supported ({', '.join(ACTIVATIONS)})")
        if self.e % self.n_head:
            raise ModelError(f"n_embd {self.e} is not a multiple of n_head {self.n_head}")
        self.options.check(self.d)
        self.kv_int8, self.kv_int4 = self.options.kv_int8, self.options.kv_int4

    # -- shared pieces -------------------------------------------------------------------------------

    def const(self, name: str, value: np.ndarray) -> str:
        """A constant of the main graph, made once (branches read it from the outer scope)."""
        if name not in self._consts:
            self._consts[name] = self.g.const(name, value)
        return self._consts[name]

    @property
    def cache_type(self) -> int:
        from onnx import TensorProto

        return (
            TensorProto.UINT8 if self.kv_int4 else TensorProto.INT8 if self.kv_int8 is not None else TensorProto.FLOAT
        )

    def cache_names(self, i: int) -> CacheNames:
        scales = gqa_scale_out_names(self.n_layer)[i] if self.kv_int4 else ()
        return CacheNames(
            gqa_names(self.n_layer)[i], (*gqa_out_names(self.n_layer)[i], *scales), gqa_scale_names(self.n_layer)[i]
        )

    # -- subgraphs -----------------------------------------------------------------------------------

    def make_embedding(self) -> str:
        """``input_ids`` ``[n, S]`` -> ``[n, S, E]``; int8 rows times their scale when quantized."""
        from onnx import TensorProto

        wte = self.source.get("transformer.wte.weight")  # [V, E]
        if not self.options.int8:
            return str(
                self.g.op(
                    "Gather",
                    [self.g.const("model.embed_tokens.weight", wte), "input_ids"],
                    "/model/embed_tokens/Gather",
                    axis=0,
                )
            )
        rows, scales = quantize.int8_rows(wte)
        del wte
        table = self.g.op(
            "Gather",
            [self.g.const("model.embed_tokens.weight_int8", rows), "input_ids"],
            "/model/embed_tokens/Gather",
            axis=0,
        )  # [n, S, E] int8
        scale = self.g.op(
            "Gather",
            [self.g.const("model.embed_tokens.scale", scales), "input_ids"],
            "/model/embed_tokens/scale/Gather",
            axis=0,
        )  # [n, S, 1]
        return str(
            self.g.op(
                "Mul",
                [self.g.op("Cast", [table], "/model/embed_tokens/Cast", to=TensorProto.FLOAT), scale],
                "/model/embed_tokens/Mul",
            )
        )

    def make_layernorm(self, x: str, prefix: str, path: str) -> str:
        """LayerNormalization over E with the checkpoint's ``{prefix}.weight`` / ``.bias``."""
        name = path.strip("/").replace("/", ".")
        w = self.g.const(f"{name}.weight", self.source.get(f"{prefix}.weight"))
        b = self.g.const(f"{name}.bias", self.source.get(f"{prefix}.bias"))
        return str(self.g.op("LayerNormalization", [x, w, b], f"{path}/LayerNormalization", axis=-1, epsilon=self.eps))

    def make_linear(self, x: str, w: np.ndarray, path: str, int4: bool = True) -> str:
        """``x @ w.T`` (``w`` ``[out, in]`` as the checkpoint stores it): MatMulNBits (``int4`` and
        asked), int8 as ``quantize_dynamic`` writes it, or fp32."""
        name = path.strip("/").replace("/", ".")
        k, n = w.shape[1], w.shape[0]
        block = self.options.int4_block
        if int4 and block and k % block == 0 and block % 2 == 0:
            packed, scales = quantize.pack_int4(w.T, block)
            return str(
                self.g.op(
                    "MatMulNBits",
                    [x, self.g.const(f"{name}.weight_q4", packed), self.g.const(f"{name}.scales", scales)],
                    f"{path}/MatMulNBits",
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=4,
                    block_size=block,
                    accuracy_level=4,
                )
            )
        if not self.options.int8:
            return str(
                self.g.op("MatMul", [x, self.g.const(f"{name}.weight", np.ascontiguousarray(w.T))], f"{path}/MatMul")
            )
        return self._matmul_int8(x, w, path, name)

    def _matmul_int8(self, x: str, w: np.ndarray, path: str, name: str) -> str:
        """``quantize_dynamic``'s pattern: x -> DynamicQuantizeLinear (once per tensor) ->
        MatMulInteger with the int8 weight -> Cast -> times x's scale times the weight's."""
        from onnx import TensorProto

        q, scale, zero_point = quantize.int8_per_tensor(w)
        w_q = self.g.const(f"{name}.weight_quantized", np.ascontiguousarray(q.T))  # [in, out] int8
        del q
        w_scale, w_zp = (
            self.g.const(f"{name}.weight_scale", scale),
            self.g.const(f"{name}.weight_zero_point", zero_point),
        )
        if x not in self._quantized_inputs:
            base = x[: x.rfind("/output_")] if "/output_" in x else f"/{x}"
            base = base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1][:1].isupper() else base  # drop the op type
            self._quantized_inputs[x] = self.g.op("DynamicQuantizeLinear", [x], f"{base}/DynamicQuantizeLinear", 3)
        x_q, x_scale, x_zp = self._quantized_inputs[x]
        scales = self.g.op("Mul", [x_scale, w_scale], f"{path}/scales/Mul")
        acc = self.g.op("MatMulInteger", [x_q, w_q, x_zp, w_zp], f"{path}/MatMulInteger")  # int32
        return str(
            self.g.op("Mul", [self.g.op("Cast", [acc], f"{path}/Cast", to=TensorProto.FLOAT), scales], f"{path}/Mul")
        )

    def make_attention(self, i: int, x: str) -> str:
        """``x`` ``[n, S, E]`` (after ln_1) -> qkv -> rotary on q, k -> attention -> out_proj."""
        p, path = f"transformer.h.{i}.attn.", f"/model/layers.{i}/attn"
        qkv = self.make_linear(
            x, qkv_weight(self.source.get(p + "qkv_proj.weight"), self.n_head), f"{path}/qkv"
        )  # [n, S, 3E]
        split = self.const("qkv_split", np.array([self.e] * 3, np.int64))
        q, k, v = self.g.op("Split", [qkv, split], f"{path}/qkv/Split", 3, axis=-1)  # [n, S, E] each
        q, k = self.make_rotary(q, f"{path}/q_rotary"), self.make_rotary(k, f"{path}/k_rotary")
        o = attention.make_gqa_attention(self, i, q, k, v)
        if self.kv_int4:
            self.attention_matmuls += [f"{path}/prompt/rotate_q/MatMul", f"{path}/prompt/rotate_k/MatMul"]
        return self.make_linear(o, self.source.get(p + "out_proj.weight"), f"{path}/out_proj")  # [n, S, E]

    def make_rotary(self, x: str, path: str) -> str:
        """Interleaved rotary on the first ``rotary_dim`` channels of each head (CodeGen's)."""
        return str(
            self.g.op(
                "RotaryEmbedding",
                [x, "position_ids", "rope_cos", "rope_sin"],
                f"{path}/RotaryEmbedding",
                domain="com.microsoft",
                interleaved=1,
                rotary_embedding_dim=self.rotary_dim,
                num_heads=self.n_head,
            )
        )

    def make_mlp(self, i: int, x: str) -> str:
        """``x`` ``[n, S, E]`` -> fc_in ``[n, S, 4E]`` -> activation -> fc_out (+ bias) ``[n, S, E]``."""
        p, path = f"transformer.h.{i}.mlp.", f"/model/layers.{i}/mlp"
        m = self.make_linear(x, self.source.get(p + "fc_in.weight"), f"{path}/fc_in")
        b_in = self.g.const(f"model.layers.{i}.mlp.fc_in.bias", self.source.get(p + "fc_in.bias"))
        if self.activation in GELU_TANH:  # gelu_new: the tanh approximation
            m = self.g.op("FastGelu", [m, b_in], f"{path}/act/FastGelu", domain="com.microsoft")
        elif self.activation == "gelu":  # the exact (erf) one
            m = self.g.op("BiasGelu", [m, b_in], f"{path}/act/BiasGelu", domain="com.microsoft")
        else:
            m = self.g.op("Relu", [self.g.op("Add", [m, b_in], f"{path}/fc_in/bias/Add")], f"{path}/act/Relu")
        b_out = self.g.const(f"model.layers.{i}.mlp.fc_out.bias", self.source.get(p + "fc_out.bias"))
        return str(
            self.g.op(
                "Add",
                [self.make_linear(m, self.source.get(p + "fc_out.weight"), f"{path}/fc_out"), b_out],
                f"{path}/fc_out/bias/Add",
            )
        )

    def make_layer(self, i: int, h: str) -> str:
        """CodeGen's parallel block: h + attention(ln_1(h)) + mlp(ln_1(h))."""
        x = self.make_layernorm(h, f"transformer.h.{i}.ln_1", f"/model/layers.{i}/ln_1")
        attn = self.make_attention(i, x)
        m = self.make_mlp(i, x)
        return str(
            self.g.op(
                "Add",
                [self.g.op("Add", [h, attn], f"/model/layers.{i}/residual/Add"), m],
                f"/model/layers.{i}/residual/Add_1",
            )
        )

    def make_lm_head(self, h: str) -> str:
        """The positions from ``logits_start`` on -> ln_f -> lm_head (+ bias) -> ``logits`` ``[n, S', V]``
        (int8 even with ``--int4``; the embedding's weight where the checkpoint ties them)."""
        h = self.g.op(
            "Slice",
            [
                h,
                "logits_start",
                self.const("int64_max", np.array([np.iinfo(np.int64).max], np.int64)),
                self.const("axis1", np.array([1], np.int64)),
            ],
            "/model/logits_positions/Slice",
        )
        h = self.make_layernorm(h, "transformer.ln_f", "/model/ln_f")
        name = "lm_head.weight" if "lm_head.weight" in self.source else "transformer.wte.weight"  # tied
        logits = self.make_linear(h, self.source.get(name), "/lm_head", int4=False)  # [n, S', V]
        if "lm_head.bias" not in self.source:
            return str(self.g.op("Identity", [logits], "/lm_head/Identity", ["logits"]))
        return str(
            self.g.op(
                "Add",
                [logits, self.g.const("lm_head.bias", self.source.get("lm_head.bias"))],
                "/lm_head/bias/Add",
                ["logits"],
            )
        )

    def make_preamble(self) -> None:
        """Constants every layer uses: rotary tables, the 4-bit cache's rotation, ``past_len``."""
        from onnx import TensorProto
        from transformers.models.codegen.modeling_codegen import create_sinusoidal_positions

        sincos = create_sinusoidal_positions(self.n_positions, self.rotary_dim).float().numpy()  # [P, rd]: sin | cos
        self.g.const("rope_sin", sincos[:, : self.rotary_dim // 2])
        self.g.const("rope_cos", sincos[:, self.rotary_dim // 2 :])
        if self.kv_int4:
            self.g.const("key_rotation", kvcache.key_rotation(self.d))  # [D, D]
        # positions already in the cache before this run: total - S
        s_len = self.g.op("Shape", ["input_ids"], "/model/past_len/Shape", start=1, end=2)
        total = self.g.op("Cast", ["total_sequence_length"], "/model/past_len/Cast", to=TensorProto.INT64)
        total = self.g.op("Reshape", [total, self.const("shape_1", np.array([1], np.int64))], "/model/past_len/Reshape")
        self.g.op("Sub", [total, s_len], "/model/past_len/Sub", ["past_len"])

    def make_io(self) -> tuple[list[Any], list[Any]]:
        """The graph's inputs and outputs (the engine's backends bind them by name)."""
        from onnx import TensorProto, helper

        i64, f32, info = TensorProto.INT64, TensorProto.FLOAT, helper.make_tensor_value_info
        outputs = [info("logits", f32, ["batch", "logits_seq", self.vocab])]
        inputs = [
            info("input_ids", i64, [1, "seq"]),
            info("position_ids", i64, [1, "seq"]),
            info("seqlens_k", TensorProto.INT32, [1]),
            info("total_sequence_length", TensorProto.INT32, []),
            info("attention_bias", f32, [1, 1, "seq", "total"]),
            info("logits_start", i64, [1]),
            info("prompt_path", TensorProto.BOOL, []),
        ]
        width = self.d // 2 if self.kv_int4 else self.d
        for i in range(self.n_layer):
            names = self.cache_names(i)
            inputs += [info(x, self.cache_type, [1, self.n_head, "cap", width]) for x in names.past]
            outputs += [info(x, self.cache_type, None) for x in names.present[:2]]
            if self.kv_int4:
                inputs += [info(x, TensorProto.FLOAT16, [1, self.n_head, "cap", 1]) for x in names.past_scale]
                outputs += [info(x, TensorProto.FLOAT16, None) for x in names.present[2:]]
        return inputs, outputs

    def build(self) -> Any:
        """The whole model, weight by weight: embedding, the layers, the head; returns the ModelProto."""
        from onnx import helper

        self.make_preamble()
        h = self.make_embedding()
        for i in range(self.n_layer):
            h = self.make_layer(i, h)
        self.make_lm_head(h)
        inputs, outputs = self.make_io()
        graph = helper.make_graph(self.g.nodes, f"codegen_{GRAPH}", inputs, outputs, initializer=self.g.inits)
        functions = [attention.decode_attention_function(helper, self.n_head)] if self.kv_int8 is not None else []
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        if functions:
            opsets.append(helper.make_opsetid(attention.DOMAIN, 1))
        proto = helper.make_model(
            graph, opset_imports=opsets, functions=functions, ir_version=IR_VERSION, producer_name="codegen-ls"
        )
        proto.metadata_props.add(key="codegen_ls.graph", value=GRAPH)
        return proto


def build_graph(source: CheckpointSource, path: Path, options: GraphOptions, external: bool) -> list[str]:
    """Build our graph of ``source`` into ``path`` (``model.onnx``). Its weights go to
    ``model.onnx.data`` as each is made, so memory holds one weight at a time; without
    ``external`` they are read back into the one file only at the end (``make_graph`` and
    ``make_model`` copy every initializer: with the weights inside, the 350M shape's export
    peaked at 2.0 GB). Returns the names of the attention MatMuls (activation x activation,
    never quantized)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    data = ExternalData(path.with_name(path.name + ".data"))
    try:
        builder = ModelBuilder(source, GraphWriter(data), options)
        proto = builder.build()
    finally:
        data.close()
    if not external:
        load_external_data_for_model(proto, str(path.parent))
        data.path.unlink()
    onnx.save(proto, str(path))
    return builder.attention_matmuls
