"""The project's own files: `make clean` and .gitignore cover what `make run` writes, and
pyproject.toml builds without setuptools deprecation warnings."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.version import Version

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def generated_folders() -> list[str]:
    """The top folders `make run` writes into with the default settings: the demo slide, the
    tile cache, the audit log."""
    s = Settings()
    paths = [s.DemoDirectory, s.TileCachePath, str(PurePosixPath(s.Audit.Path).parent)]
    return sorted({PurePosixPath(p).parts[0] for p in paths})


def test_make_clean_removes_what_make_run_writes(tmp_path):
    folders = generated_folders()
    assert folders == ["audit", "data", "tile_cache"]
    for name in folders:
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "file").write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("not generated")
    result = subprocess.run([shutil.which("make") or "make", "-f", str(ROOT / "Makefile"),
                             "-C", str(tmp_path), "clean"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_gitignore_and_dockerignore_cover_what_make_run_writes():
    gitignore = (ROOT / ".gitignore").read_text().split()
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for name in generated_folders():
        assert f"{name}/" in gitignore, name
        assert name in dockerignore, name


def test_license_is_an_spdx_string_the_build_backend_accepts():
    """setuptools >= 77 warns that a ``{text = ...}`` table is deprecated and accepts an SPDX
    expression string (PEP 639); older ones reject the string."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    [setuptools] = [Requirement(r) for r in pyproject["build-system"]["requires"]
                    if Requirement(r).name == "setuptools"]
    lowest = min(Version(spec.version) for spec in setuptools.specifier
                 if spec.operator in (">=", "==", "~="))
    assert lowest >= Version("77")
