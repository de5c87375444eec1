"""The prompt's repository section: the workspace snippets most related to the cursor, placed
before the document's own text and kept stable while the user types (KV-cache reuse)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from codegen_ls.engine.engine import Engine
from codegen_ls.settings import Settings
from codegen_ls.suggest.context import TokenCounter, offset_of
from codegen_ls.suggest.repo import Snippet, path_of, render_snippets
from codegen_ls.suggest.request import CompletionRequest

CHARS_PER_TOKEN = 4  # snippets are picked within budget x this many characters, then cut by tokens
QUERY_STEP = 16  # the snippets are chosen again only when the cursor enters another block of this many lines ...
QUERY_LINES = 40  # ... from the identifiers of this many lines above that block (stable prompt: KV cache reuse)
IMPORT_CHARS = 8_000  # the document's start, where its imports are read
DOCUMENTS = 64  # documents whose section is remembered


class RepoSections:
    """Each document's last repository section, chosen again only when its inputs change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sections: OrderedDict[str, tuple[tuple[Any, ...], str, list[Snippet]]] = OrderedDict()

    def section(
        self, engine: Engine, counter: TokenCounter, req: CompletionRequest, settings: Settings, budget: int
    ) -> tuple[str, dict[str, Any]]:
        """The section for ``req`` and what it holds (for ``complete --json`` / debugDocument).

        Chosen again only when the index changed or the cursor entered another block of
        ``QUERY_STEP`` lines, so the prompt's start stays the same while the user types; cut to
        ``repoContextTokens`` and to a quarter of the prompt budget.
        """
        tokens = min(settings.repo_context_tokens, budget // 4)
        if req.repo is None or not settings.repo_context or tokens <= 0 or not len(req.repo):
            return "", {}
        anchor = req.line - req.line % QUERY_STEP
        key = (req.repo.version, id(req.repo), anchor, tokens, hash(req.text[:IMPORT_CHARS]))
        with self._lock:
            hit = self._sections.get(req.uri)
        if hit is not None and hit[0] == key:
            text, snippets = hit[1], hit[2]
        else:
            text, snippets = self._choose(engine, counter, req, anchor, tokens)
            with self._lock:
                self._sections[req.uri] = (key, text, snippets)
                self._sections.move_to_end(req.uri)
                while len(self._sections) > DOCUMENTS:
                    self._sections.popitem(last=False)
        info = {
            "repo_snippets": [
                {"file": s.rel, "line": s.start + 1, "lines": s.text.count("\n") + 1, "why": s.why, "score": s.score}
                for s in snippets
            ]
        }
        return text, info

    def _choose(
        self, engine: Engine, counter: TokenCounter, req: CompletionRequest, anchor: int, tokens: int
    ) -> tuple[str, list[Snippet]]:
        assert req.repo is not None
        lo, _, _ = offset_of(req.text, max(0, anchor - QUERY_LINES), 0)
        hi, _, _ = offset_of(req.text, anchor, 0)
        snippets = req.repo.snippets(
            req.text[lo:hi],
            tokens * CHARS_PER_TOKEN,
            document_path=path_of(req.uri),
            document_text=req.text[:IMPORT_CHARS],
            exclude=req.open_paths(),
        )
        eot = engine.tokenizer.decode([engine.eos_id])
        while snippets and len(counter.encode(render_snippets(snippets, eot))) > tokens:
            snippets = snippets[:-1]  # the weakest go first
        return render_snippets(snippets, eot), snippets

    def forget(self, uri: str) -> None:
        with self._lock:
            self._sections.pop(uri, None)
