"""What a smaller KV cache would cost: teacher-forced loss and next-token accuracy of a CodeGen
checkpoint with its keys and values fake-quantized the way the gqa graph quantizes its int8 cache
(static per-channel scales from the export's calibration: the largest magnitude x 1.25), at 8
and 4 bits, and with a scale per token and head instead (what ``--kv-bits 4`` stores: max|x| / 7,
round, clip to -8..7), with the keys as they are and rotated as the export stores them, on the
first 1024 tokens of held-out standard-library modules (the eval's); then the attention scores'
error from 4-bit keys, per layer, unrotated and rotated. The export's ``--kv-bits auto`` runs a
shorter check itself (``codegen_ls.export.kv_check``: the loss with each cache, on 2048 tokens) before
it picks the 4-bit cache; this is the longer look, on held-out text.

    python benchmarks/eval_kv_bits.py build/train/final     # the embedded model's checkpoint
                                                            # (models/recipe/train.py makes it)
Needs the export extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from codegen_ls.export import kv_check  # noqa: E402
from codegen_ls.export.graph_builder import KV_HEADROOM, kv_scales  # noqa: E402
from codegen_ls.export.pipeline import calibration_batches  # noqa: E402
from eval_completion import heldout_files  # noqa: E402

TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import CodeGenForCausalLM
    from transformers.models.codegen import modeling_codegen

    model = CodeGenForCausalLM.from_pretrained(str(args.checkpoint)).eval()
    cfg = model.config
    tok = Tokenizer.from_file(
        str(args.checkpoint / "tokenizer.json") if (args.checkpoint / "tokenizer.json").is_file() else str(TOKENIZER)
    )
    batches = calibration_batches(TOKENIZER, int(cfg.n_positions), int(cfg.vocab_size))
    # per layer and channel: the calibration's largest magnitude (the int8 scale times 127 / headroom)
    peaks = [(k * 127 / KV_HEADROOM, v * 127 / KV_HEADROOM) for k, v in kv_scales(model, batches)]
    # (key bits, value bits, scales): "static" per channel as the gqa graph's cache; "token": each
    # token's head vector its own scale (its largest magnitude), as a cache storing a scale per row would
    mode: list[tuple[int, int, str] | None] = [None]
    original = modeling_codegen.CodeGenAttention._attn

    def fake_quantize(x: Any, peak: np.ndarray, bits: int, scales: str) -> Any:  # the export's check's (kv_check)
        static = (
            torch.from_numpy(np.maximum(peak * KV_HEADROOM, 1e-6) / (2 ** (bits - 1) - 1))
            if scales == "static"
            else None
        )
        return kv_check.fake_quantize(x, bits, static)

    from codegen_ls.engine.kvcache import key_rotation

    rot = torch.from_numpy(key_rotation(int(cfg.n_embd // cfg.n_head)))

    score_error: dict[str, list[list[float]]] = {
        "token": [[] for _ in range(cfg.n_layer)],
        "rotated": [[] for _ in range(cfg.n_layer)],
    }

    def attn(self: Any, query: Any, key: Any, value: Any, attention_mask: Any = None, head_mask: Any = None) -> Any:
        if mode[0] is None:  # the scores' error of 4-bit keys with a scale per token, unrotated and rotated
            exact = query @ key.transpose(-1, -2)
            for name, (q, k) in (("token", (query, key)), ("rotated", (query @ rot, key @ rot))):
                err = q @ fake_quantize(k, peaks[self.layer_idx][0], 4, "token").transpose(-1, -2) - exact
                score_error[name][self.layer_idx].append(float(err.pow(2).mean() / exact.pow(2).mean()))
        if mode[0]:  # keys (after rotary) and values as the cache would hold them
            k_bits, v_bits, scales = mode[0]
            if scales == "rotated":  # q.k = (qR).(kR): the rotation spreads the keys' outlier channels
                query, key = query @ rot, key @ rot
            key = fake_quantize(key, peaks[self.layer_idx][0], k_bits, scales)
            value = fake_quantize(value, peaks[self.layer_idx][1], v_bits, scales)
        return original(self, query, key, value, attention_mask, head_mask)

    modeling_codegen.CodeGenAttention._attn = attn
    files = heldout_files(False)[: args.files]
    print("| KV cache (keys / values) | bytes per cached value | loss | next-token accuracy |\n|---|---:|---:|---:|")
    for m in (
        None,
        (8, 8, "static"),
        (8, 4, "static"),
        (4, 4, "static"),
        (8, 4, "token"),
        (4, 4, "token"),
        (4, 4, "rotated"),
    ):
        mode[0] = m
        nll = hits = count = 0.0
        for f in files:
            ids = tok.encode(f.read_text(errors="replace")).ids[: args.tokens]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(ids[1:])
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            hits += (logits.argmax(-1) == target).sum().item()
            count += len(target)
        name = (
            "fp32"
            if m is None
            else f"int{m[0]} / int{m[1]}, token scales, rotated keys"
            if m[2] == "rotated"
            else f"int{m[0]} / int{m[1]}, {m[2]} scales"
        )
        size = 4.0 if m is None else (m[0] + m[1]) / 16 + (4 / int(cfg.n_embd // cfg.n_head) if m[2] != "static" else 0)
        print(f"| {name} | {size:.2f} | {nll / count:.4f} | {100 * hits / count:.2f} % |", flush=True)
    print(
        f"\n{int(count)} tokens of {len(files)} held-out files; command: `python benchmarks/eval_kv_bits.py "
        f"{' '.join(sys.argv[1:])}`"
    )
    print(
        "\nThe attention scores' error with 4-bit keys (a scale per token), relative mean square, per layer "
        "(mean over the files):\n\n| keys | "
        + " | ".join(f"layer {i}" for i in range(cfg.n_layer))
        + " |\n|---|"
        + "---:|" * cfg.n_layer
    )
    for name in ("token", "rotated"):
        label = "as they are" if name == "token" else "rotated (what `--kv-bits 4` stores)"
        print(f"| {label} | " + " | ".join(f"{np.mean(e):.4f}" for e in score_error[name]) + " |")


if __name__ == "__main__":
    main()
