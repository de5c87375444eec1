"""Model directories: the manifest, checksum verification, and where the model in use comes from.

A model directory is self-contained: ``model.onnx`` (plus ``model.onnx.data`` for models over
2 GB), ``tokenizer.json`` and ``manifest.json``. Serving reads only this directory.

Resolution order for the model in use: explicit path (``--model`` or the ``modelPath`` setting),
then ``$CODEGEN_LS_MODEL``, then the embedded default model shipped inside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from codegen_ls.errors import ModelError

MANIFEST = "manifest.json"
FORMAT = "codegen-ls-model/1"
ENV_VAR = "CODEGEN_LS_MODEL"


@dataclass(frozen=True)
class Manifest:
    """What ``codegen-ls model export`` writes next to the ONNX file."""

    architecture: str
    vocab_size: int
    context_length: int
    n_layer: int
    n_head: int
    head_dim: int
    bos_token_id: int
    eos_token_id: int
    quantization: str
    source: str
    onnx: str = "model.onnx"
    tokenizer: str = "tokenizer.json"
    files: dict[str, str] = field(default_factory=dict)
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, **self.__dict__}
        return data


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def read_manifest(directory: Path) -> Manifest:
    """Read and sanity-check ``manifest.json``; raise :class:`ModelError` with one clear line."""
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelError(f"not a codegen-ls model directory (no {MANIFEST}): {directory}")
    try:
        data = json.loads(path.read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"unknown format, expected {FORMAT}")
        known = set(Manifest.__dataclass_fields__)
        manifest = Manifest(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise ModelError(f"invalid manifest {path}: {exc}") from None
    for name in (manifest.onnx, manifest.tokenizer):
        if not (directory / name).is_file():
            raise ModelError(f"model directory {directory} is missing {name}")
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> list[str]:
    """Problems found comparing the files with their recorded checksums (empty list: all good)."""
    problems = []
    for name, digest in manifest.files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif sha256(path) != digest:
            problems.append(f"checksum mismatch for {name}")
    return problems


def default_model_dir() -> Path:
    """The embedded model shipped as package data (``models/codegen-ls-small`` in the repo)."""
    return Path(str(resources.files("codegen_ls.default_model")))


def resolve_model_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Explicit path, else ``$CODEGEN_LS_MODEL``, else the embedded default model."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return default_model_dir()
