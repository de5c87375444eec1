"""Shared test material: a small Python document and contexts built from ``|``-marked text."""

from __future__ import annotations

from pathlib import Path

from codegen_ls.context import Context, TokenCounter, build_context
from codegen_ls.engine import Tokenizer

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
