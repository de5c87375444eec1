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


def _dequant(inits: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A MatMul weight ``[in, out]``: fp32 as is, or int8 with scale and zero point."""
    if f"{name}.w" in inits:
        return inits[f"{name}.w"]
    base = f"{name}.w" if f"{name}.w_quantized" in inits else name  # the LM head is "w_lm_quantized"
    q = inits[f"{base}_quantized"].astype(np.float32)
    return (q - inits[f"{base}_zero_point"].astype(np.float32)) * inits[f"{base}_scale"]


def qkv_unfuse(w: np.ndarray, mp_num: int = 4) -> np.ndarray:
    """Rows q | k | v ``[3E, E]`` -> CodeGen's qkv_proj layout ``[mp, (q, v, k), E/mp, E]`` flattened."""
    e = w.shape[1]
    q, k, v = w[:e], w[e:2 * e], w[2 * e:]
    blocks = np.stack([x.reshape(mp_num, e // mp_num, e) for x in (q, v, k)], axis=1)  # [mp, 3, local, in]
    return blocks.reshape(3 * e, e)


def state_from_onnx(model_dir: Path, n_layer: int) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    sd: dict[str, np.ndarray] = {}
    sd["transformer.wte.weight"] = inits["wte_int8"].astype(np.float32) * inits["wte_scale"]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = inits[f"ln1_w.{i}"], inits[f"ln1_b.{i}"]
        sd[p + "attn.qkv_proj.weight"] = qkv_unfuse(_dequant(inits, f"qkv.{i}").T)
        sd[p + "attn.out_proj.weight"] = _dequant(inits, f"out_proj.{i}").T
        sd[p + "mlp.fc_in.weight"] = _dequant(inits, f"fc_in.{i}").T
        sd[p + "mlp.fc_in.bias"] = inits[f"b_fc_in.{i}"]
        sd[p + "mlp.fc_out.weight"] = _dequant(inits, f"fc_out.{i}").T
        sd[p + "mlp.fc_out.bias"] = inits[f"b_fc_out.{i}"]
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = inits["lnf_w"], inits["lnf_b"]
    sd["lm_head.weight"] = (inits["w_lm"] if "w_lm" in inits else _dequant(inits, "w_lm")).T
    sd["lm_head.bias"] = inits["b_lm"]
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
