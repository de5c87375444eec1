"""The repository snapshot: an immutable view of the indexed workspace files, and its two queries.

:class:`~codegen_ls.suggest.repo.RepoIndex` (the background index) builds a new
:class:`RepoSnapshot` from its :class:`SourceFile` records on each change; a request reads
whichever snapshot is current, so it never waits for the index. A snapshot answers two questions:

- :meth:`RepoSnapshot.line_matches`: lines of other files that start with the cursor line's text
  (indentation ignored), found by bisection in the sorted set of all stripped lines;
  :mod:`codegen_ls.suggest.drafts` re-ranks the nearest by how much of the text before the cursor
  agrees with the text before them (prompt-lookup style); source ``lookup:repo``.
- :meth:`RepoSnapshot.snippets`: the most related pieces of other files for a query text (the
  code above the cursor): definitions of the names the document imports from workspace modules
  first (imports resolved to files), then windows of ``CHUNK_LINES`` lines ranked by the Jaccard
  similarity of their identifiers with the query's (Copilot's "similar files"), within a
  character budget. :func:`render_snippets` turns them into the prompt's repository section.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHUNK_LINES = 20  # snippet windows: this many lines ...
CHUNK_STRIDE = 10  # ... every this many lines
MAX_KEY_CHARS = 200  # stripped lines are indexed up to this many characters
MIN_KEY_CHARS = 2  # shorter lines (``)``, ``}``) are not indexed
MAX_KEYS_SCANNED = 512  # distinct indexed lines looked at per line-draft query
COMMON_IDENT_SHARE = 0.05  # identifiers in more chunks than this share do not select chunks
MAX_POSTINGS = 2_000  # ... nor those in more chunks than this
DEF_LINES = 12  # lines of a definition taken as a snippet
QUERY_LINES = 40  # lines of the query text whose identifiers are compared
SIMILAR_TRIED = 64  # best-ranked similar windows tried against the budget
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_IMPORT = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+import\s+\(?([^)#\n]*)|import\s+([\w., ]+))", re.M)
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+def|def|class)[ \t]+(\w+)|^(\w+)[ \t]*(?::[^=\n]*)?=", re.M)
_KEYWORDS = frozenset(
    """False None True and as assert async await break class continue def del elif else except
