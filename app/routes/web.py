"""Pages: the slide index and the OpenSeadragon viewer, and their static files."""

from __future__ import annotations

import html
from functools import lru_cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from app.dependencies import Registry
from app.routes.api import dzi_url
from app.slides import SINGLE_SLIDE_NAME

router = APIRouter(tags=["pages"])

OPENSEADRAGON_PARTS = ("node_modules", "openseadragon", "build", "openseadragon")


@lru_cache(maxsize=8)
def template(name: str) -> str:
    """A file of ``app/web`` as text (read once)."""
    return (resources.files("app") / "web" / name).read_text(encoding="utf-8")


def openseadragon_dir() -> Path | None:
    """Where ``npm ci`` put OpenSeadragon's build: the working directory or the project root."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.joinpath(*OPENSEADRAGON_PARTS)
        if (candidate / "openseadragon.min.js").is_file():
            return candidate
    return None


def viewer_page(name: str, index_url: str, associated: str | None = None) -> str:
    """The viewer page of one slide, or of one of its associated images, with its DZI and
    API URLs filled in."""
    api_url = f"/api/slides/{name}"
    values = {
        "{{TITLE}}": name if associated is None else f"{name} \u00b7 {associated}",
        "{{DZI_URL}}": dzi_url(name, associated),
        "{{API_URL}}": api_url if associated is None else f"{api_url}/associated/{associated}",
        "{{INDEX_URL}}": index_url,
    }
    page = template("viewer.html")
    for placeholder, value in values.items():
        page = page.replace(placeholder, html.escape(value, quote=True))
    return page


@router.get("/", response_class=HTMLResponse, summary="Index of slides (viewer in single mode)")
async def index(registry: Registry) -> HTMLResponse:
    """The single slide's viewer when only ``Image.Path`` is configured, else the index."""
    names = registry.names
    if names == [SINGLE_SLIDE_NAME]:
        return HTMLResponse(viewer_page(SINGLE_SLIDE_NAME, ""))
    rows = "\n".join(
        f'<li><a href="/slide/{html.escape(n, quote=True)}.html">{html.escape(n)}</a>'
        f'<span class="file">{html.escape(registry.entry(n).path.name)}</span></li>'
        for n in names
    )
    return HTMLResponse(template("index.html").replace("{{ROWS}}", rows))


@router.get("/slide/{name}.html", response_class=HTMLResponse, summary="Viewer of one slide")
async def slide_page(name: str, registry: Registry) -> HTMLResponse:
    """The OpenSeadragon viewer of slide ``name`` (404 for an unknown name)."""
    registry.entry(name)
    return HTMLResponse(viewer_page(name, "/"))


@router.get("/static/{file}", include_in_schema=False)
async def static(file: str) -> Response:
    """``viewer.js`` and ``viewer.css``."""
    media = {"viewer.js": "text/javascript", "viewer.css": "text/css"}.get(file)
    if media is None:
        return Response(status_code=404)
    return Response(template(file), media_type=media,
                    headers={"Cache-Control": "no-cache"})


@router.get("/healthz", summary="Liveness")
async def healthz(registry: Registry) -> dict[str, object]:
    """Always 200 while the process serves; lists the configured slide count."""
    return {"status": "ok", "slides": len(registry.names)}
