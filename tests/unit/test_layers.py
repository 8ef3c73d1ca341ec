"""The layers of app/: the core, the caches and batch work never import the web framework."""

import json
import subprocess
import sys

import pytest

WEB = ("fastapi", "starlette", "uvicorn")


@pytest.mark.parametrize("package", ["app.core", "app.cache", "app.batch", "app.coordination",
                                     "app.settings", "app.logs"])
def test_lower_layers_import_no_web_framework(package):
    """Importing every module of a lower layer (in a fresh interpreter) loads no web module, so
    pregeneration workers and the CLI's batch commands never import FastAPI."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"root = importlib.import_module({package!r})\n"
        "names = [root.__name__]\n"
        "if hasattr(root, '__path__'):\n"
        "    names += [m.name for m in pkgutil.walk_packages(root.__path__, root.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'modules': names, 'loaded': sorted(sys.modules)}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout)
    assert len(report["modules"]) >= 1
    web = [m for m in report["loaded"] if m.split(".")[0] in WEB]
    assert web == [], f"{package} imports {web[:5]}"


def test_the_check_sees_a_web_import():
    """The check above can fail: the server layer does import FastAPI."""
    code = "import app.server.app, sys; print('fastapi' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "True"