finally for from global if import in is lambda nonlocal not or pass raise return try while with yield self
cls""".split()
)


@dataclass(frozen=True)
class Snippet:
    rel: str  # path relative to its workspace folder
    start: int  # 0-based first line
    text: str
    score: float
    why: str  # "import:NAME" | "similar"


@dataclass
class SourceFile:
    """One indexed file: its text, line starts, identifier windows and definitions."""

    path: str  # absolute, as the index keys it
    rel: str
    text: str
    stamp: tuple[int, int]  # (mtime_ns, size) of the file read; (0, len) for an open document's text
    line_starts: list[int] = field(default_factory=list)
    chunks: list[tuple[int, frozenset[str]]] = field(default_factory=list)  # (first line, identifiers)
    defs: dict[str, int] = field(default_factory=dict)  # top-level-ish name -> line

    @staticmethod
    def of(path: str, rel: str, text: str, stamp: tuple[int, int]) -> SourceFile:
        f = SourceFile(path, rel, text, stamp)
        starts = [0]
        pos = text.find("\n")
        while pos != -1:
            starts.append(pos + 1)
            pos = text.find("\n", pos + 1)
        f.line_starts = starts
        lines = text.split("\n")
        for s in range(0, max(1, len(lines) - CHUNK_LINES // 2), CHUNK_STRIDE):
            f.chunks.append((s, frozenset(_idents("\n".join(lines[s : s + CHUNK_LINES])))))
        for m in _DEF.finditer(text):
            name = m.group(1) or m.group(2)
            if name and name not in f.defs:
                f.defs[name] = text.count("\n", 0, m.start())
        return f

    def line(self, n: int) -> str:
        end = self.line_starts[n + 1] - 1 if n + 1 < len(self.line_starts) else len(self.text)
        return self.text[self.line_starts[n] : end]

    def lines(self, start: int, count: int) -> str:
        lo = self.line_starts[min(start, len(self.line_starts) - 1)]
        end = start + count
        hi = self.line_starts[end] - 1 if end < len(self.line_starts) else len(self.text)
        return self.text[lo : max(lo, hi)]


def _idents(text: str) -> Iterator[str]:
    return (w for w in _IDENT.findall(text) if w not in _KEYWORDS)


class _Picker:
    """Snippets taken so far within a character budget, no two overlapping in one file."""

    def __init__(self, budget_chars: int) -> None:
        self.budget_chars = budget_chars
        self.out: list[Snippet] = []
        self.used: dict[str, list[tuple[int, int]]] = {}  # path -> line ranges taken
        self.size = 0

    @property
    def full(self) -> bool:
        return self.size >= self.budget_chars

    def take(self, f: SourceFile, start: int, count: int, score: float, why: str) -> None:
        ranges = self.used.setdefault(f.path, [])
        if any(start < e and s < start + count for s, e in ranges):
            return
        text = f.lines(start, count).rstrip()
        if not text.strip() or self.size + len(text) > self.budget_chars:
            return
        ranges.append((start, start + count))
        self.size += len(text)
        self.out.append(Snippet(f.rel, start, text, round(score, 4), why))


class RepoSnapshot:
    """An immutable view of the indexed files (see the module docstring)."""

    def __init__(self, files: dict[str, SourceFile], roots: list[str], version: int) -> None:
        self.files = files
        self.roots = roots
        self.version = version
        refs: dict[str, list[tuple[str, int]]] = {}
        for f in files.values():
            for n in range(len(f.line_starts)):
                key = f.line(n).strip(" \t\r")[:MAX_KEY_CHARS]
                if len(key) >= MIN_KEY_CHARS:
                    refs.setdefault(key, []).append((f.path, n))
        self._refs = refs
        self._keys = sorted(refs)
        self._postings = self._identifier_postings(files)
        self._modules: dict[str, str] = {}
        for f in sorted(files.values(), key=lambda f: (f.rel.count("/"), f.rel)):
            parts = f.rel[: -len(Path(f.rel).suffix)].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            for i in range(len(parts)):
                self._modules.setdefault(".".join(parts[i:]), f.path)

    @staticmethod
    def _identifier_postings(files: dict[str, SourceFile]) -> dict[str, list[tuple[str, int]]]:
        """identifier -> (path, chunk index) of the windows holding it; too common ones left out."""
        postings: dict[str, list[tuple[str, int]]] = {}
        n_chunks = 0
        for f in files.values():
            for i, (_, idents) in enumerate(f.chunks):
                n_chunks += 1
                for w in idents:
                    postings.setdefault(w, []).append((f.path, i))
        cap = min(MAX_POSTINGS, max(8, int(COMMON_IDENT_SHARE * n_chunks)))
        return {w: p for w, p in postings.items() if len(p) <= cap}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        return sum(len(f.text) for f in self.files.values())

    # -- lookup drafts -------------------------------------------------------------------------
    def line_matches(self, key: str, exclude: Iterable[str] = ()) -> Iterator[tuple[SourceFile, int, int]]:
        """(file, line, offset after the key's text on that line) of lines starting with ``key``."""
        key = key[:MAX_KEY_CHARS]
        if len(key.strip()) == 0:
            return
        skip = set(exclude)
        i = bisect.bisect_left(self._keys, key)
        for scanned in range(MAX_KEYS_SCANNED):
            if i + scanned >= len(self._keys) or not self._keys[i + scanned].startswith(key):
                return
            for path, n in self._refs[self._keys[i + scanned]]:
                if path in skip:
                    continue
                f = self.files[path]
                line = f.line(n)
                indent = len(line) - len(line.lstrip(" \t"))
                yield f, n, f.line_starts[n] + indent + len(key)

    # -- snippets ------------------------------------------------------------------------------
    def snippets(
        self,
        query: str,
        budget_chars: int,
        *,
        document_path: str | None = None,
        document_text: str = "",
        exclude: Iterable[str] = (),
    ) -> list[Snippet]:
        """The most related pieces of other files, best first, within ``budget_chars``.

        ``query``: the code above the cursor (its last ``QUERY_LINES`` lines are compared);
        ``document_text``: where the imports are read (the document's start); ``document_path``
        resolves relative imports.
        """
        if budget_chars <= 0 or not self.files:
            return []
        skip = set(exclude) | ({document_path} if document_path else set())
        picker = _Picker(budget_chars)
        for name, path in self._imported(document_text, document_path):
            f = self.files.get(path)
            if f is not None and path not in skip and name in f.defs:
                picker.take(f, f.defs[name], DEF_LINES, 1.0, f"import:{name}")
        for jac, path, start in self._similar(query, skip)[:SIMILAR_TRIED]:
            if picker.full:
                break
            picker.take(self.files[path], start, CHUNK_LINES, jac, "similar")
        return picker.out

    def _similar(self, query: str, skip: set[str]) -> list[tuple[float, str, int]]:
        """(Jaccard similarity, path, first line) of the windows sharing identifiers with the
        query's last ``QUERY_LINES`` lines, most similar first."""
        q = set(_idents("\n".join(query.split("\n")[-QUERY_LINES:])))
        scores: dict[tuple[str, int], int] = {}
        for w in q:
            for ref in self._postings.get(w, ()):
                if ref[0] not in skip:
                    scores[ref] = scores.get(ref, 0) + 1
        ranked = []
        for (path, i), inter in scores.items():
            start, idents = self.files[path].chunks[i]
            ranked.append((inter / (len(q) + len(idents) - inter), path, start))
        ranked.sort(key=lambda r: (-r[0], r[1], r[2]))
        return ranked

    def _imported(self, text: str, document_path: str | None) -> list[tuple[str, str]]:
        """(name, file path) for each name the document imports from a workspace module."""
        out: list[tuple[str, str]] = []
        here = self._rel_parts(document_path)
        for m in _IMPORT.finditer(text):
            module, names, plain = m.group(1), m.group(2), m.group(3)
            if plain is not None:
                continue  # ``import x.y``: no names to look up (attribute use follows)
            dots = len(module) - len(module.lstrip("."))
            mod = module.lstrip(".")
            if dots and here is not None:
                base = here[:-1][: max(0, len(here) - dots)] if dots > 1 else here[:-1]
                mod = ".".join([*base, *([mod] if mod else [])])
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                if not name or name == "*":
                    continue
                target = self._modules.get(mod) if mod else None
                if target is not None:
                    out.append((name, target))
        return out

    def _rel_parts(self, path: str | None) -> list[str] | None:
        if path is None:
            return None
        for root in self.roots:
            if path.startswith(root.rstrip(os.sep) + os.sep):
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                return rel[: -len(Path(rel).suffix)].split("/") if Path(rel).suffix else rel.split("/")
        return None


def render_snippets(snippets: list[Snippet], eot: str) -> str:
    """The prompt's repository section: each snippet as a file of its own (a path comment, its
    lines), separated by the end-of-text token as files were in training; weakest first, so the
    best sits nearest the document. Empty when there are none."""
    if not snippets:
        return ""
    parts = [f"{eot}# {s.rel}\n{s.text}\n" for s in sorted(snippets, key=lambda s: (s.score, s.rel, s.start))]
    return "".join(parts)


__all__ = ["CHUNK_LINES", "RepoSnapshot", "Snippet", "SourceFile", "render_snippets"]
