"""Trust boundaries outside the protocol: editor settings that run code, the model directory,
onnxruntime's telemetry. (The protocol's own hostile-input tests are in test_robustness.py.)"""

from __future__ import annotations

import json

from samples import REPO


def test_vscode_settings_that_run_code_are_machine_scoped() -> None:
    """A cloned repository's ``.vscode/settings.json`` must not choose the server binary, its
    arguments or the model it loads: VS Code ignores workspace values of ``machine`` settings."""
    package = json.loads((REPO / "editors" / "vscode" / "package.json").read_text(encoding="utf-8"))
    declared = package["contributes"]["configuration"]["properties"]
    for name in ("serverPath", "serverArgs", "modelPath"):
        assert declared[f"codegenLs.{name}"].get("scope") == "machine", name
