"""Static assets shared by the server's pages and static exports: HTML templates, the viewer's
script and style, and where ``npm ci`` put OpenSeadragon."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

OPENSEADRAGON_PARTS = ("node_modules", "openseadragon", "build", "openseadragon")


@lru_cache(maxsize=16)
def template(name: str) -> str:
    """A file of ``app/assets`` as text (read once)."""
    return (resources.files(__name__) / name).read_text(encoding="utf-8")


SWAGGER_UI_PARTS = ("node_modules", "swagger-ui-dist")
REDOC_PARTS = ("node_modules", "redoc", "bundles")


def npm_dir(parts: tuple[str, ...], marker: str) -> Path | None:
    """Where ``npm ci`` put a package's folder ``parts`` (holding file ``marker``): under the
    working directory or the project root; None when neither has it."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.joinpath(*parts)
        if (candidate / marker).is_file():
            return candidate
    return None


def openseadragon_dir() -> Path | None:
    """Where ``npm ci`` put OpenSeadragon's build: the working directory or the project root."""
    return npm_dir(OPENSEADRAGON_PARTS, "openseadragon.min.js")
