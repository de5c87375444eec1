"""The checkpoint an export starts from: found (a local directory, or a hub id downloaded when
online), checked (a CodeGen config; weights as safetensors, or ``.bin`` that load with
``weights_only``), its tokenizer copied out; and random checkpoints of a given shape for tests
and benchmarks.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.export.progress import step

WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")


def resolve_source(src: str) -> Path:
    """``src`` as a local checkpoint directory: itself, or a hub id's download (safetensors first)."""
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{src} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CodegenLsError(f"checkpoint directory not found: {src}")
    return _download(src)


def _download(src: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        step(f"downloading {src} from the Hugging Face hub ...")
        local = Path(snapshot_download(src, allow_patterns=list(WEIGHT_PATTERNS)))
        if not any(local.glob("*.safetensors")):  # no safetensors: PyTorch .bin (loaded weights_only)
            local = Path(snapshot_download(src, allow_patterns=[*WEIGHT_PATTERNS, "*.bin"]))
    except LocalEntryNotFoundError:
        raise CodegenLsError(
            f"cannot download '{src}': the Hugging Face hub is not reachable (offline?) and it is not "
            "in the local cache; download the checkpoint elsewhere and pass its local directory"
        ) from None
    except Exception as exc:  # unknown repo, gated, auth, HTTP errors: one clear line
        raise CodegenLsError(
            f"cannot download '{src}' ({type(exc).__name__}): unknown, private or gated "
            "model id; pass a local checkpoint directory instead"
        ) from None
    return local


def check_config(src: Path) -> dict:
    """The checkpoint's ``config.json``, once it is known to be CodeGen with safe weights."""
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "codegen":
        raise ModelError(f"{src} is a '{config.get('model_type')}' checkpoint; only CodeGen is supported")
    has_safe = any(src.glob("*.safetensors"))
    has_bin = any(src.glob("*.bin"))
    if not (has_safe or has_bin):
        raise ModelError(f"{src} has no weights (*.safetensors or *.bin)")
    if not has_safe:
        check_pickled_weights(src)
    return config


def check_pickled_weights(src: Path) -> None:
    """Open every ``*.bin`` with ``torch.load(weights_only=True)`` (tensors only, no code runs).

    transformers loads them the same way; checking first turns a refused pickle into one clear
    line instead of its fallback errors.
    """
    import torch

    for path in sorted(src.glob("*.bin")):
        try:
            torch.load(str(path), map_location="meta", weights_only=True)
        except Exception as exc:
            # torch's own text advises retrying with weights_only=False: we never do (and never say so)
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
            why = next(
                (ln for ln in lines if re.search(r"unsupported|global", ln, re.I) and "weights_only" not in ln),
                "it holds objects other than tensors",
            )
            why = why.removeprefix("WeightsUnpickler error: ").split(". Please")[0].rstrip(".")
            raise ModelError(
                f"{path} is not a plain PyTorch weights file ({why}): codegen-ls reads .bin weights "
                "only with torch.load(weights_only=True), never without it, because unpickling such a "
                "file can run any code on this machine; use the checkpoint's safetensors, or convert "
                "it to safetensors where you trust its source"
            ) from None


def save_tokenizer(src: Path, out: Path) -> None:
    """``out/tokenizer.json``: the checkpoint's own, or its tokenizer converted by transformers."""
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


@dataclass(frozen=True)
class RandomCheckpoint:
    """The shape and details of a random-weight CodeGen (see :func:`random_checkpoint`)."""

    vocab_size: int = 8192
    n_positions: int = 2048
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    rotary_dim: int = 8
    tokenizer: Path | None = None  # a tokenizer.json copied next to the weights (the vocabulary grows to it)
    eos_token_id: int = 0
    suppress_eos: bool = True  # a -1e4 bias on the EOS logit: decoding always runs to its length
    seed: int = 0
    safetensors: bool = True  # else PyTorch .bin


def random_checkpoint(out: Path, spec: RandomCheckpoint | None = None, **fields: Any) -> Path:
    """Save a random-weight ``CodeGenForCausalLM`` of the given shape (tests and benchmarks).

    ``spec`` (:class:`RandomCheckpoint`), with keyword ``fields`` replacing its fields
    (``random_checkpoint(out, n_layer=4)``). ``vocab_size`` grows to the tokenizer's size where
    it is larger (its added tokens: FIM); ``suppress_eos`` makes benchmarks stable and
    token-for-token comparisons run to their length.
    """
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    spec = replace(spec or RandomCheckpoint(), **fields)
    vocab_size = spec.vocab_size
    if spec.tokenizer is not None:
        from tokenizers import Tokenizer as HFTokenizer

        vocab_size = max(vocab_size, HFTokenizer.from_file(str(spec.tokenizer)).get_vocab_size())
    config = CodeGenConfig(
        vocab_size=vocab_size,
        n_positions=spec.n_positions,
        n_ctx=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        rotary_dim=spec.rotary_dim,
        bos_token_id=spec.eos_token_id,
        eos_token_id=spec.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = CodeGenForCausalLM(config).eval()
    if spec.suppress_eos:
        with torch.no_grad():
            model.lm_head.bias[spec.eos_token_id] = -1e4
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=spec.safetensors)
    if spec.tokenizer is not None:
        shutil.copyfile(spec.tokenizer, out / "tokenizer.json")
    return out
