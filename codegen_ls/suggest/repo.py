"""Repository context: an index of the workspace folders, for lookup drafts and prompt snippets.

The editor names its workspace folders (``rootUri`` / ``workspaceFolders``). :class:`RepoIndex`
reads their source files on a thread of its own (never on the request path), keeps them under
:class:`RepoLimits` (files, bytes per file, bytes in all: bounded memory), skips what
``.gitignore`` ignores (:mod:`codegen_ls.suggest.gitignore`) and the usual tool folders, and
re-reads single files when told (``didSave``, ``workspace/didChangeWatchedFiles``). Each change
builds a new immutable :class:`RepoSnapshot`; a request reads whichever snapshot is current, so
it never waits for the index.

Open documents take precedence over their files on disk: the server passes their text with
:meth:`RepoIndex.set_open` (on open and save; on close the disk's text is read again), and a
request excludes its own document and the open documents whose live text it already has
(``exclude``), so a stale copy of the file being edited never becomes a draft.

A snapshot answers two questions:

- :meth:`RepoSnapshot.line_drafts`: lines of other files that start with the cursor line's text
  (indentation ignored), found by bisection in the sorted set of all stripped lines, the ``RERANK``
  first ranked by how much of the text before the cursor agrees with the text before them
  (prompt-lookup style, as :mod:`codegen_ls.suggest.drafts` does in the document); source
  ``lookup:repo``.
- :meth:`RepoSnapshot.snippets`: the most related pieces of other files for a query text (the
  code above the cursor): definitions of the names the document imports from workspace modules
  first (imports resolved to files), then windows of ``CHUNK_LINES`` lines ranked by the Jaccard
  similarity of their identifiers with the query's (Copilot's "similar files"), within a
  character budget. :func:`render_snippets` turns them into the prompt's repository section.
"""

from __future__ import annotations

import bisect
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from codegen_ls.suggest.gitignore import Ignore

log = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".py", ".pyi")
SKIP_DIRS = frozenset(
    (
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        "node_modules",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "site-packages",
        ".eggs",
        "build",
        "dist",
    )
)
CHUNK_LINES = 20  # snippet windows: this many lines ...
CHUNK_STRIDE = 10  # ... every this many lines
MAX_KEY_CHARS = 200  # stripped lines are indexed up to this many characters
MIN_KEY_CHARS = 2  # shorter lines (``)``, ``}``) are not indexed
MAX_KEYS_SCANNED = 512  # distinct indexed lines looked at per line-draft query
RERANK = 16  # matches re-ranked by context agreement
CONTEXT_CHARS = 64
COMMON_IDENT_SHARE = 0.05  # identifiers in more chunks than this share do not select chunks
MAX_POSTINGS = 2_000  # ... nor those in more chunks than this
DEF_LINES = 12  # lines of a definition taken as a snippet
QUERY_LINES = 40  # lines of the query text whose identifiers are compared
BATCH_S = 0.2  # changes arriving within this are applied together (one new snapshot)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_IMPORT = re.compile(r"^\s*(?:from\s+(\.*[\w.]*)\s+import\s+\(?([^)#\n]*)|import\s+([\w., ]+))", re.M)
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+def|def|class)[ \t]+(\w+)|^(\w+)[ \t]*(?::[^=\n]*)?=", re.M)
_KEYWORDS = frozenset(
    """False None True and as assert async await break class continue def del elif else except
finally for from global if import in is lambda nonlocal not or pass raise return try while with yield self
cls""".split()
)


@dataclass(frozen=True)
class RepoLimits:
    """What the index may hold: bounded memory whatever the workspace."""

    max_files: int = 4_000
    max_file_bytes: int = 256_000  # larger files (generated tables) are skipped
    max_total_bytes: int = 16_000_000  # files are taken shallowest first until this is reached


@dataclass(frozen=True)
class Snippet:
    rel: str  # path relative to its workspace folder
    start: int  # 0-based first line
    text: str
    score: float
    why: str  # "import:NAME" | "similar"


@dataclass
class _File:
    path: str  # absolute, as the index keys it
    rel: str
    text: str
    stamp: tuple[int, int]  # (mtime_ns, size) of the file read; (0, len) for an open document's text
    line_starts: list[int] = field(default_factory=list)
    chunks: list[tuple[int, frozenset[str]]] = field(default_factory=list)  # (first line, identifiers)
    defs: dict[str, int] = field(default_factory=dict)  # top-level-ish name -> line

    @staticmethod
    def of(path: str, rel: str, text: str, stamp: tuple[int, int]) -> _File:
        f = _File(path, rel, text, stamp)
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


def path_of(uri: str) -> str | None:
    """The absolute file path of a ``file:`` URI (None for other schemes)."""
    if not uri.startswith("file:"):
        return None
    p = urlparse(uri)
    path = unquote(p.path)
    if os.name == "nt" and re.match(r"^/[A-Za-z]:", path):
        path = path[1:]
    return os.path.normpath(path)


