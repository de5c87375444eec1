"""An ONNX graph written as it is built: nodes named by their place in the model, weights sent to
the external data file the moment they are made (the graph in memory holds only their offsets).

Node names follow onnxruntime-genai's model builder (``/model/layers.0/attn/qkv/MatMul``), and a
node's outputs are ``<name>/output_<i>``, so a profile or a Netron view reads like the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np

ALIGN = 4096  # each weight starts on a page: onnxruntime can map it in place
INLINE_BYTES = 1024  # smaller constants stay inside model.onnx


class ExternalData:
    """``model.onnx.data``, appended to: each weight's bytes once, page-aligned."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] = open(path, "wb")
        self.size = 0

    def append(self, array: np.ndarray) -> tuple[int, int]:
        """Write ``array``'s bytes (C order); return (offset, length)."""
        pad = -self.size % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.size += pad
        offset = self.size
        data = np.ascontiguousarray(array)
        self._file.write(data.data)  # the array's own buffer, no copy
        self.size += data.nbytes
        return offset, data.nbytes

    def close(self) -> None:
        self._file.close()


class GraphWriter:
    """Nodes and initializers of one graph (the model, or an ``If`` branch: :meth:`branch`)."""

    def __init__(self, data: ExternalData | None) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.data = data
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: set[str] = set()

    def branch(self) -> GraphWriter:
        """A writer for a subgraph: its own nodes, the same data file."""
        return GraphWriter(self.data)

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer ``name``; large ones go to the external data file now."""
        value = np.asarray(value)
        if self.data is None or value.nbytes < INLINE_BYTES:
            self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
            return name
        from onnx import TensorProto

        offset, length = self.data.append(value)
        tensor = TensorProto(
            name=name,
            dims=list(value.shape),
            data_type=self.helper.np_dtype_to_tensor_dtype(value.dtype),
            data_location=TensorProto.EXTERNAL,
        )
        for key, v in (("location", self.data.path.name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=v)
        self.inits.append(tensor)
        return name

    def op(
        self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs: Any
    ) -> Any:
        """Node ``name`` (a path such as ``/model/layers.0/attn/qkv/MatMul``); returns its output
        name, or the list of them when it has several."""
        if name in self.names:
            raise ValueError(f"duplicate node name {name}")
        self.names.add(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def subgraph(self, name: str, outputs: list[tuple[str, int]]) -> Any:
        """This writer's nodes as an ``If`` branch (no inputs: it reads the outer scope)."""
        outs = [self.helper.make_tensor_value_info(o, t, None) for o, t in outputs]
        return self.helper.make_graph(self.nodes, name, [], outs, initializer=self.inits)
