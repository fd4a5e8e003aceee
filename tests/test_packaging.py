"""Installing the package prints no warning the project can avoid (setuptools' deprecations included)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

BUILD = "import setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel('out'))"


def test_the_package_metadata_builds_without_a_warning(tmp_path):
    pytest.importorskip("setuptools")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "distill", tmp_path / "distill", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-W", "always", "-c", BUILD], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    metadata = next((tmp_path / "out").glob("*/METADATA")).read_text()
    assert "License-Expression: Apache-2.0" in metadata
