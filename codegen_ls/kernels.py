"""Our native decode-attention kernel: an optional onnxruntime custom-op library.

``csrc/decode_attention.c`` implements ``codegen_ls.DecodeAttention``, the node the ``gqa``
graph's decode branch uses on an int8 cache. The graph also carries that node as an ONNX function
whose body is onnxruntime's ``GroupQueryAttention``, so a model runs the same with or without
the library: onnxruntime inlines the function unless a registered kernel claims the node.

``pip install`` builds the library when a C compiler is there (``setup.py``; optional). Its
vector paths (AVX-512, AVX2) are chosen at run time by the CPU, and it is used only when one of
them applies: the plain C path would be slower than onnxruntime's kernel (so on ARM, for now,
onnxruntime's runs). ``CODEGEN_LS_KERNEL=off`` turns it off (``avx2`` / ``generic`` force a lesser path).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from functools import lru_cache
from typing import Any

MODULE = "codegen_ls._decode_attention"
DOMAIN, OP_NAME = "codegen_ls", "DecodeAttention"  # the node the graph builder writes
OP = f"{DOMAIN}.{OP_NAME}"  # recorded in the manifest's extra.decode_attention
ONNXRUNTIME_ATTENTION = "onnxruntime GroupQueryAttention"
LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}  # the library's vector paths
log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _load() -> tuple[str, str, Any] | None:
    """(path, the best path this CPU takes, the library via ctypes) or None when not built."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)  # the same handle onnxruntime's dlopen of this path gets
        lib.cgls_isa.restype = ctypes.c_char_p
        lib.cgls_limit_isa.argtypes = [ctypes.c_int]
        lib.cgls_limit_isa(LEVELS["avx512"])
        return spec.origin, lib.cgls_isa().decode(), lib
    except (OSError, AttributeError):
        return None


def library() -> tuple[str, str] | None:
    """(path, the best vector path this CPU takes: avx512, avx2 or generic) of the built
    library, or None when it was not built."""
    loaded = _load()
    return None if loaded is None else (loaded[0], loaded[1])


def setting() -> str:
    """``CODEGEN_LS_KERNEL``: empty (the best path), ``off``, or ``avx2`` / ``generic`` to force
    a lesser path (to check or rule out one)."""
    return os.environ.get("CODEGEN_LS_KERNEL", "").strip().lower()


def disabled_by_env() -> bool:
    return setting() in {"0", "off", "no", "false"}


def register(session_options: Any, wanted: bool = True) -> str | None:
    """Register the library with ``session_options`` where it is built, vectorized (or a lesser
    path is asked for), wanted and not turned off; return its description
    (``codegen-ls kernel (avx512)``) or None. The path applies process-wide from this call on."""
    loaded = _load()
    if not wanted or loaded is None or disabled_by_env():
        return None
    path, best, lib = loaded
    forced = setting() in LEVELS
    level = min(LEVELS[setting()], LEVELS[best]) if forced else LEVELS[best]
    if level == 0 and not forced:
        return None  # the plain C path: onnxruntime's kernel is faster
    lib.cgls_limit_isa(level)
    try:
        session_options.register_custom_ops_library(path)
    except Exception as exc:  # a broken or foreign build: serve with onnxruntime's attention instead
        log.warning("decode-attention kernel %s not loaded (%s): onnxruntime's attention is used", path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return f"codegen-ls kernel ({lib.cgls_isa().decode()})"


def status() -> str:
    """One line for ``codegen-ls doctor``: whether the kernel is there and why not."""
    lib = library()
    if lib is None:
        return "not built (no C compiler at install?): onnxruntime's attention is used"
    if disabled_by_env():
        return f"built ({lib[1]}), turned off by CODEGEN_LS_KERNEL"
    if lib[1] == "generic" and setting() != "generic":
        return "built without a vector path for this CPU: onnxruntime's attention is used"
    return f"built ({lib[1]}): {lib[0]}"
