"""Train the embedded default model: a small CodeGen on the stdlib and third-party Python, with FIM.

One command, resumable, deterministic (this release's run)::

    pip install -e '.[export]' torch==2.13.0
    python models/recipe/train.py --out build/train --corpus build/corpus --init models/codegen-ls-small \
        --steps 750 --warmup 50 --lr 1e-3 --eval-every 50

Steps (each skipped when its output already exists, so a rerun resumes):

1. corpus   -- ``corpus.py``: the stdlib's ``.py`` files (the ``HELDOUT`` modules and their tests kept
               out) plus pinned, permissively licensed sdists from PyPI, filtered and deduplicated; the
               reserved packages (click, requests) refused by name and by content; EVAL and CALIB
               packages held out.
2. tokenizer -- with ``--init``: that model's tokenizer plus the three FIM tokens (``codegen_ls.engine.fim``);
               without: byte-level BPE trained here (whitespace runs with the newline in front are
               single tokens, as in CodeGen's own tokenizer).
3. tokens   -- every file encoded and packed into one stream, files separated by ``<|endoftext|>``.
4. train    -- ``CodeGenForCausalLM``, from ``--init`` (the shipped model's int8 weights dequantized:
               ``warmstart.py``) or from scratch; bf16 autocast, AdamW, warmup + cosine; random
               1024-token windows, ``--fim-rate`` of them turned into FIM samples (PSM and SPM, half
               each: ``fim_row``); a checkpoint every ``--ckpt-every`` steps (``ckpt.pt``, resumed
               automatically) and the final model in Hugging Face format under ``OUT/final``.
               ``--device cuda`` runs the same recipe on a GPU (never required; carry ``OUT`` with a
               ``train.npy`` cut by ``--max-train-tokens`` to fit a 64 MiB transfer).

Export the result with ``codegen-ls model export OUT/final OUT/model --name codegen-ls-small --kv-bits 8``
(the int8 cache: the embedded model ships to every CPU) and copy ``model.onnx``, ``tokenizer.json`` and
``manifest.json`` into ``models/codegen-ls-small``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # corpus.py, warmstart.py

EOS = "<|endoftext|>"

# Held-out stdlib modules: never trained on, used for validation loss and the completion eval.
HELDOUT = [
    "argparse.py",
    "csv.py",
    "textwrap.py",
    "shlex.py",
    "fractions.py",
    "heapq.py",
    "difflib.py",
    "calendar.py",
    "configparser.py",
    "dataclasses.py",
    "json",
]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel: Path) -> bool:
    """True for a held-out module, a file inside a held-out package, or its test module."""
    parts = rel.parts
    for name in HELDOUT:
        stem = name[:-3] if name.endswith(".py") else name
        if parts[0] == name:  # top-level module or package
            return True
        if "test" in parts[:-1] or parts[0] == "test":
            if any(p in (f"test_{stem}.py", f"test_{stem}") for p in parts):
                return True
    return False


def list_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(train, heldout) .py files under the stdlib, sorted, site-packages and huge files excluded."""
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts:
            continue
        if path.stat().st_size > 400_000:  # generated tables (pydoc_data/topics.py, ...)
            continue
        (held if is_heldout(rel) else train).append(path)
    return train, held


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_files() -> list[tuple[str, str, str]]:
    """(path, text, split) of the stdlib part of the corpus: split ``train`` or ``heldout``."""
    root = stdlib_dir()
    train_files, held_files = list_files(root)
    out = []
    for files, split in ((train_files, "train"), (held_files, "heldout")):
        for path in files:
            text = read(path)
            if text:
                out.append((str(path.relative_to(root)), text, split))
    return out


def build_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.save(str(out))


def encode_all(tok_path: Path, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


FIM_TOKENS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]  # StarCoder's names; the export detects them


