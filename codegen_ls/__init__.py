"""codegen-ls: local, offline inline code completion with CodeGen models on onnxruntime."""

from __future__ import annotations

from codegen_ls.offline import disable_telemetry

disable_telemetry()  # first, before any module can load onnxruntime: nothing leaves the machine

__version__ = "0.1.0"
