"""The export's runs of the torch model, one layer at a time (a 16B checkpoint never whole in memory).

The int8 KV cache's scales (each channel's largest key/value over the calibration windows) and
the 4-bit cache's check (:mod:`codegen_ls.export.kv_check`: the loss exact, and with each cache's
quantization simulated) need the model's activations. Instead of loading the model, this runs
the windows through transformers' own ``CodeGenBlock``, one layer's weights at a time from the
:class:`~codegen_ls.export.source.CheckpointSource`: the exact stream on every calibration
window (it gives the scales), the int8 and 4-bit streams on the check's windows, each under
:func:`codegen_ls.export.kv_check.quantized_cache`. Memory: one layer's float32 weights and a
few windows of hidden states (at 16B: 1.8 GB and 0.1 GB); the same numbers as the whole model
(:func:`codegen_ls.export.graph_builder.kv_scales` and :func:`codegen_ls.export.kv_check.check`,
which tests compare them with).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np

from codegen_ls.export import kv_check
from codegen_ls.export.graph_builder import KV_HEADROOM, scales_from_peaks
from codegen_ls.export.kv_check import KvCheck
from codegen_ls.export.source import CheckpointSource

Scales = list[tuple[np.ndarray, np.ndarray]]


def run(
    source: CheckpointSource, batches: list[list[int]], check: bool, headroom: float = KV_HEADROOM
) -> tuple[Scales, KvCheck | None]:
    """The int8 cache's per-layer scales from ``batches`` and, with ``check``, what each cache
    costs on the first :data:`kv_check.CHECK_WINDOWS` of them."""
    import torch
    from transformers import CodeGenConfig

    cfg = CodeGenConfig.from_pretrained(str(source.path))
    windows = [torch.tensor([ids]) for ids in batches]
    wte = torch.from_numpy(source.get("transformer.wte.weight"))
    exact = [torch.nn.functional.embedding(ids, wte) for ids in windows]  # [1, T, E] each
    del wte
    n_check = min(kv_check.CHECK_WINDOWS, len(windows)) if check else 0
    streams = {mode: [x.clone() for x in exact[:n_check]] for mode in ("int8", "int4")} if check else {}
    scales: Scales = []
    with torch.no_grad():
        for i in range(int(cfg.n_layer)):
            block = _block(source, cfg, i)
            with _peaks() as peaks:
                exact = [block(x, attention_mask=_causal(x), position_ids=_positions(x))[0] for x in exact]
            scales.append(scales_from_peaks(peaks[0], peaks[1], headroom))
            for mode, hidden in streams.items():
                with kv_check.quantized_cache(SimpleNamespace(config=cfg), mode, scales):
                    streams[mode] = [block(x, attention_mask=_causal(x), position_ids=_positions(x))[0] for x in hidden]
            del block
    if not check:
        return scales, None
    return scales, _score(source, cfg, windows[:n_check], {"exact": exact[:n_check], **streams})


def _block(source: CheckpointSource, cfg: Any, i: int) -> Any:
    """transformers' ``CodeGenBlock`` ``i`` with the checkpoint's weights (built on the meta
    device, so nothing is allocated twice; its two computed tensors made again for real)."""
    import torch
    from transformers.models.codegen.modeling_codegen import CodeGenBlock, create_sinusoidal_positions

    with torch.device("meta"):
        block = CodeGenBlock(cfg, layer_idx=i)
    block.load_state_dict({k: torch.from_numpy(v) for k, v in source.layer(i).items()}, strict=True, assign=True)
    attn = block.attn
    attn.embed_positions = create_sinusoidal_positions(cfg.max_position_embeddings, attn.rotary_dim or attn.embed_dim)
    attn.scale_attn = torch.sqrt(torch.tensor(attn.head_dim, dtype=torch.float32)).to(torch.get_default_dtype())
    return block.eval()


def _positions(x: Any) -> Any:
    import torch

    return torch.arange(x.shape[1])[None]  # [1, T]


def _causal(x: Any) -> Any:
    """The additive causal mask ``[1, 1, T, T]`` exactly as ``CodeGenModel`` makes it (eager attention)."""
    import torch

    t = x.shape[1]
    mask = torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), diagonal=1)
    mask *= torch.arange(t) > torch.arange(t).reshape(-1, 1)
    return mask[None, None]


@contextmanager
def _peaks() -> Iterator[list[np.ndarray]]:
    """While inside, each attention call's keys (after rotary) and values raise the running
    per-channel maxima ``[H, D]`` (yielded as [keys, values], filled in place)."""
    from transformers.models.codegen import modeling_codegen

    original = modeling_codegen.CodeGenAttention._attn
    peaks: list[np.ndarray] = []

    def attn(self: Any, query: Any, key: Any, value: Any, attention_mask: Any = None, head_mask: Any = None) -> Any:
        amax = [t.abs().amax(dim=(0, 2)).float().numpy() for t in (key, value)]  # [H, D]
        peaks[:] = amax if not peaks else [np.maximum(a, b) for a, b in zip(peaks, amax)]
        return original(self, query, key, value, attention_mask, head_mask)

    setattr(modeling_codegen.CodeGenAttention, "_attn", attn)
    try:
        yield peaks
    finally:
        setattr(modeling_codegen.CodeGenAttention, "_attn", original)


def _score(source: CheckpointSource, cfg: Any, windows: list[Any], hidden: dict[str, list[Any]]) -> KvCheck:
    """ln_f and lm_head on each stream's last hidden states: mean loss and next-token agreement."""
    import torch

    f = torch.nn.functional
    ln_w, ln_b = (torch.from_numpy(source.get(f"transformer.ln_f.{n}")) for n in ("weight", "bias"))
    head = torch.from_numpy(source.get("lm_head.weight" if "lm_head.weight" in source else "transformer.wte.weight"))
    bias = torch.from_numpy(source.get("lm_head.bias")) if "lm_head.bias" in source else None
    tokens = sum(int(ids.shape[1]) - 1 for ids in windows)  # positions with a next token
    loss, same, exact_top = {}, {}, []
    with torch.no_grad():
        for mode, states in hidden.items():
            nll = hits = 0.0
            for j, (ids, h) in enumerate(zip(windows, states)):
                h = f.layer_norm(h, (h.shape[-1],), ln_w, ln_b, float(cfg.layer_norm_epsilon))
                logits = f.linear(h, head, bias).to(torch.float32)[0, :-1]  # [T-1, V]
                nll += float(f.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                top = logits.argmax(-1)
                if mode == "exact":
                    exact_top.append(top)
                else:
                    hits += int((top == exact_top[j]).sum())
            loss[mode] = nll / tokens
            if mode != "exact":
                same[mode] = hits / tokens
    return KvCheck(tokens, loss, same)
