"""The ``manifest.json`` an export writes: the checkpoint's shapes and special ids, the files'
checksums, the graph kind and KV-cache format the engine picks its backend by, and what the
export ran with."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from codegen_ls.engine import kernels, kvcache
from codegen_ls.engine.fim import detect as detect_fim
from codegen_ls.engine.modeldir import Manifest, read_manifest, sha256, write_manifest
from codegen_ls.export.kv_check import KvCheck
from codegen_ls.export.progress import step


@dataclass
class ExportRecord:
    """What an export made: from ``src`` (named ``name``, or the source's last path component),
    its weights' ``quantization``, ``graph`` kind and ``kv_dtype``; ``checked``: the 4-bit
    check's result (``--kv-bits auto``); ``t0``: when it started."""

    src: str
    quantization: str
    graph: str
    kv_dtype: str
    t0: float
    name: str | None = None
    checked: KvCheck | None = None


def write_export_manifest(out: Path, config: dict, record: ExportRecord) -> Manifest:
    """Write ``out/manifest.json`` for the files now in ``out``, read it back, and return it."""
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
        quantization=record.quantization,
        source=str(record.src),
        files=files,
        name=record.name or Path(str(record.src).rstrip("/")).name,
        extra=_extra(config, record),
        fim=fim.to_json() if (fim := detect_fim(out / "tokenizer.json")) is not None else {},
    )
    write_manifest(out, manifest)
    read_manifest(out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    step(f"done in {time.time() - record.t0:.1f}s: {out} ({size:.1f} MB)")
    return manifest


def _extra(config: dict, record: ExportRecord) -> dict:
    extra = {
        "graph": record.graph,
        "kv_dtype": record.kv_dtype,
        "rotary_dim": config.get("rotary_dim"),
        "n_embd": config.get("n_embd"),
        "exported_with": _versions(),
        "export_seconds": round(time.time() - record.t0, 1),
    }
    if record.graph == "gqa" and record.kv_dtype == "int8":  # its decode branch is our op (with a GQA function body)
        extra["decode_attention"] = kernels.OP
    if record.graph == "gqa" and record.kv_dtype == "int4":  # our op, which only our kernel implements
        extra["decode_attention"] = kernels.OP4
        extra.update(kvcache.manifest_flags())  # the format: keys stored as kR, rows in the kernel's order
    if record.checked is not None:  # --kv-bits auto: what the 4-bit cache cost the checkpoint
        extra["kv_check"] = record.checked.to_json()
    return extra


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    result = {}
    for name in ("torch", "transformers", "optimum-onnx", "onnxruntime", "onnx"):
        try:
            result[name] = version(name)
        except PackageNotFoundError:
            pass
    return result
