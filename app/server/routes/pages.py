"""Pages: the slide index, the OpenSeadragon viewer of a slide or an associated image, the
viewer's static files, and liveness."""

from __future__ import annotations

import html

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from app.assets import template
from app.core.slides import SINGLE_SLIDE_NAME
from app.server.dependencies import Registry
from app.server.errors import error_response
from app.server.urls import dzi_url, viewer_url

router = APIRouter(tags=["pages"])


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
    hide_file = registry.privacy.hide_file_names  # Privacy.SlideNames: hash
    rows = "\n".join(
        f'<li><a href="{html.escape(viewer_url(n), quote=True)}">{html.escape(n)}</a>'
        + ("" if hide_file else
           f'<span class="file">{html.escape(registry.entry(n).path.name)}</span>')
        + "</li>"
        for n in names
    )
    return HTMLResponse(template("index.html").replace("{{ROWS}}", rows))


@router.get("/slide/{name}.html", response_class=HTMLResponse, summary="Viewer of one slide")
async def slide_page(name: str, registry: Registry) -> HTMLResponse:
    """The OpenSeadragon viewer of slide ``name`` (404 for an unknown name)."""
    registry.entry(name)
    return HTMLResponse(viewer_page(name, "/"))


@router.get("/slide/{name}/associated/{associated}.html", response_class=HTMLResponse,
            summary="Viewer of an associated image")
async def associated_page(name: str, associated: str, registry: Registry) -> HTMLResponse:
    """The OpenSeadragon viewer of one associated image (404 if absent or withheld)."""
    handle = await registry.get(name)
    await registry.associated(handle, associated)
    back = "/" if registry.names == [SINGLE_SLIDE_NAME] else viewer_url(name)
    return HTMLResponse(viewer_page(name, back, associated))


@router.get("/static/{file}", include_in_schema=False)
async def static(file: str) -> Response:
    """``viewer.js`` and ``viewer.css``."""
    media = {"viewer.js": "text/javascript", "viewer.css": "text/css"}.get(file)
    if media is None:
        return error_response(404, "not_found", "Not Found")
    return Response(template(file), media_type=media,
                    headers={"Cache-Control": "no-cache"})


@router.get("/healthz", summary="Liveness")
async def healthz(registry: Registry) -> dict[str, object]:
    """Always 200 while the process serves; lists the configured slide count."""
    return {"status": "ok", "slides": len(registry.names)}