class RepoSnapshot:
    """An immutable view of the indexed files (see the module docstring)."""

    def __init__(self, files: dict[str, _File], roots: list[str], version: int) -> None:
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
        postings: dict[str, list[tuple[str, int]]] = {}
        n_chunks = 0
        for f in files.values():
            for i, (_, idents) in enumerate(f.chunks):
                n_chunks += 1
                for w in idents:
                    postings.setdefault(w, []).append((f.path, i))
        cap = min(MAX_POSTINGS, max(8, int(COMMON_IDENT_SHARE * n_chunks)))
        self._postings = {w: p for w, p in postings.items() if len(p) <= cap}
        self._modules: dict[str, str] = {}
        for f in sorted(files.values(), key=lambda f: (f.rel.count("/"), f.rel)):
            parts = f.rel[: -len(Path(f.rel).suffix)].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            for i in range(len(parts)):
                self._modules.setdefault(".".join(parts[i:]), f.path)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        return sum(len(f.text) for f in self.files.values())

    # -- lookup drafts -------------------------------------------------------------------------
    def line_matches(self, key: str, exclude: Iterable[str] = ()) -> Iterator[tuple[_File, int, int]]:
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
        out: list[Snippet] = []
        used: dict[str, list[tuple[int, int]]] = {}  # path -> line ranges taken
        size = 0

        def take(f: _File, start: int, count: int, score: float, why: str) -> None:
            nonlocal size
            ranges = used.setdefault(f.path, [])
            if any(start < e and s < start + count for s, e in ranges):
                return
            text = f.lines(start, count).rstrip()
            if not text.strip() or size + len(text) > budget_chars:
                return
            ranges.append((start, start + count))
            size += len(text)
            out.append(Snippet(f.rel, start, text, round(score, 4), why))

        for name, path in self._imported(document_text, document_path):
            f = self.files.get(path)
            if f is not None and path not in skip and name in f.defs:
                take(f, f.defs[name], DEF_LINES, 1.0, f"import:{name}")
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
        for jac, path, start in ranked[:64]:
            if size >= budget_chars:
                break
            take(self.files[path], start, CHUNK_LINES, jac, "similar")
        return out

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


