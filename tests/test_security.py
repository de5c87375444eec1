"""Trust boundaries outside the protocol: editor settings that run code, the model directory,
onnxruntime's telemetry. (The protocol's own hostile-input tests are in test_robustness.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

MODEL_DIR = REPO / "models" / "codegen-ls-small"


def test_vscode_settings_that_run_code_are_machine_scoped() -> None:
    """A cloned repository's ``.vscode/settings.json`` must not choose the server binary, its
    arguments, the model it loads, or where the remote backend sends code and which environment
    variable's key goes with it: VS Code ignores workspace values of ``machine`` settings."""
    package = json.loads((REPO / "editors" / "vscode" / "package.json").read_text(encoding="utf-8"))
    declared = package["contributes"]["configuration"]["properties"]
    for name in ("serverPath", "serverArgs", "modelPath", "backend", "remoteUrl", "remoteApiKeyEnv"):
        assert declared[f"codegenLs.{name}"].get("scope") == "machine", name


# -------------------------------------------------------------------------------------------------
# onnxruntime telemetry
# -------------------------------------------------------------------------------------------------

SESSION = """
import sys, time
import codegen_ls
from codegen_ls.engine.engine import Engine
engine = Engine(sys.argv[1])
print(engine.generate("def add(a, b):\\n    return", max_new_tokens=8).candidates[0].text)
time.sleep(2)
"""


def private_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without ORT_DISABLE_TELEMETRY (codegen-ls must set it itself), with a
    private home and cache directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CODEGEN_LS_MODEL")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), **extra)
    return env


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_onnxruntime_telemetry_is_off(tmp_path: Path) -> None:
    """A model session (and ``codegen-ls complete``) leaves the telemetry store untouched and
    opens no network socket. The control shows onnxruntime alone writes that store here."""
    control = tmp_path / "control"
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=private_env(control), check=True, timeout=120)
    if not files_under(control):
        pytest.skip("this onnxruntime build keeps no telemetry store (built without telemetry?)")
    assert any(".onnxruntime" in f for f in files_under(control)), files_under(control)

    strace = shutil.which("strace")
    runs = {
        "engine": [sys.executable, "-c", SESSION, str(MODEL_DIR)],
        "complete": [sys.executable, "-m", "codegen_ls", "complete", str(REPO / "examples" / "demo.py") + ":41:22"],
    }
    for name, cmd in runs.items():
        home = tmp_path / name
        trace = tmp_path / f"{name}.strace"
        if strace:
            cmd = [strace, "-f", "-qq", "-e", "trace=socket,connect", "-o", str(trace), *cmd]
        done = subprocess.run(cmd, env=private_env(home), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        foreign = [f for f in files_under(home) if "codegen-ls" not in Path(f).parts]  # ours: local state
        assert foreign == [], (name, foreign)
        if strace:
            calls = trace.read_text()
            inet = [ln for ln in calls.splitlines() if "AF_INET" in ln]
            assert not inet, (name, inet[:5])


# -------------------------------------------------------------------------------------------------
# The model directory
# -------------------------------------------------------------------------------------------------


def test_manifest_paths_stay_inside_the_model_directory(tmp_path: Path) -> None:
    from codegen_ls.engine.modeldir import read_manifest
    from codegen_ls.errors import ModelError

    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "link.json").symlink_to(outside)
    for field, name in (
        ("tokenizer", "/etc/passwd"),
        ("tokenizer", "../outside.json"),
        ("onnx", "sub/../../x.onnx"),
        ("tokenizer", "link.json"),
        ("onnx", "C:\\model.onnx"),
        ("tokenizer", 7),
    ):
        (tmp_path / "m" / "manifest.json").write_text(json.dumps({**manifest, field: name}))
        with pytest.raises(ModelError, match="outside the model directory|file name must be"):
            read_manifest(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({**manifest, "files": {"../outside.json": "0" * 64}}))
    with pytest.raises(ModelError, match="outside the model directory"):
        read_manifest(tmp_path / "m")


def test_checksums_are_verified_at_load_once_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from codegen_ls.engine import modeldir
    from codegen_ls.engine.engine import Engine
    from codegen_ls.errors import ModelError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    hashed: list[str] = []
    real_sha256 = modeldir.sha256
    monkeypatch.setattr(modeldir, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    Engine(model)
    assert sorted(hashed) == ["model.onnx", "tokenizer.json"]
    Engine(model)  # verified before, files unchanged: not hashed again
    modeldir._verified.clear()  # a new process: the stamp file remembers
    Engine(model)
    assert len(hashed) == 2
    tokenizer = model / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes() + b" ")  # still a valid tokenizer, not the exported file
    with pytest.raises(ModelError, match="checksum mismatch for tokenizer.json"):
        Engine(model)


async def test_serve_leaves_no_telemetry_and_opens_no_network_socket(tmp_path: Path) -> None:
    """The language server itself: model loaded, a completion answered, then exit."""
    from helpers import RawClient

    home, trace = tmp_path / "serve", tmp_path / "serve.strace"
    strace = shutil.which("strace")
    cmd = [sys.executable, "-m", "codegen_ls", "serve"]
    if strace:
        cmd = [strace, "-f", "-qq", "-e", "trace=socket,connect", "-o", str(trace), *cmd]
    c = await RawClient.start(cmd=cmd, env=private_env(home))
    try:
        status = await c.initialize()
        assert "result" in status
        await c.open("file:///a.py", "import os\n\n\ndef names(root):\n    return os.")
        reply = await c.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": "file:///a.py"},
                "position": {"line": 4, "character": 14},
                "context": {"triggerKind": 1},
            },
        )
        assert "result" in reply
    finally:
        assert await c.close() == 0
    foreign = [f for f in files_under(home) if "codegen-ls" not in Path(f).parts]
    assert foreign == [], foreign
    if strace:
        inet = [ln for ln in trace.read_text().splitlines() if "AF_INET" in ln]
        assert not inet, inet[:5]


def test_scripts_load_onnxruntime_only_after_codegen_ls() -> None:
    """Importing codegen_ls is what turns the telemetry off: a benchmark or recipe script that
    imports onnxruntime (anywhere) must import codegen_ls at module level, before any module-level
    onnxruntime import."""
    import ast

    scripts = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "models" / "recipe").glob("*.py"))
    for script in scripts:
        tree = ast.parse(script.read_text(encoding="utf-8"))

        def modules(node: ast.AST) -> list[str]:
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            return [node.module or ""] if isinstance(node, ast.ImportFrom) else []

        if not any(m.startswith(("onnxruntime", "optimum")) for n in ast.walk(tree) for m in modules(n)):
            continue
        ours = [n.lineno for n in tree.body if any(m.startswith("codegen_ls") for m in modules(n))]
        theirs = [n.lineno for n in tree.body if any(m.startswith(("onnxruntime", "optimum")) for m in modules(n))]
        assert ours and (not theirs or min(ours) < min(theirs)), f"{script.name}: import codegen_ls first"
