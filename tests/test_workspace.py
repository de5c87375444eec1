"""The real server over stdio with a workspace folder: indexed at ``initialize``, kept current by
``didSave`` / ``didChangeWatchedFiles`` / workspace folder changes, used by completions, shown
by ``codegenLs/debugDocument``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from helpers import SERVER_CMD, server_env

pytestmark = pytest.mark.asyncio(loop_scope="module")

UTIL = """def total_price(items, tax_rate=0.2):
    subtotal = sum(item.price for item in items)
    return round(subtotal * (1 + tax_rate), 2)
"""
MAIN = """from .util import total_price


def checkout(cart):
    amount = total_price(cart.items, tax_rate=0.07)
    return amount
"""
CAPABILITIES = types.ClientCapabilities(
    workspace=types.WorkspaceClientCapabilities(
        workspace_folders=True,
        did_change_watched_files=types.DidChangeWatchedFilesClientCapabilities(dynamic_registration=True),
    ),
    text_document=types.TextDocumentClientCapabilities(inline_completion=types.InlineCompletionClientCapabilities()),
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "pkg").mkdir()
    (root / "pkg" / "util.py").write_text(UTIL)
    (root / "pkg" / "main.py").write_text(MAIN)
    (root / "ignored").mkdir()
    (root / "ignored" / "x.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("ignored/\n")
    return root


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=SERVER_CMD, server_env=server_env()))
async def client(lsp_client: LanguageClient, project: Path):
    registrations: list[Any] = []
    lsp_client.registrations = registrations  # type: ignore[attr-defined]
    lsp_client.feature(types.CLIENT_REGISTER_CAPABILITY)(lambda params: registrations.append(params))
    statuses: list[Any] = []
    lsp_client.feature("codegenLs/status")(lambda params: statuses.append(params))
    lsp_client.init_result = await lsp_client.initialize_session(
        types.InitializeParams(  # type: ignore[attr-defined]
            capabilities=CAPABILITIES,
            root_uri=project.as_uri(),
            workspace_folders=[types.WorkspaceFolder(uri=project.as_uri(), name="project")],
        )
    )
    await until(lambda: any(_get(s, "state") in ("ready", "error") for s in statuses), "model load")
    yield
    await lsp_client.shutdown_session()


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


async def until(predicate: Any, what: str, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def debug(client: LanguageClient, uri: str) -> dict[str, Any]:
    reply = await client.protocol.send_request_async("codegenLs/debugDocument", {"uri": uri})
    return reply if isinstance(reply, dict) else reply._asdict()  # type: ignore[no-any-return]


async def workspace_files(client: LanguageClient, uri: str, want: int, roots: int = 1) -> dict[str, Any]:
    for _ in range(600):
        info = _as_dict((await debug(client, uri))["workspace"])
        if info["files"] == want and len(info["roots"]) == roots:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"the index never had {want} files: {info}")


def _as_dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else x._asdict()


async def test_the_workspace_is_indexed_watched_and_used(client: LanguageClient, project: Path) -> None:
    caps = client.init_result.capabilities  # type: ignore[attr-defined]
    assert caps.text_document_sync.save is not None
    await until(lambda: client.registrations, "the file watcher registration")  # type: ignore[attr-defined]
    watchers = client.registrations[0].registrations[0].register_options  # type: ignore[attr-defined]
    assert "**/*.py" in str(watchers)

    uri = (project / "pkg" / "shop.py").as_uri()  # a new file: only in the editor
    text = "from .util import total_price\n\n\ndef pay(cart):\n    amount = total_price("
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text))
    )
    info = await workspace_files(client, uri, 3)  # util, main, and the open document's text; not ignored/
    assert info["roots"] == [str(project)]
    await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(4, 25),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        )
    )
    prompt = _as_dict((await debug(client, uri))["lastPrompt"])
    first = _as_dict(prompt["repo_snippets"][0])
    assert first["file"] == "pkg/util.py" and first["why"] == "import:total_price" and prompt["repo_tokens"] > 0

    (project / "pkg" / "extra.py").write_text("def helper():\n    return 1\n")  # changed outside the editor
    client.workspace_did_change_watched_files(
        types.DidChangeWatchedFilesParams(
            changes=[types.FileEvent(uri=(project / "pkg" / "extra.py").as_uri(), type=types.FileChangeType.Created)]
        )
    )
    await workspace_files(client, uri, 4)
    (project / "pkg" / "extra.py").unlink()
    client.workspace_did_change_watched_files(
        types.DidChangeWatchedFilesParams(
            changes=[types.FileEvent(uri=(project / "pkg" / "extra.py").as_uri(), type=types.FileChangeType.Deleted)]
        )
    )
    await workspace_files(client, uri, 3)

    client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))
    other = project.parent / f"{project.name}-second"
    other.mkdir()
    (other / "lib.py").write_text("VALUE = 1\n")
    client.workspace_did_change_workspace_folders(
        types.DidChangeWorkspaceFoldersParams(
            event=types.WorkspaceFoldersChangeEvent(
                added=[types.WorkspaceFolder(uri=other.as_uri(), name="second")], removed=[]
            )
        )
    )
    main_uri = (project / "pkg" / "main.py").as_uri()
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            types.TextDocumentItem(uri=main_uri, language_id="python", version=1, text=MAIN)
        )
    )
    info = await workspace_files(client, main_uri, 3, roots=2)  # shop.py closed (not on disk), lib.py added
    assert sorted(info["roots"]) == sorted([str(project), str(other)])
