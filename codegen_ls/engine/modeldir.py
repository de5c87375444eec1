"""Model directories: the manifest, checksum verification, and where the model in use comes from.

A model directory is self-contained: ``model.onnx`` (plus ``model.onnx.data`` for models over
2 GB), ``tokenizer.json`` and ``manifest.json``. Serving reads only this directory.

Resolution order for the model in use: explicit path (``--model`` or the ``modelPath`` setting),
then ``$CODEGEN_LS_MODEL``, then the embedded default model shipped inside the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from codegen_ls.errors import ModelError

log = logging.getLogger(__name__)

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
    fim: dict[str, Any] = field(default_factory=dict)  # fill-in-the-middle tokens (engine/fim.py); {} = none

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
    for name in (manifest.onnx, manifest.tokenizer, *manifest.files):
        inside(directory, name)
    for name in (manifest.onnx, manifest.tokenizer):
        if not (directory / name).is_file():
            raise ModelError(f"model directory {directory} is missing {name}")
    return manifest


def inside(directory: Path, name: Any) -> Path:
    """``directory / name`` for a manifest's file name, which must stay inside the directory: a
    plain relative path (no absolute path, drive or ``..``) that does not resolve elsewhere
    through a link. A manifest naming ``/etc/passwd`` as its tokenizer is refused."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelError(f"invalid manifest in {directory}: a file name must be a non-empty string, got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise ModelError(f"invalid manifest in {directory}: file '{name}' is outside the model directory")
    path = directory / name
    root = directory.resolve()
    if path.exists() and not path.resolve().is_relative_to(root):
        raise ModelError(f"invalid manifest in {directory}: file '{name}' links outside the model directory")
    return path


def verify_files(directory: Path, manifest: Manifest) -> list[str]:
    """Problems found comparing the files with their recorded checksums (empty list: all good)."""
    problems = []
    for name, digest in manifest.files.items():
        path = inside(directory, name)
        if not path.is_file():
            problems.append(f"missing {name}")
        elif sha256(path) != digest:
            problems.append(f"checksum mismatch for {name}")
    return problems


# -- checksums at load: verified once a directory, while its files keep their size and mtime ----
_verified: dict[str, tuple[tuple[str, int, int, str], ...]] = {}  # resolved directory -> what was verified
_verified_lock = threading.Lock()


def _stamps(directory: Path, manifest: Manifest) -> tuple[tuple[str, int, int, str], ...] | None:
    """(name, size, mtime_ns, digest) of every listed file; None when one is missing."""
    stamps = []
    for name, digest in sorted(manifest.files.items()):
        try:
            st = (directory / name).stat()
        except OSError:
            return None
        stamps.append((name, st.st_size, st.st_mtime_ns, digest))
    return tuple(stamps)


def _stamp_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "codegen-ls" / "verified-models.json"


def _load_stamps() -> dict[str, Any]:
    try:
        data = json.loads(_stamp_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_stamp(key: str, stamps: tuple[tuple[str, int, int, str], ...]) -> None:
    """Remember a verified directory across processes (best effort: a read-only cache is fine)."""
    path = _stamp_file()
    try:
        data = _load_stamps()
        data[key] = [list(s) for s in stamps]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(data.items())[-64:])))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot record the verified model directory: %r", exc)


def verify_at_load(directory: Path, manifest: Manifest) -> None:
    """Raise :class:`ModelError` unless every file the manifest lists matches its checksum.

    Hashing a large model takes seconds, so a directory is hashed on its first load only: after
    that, while each file keeps the size and modification time it had when verified (remembered
    in this process and in ``$XDG_CACHE_HOME/codegen-ls/verified-models.json``), it is trusted.
    """
    if not manifest.files:
        log.warning("%s: the manifest lists no checksums: its files cannot be verified", directory)
        return
    key = str(directory.resolve())
    stamps = _stamps(directory, manifest)
    with _verified_lock:
        if stamps is not None and (
            _verified.get(key) == stamps or _load_stamps().get(key) == [list(s) for s in stamps]
        ):
            _verified[key] = stamps
            return
    problems = verify_files(directory, manifest)
    if problems:
        raise ModelError(
            f"model directory {directory} failed its checksum check ({'; '.join(problems)}): "
            "its files changed since export (damaged, or modified); export it again "
            "(`codegen-ls model info DIR` checks a directory)"
        )
    if stamps is not None and stamps == _stamps(directory, manifest):  # unchanged while hashing
        with _verified_lock:
            _verified[key] = stamps
        _save_stamp(key, stamps)


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
