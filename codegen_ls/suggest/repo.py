"""The workspace index: reads the editor's workspace folders on a thread of its own and publishes snapshots.

The editor names its workspace folders (``rootUri`` / ``workspaceFolders``). :class:`RepoIndex`
reads their source files on a thread of its own (never on the request path), keeps them under
:class:`RepoLimits` (files, bytes per file, bytes in all: bounded memory), skips what
``.gitignore`` ignores (:mod:`codegen_ls.suggest.gitignore`) and the usual tool folders, and
re-reads single files when told (``didSave``, ``workspace/didChangeWatchedFiles``). Each change
builds a new immutable :class:`~codegen_ls.suggest.repo_snapshot.RepoSnapshot`; a request reads
whichever snapshot is current, so it never waits for the index. What a snapshot answers (line
drafts, related snippets) lives in :mod:`codegen_ls.suggest.repo_snapshot`.

Open documents take precedence over their files on disk: the server passes their text with
:meth:`RepoIndex.set_open` (on open and save; on close the disk's text is read again), and a
request excludes its own document and the open documents whose live text it already has
(``exclude``), so a stale copy of the file being edited never becomes a draft.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from codegen_ls.suggest.gitignore import Ignore
from codegen_ls.suggest.repo_snapshot import RepoSnapshot, Snippet, SourceFile, render_snippets

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
BATCH_S = 0.2  # changes arriving within this are applied together (one new snapshot)


@dataclass(frozen=True)
class RepoLimits:
    """What the index may hold: bounded memory whatever the workspace."""

    max_files: int = 4_000
    max_file_bytes: int = 256_000  # larger files (generated tables) are skipped
    max_total_bytes: int = 16_000_000  # files are taken shallowest first until this is reached


def path_of(uri: str) -> str | None:
    """The absolute file path of a ``file:`` URI (None for other schemes)."""
    if not uri.startswith("file:"):
        return None
    p = urlparse(uri)
    path = unquote(p.path)
    if os.name == "nt" and re.match(r"^/[A-Za-z]:", path):
        path = path[1:]
    return os.path.normpath(path)


class RepoIndex:
    """The workspace folders' source files, indexed on a background thread (see the module docstring)."""

    def __init__(self, limits: RepoLimits | None = None) -> None:
        self.limits = limits or RepoLimits()
        self._files: dict[str, SourceFile] = {}  # owned by the worker thread
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
        self._files[path] = SourceFile.of(path, rel, text.replace("\r\n", "\n"), stamp)

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
        kept: dict[str, SourceFile] = {}
        size = 0
        for f in order:
            if len(kept) >= self.limits.max_files or size + len(f.text) > self.limits.max_total_bytes:
                self.skipped += 1
                continue
            kept[f.path] = f
            size += len(f.text)
        self._files = kept


__all__ = ["RepoIndex", "RepoLimits", "RepoSnapshot", "Snippet", "render_snippets", "path_of", "SOURCE_SUFFIXES"]
