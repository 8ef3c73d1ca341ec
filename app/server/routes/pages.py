"""Pages: the slide index, the OpenSeadragon viewer of a slide or an associated image, the
viewer's static files, and liveness."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from app.assets import template
from app.cache.tiles import SlideCacheUse
from app.core.iiif import base_path
from app.core.slides import SINGLE_SLIDE_NAME, SlideEntry, SlideRegistry
from app.server.dependencies import Registry, Tiles
from app.server.errors import error_response
from app.server.urls import dzi_url, viewer_url

router = APIRouter(tags=["pages"])

MIB = 1024 * 1024
THUMBNAIL = (160, 120)
"""The box (CSS px) each index thumbnail fits, asked of the IIIF Image API as ``^!w,h`` (tiny
slides are scaled up to it)."""


def viewer_page(name: str, file: str, back_url: str, back_label: str,
                associated: str | None = None) -> str:
    """The viewer page of one slide, or of one of its associated images, with its DZI, IIIF
    and API URLs filled in.

    Args:
        name: the slide name; file: its file name (the page's title names both), empty
            when clients may not see it.
        back_url: the link back (the index, or the slide's viewer), empty for none.
        back_label: that link's text.
        associated: an associated image's name, or None for the slide.
    """
    api_url = f"/api/slides/{name}"
    title = name if associated is None else f"{name} \u00b7 {associated}"
    values = {
        "{{PAGE_TITLE}}": f"{title} \u00b7 {file}" if file else title,
        "{{TITLE}}": title,
        "{{FILE}}": file,
        "{{DZI_URL}}": dzi_url(name, associated),
        "{{IIIF_URL}}": quote(f"{base_path(name, associated)}/info.json"),
        "{{API_URL}}": api_url if associated is None else f"{api_url}/associated/{associated}",
        "{{INDEX_URL}}": back_url,
        "{{INDEX_LABEL}}": back_label,
        "{{MIRADOR_URL}}": quote(f"/slide/{name}/mirador.html"),
        "{{MANIFEST_URL}}": quote(f"{base_path(name)}/manifest.json"),
    }
    page = template("viewer.html")
    for placeholder, value in values.items():
        page = page.replace(placeholder, html.escape(value, quote=True))
    return page


@router.get("/", response_class=HTMLResponse, summary="Index of slides (viewer in single mode)")
async def index(registry: Registry, tiles: Tiles) -> HTMLResponse:
    """The single slide's viewer when only ``Image.Path`` is configured, else the index: per
    slide a lazily loaded IIIF thumbnail, the file and its size, the disk cache it uses, and
    (filled in by ``index.js`` for the rows on screen) dimensions, vendor, mpp and objective
    power. No slide is opened to render it."""
    names = registry.names
    if names == [SINGLE_SLIDE_NAME]:
        return HTMLResponse(viewer_page(SINGLE_SLIDE_NAME, _file(registry, SINGLE_SLIDE_NAME),
                                        "", ""))
    usage = await tiles.usage()
    entries = [registry.entry(n) for n in names]
    sizes = await anyio.to_thread.run_sync(_file_sizes, [e.path for e in entries],
                                           limiter=tiles.io_limiter)
    hide_file = registry.privacy.hide_file_names  # Privacy.SlideNames: hash
    rows = "\n".join(_index_row(entry, size, usage.get(entry.name, SlideCacheUse()).bytes,
                                hide_file)
                     for entry, size in zip(entries, sizes, strict=True))
    page = template("index.html").replace("{{COUNT}}", str(len(names)))
    return HTMLResponse(page.replace("{{ROWS}}", rows))


def _file_sizes(paths: list[Path]) -> list[int | None]:
    """Each file's size in bytes, None where it cannot be stat'ed (blocking)."""
    out: list[int | None] = []
    for path in paths:
        try:
            out.append(path.stat().st_size)
        except OSError:
            out.append(None)
    return out


def _file(registry: SlideRegistry, name: str) -> str:
    """The file name of a slide as clients may see it: none with ``Privacy.SlideNames``
    ``hash``."""
    return "" if registry.privacy.hide_file_names else registry.entry(name).path.name


def _index_row(entry: SlideEntry, size: int | None, cache_bytes: int, hide_file: bool) -> str:
    """One ``<li>`` of the index (every value escaped; no file name when ``hide_file``)."""
    name = entry.name
    thumb = quote(f"{base_path(name)}/full/^!{THUMBNAIL[0]},{THUMBNAIL[1]}/0/default.jpg")
    link = html.escape(viewer_url(name), quote=True)
    size_text = f"{size / MIB:,.1f} MiB" if size is not None else "missing"
    return (
        f'<li data-name="{html.escape(name, quote=True)}">'
        f'<a class="thumb" href="{link}" tabindex="-1"><img loading="lazy" alt="" '
        f'width="{THUMBNAIL[0]}" height="{THUMBNAIL[1]}" src="{html.escape(thumb, quote=True)}">'
        f'</a><div class="about"><a href="{link}">{html.escape(name)}</a>'
        f'<span class="facts"></span>'
        f'<span class="file">{"" if hide_file else html.escape(entry.path.name) + " · "}'
        f'{size_text} \u00b7 cache {cache_bytes / MIB:,.1f} MiB</span></div></li>')


@router.get("/slide/{name}.html", response_class=HTMLResponse, summary="Viewer of one slide")
async def slide_page(name: str, registry: Registry) -> HTMLResponse:
    """The OpenSeadragon viewer of slide ``name`` (404 for an unknown name)."""
    registry.entry(name)
    single = registry.names == [SINGLE_SLIDE_NAME]
    return HTMLResponse(viewer_page(name, _file(registry, name), "" if single else "/",
                                    "Slides"))


@router.get("/slide/{name}/mirador.html", response_class=HTMLResponse,
            summary="Mirador viewer of one slide (IIIF)")
async def mirador_page(name: str, registry: Registry) -> HTMLResponse:
    """Mirador opening the slide's IIIF manifest (``/iiif/3/{name}/manifest.json``): the
    slide and its associated images as canvases (404 for an unknown name)."""
    registry.entry(name)
    page = template("mirador.html")
    for placeholder, value in (("{{TITLE}}", name),
                               ("{{MANIFEST_URL}}", quote(f"{base_path(name)}/manifest.json"))):
        page = page.replace(placeholder, html.escape(value, quote=True))
    return HTMLResponse(page)


@router.get("/slide/{name}/associated/{associated}.html", response_class=HTMLResponse,
            summary="Viewer of an associated image")
async def associated_page(name: str, associated: str, registry: Registry) -> HTMLResponse:
    """The OpenSeadragon viewer of one associated image (404 if absent or withheld)."""
    handle = await registry.get(name)
    await registry.associated(handle, associated)
    back = "/" if registry.names == [SINGLE_SLIDE_NAME] else viewer_url(name)
    return HTMLResponse(viewer_page(name, _file(registry, name), back, name, associated))


@router.get("/static/{file}", include_in_schema=False)
async def static(file: str) -> Response:
    """``viewer.js``, ``index.js`` and ``viewer.css``."""
    media = {"viewer.js": "text/javascript", "viewer.css": "text/css",
             "index.js": "text/javascript"}.get(file)
    if media is None:
        return error_response(404, "not_found", "Not Found")
    return Response(template(file), media_type=media,
                    headers={"Cache-Control": "no-cache"})


@router.get("/healthz", summary="Liveness")
async def healthz(registry: Registry) -> dict[str, object]:
    """Always 200 while the process serves; lists the configured slide count."""
    return {"status": "ok", "slides": len(registry.names)}
