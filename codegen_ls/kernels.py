"""Our native decode-attention kernel: an optional onnxruntime custom-op library.

``csrc/decode_attention.c`` implements ``codegen_ls.DecodeAttention``, the node the ``gqa``
graph's decode branch uses on an int8 cache. The graph also carries that node as an ONNX function
whose body is onnxruntime's ``GroupQueryAttention``, so a model runs the same with or without
the library: onnxruntime inlines the function unless a registered kernel claims the node.

``pip install`` builds the library when a C compiler is there (``setup.py``; optional). Its
vector paths (AVX-512, AVX2) are chosen at run time by the CPU, and it is used only when one of
them applies: the plain C path would be slower than onnxruntime's kernel (so on ARM, for now,
onnxruntime's runs). ``CODEGEN_LS_KERNEL=off`` turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from typing import Any

MODULE = "codegen_ls._decode_attention"
DOMAIN, OP_NAME = "codegen_ls", "DecodeAttention"  # the node the graph builder writes
OP = f"{DOMAIN}.{OP_NAME}"  # recorded in the manifest's extra.decode_attention
ONNXRUNTIME_ATTENTION = "onnxruntime GroupQueryAttention"


@lru_cache(maxsize=1)
def library() -> tuple[str, str] | None:
    """(path, vector path) of the built library, or None when it was not built."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        lib.cgls_isa.restype = ctypes.c_char_p
        isa = lib.cgls_isa().decode()
    except (OSError, AttributeError):
        return None
    return spec.origin, isa


def disabled_by_env() -> bool:
    return os.environ.get("CODEGEN_LS_KERNEL", "").strip().lower() in {"0", "off", "no", "false"}


def register(session_options: Any, wanted: bool = True) -> str | None:
    """Register the library with ``session_options`` where it is built, vectorized, wanted and
    not turned off; return its description (``codegen-ls kernel (avx512)``) or None."""
    lib = library()
    if not wanted or lib is None or lib[1] == "generic" or disabled_by_env():
        return None
    session_options.register_custom_ops_library(lib[0])
    return f"codegen-ls kernel ({lib[1]})"


def status() -> str:
    """One line for ``codegen-ls doctor``: whether the kernel is there and why not."""
    lib = library()
    if lib is None:
        return "not built (no C compiler at install?): onnxruntime's attention is used"
    if lib[1] == "generic":
        return "built without a vector path: onnxruntime's attention is used"
    if disabled_by_env():
        return f"built ({lib[1]}), turned off by CODEGEN_LS_KERNEL"
    return f"built ({lib[1]}): {lib[0]}"
