"""prometheus-client's multiprocess folder, prepared by ``tileserver serve`` before any worker
starts. This module imports no prometheus-client: the library picks its multiprocess mode when
it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``, so that variable must be set first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_directory(folder: str | Path) -> None:
    """Empty (creating) the multiprocess folder and point ``PROMETHEUS_MULTIPROC_DIR`` at it,
    before any worker starts (files of an earlier run would add old counts)."""
    path = Path(folder)
    if path.is_dir():
        for entry in path.iterdir():
            if entry.is_file() and entry.suffix == ".db":
                entry.unlink()
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROCESS_ENV] = str(path)
