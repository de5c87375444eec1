"""A Hugging Face CodeGen checkpoint on disk, read one tensor at a time (the export never holds it whole).

Formats: ``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, and the same two for PyTorch ``.bin`` files, which are read
with ``torch.load(weights_only=True, mmap=True)`` (tensors only: no pickled code runs). Each
read opens its file, copies the one tensor out as float32 and closes it again, so the pages of
the memory map never pile up in the process's resident memory: an export's peak is the largest
tensor and what is built from it, not the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from codegen_ls.errors import ModelError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attn.causal_mask")  # old checkpoints' mask buffers


class CheckpointSource:
    """The tensors of the checkpoint in ``path``: names, shapes, and each one as float32 on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config: dict[str, Any] = json.loads((path / "config.json").read_text())
        self._files = self._weight_map()
        self.safetensors = next(iter(self._files.values()), "").endswith(".safetensors")

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> file name, from the index where the checkpoint is sharded."""
        for index in (SAFE_INDEX, BIN_INDEX):
            if (self.path / index).is_file():
                weight_map = json.loads((self.path / index).read_text())["weight_map"]
                return {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_SUFFIXES)}
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        if not files:
            raise ModelError(f"{self.path} has no weights (*.safetensors or *.bin)")
        return {name: f.name for f in files for name in self._names_in(f) if not name.endswith(IGNORED_SUFFIXES)}

    @staticmethod
    def _names_in(file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        return list(_torch_load(file, "meta"))

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 numpy array (its own memory; the file is closed again)."""
        if name not in self._files:
            raise ModelError(f"{self.path} has no tensor {name}")
        file = self.path / self._files[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(name)
        else:
            tensor = _torch_load(file, "cpu")[name]
        # float32 tensors may share the file's memory map: copy, so nothing keeps it mapped
        return tensor.float().numpy().copy() if tensor.dtype == _float32() else tensor.float().numpy()

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Block ``i``'s tensors without the ``transformer.h.{i}.`` prefix."""
        prefix = f"transformer.h.{i}."
        return {name[len(prefix) :]: self.get(name) for name in self._files if name.startswith(prefix)}

    def fp32_bytes(self) -> int:
        """The checkpoint's size in float32 (what the export would take loaded whole)."""
        return sum(4 * int(np.prod(shape)) for shape in self.shapes().values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._iter_shapes())

    def _iter_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        by_file: dict[str, list[str]] = {}
        for name, file in self._files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(self.path / file), framework="pt") as f:
                    for name in names:
                        yield name, tuple(f.get_slice(name).get_shape())
            else:
                tensors = _torch_load(self.path / file, "meta")
                for name in names:
                    yield name, tuple(tensors[name].shape)


def _float32() -> Any:
    import torch

    return torch.float32


def _torch_load(file: Path, device: str) -> dict[str, Any]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``, memory-mapped where the
    file allows (the zip format torch has written since 1.6), so reading one tensor reads only it."""
    import torch

    if device == "meta":
        return torch.load(str(file), map_location="meta", weights_only=True)
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        return torch.load(str(file), map_location="cpu", weights_only=True)
