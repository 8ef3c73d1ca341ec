"""Static assets shared by the server's pages and static exports: HTML templates, the viewer's
script and style, and where ``npm ci`` put OpenSeadragon and Mirador."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

OPENSEADRAGON_PARTS = ("node_modules", "openseadragon", "build", "openseadragon")
MIRADOR_PARTS = ("node_modules", "mirador", "dist")


@lru_cache(maxsize=16)
def template(name: str) -> str:
    """A file of ``app/assets`` as text (read once)."""
    return (resources.files(__name__) / name).read_text(encoding="utf-8")


def openseadragon_dir() -> Path | None:
    """Where ``npm ci`` put OpenSeadragon's build: the working directory or the project root."""
    return _npm_dir(OPENSEADRAGON_PARTS, "openseadragon.min.js")


def mirador_dir() -> Path | None:
    """Where ``npm ci`` put Mirador's bundle (``mirador.min.js``, React included)."""
    return _npm_dir(MIRADOR_PARTS, "mirador.min.js")


def _npm_dir(parts: tuple[str, ...], marker: str) -> Path | None:
    """The first of ``{cwd}/parts`` and ``{project root}/parts`` that holds ``marker``."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.joinpath(*parts)
        if (candidate / marker).is_file():
            return candidate
    return None
