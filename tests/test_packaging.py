"""Every subpackage of codegen_ls is in the wheel: a plain ``pip install .`` (not editable) imports it."""

from __future__ import annotations

import pytest

from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "codegen_ls").rglob("__init__.py")}
    assert on_disk - listed == set(), "subpackages missing from [tool.setuptools] packages in pyproject.toml"
