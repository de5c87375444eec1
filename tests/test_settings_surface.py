"""Every server setting reaches users: README table, VS Code contributions (same default), forwarded
keys, and the Neovim config's settings table."""

from __future__ import annotations

import json
import re

from codegen_ls.settings import NAMESPACE, describe, parse_settings
from samples import REPO


def test_every_setting_is_documented_declared_and_forwarded() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    package = json.loads((REPO / "editors" / "vscode" / "package.json").read_text(encoding="utf-8"))
    declared = package["contributes"]["configuration"]["properties"]
    extension = (REPO / "editors" / "vscode" / "src" / "extension.ts").read_text(encoding="utf-8")
    forwarded = set(re.findall(r"'(\w+)'", extension[extension.index("SERVER_KEYS") : extension.index("] as const")]))
    names = {name for name, _, _ in describe()}
    lua = (REPO / "editors" / "nvim" / "lsp" / "codegen_ls.lua").read_text(encoding="utf-8")
    lua_keys = set(re.findall(r"^    (\w+) = ", lua[lua.index("codegenLs = {") : lua.index("\n  },")], re.M))
    assert lua_keys == names, (lua_keys ^ names)
    for name, _, default in describe():
        assert f"| `{name}` |" in readme, f"{name} missing from the README settings table"
        entry = declared.get(f"{NAMESPACE}.{name}")
        assert entry is not None, f"{name} not declared in editors/vscode/package.json"
        assert entry.get("default") == default, (name, entry.get("default"), default)
        assert name in forwarded, f"{name} not forwarded by the VS Code extension"
    assert forwarded <= names, f"the extension forwards unknown keys: {forwarded - names}"
    # the declared defaults, sent back as settings, are accepted by the server as they are
    defaults = {k.split(".", 1)[1]: v["default"] for k, v in declared.items() if k.split(".", 1)[1] in names}
    assert parse_settings(defaults) == (parse_settings({})[0], [])
