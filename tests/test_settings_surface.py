"""Every server setting reaches users: README table, VS Code contributions (same default), forwarded
keys, and the Neovim config's settings table."""

from __future__ import annotations

import json
import re

from codegen_ls.settings import NAMESPACE, Settings, describe, markdown_table, parse_settings, schema
from helpers import REPO


def test_every_setting_is_documented_declared_and_forwarded() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    package = json.loads((REPO / "editors" / "vscode" / "package.json").read_text(encoding="utf-8"))
    declared = package["contributes"]["configuration"]["properties"]
    extension = (REPO / "editors" / "vscode" / "src" / "extension.ts").read_text(encoding="utf-8")
    forwarded = set(re.findall(r"'(\w+)'", extension[extension.index("SERVER_KEYS") : extension.index("] as const")]))
    names = {name for name, _, _ in describe()}
    lua = (REPO / "editors" / "nvim" / "lsp" / "codegen_ls.lua").read_text(encoding="utf-8")
    lua_keys = set(re.findall(r"^    (\w+) = ", lua[lua.index("codegenLs = {") : lua.index("\n  },")], re.M))
    assert lua_keys == names, lua_keys ^ names
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


def test_one_table_of_bounds_drives_validation_and_the_vscode_declarations() -> None:
    """settings.py's field metadata (bounds, choices) is what the server enforces and what
    package.json declares; the README table can be generated from it."""
    package = json.loads((REPO / "editors" / "vscode" / "package.json").read_text(encoding="utf-8"))
    declared = package["contributes"]["configuration"]["properties"]
    for entry in schema():
        vscode = declared[f"{NAMESPACE}.{entry['name']}"]
        for key in ("minimum", "maximum", "enum"):
            assert vscode.get(key) == entry.get(key), (entry["name"], key, vscode.get(key), entry.get(key))
        if "minimum" in entry:
            for value, ok in (
                (entry["minimum"], True),
                (entry["maximum"], True),
                (entry["maximum"] + 1, False),
                (entry["minimum"] - 1, False),
            ):
                _, problems = parse_settings({entry["name"]: type(entry["default"])(value)})
                assert (not problems) == ok, (entry["name"], value, problems)
        if "enum" in entry:
            assert parse_settings({entry["name"]: "no-such-choice"})[1]
    assert parse_settings({"maxNewTokens": 0})[1] == ["maxNewTokens must be between 1 and 512"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"
    block = readme[readme.index(start) + len(start) : readme.index(end)]
    assert block == markdown_table(), "README settings table out of date: run python -m codegen_ls.settings"
    assert Settings().max_new_tokens == 48