def prepare(out: Path, args: argparse.Namespace) -> dict:
    """Corpus (corpus.py), tokenizer (the init model's plus the FIM tokens, or trained here), token streams."""
    meta_path = out / "data.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    import corpus as corpus_mod

    files_path = args.corpus / "files.jsonl"
    if not files_path.exists():
        corpus_mod.build(args.corpus, stdlib_files())
    docs = [json.loads(line) for line in files_path.read_text().splitlines()]
    by_split = {s: [d["text"] for d in docs if d["split"] == s] for s in ("train", "heldout", "eval")}
    rng = random.Random(args.seed)
    rng.shuffle(by_split["train"])  # packages and the stdlib interleaved in the packed stream
    tok_path = out / "tokenizer.json"
    if args.init:
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_file(str(args.init / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM_TOKENS])
        tok.save(str(tok_path))
    else:
        build_tokenizer(by_split["train"], args.vocab, tok_path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
    for split, name in (("train", "train"), ("heldout", "val"), ("eval", "val_eval")):
        ids = encode_all(tok_path, by_split[split])
        if split == "train" and args.max_train_tokens:  # e.g. 32M tokens = 64 MiB of uint16 to carry to a GPU box
            ids = ids[: args.max_train_tokens]
        np.save(out / f"{name}.npy", ids)
    summary = json.loads((args.corpus / "corpus.json").read_text())
    meta = {
        "corpus": str(args.corpus),
        "packages": summary["packages"],
        "train_files": len(by_split["train"]),
        "train_bytes": sum(len(t.encode()) for t in by_split["train"]),
        "train_tokens": int(len(np.load(out / "train.npy"))),
        "val_tokens": int(len(np.load(out / "val.npy"))),
        "val_eval_tokens": int(len(np.load(out / "val_eval.npy"))),
        "vocab_size": vocab,
        "excluded": summary["excluded"],
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    print(json.dumps({k: v for k, v in meta.items() if k != "packages"}))
    return meta


def fim_row(row: np.ndarray, rng: np.random.Generator, ids: dict[str, int], eos: int) -> np.ndarray:
    """Fill-in-the-middle on the longest document piece of a window (same length out).

    PSM: ``<fim_prefix> p <fim_suffix> s <fim_middle> m <eos>``; SPM (StarCoder's variant):
    ``<fim_prefix><fim_suffix> s <fim_middle> p m <eos>`` -- the form the engine sends, since typing
    only extends its end. Half of the middles are short (up to 48 tokens: the rest of a line or a few
    lines, what the editor asks for), half are any length.
    """
    n = len(row)
    cuts = [-1] + [int(i) for i in np.flatnonzero(row == eos)] + [n]
    a, b = max(zip(cuts[:-1], cuts[1:]), key=lambda ab: ab[1] - ab[0])
    piece = row[a + 1 : b]
    if len(piece) < 16:
        return row
    i = int(rng.integers(0, len(piece)))
    span = int(rng.integers(1, 49)) if rng.random() < 0.5 else int(rng.integers(1, len(piece) - i + 1))
    j = min(len(piece), i + span)
    pre, mid, suf = piece[:i], piece[i:j], piece[j:]
    P, M, S = ids["<fim_prefix>"], ids["<fim_middle>"], ids["<fim_suffix>"]
    if rng.random() < 0.5:
        fim = np.concatenate([[P], pre, [S], suf, [M], mid, [eos]])
    else:
        fim = np.concatenate([[P, S], suf, [M], pre, mid, [eos]])
    return np.concatenate([row[: a + 1], fim, row[b:]])[:n].astype(row.dtype)


def patch_fast_attention() -> None:
    """Training-only speed-up: CodeGen's eager attention through SDPA (same math, causal)."""
    import torch.nn.functional as F
    from transformers.models.codegen import modeling_codegen as mc

    def _attn(self, query, key, value, attention_mask=None, head_mask=None):  # type: ignore[no-untyped-def]
        dt = value.dtype
        out = F.scaled_dot_product_attention(query.to(dt), key.to(dt), value, is_causal=True)
        return out, None

    mc.CodeGenAttention._attn = _attn


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm
    from transformers import CodeGenConfig, CodeGenForCausalLM, PreTrainedTokenizerFast

    out: Path = args.out
    meta = prepare(out, args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)  # "cuda" on a GPU machine: same recipe, bf16 autocast there too
    patch_fast_attention()

    train_ids = torch.from_numpy(np.load(out / "train.npy").astype(np.int64))
    val_ids = torch.from_numpy(np.load(out / "val.npy").astype(np.int64))
    val_eval_ids = torch.from_numpy(np.load(out / "val_eval.npy").astype(np.int64))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    special = {t: tokenizer.token_to_id(t) for t in [EOS, *FIM_TOKENS]}
    cfg = CodeGenConfig(
        vocab_size=meta["vocab_size"],
        n_positions=2048,
        n_ctx=2048,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        rotary_dim=args.rotary_dim,
        n_inner=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = CodeGenForCausalLM(cfg)
    if args.init and not (out / "ckpt.pt").exists():
        from warmstart import load_into

        load_into(model, args.init, meta["vocab_size"] - 8192)
        print(f"warm start from {args.init}")
    model.to(dev)  # before the optimizer: its state follows the parameters' device
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    ckpt_path = out / "ckpt.pt"
    step, log = 0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, log = ck["step"], ck["log"]
        print(f"resumed from step {step}")
    vrng = np.random.default_rng(1234)
    val_sets = {
        "val_loss": (val_ids, vrng.integers(0, len(val_ids) - args.seq - 1, size=args.val_windows)),
        "val_eval_loss": (val_eval_ids, vrng.integers(0, len(val_eval_ids) - args.seq - 1, size=args.val_windows)),
    }
    fwd = torch.compile(model) if args.compile else model

    def evaluate() -> dict[str, float]:
        """Plain next-token loss on the held-out stdlib modules and on the EVAL packages."""
        model.eval()
        res = {}
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            for key, (ids, starts) in val_sets.items():
                losses = []
                for i in range(0, len(starts), args.batch):
                    x = torch.stack([ids[s : s + args.seq] for s in starts[i : i + args.batch]]).to(dev)
                    losses.append(float(model(input_ids=x, labels=x).loss))
                res[key] = round(float(np.mean(losses)), 4)
        model.train()
        return res

    def save(final: bool = False) -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, ckpt_path)
        if final or args.save_hf_every:
            hf = out / ("final" if final else "latest")
            model.save_pretrained(hf, safe_serialization=True)
            tok = PreTrainedTokenizerFast(
                tokenizer_file=str(out / "tokenizer.json"),
                bos_token=EOS,
                eos_token=EOS,
                unk_token=EOS,
                model_max_length=2048,
            )
            tok.save_pretrained(hf)
            (hf / "training.json").write_text(
                json.dumps(
                    {
                        "step": step,
                        "params": n_params,
                        "tokens_seen": step * args.batch * args.seq,
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "data": {k: v for k, v in meta.items() if k != "packages"},
                        "packages": meta.get("packages", []),
                        "log": log,
                    },
                    indent=1,
                )
            )

    print(
        f"model: {n_params / 1e6:.2f}M params; {meta['train_tokens']} train tokens; "
        f"{args.steps} steps x {args.batch}x{args.seq} tokens"
    )
    model.train()
    t_start = time.time()
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, mininterval=5)
    train_np = train_ids.numpy()
    if step == 0 and args.init:
        log.append({"step": 0, **evaluate()})
        print(f"before training: {log[-1]}")
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])  # per step: a resumed run sees the same data
        starts = rng.integers(0, len(train_np) - args.seq - 1, size=args.batch)
        rows = [train_np[s : s + args.seq] for s in starts]
        rows = [fim_row(r, rng, special, special[EOS]) if rng.random() < args.fim_rate else r for r in rows]
        x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        t0 = time.time()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        entry = {
            "step": step,
            "loss": round(float(loss), 4),
            "tok_s": round(x.numel() / dt),
            "elapsed_s": round(time.time() - t_start),
        }
        if step % args.eval_every == 0 or step == args.steps:
            entry.update(evaluate())
        log.append(entry)
        bar.set_postfix(
            loss=entry["loss"],
            val=entry.get("val_loss", ""),
            val3p=entry.get("val_eval_loss", ""),
            tok_s=entry["tok_s"],
        )
        bar.update(1)
        if step % args.ckpt_every == 0 and step < args.steps:
            save()
    bar.close()
    save(final=True)
    print(f"done: {step} steps, final val loss {log[-1].get('val_loss')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("build/train"))
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rotary-dim", type=int, default=24)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--save-hf-every", action="store_true", default=True, help="also refresh OUT/latest at checkpoints")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--corpus", type=Path, default=Path("build/corpus"), help="corpus.py's cache folder")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this exported model dir (its tokenizer plus the FIM tokens); default: from scratch",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is (never required)")
    p.add_argument(
        "--max-train-tokens",
        type=int,
        default=0,
        help="cut the packed training stream (0: all); 33554432 tokens = 64 MiB of uint16",
    )
    p.add_argument("--fim-rate", type=float, default=0.5, help="share of training windows turned into FIM samples")
    args = p.parse_args()
    random.seed(args.seed)
    if args.prepare_only:
        prepare(args.out, args)
        return
    train(args)


if __name__ == "__main__":
    main()
