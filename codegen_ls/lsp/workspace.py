"""The workspace folders for repository context: ``initialize`` (``rootUri`` / ``workspaceFolders``),
``workspace/didChangeWorkspaceFolders``, ``textDocument/didSave``, ``workspace/didChangeWatchedFiles``.

The server's :class:`~codegen_ls.suggest.repo.RepoIndex` reads the folders on its own thread;
these handlers only tell it what changed (never on the request path). When the client can
register file watchers dynamically, the server asks it to watch ``**/*.py`` / ``**/*.pyi`` and
``**/.gitignore`` so that changes made outside the editor reach the index too. With both
``repoLookup`` and ``repoContext`` off at ``initialize`` nothing is indexed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lsprotocol import types

from codegen_ls.suggest.repo import RepoSnapshot

if TYPE_CHECKING:
    from codegen_ls.lsp.server import CodegenLanguageServer
    from codegen_ls.settings import Settings

log = logging.getLogger(__name__)

WATCH_GLOBS = ("**/*.py", "**/*.pyi", "**/.gitignore")
WATCHER_ID = "codegen-ls/watch-sources"


def index_folders(ls: CodegenLanguageServer, params: types.InitializeParams) -> None:
    """Start indexing the folders the client opened (``workspaceFolders``, else ``rootUri`` / ``rootPath``)."""
    if not (ls.settings.repo_lookup or ls.settings.repo_context):
        return
    roots = [f.uri for f in params.workspace_folders or []]
    if not roots and params.root_uri:
        roots = [params.root_uri]
    if not roots and params.root_path:
        roots = [params.root_path]
    for root in roots:
        ls.repo.add_root(root)
    log.info("repository index: %s", ", ".join(roots) or "no workspace folder")


def snapshot(ls: CodegenLanguageServer, settings: Settings) -> RepoSnapshot | None:
    """The index for a request, or None when the settings turn repository context off."""
    if not (settings.repo_lookup or settings.repo_context):
        return None
    snap = ls.repo.snapshot
    return snap if len(snap) else None


async def watch_sources(ls: CodegenLanguageServer) -> None:
    """Ask the client to send ``didChangeWatchedFiles`` for source files (dynamic registration)."""
    if not ls.repo.requested:
        return
    caps = getattr(getattr(ls.client_capabilities, "workspace", None), "did_change_watched_files", None)
    if not getattr(caps, "dynamic_registration", False):
        return
    options = types.DidChangeWatchedFilesRegistrationOptions(
        watchers=[types.FileSystemWatcher(glob_pattern=g) for g in WATCH_GLOBS]
    )
    registration = types.Registration(
        id=WATCHER_ID, method=types.WORKSPACE_DID_CHANGE_WATCHED_FILES, register_options=options
    )
    try:
        await ls.client_register_capability_async(types.RegistrationParams(registrations=[registration]))
    except Exception as exc:  # the client may refuse: saves still reach the index
        log.info("no file watchers: %r", exc)


def on_did_save(ls: CodegenLanguageServer, params: types.DidSaveTextDocumentParams) -> None:
    doc = ls.document(params.text_document.uri)
    ls.repo.set_open(
        params.text_document.uri, params.text if params.text is not None else (doc.source if doc else None)
    )


def on_did_change_watched_files(ls: CodegenLanguageServer, params: types.DidChangeWatchedFilesParams) -> None:
    for change in params.changes:
        if change.type == types.FileChangeType.Deleted:
            ls.repo.deleted(change.uri)
        elif change.uri.endswith("/.gitignore"):  # what is ignored changed: read the folder again
            for root in list(ls.repo.snapshot.roots):
                ls.repo.remove_root(root)
                ls.repo.add_root(root)
        else:
            ls.repo.changed(change.uri)


def on_did_change_workspace_folders(ls: CodegenLanguageServer, params: types.DidChangeWorkspaceFoldersParams) -> None:
    for folder in params.event.removed:
        ls.repo.remove_root(folder.uri)
    for folder in params.event.added:
        ls.repo.add_root(folder.uri)


def register(ls: CodegenLanguageServer) -> None:
    """The workspace handlers; the server's ``initialize`` result then says it takes saves (with
    their text) and workspace folder changes."""
    ls.feature(types.TEXT_DOCUMENT_DID_SAVE, types.SaveOptions(include_text=False))(on_did_save)
    ls.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)(on_did_change_watched_files)
    ls.feature(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)(on_did_change_workspace_folders)


def info(ls: CodegenLanguageServer) -> dict[str, Any]:
    """The index's state, for ``codegenLs/debugDocument``."""
    snap = ls.repo.snapshot
    return {
        "roots": snap.roots,
        "files": len(snap),
        "bytes": snap.nbytes,
        "version": snap.version,
        "skipped": ls.repo.skipped,
    }


__all__ = ["index_folders", "snapshot", "watch_sources", "register", "info"]