class RepoIndex:
    """The workspace folders' source files, indexed on a background thread (see the module docstring)."""

    def __init__(self, limits: RepoLimits | None = None) -> None:
        self.limits = limits or RepoLimits()
        self._files: dict[str, _File] = {}  # owned by the worker thread
        self._open: dict[str, str] = {}  # path -> text of open documents (override the disk)
        self._roots: list[str] = []
        self._snapshot = RepoSnapshot({}, [], 0)
        self._jobs: queue.Queue[tuple[str, str, str | None] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.skipped = 0  # files left out by the limits (last full scan)
        self.requested: list[str] = []  # folders asked for (the snapshot has them once read)

    # -- requests (any thread) -----------------------------------------------------------------
    @property
    def snapshot(self) -> RepoSnapshot:
        return self._snapshot

    def add_root(self, uri_or_path: str) -> None:
        """Index a workspace folder (a ``file:`` URI or a path)."""
        path = path_of(uri_or_path) if uri_or_path.startswith("file:") else os.path.normpath(uri_or_path)
        if path:
            self.requested.append(os.path.abspath(path))
            self._submit("root", os.path.abspath(path))

    def remove_root(self, uri_or_path: str) -> None:
        path = path_of(uri_or_path) if uri_or_path.startswith("file:") else os.path.normpath(uri_or_path)
        if path:
            self._submit("unroot", os.path.abspath(path))

    def changed(self, uri_or_path: str) -> None:
        """A file was created or changed on disk (``didSave``, watched files)."""
        path = path_of(uri_or_path) if uri_or_path.startswith("file:") else os.path.abspath(uri_or_path)
        if path:
            self._submit("file", path)

    def deleted(self, uri_or_path: str) -> None:
        path = path_of(uri_or_path) if uri_or_path.startswith("file:") else os.path.abspath(uri_or_path)
        if path:
            self._submit("delete", path)

    def set_open(self, uri: str, text: str | None) -> None:
        """An open document's text (None: closed, the disk's text counts again)."""
        path = path_of(uri)
        if path:
            self._submit("open", path, text)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every change submitted so far is in the snapshot (tests, evaluation)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=2.0)
            self._thread = None

    def _submit(self, kind: str, path: str, text: str | None = None) -> None:
        with self._lock:
            self._idle.clear()
            self._jobs.put((kind, path, text))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="codegen-ls-repo-index", daemon=True)
                self._thread.start()

    # -- the index's own thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + BATCH_S
            while True:  # gather what arrives together (a save of many files, a checkout)
                try:
                    nxt = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    return
                batch.append(nxt)
            try:
                for kind, path, text in batch:
                    self._apply(kind, path, text)
                self._enforce_limits()
                self._snapshot = RepoSnapshot(dict(self._files), list(self._roots), self._snapshot.version + 1)
                log.info(
                    "repository index: %d files, %d bytes (%d skipped by the limits)",
                    len(self._files),
                    self._snapshot.nbytes,
                    self.skipped,
                )
            except Exception:  # the index must never take the server down
                log.exception("repository index update failed")
            with self._lock:
                if self._jobs.empty():
                    self._idle.set()

    def _apply(self, kind: str, path: str, text: str | None) -> None:
        if kind == "root":
            if path not in self._roots:
                self._roots.append(path)
                self._scan(path)
        elif kind == "unroot":
            if path in self._roots:
                self._roots.remove(path)
                self._files = {p: f for p, f in self._files.items() if self._root_of(p) is not None}
        elif kind == "open":
            if text is None:
                self._open.pop(path, None)
            else:
                self._open[path] = text
            self._read(path)
        elif kind == "file":
            self._read(path)
        elif kind == "delete":
            self._files.pop(path, None)
            prefix = path.rstrip(os.sep) + os.sep  # a deleted folder
            for p in [p for p in self._files if p.startswith(prefix)]:
                del self._files[p]

    def _root_of(self, path: str) -> str | None:
        for root in self._roots:
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return root
        return None

    def _scan(self, root: str) -> None:
        """Walk a folder (``.gitignore`` and the limits respected), shallowest files first."""
        found: list[tuple[int, str, str]] = []
        stack: list[tuple[Path, str, Ignore]] = [(Path(root), "", Ignore().child(Path(root), ""))]
        while stack:
            folder, rel, ignore = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                r = f"{rel}{e.name}"
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if (
                        e.name in SKIP_DIRS
                        or e.name.startswith(".")
                        or e.name.endswith(".egg-info")
                        or ignore.ignored(r, True)
                    ):
                        continue
                    stack.append((Path(e.path), r + "/", ignore.child(Path(e.path), r + "/")))
                elif e.name.endswith(SOURCE_SUFFIXES) and not ignore.ignored(r, False):
                    found.append((r.count("/"), r, e.path))
        found.sort()
        for _, _, path in found[: self.limits.max_files]:
            self._read(os.path.normpath(path), scanning=True)
        self.skipped = max(0, len(found) - self.limits.max_files)

    def _read(self, path: str, scanning: bool = False) -> None:
        root = self._root_of(path)
        if root is None or not path.endswith(SOURCE_SUFFIXES):
            self._files.pop(path, None)
            return
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if not scanning and self._is_ignored(root, rel):
            self._files.pop(path, None)
            return
        text = self._open.get(path)
        if text is not None:
            stamp = (0, len(text))
        else:
            try:
                st = os.stat(path)
                stamp = (st.st_mtime_ns, st.st_size)
                old = self._files.get(path)
                if old is not None and old.stamp == stamp:
                    return
                if st.st_size > self.limits.max_file_bytes:
                    self._files.pop(path, None)
                    return
                with open(path, "rb") as fh:
                    raw = fh.read(self.limits.max_file_bytes + 1)
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                self._files.pop(path, None)
                return
        if len(text) > self.limits.max_file_bytes or "\0" in text:
            self._files.pop(path, None)
            return
        self._files[path] = _File.of(path, rel, text.replace("\r\n", "\n"), stamp)

    def _is_ignored(self, root: str, rel: str) -> bool:
        parts = rel.split("/")
        ignore = Ignore().child(Path(root), "")
        for i in range(len(parts) - 1):
            sub = "/".join(parts[: i + 1]) + "/"
            if parts[i] in SKIP_DIRS or parts[i].startswith(".") or ignore.ignored(sub, True):
                return True
            ignore = ignore.child(Path(root) / sub, sub)
        return ignore.ignored(rel, False)

    def _enforce_limits(self) -> None:
        """Drop the deepest files while over the byte or file limits."""
        total = sum(len(f.text) for f in self._files.values())
        if total <= self.limits.max_total_bytes and len(self._files) <= self.limits.max_files:
            return
        order = sorted(self._files.values(), key=lambda f: (f.rel.count("/"), f.rel))
        kept: dict[str, _File] = {}
        size = 0
        for f in order:
            if len(kept) >= self.limits.max_files or size + len(f.text) > self.limits.max_total_bytes:
                self.skipped += 1
                continue
            kept[f.path] = f
            size += len(f.text)
        self._files = kept


__all__ = ["RepoIndex", "RepoLimits", "RepoSnapshot", "Snippet", "render_snippets", "path_of", "SOURCE_SUFFIXES"]
