"""codegen-ls: local, offline inline code completion with CodeGen models on onnxruntime."""

from __future__ import annotations

__version__ = "0.1.0"
