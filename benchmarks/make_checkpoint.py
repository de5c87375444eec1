"""A random-weight CodeGen checkpoint of a real size, written shard by shard (a few layers at a time).

transformers would build the whole model in memory first (11 GB for codegen-2B's shape in
float32); this writes safetensors shards and their index directly, with weights as transformers
initializes them (normal 0.02; biases 0; LayerNorm 1, 0), the EOS logit's bias at -1e4 (decoding
always runs to its length, as :func:`codegen_ls.export.pipeline.random_checkpoint`), the
config from ``CodeGenConfig`` and the embedded model's ``tokenizer.json``::

    python benchmarks/make_checkpoint.py --shape 2b /work/cache/ckpt/r2b      # 11 GB, ~1.5 GB of memory
    python benchmarks/make_checkpoint.py --shape 350m /work/cache/ckpt/r350m --layers-per-shard 0
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # the real checkpoints' shapes (n_embd, n_layer, n_head, rotary_dim); vocab 51200, 2048 positions
    "350m": (1024, 20, 16, 32),
    "2b": (2560, 32, 32, 64),
    "6b": (4096, 33, 16, 64),
    "16b": (6144, 34, 24, 64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    ap.add_argument("--layers-per-shard", type=int, default=4, help="0: one model.safetensors")
    args = ap.parse_args()
    from safetensors.numpy import save_file
    from transformers import CodeGenConfig

    e, n_layer, n_head, rd = SHAPES[args.shape]
    vocab, out = 51200, args.out
    out.mkdir(parents=True, exist_ok=True)
    CodeGenConfig(
        vocab_size=vocab,
        n_positions=2048,
        n_ctx=2048,
        n_embd=e,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=rd,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        architectures=["CodeGenForCausalLM"],
    ).save_pretrained(out)
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def layer(i: int) -> dict[str, np.ndarray]:
        p = f"transformer.h.{i}."
        return {
            p + "ln_1.weight": np.ones(e, np.float32),
            p + "ln_1.bias": np.zeros(e, np.float32),
            p + "attn.qkv_proj.weight": normal(3 * e, e),
            p + "attn.out_proj.weight": normal(e, e),
            p + "mlp.fc_in.weight": normal(4 * e, e),
            p + "mlp.fc_in.bias": np.zeros(4 * e, np.float32),
            p + "mlp.fc_out.weight": normal(e, 4 * e),
            p + "mlp.fc_out.bias": np.zeros(e, np.float32),
        }

    head_bias = np.zeros(vocab, np.float32)
    head_bias[0] = -1e4
    head = {
        "transformer.ln_f.weight": np.ones(e, np.float32),
        "transformer.ln_f.bias": np.zeros(e, np.float32),
        "lm_head.weight": normal(vocab, e),
        "lm_head.bias": head_bias,
    }
    step = args.layers_per_shard or n_layer
    groups = [list(range(s, min(n_layer, s + step))) for s in range(0, n_layer, step)]
    weight_map: dict[str, str] = {}
    total = 0
    for k, layers in enumerate(groups + [[]]):
        tensors = {"transformer.wte.weight": normal(vocab, e)} if k == 0 else {}
        for i in layers:
            tensors.update(layer(i))
        if k == len(groups) or not args.layers_per_shard:
            tensors.update(head)
        if not tensors:
            continue
        name = (
            "model.safetensors"
            if not args.layers_per_shard
            else f"model-{k + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        )
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(a.nbytes for a in tensors.values())
        print(f"wrote {name}", flush=True)
        if not args.layers_per_shard:
            break
    if args.layers_per_shard:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    shutil.copyfile(REPO / "models" / "codegen-ls-small" / "tokenizer.json", out / "tokenizer.json")
    print(f"{out}: {total / 1e9:.2f} GB of float32 weights")


if __name__ == "__main__":
    main()
