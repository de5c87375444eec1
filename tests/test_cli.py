"""The command line as a user meets it: help, one-line errors with non-zero exit, packaging."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "codegen_ls"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_help_lists_every_subcommand() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("serve", "complete", "doctor", "model"):
        assert cmd in out.stdout
    for sub in (["model", "--help"], ["serve", "--help"], ["complete", "--help"], ["doctor", "--help"]):
        assert run(*sub).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["complete", "missing.py:1:1"], "file not found"),
        (["complete", "examples/demo.py:999:1"], "out of range"),
        (["complete", "examples/demo.py:3:500"], "out of range"),
        (["complete", "examples/demo.py"], "expected FILE:LINE:COL"),
        (["complete", "examples/demo.py:x:1"], "must be numbers"),
        (["complete", "--model", "/nonexistent/model", "examples/demo.py:36:24"], "model directory not found"),
        (["model", "info", "/nonexistent/model"], "model directory not found"),
        (["model", "export", "no/such-model-offline", "/tmp/codegen-ls-never"], "cannot download"),
        (["model", "export", "/nonexistent/ckpt", "/tmp/codegen-ls-never"], "not found"),
    ],
)
def test_user_mistakes_are_one_clear_line(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("codegen-ls: error:") and message in last, out.stderr


def test_complete_prints_ranked_suggestions_with_timings() -> None:
    out = run("complete", "examples/demo.py:41:22")
    assert out.returncode == 0, out.stderr
    assert "mode=" in out.stdout and "timings ms:" in out.stdout


def test_complete_json_is_machine_readable() -> None:
    import json

    out = run("complete", "--json", "examples/demo.py:41:22")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["line"] == 41 and data["column"] == 22 and data["mode"] == "single"
    assert data["suggestions"], "the demo position gets suggestions"
    ranks = [s["rank"] for s in data["suggestions"]]
    assert ranks == list(range(1, len(ranks) + 1))
    scores = [s["score"] for s in data["suggestions"]]
    assert scores == sorted(scores, reverse=True)
    for s in data["suggestions"]:
        assert s["source"] and s["text"].strip()


def test_model_info_verifies_embedded_model() -> None:
    out = run("model", "info")
    assert out.returncode == 0, out.stderr
    assert "all files verified" in out.stdout
    assert '"architecture": "codegen"' in out.stdout


def test_doctor_reports_versions_model_and_a_timed_completion() -> None:
    out = run("doctor")
    assert out.returncode == 0, out.stderr
    for needle in ("onnxruntime", "providers", "CPUExecutionProvider", "model:", "timed completion"):
        assert needle in out.stdout
    manifest = json.loads((ROOT / "models" / "codegen-ls-small" / "manifest.json").read_text())
    assert f"graph: {manifest['extra']['graph']}  KV cache: {manifest['extra']['kv_dtype']}" in out.stdout
    from codegen_ls.engine import kernels  # which decode attention runs, and why

    assert f"decode-attention kernel: {kernels.status()}" in out.stdout
    lib = kernels.library()
    used = f"codegen-ls kernel ({lib[1]})" if lib and lib[1] != "generic" else kernels.ONNXRUNTIME_ATTENTION
    assert f"decode attention in use: {used}" in out.stdout


@pytest.mark.slow
def test_wheel_contains_the_embedded_model(tmp_path: Path) -> None:
    """`pip install .` (not only editable) must serve offline: the model is package data."""
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("codegen_ls-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("manifest.json", "model.onnx", "tokenizer.json"):
        assert f"codegen_ls/default_model/{name}" in names
    assert not any("torch" in n or "transformers" in n for n in names)
    if shutil.which("cc") or shutil.which("gcc"):  # the optional decode-attention kernel was built into it
        assert any(n.startswith("codegen_ls/engine/_decode_attention") for n in names), build.stderr


def test_serving_path_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from codegen_ls import cli\n"
        "from codegen_ls.lsp import server\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['complete', 'examples/demo.py:41:22']) == 0\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules)\n"
        "print('imported:', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
