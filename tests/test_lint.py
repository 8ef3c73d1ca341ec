"""Style and types are checked like behaviour: ruff (docstrings D1, imports, pyupgrade,
bugbear) over app, tests and bench; mypy over app with pyproject.toml's [tool.mypy]."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", "app", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def mypy(*paths: str) -> subprocess.CompletedProcess[str]:
    """Run mypy as `make lint` does: the project's configuration, over its `files` (app/)
    unless paths are given."""
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(ROOT / "pyproject.toml"), *paths],
                          cwd=ROOT, capture_output=True, text=True)


def test_mypy_is_clean():
    result = mypy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_mypy_fails_on_a_type_error(tmp_path):
    """The check above can fail: the same command reports a wrong type, an untyped function
    (strict mode) and an unused ``type: ignore`` and exits 1."""
    bad = tmp_path / "bad.py"
    bad.write_text('def untyped(x):\n    return x\n\n\n'
                   'count: int = "three"\n'
                   'fine: int = 3  # type: ignore[assignment]\n')
    result = mypy(str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    for expected in ('Incompatible types in assignment (expression has type "str", variable '
                     'has type "int")  [assignment]',
                     "Function is missing a type annotation  [no-untyped-def]",
                     'Unused "type: ignore" comment  [unused-ignore]'):
        assert expected in result.stdout, result.stdout
