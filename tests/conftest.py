"""Fixtures shared by the tests. Helpers (paths, the server command, the raw JSON-RPC client,
tiny exports, UTF-16 positions) live in ``helpers.py``: ``from helpers import ...``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture()
def best_path_after() -> Iterator[None]:
    """A test that forces a lesser decode-attention kernel path (``CODEGEN_LS_KERNEL=avx2`` or
    ``generic``) gives the process its best one back: the path is process-wide."""
    yield
    from codegen_ls.engine import kernels

    loaded = kernels._load()
    if loaded is not None:
        loaded[2].cgls_limit_isa(kernels.LEVELS["avx512"])
