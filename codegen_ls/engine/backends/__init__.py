"""The engine's ways of running a CodeGen ONNX graph, chosen by the manifest's graph kind.

* :class:`GqaBackend` (``graph: gqa``, the default export, see :mod:`codegen_ls.export.graph_builder`):
  one KV cache per layer (int8 when quantized) that GroupQueryAttention reads and writes in
  place when decoding (prompt chunks take the graph's MatMul path and are copied in); N
  candidates are N query positions of one run, sharing the prompt's cache.
* :class:`OptimumBackend` (``graph: optimum``, the reference): optimum's export, the whole past
  in and ``past + new`` out every run. A state is that list of arrays; a prefix is a slice.

Both expose the same four calls to the engine: ``prefill`` (feed prompt tokens on top of the
first ``keep`` tokens of a state; cancelled between chunks it raises :class:`PrefillCancelled`
with the state fed so far), ``begin`` / ``step`` / ``keep_rows`` (batched decode), and count
``tokens_fed`` and ``session_ms``. Input and output names are read from the session.

One module per backend (``optimum``, ``gqa``) over ``base``; the names the engine and
tests use are re-exported here.
"""

from __future__ import annotations

from codegen_ls.engine.backends.base import (
    LONG_PREFILL,
    MASKED,
    ROUND,
    Backend,
    CancelFn,
    PrefillCancelled,
    release_free_heap,
)
from codegen_ls.engine.backends.gqa import DECODE_ROOM, PROMPT_PATH_MIN, GqaBackend, GqaDecode, GqaState
from codegen_ls.engine.backends.optimum import OptimumBackend, PastState

__all__ = [
    "DECODE_ROOM",
    "LONG_PREFILL",
    "MASKED",
    "PROMPT_PATH_MIN",
    "ROUND",
    "Backend",
    "CancelFn",
    "GqaBackend",
    "GqaDecode",
    "GqaState",
    "OptimumBackend",
    "PastState",
    "PrefillCancelled",
    "release_free_heap",
]
