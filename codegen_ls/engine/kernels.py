"""Our native decode-attention kernel: an optional onnxruntime custom-op library.

``csrc/decode_attention.c`` implements ``codegen_ls.DecodeAttention``, the node the ``gqa``
graph's decode branch uses on an int8 cache. The graph also carries that node as an ONNX function
whose body is onnxruntime's ``GroupQueryAttention``, so a model runs the same with or without
the library: onnxruntime inlines the function unless a registered kernel claims the node.

``pip install`` builds the library when a C compiler is there (``setup.py``; optional). Its
vector paths (AVX-512, AVX2) are chosen at run time by the CPU, and it is used only when one of
them applies: the plain C path would be slower than onnxruntime's kernel (so on ARM, for now,
onnxruntime's runs). ``CODEGEN_LS_KERNEL=off`` turns it off (``avx2`` / ``generic`` force a lesser path).

It also implements ``codegen_ls.DecodeAttentionQ4``, the decode attention of a 4-bit cache
(``codegen-ls model export --kv-bits 4``, ``csrc/attend4.c``; the format is owned by
:mod:`codegen_ls.engine.kvcache`). No onnxruntime kernel reads that format, so such a model needs
this library (:func:`register` with ``required``); its vector paths need AVX-512 VNNI or AVX2
(:func:`path4`), elsewhere a plain C loop runs it, slowly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from functools import lru_cache
from typing import Any

from codegen_ls.engine import kvcache

MODULE = "codegen_ls.engine._decode_attention"
DOMAIN, OP_NAME = "codegen_ls", "DecodeAttention"  # the node the graph builder writes
OP = f"{DOMAIN}.{OP_NAME}"  # recorded in the manifest's extra.decode_attention
OP4_NAME = "DecodeAttentionQ4"  # the same on a 4-bit cache (a scale per token): only this library runs it
OP4 = f"{DOMAIN}.{OP4_NAME}"
# the 4-bit cache's prompt-path reads (the same library), one per layout (keys, values)
DEQUANTIZE4_NAMES = ("DequantizeKeys4", "DequantizeValues4")
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
        lib.cgls_isa4.restype = ctypes.c_int
        lib.cgls_isa4_best.restype = ctypes.c_int
        return spec.origin, lib.cgls_isa().decode(), lib
    except (OSError, AttributeError):
        return None


def library() -> tuple[str, str] | None:
    """(path, the best vector path this CPU takes: avx512, avx2 or generic) of the built
    library, or None when it was not built."""
    loaded = _load()
    return None if loaded is None else (loaded[0], loaded[1])


PATHS4 = {2: "avx512-vnni", 1: "avx2", 0: "generic, slow"}  # the 4-bit cache's paths


def path4(best: bool = False, head_dim: int | None = None) -> str | None:
    """The path the 4-bit cache's attention (``--kv-bits 4``) takes here (at the current limit;
    ``best``: the best this CPU has, whatever the limit): ``avx512-vnni``, ``avx2`` or
    ``generic, slow`` (a plain C loop, several times slower); None where the library is not
    built, or for heads of ``head_dim`` that the cache's layout does not take (a multiple of 8, at
    most 256: :func:`kvcache.fits`)."""
    loaded = _load()
    if loaded is None or (head_dim is not None and not kvcache.fits(head_dim)):
        return None
    return PATHS4.get(int(loaded[2].cgls_isa4_best() if best else loaded[2].cgls_isa4()), PATHS4[0])


def vector4(best: bool = False, head_dim: int | None = None) -> bool:
    """Whether the 4-bit cache's attention has a vector path here (AVX-512 VNNI or AVX2; ``best``
    and ``head_dim``: see :func:`path4`)."""
    return path4(best, head_dim) not in (None, PATHS4[0])


def setting() -> str:
    """``CODEGEN_LS_KERNEL``: empty (the best path), ``off``, or ``avx2`` / ``generic`` to force
    a lesser path (to check or rule out one)."""
    return os.environ.get("CODEGEN_LS_KERNEL", "").strip().lower()


def disabled_by_env() -> bool:
    return setting() in {"0", "off", "no", "false"}


def register(session_options: Any, wanted: bool = True, required: bool = False) -> str | None:
    """Register the library with ``session_options`` where it is built, vectorized (or a lesser
    path is asked for), wanted and not turned off; return its description
    (``codegen-ls kernel (avx512)``) or None. ``required``: the model's 4-bit cache has no other
    attention, so the library is registered even with only its plain C path (and the description
    says which path that cache's attention takes). The path applies process-wide from this call on."""
    loaded = _load()
    if not wanted or loaded is None or disabled_by_env():
        return None
    path, best, lib = loaded
    forced = setting() in LEVELS
    level = min(LEVELS[setting()], LEVELS[best]) if forced else LEVELS[best]
    if level == 0 and not forced and not required:
        return None  # the plain C path: onnxruntime's kernel is faster
    lib.cgls_limit_isa(level)
    try:
        session_options.register_custom_ops_library(path)
    except Exception as exc:  # a broken or foreign build: serve with onnxruntime's attention instead
        log.warning(
            "decode-attention kernel %s not loaded (%s): onnxruntime's attention is used",
            path,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None
    if required:  # the 4-bit cache
        return f"codegen-ls kernel ({path4()}, 4-bit cache)"
    return f"codegen-ls kernel ({lib.cgls_isa().decode()})"


def status(required: bool = False) -> str:
    """One line for ``codegen-ls doctor``: whether the kernel is there and why not
    (``required``: for a model that cannot run without it)."""
    lib = library()
    if lib is None:
        return "not built (no C compiler at install?)" + ("" if required else ": onnxruntime's attention is used")
    if disabled_by_env():
        return f"built ({lib[1]}), turned off by CODEGEN_LS_KERNEL"
    four = f"4-bit cache: {path4() if vector4() else 'plain C, slow (no AVX2)'}"
    if lib[1] == "generic" and setting() != "generic" and not required:
        return f"built without a vector path for this CPU: onnxruntime's attention is used ({four})"
    return f"built ({lib[1]}), {four}: {lib[0]}"
