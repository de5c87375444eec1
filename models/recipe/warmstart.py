"""Start training from the shipped model: its int8 ONNX weights back into a Hugging Face CodeGen state dict.

The previous embedded model's fp32 checkpoint was not kept, but its exported graph holds every weight
(MatMul weights int8 with one scale each, the embedding int8 per row, norms and biases fp32). Dequantized,
they are the old model to within int8 rounding, which a few hundred steps of training absorb; this saves
the 77 minutes that model took to train from scratch. ``qkv_proj`` is put back into CodeGen's
``mp_num=4`` interleaved layout (the inverse of the graph builder's ``qkv_weight``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _weight(inits: dict[str, np.ndarray], base: str) -> np.ndarray:
    """A MatMul weight ``[in, out]``: fp32 (``base``) or int8 (``base_quantized`` with scale and zero point)."""
    if base in inits:
        return inits[base]
    q = inits[f"{base}_quantized"].astype(np.float32)
    return (q - inits[f"{base}_zero_point"].astype(np.float32)) * inits[f"{base}_scale"]


# Initializer names of the two graph-builder generations: (embedding int8, its row scales, per-layer
# name of ln_1 / qkv / out_proj / fc_in / fc_out with {i}, ln_f, LM head weight, LM head bias).
NAMES = {
    "model-builder": dict(
        wte="model.embed_tokens.weight_int8",
        wte_scale="model.embed_tokens.scale",
        ln1="model.layers.{i}.ln_1.",
        qkv="model.layers.{i}.attn.qkv.weight",
        out="model.layers.{i}.attn.out_proj.weight",
        fc_in="model.layers.{i}.mlp.fc_in.weight",
        fc_in_b="model.layers.{i}.mlp.fc_in.bias",
        fc_out="model.layers.{i}.mlp.fc_out.weight",
        fc_out_b="model.layers.{i}.mlp.fc_out.bias",
        lnf="model.ln_f.",
        lm="lm_head.weight",
        lm_b="lm_head.bias",
    ),
    "flat": dict(
        wte="wte_int8",
        wte_scale="wte_scale",
        ln1="ln1_{}.{i}",
        qkv="qkv.{i}.w",
        out="out_proj.{i}.w",
        fc_in="fc_in.{i}.w",
        fc_in_b="b_fc_in.{i}",
        fc_out="fc_out.{i}.w",
        fc_out_b="b_fc_out.{i}",
        lnf="lnf_{}",
        lm="w_lm",
        lm_b="b_lm",
    ),
}


def qkv_unfuse(w: np.ndarray, mp_num: int = 4) -> np.ndarray:
    """Rows q | k | v ``[3E, E]`` -> CodeGen's qkv_proj layout ``[mp, (q, v, k), E/mp, E]`` flattened."""
    e = w.shape[1]
    q, k, v = w[:e], w[e : 2 * e], w[2 * e :]
    blocks = np.stack([x.reshape(mp_num, e // mp_num, e) for x in (q, v, k)], axis=1)  # [mp, 3, local, in]
    return blocks.reshape(3 * e, e)


def state_from_onnx(model_dir: Path, n_layer: int) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    n = NAMES["model-builder"] if "model.embed_tokens.weight_int8" in inits else NAMES["flat"]

    def norm(prefix: str, i: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if "{}" in prefix:  # the flat graph: ln1_w.0 / ln1_b.0, lnf_w / lnf_b
            return tuple(inits[prefix.format(x, i=i)] for x in ("w", "b"))  # type: ignore[return-value]
        p = prefix.format(i=i)
        return inits[p + "weight"], inits[p + "bias"]

    sd: dict[str, np.ndarray] = {}
    sd["transformer.wte.weight"] = inits[n["wte"]].astype(np.float32) * inits[n["wte_scale"]]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = norm(n["ln1"], i)
        sd[p + "attn.qkv_proj.weight"] = qkv_unfuse(_weight(inits, n["qkv"].format(i=i)).T)
        sd[p + "attn.out_proj.weight"] = _weight(inits, n["out"].format(i=i)).T
        sd[p + "mlp.fc_in.weight"] = _weight(inits, n["fc_in"].format(i=i)).T
        sd[p + "mlp.fc_in.bias"] = inits[n["fc_in_b"].format(i=i)]
        sd[p + "mlp.fc_out.weight"] = _weight(inits, n["fc_out"].format(i=i)).T
        sd[p + "mlp.fc_out.bias"] = inits[n["fc_out_b"].format(i=i)]
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = norm(n["lnf"])
    sd["lm_head.weight"] = _weight(inits, n["lm"]).T
    sd["lm_head.bias"] = inits[n["lm_b"]]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def load_into(model, model_dir: Path, new_tokens: int) -> None:  # type: ignore[no-untyped-def]
    """Copy the shipped model's weights into ``model``; ``new_tokens`` rows (the FIM tokens) appended to
    the embedding and LM head start from the mean embedding (and a low bias), so they begin as neutral."""
    import torch

    sd = state_from_onnx(model_dir, model.config.n_layer)
    wte, lm_w, lm_b = sd["transformer.wte.weight"], sd["lm_head.weight"], sd["lm_head.bias"]
    if new_tokens:
        rng = np.random.default_rng(0)
        extra = wte.mean(axis=0, keepdims=True) + 0.02 * rng.standard_normal((new_tokens, wte.shape[1]))
        sd["transformer.wte.weight"] = np.concatenate([wte, extra.astype(np.float32)])
        sd["lm_head.weight"] = np.concatenate([lm_w, np.zeros((new_tokens, lm_w.shape[1]), np.float32)])
        sd["lm_head.bias"] = np.concatenate([lm_b, np.full(new_tokens, lm_b.min(), np.float32)])
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"warm start: missing {missing}, unexpected {unexpected}")
