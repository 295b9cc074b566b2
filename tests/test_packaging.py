"""Packaging metadata: one version (``randlora.__version__``, which pyproject.toml reads) and a LICENSE file
that is the licence pyproject.toml declares."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

import randlora

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
# sha256 of the shipped LICENSE: the Apache License 2.0 text as distributed in peft's wheel (with the leading
# blank line of the apache.org file); a changed or truncated LICENSE fails the test
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def static_version() -> str:
    """``__version__`` as setuptools reads it to build: a literal assignment in ``randlora/__init__.py``,
    found without importing the package (the build environment has no torch)."""
    tree = ast.parse((ROOT / "randlora" / "__init__.py").read_text("utf-8"))
    found = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
             and any(isinstance(t, ast.Name) and t.id == "__version__" for t in n.targets)]
    assert len(found) == 1, f"randlora/__init__.py must assign __version__ a literal string once, found {found}"
    return found[0]


def test_the_version_has_one_source() -> None:
    project = pyproject()["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "randlora.__version__"}
    assert static_version() == randlora.__version__
    parts = randlora.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts), randlora.__version__


def test_license_file_is_the_declared_licence() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    data = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(data).hexdigest() == APACHE_2_SHA256, "LICENSE is not the standard Apache 2.0 text"
    requires = pyproject()["build-system"]["requires"]
    assert requires == ["setuptools>=77"]  # the first setuptools that reads an SPDX license and license-files


def test_the_changelogs_latest_release_is_this_version() -> None:
    """The first dated release heading of CHANGELOG.md (below an Unreleased section) names ``__version__``."""
    import re

    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, flags=re.M)
    assert headings[0] == ("Unreleased", "")
    version, date = headings[1]
    assert version == randlora.__version__ and date, headings[:2]
