"""The VS Code extension's manifest and code agree: every contributed command is registered and
every registered command contributed, the default language list is the same in package.json
(setting and activation events) and extension.ts, and Neovim's config covers those languages."""

from __future__ import annotations

import json
import re

from helpers import REPO

VSCODE = REPO / "editors" / "vscode"
# VS Code language ids -> Neovim filetypes
NVIM_FILETYPES = {"shellscript": {"sh", "bash", "zsh"}}


def test_commands_and_languages_agree() -> None:
    package = json.loads((VSCODE / "package.json").read_text(encoding="utf-8"))
    extension = (VSCODE / "src" / "extension.ts").read_text(encoding="utf-8")
    contributed = {c["command"] for c in package["contributes"]["commands"]}
    registered = set(re.findall(r"registerCommand\('([\w.]+)'", extension))
    assert contributed == registered, contributed ^ registered

    default = package["contributes"]["configuration"]["properties"]["codegenLs.languages"]["default"]
    block = extension[
        extension.index("DEFAULT_LANGUAGES = [") : extension.index("];", extension.index("DEFAULT_LANGUAGES = ["))
    ]
    assert re.findall(r"'([\w]+)'", block) == default
    activation = {e.split(":", 1)[1] for e in package["activationEvents"] if e.startswith("onLanguage:")}
    assert activation == set(default)
    assert "onStartupFinished" in package["activationEvents"]  # languages the user adds

    lua = (REPO / "editors" / "nvim" / "lsp" / "codegen_ls.lua").read_text(encoding="utf-8")
    filetypes = set(
        re.findall(r"'(\w+)'", lua[lua.index("filetypes = {") : lua.index("},", lua.index("filetypes = {"))])
    )
    for language in default:
        assert NVIM_FILETYPES.get(language, {language}) <= filetypes, language


def test_extension_is_bundled_not_shipped_with_node_modules() -> None:
    package = json.loads((VSCODE / "package.json").read_text(encoding="utf-8"))
    ignore = (VSCODE / ".vscodeignore").read_text(encoding="utf-8").split()
    assert "node_modules/**" in ignore
    assert "esbuild" in package["scripts"]["compile"] and "--external:vscode" in package["scripts"]["compile"]
    assert "--no-dependencies" in package["scripts"]["package"]
    assert package["main"] == "./out/extension.js"
