"""``codegen-ls model export``: a Hugging Face CodeGen checkpoint -> a self-contained ONNX model dir.

Pipeline (needs the ``export`` extra: torch, transformers, optimum-onnx; serving never imports it):

1. resolve SRC: a local checkpoint directory, or a hub id downloaded when online;
2. export with past key/values through optimum-onnx (``text-generation-with-past``);
3. int8 dynamic quantization with ``onnxruntime.quantization`` (``--no-quantize`` keeps fp32);
   models over 2 GB use ONNX external data;
4. write ``tokenizer.json`` and ``manifest.json`` (shapes, special ids, checksums).

Only safe weight formats are loaded: safetensors, or ``torch.load(weights_only=True)`` which
transformers uses for ``.bin`` files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.modeldir import Manifest, read_manifest, sha256, write_manifest

WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")


def _step(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resolve_source(src: str) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{src} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CodegenLsError(f"checkpoint directory not found: {src}")
    try:
        from huggingface_hub import snapshot_download

        _step(f"downloading {src} from the Hugging Face hub ...")
        local = snapshot_download(src, allow_patterns=list(WEIGHT_PATTERNS) + ["*.bin"])
    except Exception as exc:  # offline, unknown repo, auth: one clear line
        reason = type(exc).__name__
        raise CodegenLsError(
            f"cannot download '{src}' ({reason}): no network or unknown model id; "
            "download the checkpoint elsewhere and pass its local directory"
        ) from None
    return Path(local)


def _check_config(src: Path) -> dict:
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "codegen":
        raise ModelError(f"{src} is a '{config.get('model_type')}' checkpoint; only CodeGen is supported")
    has_safe = any(src.glob("*.safetensors"))
    has_bin = any(src.glob("*.bin"))
    if not (has_safe or has_bin):
        raise ModelError(f"{src} has no weights (*.safetensors or *.bin)")
    return config


def _save_tokenizer(src: Path, out: Path) -> None:
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


def quantize(src_onnx: Path, dst_onnx: Path, external_data: bool) -> None:
    """Weight-only int8 dynamic quantization of every MatMul/Gemm (per-tensor, signed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src_onnx), str(dst_onnx), weight_type=QuantType.QInt8, per_channel=False,
        op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=external_data,
    )


def export(src: str, out: Path, quantize_int8: bool = True, force: bool = False) -> Manifest:
    """Export ``src`` into ``out`` and return the manifest written there."""
    t0 = time.time()
    source = _resolve_source(src)
    config = _check_config(source)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CodegenLsError(f"output directory is not empty: {out} (use --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise CodegenLsError("export needs the export extra: pip install 'codegen-ls[export]' torch==2.13.0") from None

    with tempfile.TemporaryDirectory(prefix="codegen-ls-export-") as tmp:
        tmp_dir = Path(tmp)
        _step(f"[1/3] exporting {source} to ONNX with past key/values (optimum) ...")
        main_export(str(source), output=tmp_dir, task="text-generation-with-past",
                    do_validation=False, no_post_process=False, device="cpu")
        exported = tmp_dir / "model.onnx"
        external = any(p.name != "model.onnx" and p.name.startswith("model.onnx") for p in tmp_dir.iterdir()) \
            or sum(p.stat().st_size for p in tmp_dir.glob("model.onnx*")) > 1_800_000_000
        if quantize_int8:
            _step("[2/3] int8 dynamic quantization (onnxruntime.quantization) ...")
            quantize(exported, out / "model.onnx", external)
        else:
            _step("[2/3] keeping fp32 weights (--no-quantize)")
            for p in tmp_dir.glob("model.onnx*"):
                shutil.copyfile(p, out / p.name)
    _step("[3/3] writing tokenizer.json and manifest.json ...")
    _save_tokenizer(source, out)
    n_head = int(config["n_head"])
    files = {p.name: sha256(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest = Manifest(
        architecture="codegen",
        vocab_size=int(config["vocab_size"]),
        context_length=int(config.get("n_positions") or config.get("n_ctx") or 2048),
        n_layer=int(config["n_layer"]),
        n_head=n_head,
        head_dim=int(config["n_embd"]) // n_head,
        bos_token_id=int(config.get("bos_token_id") or 0),
        eos_token_id=int(config.get("eos_token_id") or 0),
        quantization="int8-dynamic" if quantize_int8 else "none",
        source=str(src),
        files=files,
        name=Path(str(src).rstrip("/")).name,
        extra={"rotary_dim": config.get("rotary_dim"), "n_embd": config.get("n_embd"),
               "exported_with": _versions(), "export_seconds": round(time.time() - t0, 1)},
    )
    write_manifest(out, manifest)
    read_manifest(out)
    _step(f"done in {time.time() - t0:.1f}s: {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")
    return manifest


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    result = {}
    for name in ("torch", "transformers", "optimum-onnx", "onnxruntime", "onnx"):
        try:
            result[name] = version(name)
        except PackageNotFoundError:
            pass
    return result


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
