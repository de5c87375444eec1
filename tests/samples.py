"""Shared test material: a small Python document, contexts built from ``|``-marked text, and a
decode run through a gqa backend (the kernel tests compare two of them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from codegen_ls.suggest.context import Context, TokenCounter, build_context
from codegen_ls.engine.engine import Tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "codegen-ls-small"
COUNTER = TokenCounter(Tokenizer(MODEL / "tokenizer.json"))
BOS = "<|endoftext|>"

CODE = '''import os


class Greeter:
    """Says hello."""

    def __init__(self, name):
        self.name = name

    def greet(self, loud=False):
        message = "Hello, " + self.name
        if loud:
            message = message.upper()
        return message


def main():
    g = Greeter("world")
    print(g.greet())
'''


def ctx_of(marked: str, **kw: object) -> Context:
    """Context for a document with ``|`` marking the cursor (512-token budget)."""
    i = marked.index("|")
    before = marked[:i]
    return build_context(marked[:i] + marked[i + 1:], before.count("\n"), len(before) - before.rfind("\n") - 1,
                         COUNTER, 512, bos_text=BOS, **kw)  # type: ignore[arg-type]


def decode_run(be: Any, ids: list[int], steps: list[list[int]], rows: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Prefill ``ids`` on a gqa backend, then decode ``steps`` with ``rows`` candidate rows (the
    last row finishes after four steps: the others go on). Returns (the prompt's last logits and
    every step's, copies of the cache buffers, the end position)."""
    logits, state = be.prefill(None, 0, ids, len(ids) - 1, None)
    dec = be.begin(state, len(ids), rows, len(steps))
    out = [logits[-1:]]
    for i, tokens in enumerate(steps):
        if rows > 1 and i == 4:
            be.keep_rows(dec, np.arange(rows - 1))
        out.append(be.step(dec, tokens[: dec.bias.shape[0]]))
    return out, [b.copy() for b in state.buffers], dec.end
