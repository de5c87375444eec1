"""What quantizing the KV cache costs a checkpoint: its loss on real text, with and without.

The torch model runs, teacher-forced, on calibration text (standard-library source) three times:
exact, then with its keys (after rotary) and values quantized the way each of the gqa graph's
caches stores them:

* ``int8``: a static scale per channel from the calibration (:func:`graph_builder.kv_scales`),
  round, clip to -128..127;
* ``int4``: keys and queries rotated (:func:`codegen_ls.engine.kvcache.key_rotation`), then each token's
  head vector its own scale (its largest magnitude / 7), round, clip to -8..7; values the same,
  unrotated.

The export's ``--kv-bits auto`` takes the 4-bit cache only where its loss is at most
:data:`KV4_TOLERANCE` above the int8 cache's (about 3 % perplexity), so a checkpoint whose keys do
not survive 4 bits gets the int8 cache. The loss is the measure, not whether the most likely
next token stays the same: that flips wherever two tokens are close to tied, which costs nothing
(on the embedded model the 4-bit cache changes 5 % of them, and its next-token accuracy by 0.4
points). The quantization is simulated on the whole window (the graph keeps a prompt chunk's own
keys exact), so this errs on the side of int8. Needs torch and transformers (the export extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from codegen_ls.engine import kvcache

KV4_TOLERANCE = 0.03  # nats: the 4-bit cache's loss may be this much above the int8 cache's
CHECK_WINDOWS = 2  # calibration windows (of up to 1024 tokens) the check runs on


@dataclass(frozen=True)
class KvCheck:
    """Mean loss (nats per token) and the fraction of positions whose most likely next token
    stays the exact model's, on ``tokens`` positions, by cache."""

    tokens: int
    loss: dict[str, float]  # "exact", "int8", "int4"
    same: dict[str, float]  # "int8", "int4"

    @property
    def four_bit_ok(self) -> bool:
        return self.loss["int4"] <= self.loss["int8"] + KV4_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "loss": {k: round(v, 4) for k, v in self.loss.items()},
            "same_next_token": {k: round(v, 4) for k, v in self.same.items()},
            "tolerance": KV4_TOLERANCE,
        }


def fake_quantize(x: Any, bits: int, scale: Any | None = None) -> Any:
    """``x`` (a torch tensor ``[..., D]``) through a signed ``bits``-bit grid: ``scale`` (static,
    broadcast) or, when None, each row's largest magnitude over the grid's top level, clamped to
    float16's normal range and read back as the float16 the 4-bit cache keeps (the constants of
    :mod:`codegen_ls.engine.kvcache`, whose :func:`~codegen_ls.engine.kvcache.quantize4` is the numpy reference)."""
    import torch

    top = 2 ** (bits - 1) - 1
    if scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True).clamp(min=kvcache.TINY) / top).clamp(
            kvcache.SCALE_MIN, kvcache.SCALE_MAX
        )
        return torch.clamp(torch.round(x / scale), -top - 1, top) * scale.half().float()
    return torch.clamp(torch.round(x / scale), -top - 1, top) * scale


@contextmanager
def quantized_cache(model: Any, mode: str, int8_scales: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[None]:
    """While inside: ``model``'s attention reads its keys and values as the ``mode`` cache
    (``int8`` or ``int4``) would hold them."""
    import torch
    from transformers.models.codegen import modeling_codegen

    original = modeling_codegen.CodeGenAttention._attn
    rotation = torch.from_numpy(kvcache.key_rotation(int(model.config.n_embd // model.config.n_head)))
    scales = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in int8_scales]

    def attn(self: Any, query: Any, key: Any, value: Any, attention_mask: Any = None, head_mask: Any = None) -> Any:
        if mode == "int8":
            k_scale, v_scale = scales[self.layer_idx]
            key, value = fake_quantize(key, 8, k_scale), fake_quantize(value, 8, v_scale)
        else:
            query, key = query @ rotation, fake_quantize(key @ rotation, 4)
            value = fake_quantize(value, 4)
        return original(self, query, key, value, attention_mask, head_mask)

    setattr(modeling_codegen.CodeGenAttention, "_attn", attn)
    try:
        yield
    finally:
        setattr(modeling_codegen.CodeGenAttention, "_attn", original)


def check(model: Any, batches: list[list[int]], int8_scales: list[tuple[np.ndarray, np.ndarray]]) -> KvCheck:
    """Run ``model`` (a transformers ``CodeGenForCausalLM``, fp32, eval) on the first
    :data:`CHECK_WINDOWS` of ``batches``, exact and with each cache's quantization."""
    import torch

    windows = [torch.tensor([ids]) for ids in batches[:CHECK_WINDOWS]]
    tokens = sum(int(ids.shape[1]) - 1 for ids in windows)  # positions with a next token
    loss, same, exact = {}, {}, []
    with torch.no_grad():
        for mode in ("exact", "int8", "int4"):
            nll = hits = 0.0
            with quantized_cache(model, mode, int8_scales) if mode != "exact" else nullcontext():
                for i, ids in enumerate(windows):
                    logits = model(ids).logits[0, :-1]
                    nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                    top = logits.argmax(-1)
                    if mode == "exact":
                        exact.append(top)
                    else:
                        hits += int((top == exact[i]).sum())
            loss[mode] = nll / tokens
            if mode != "exact":
                same[mode] = hits / tokens
    return KvCheck(tokens, loss, same)
