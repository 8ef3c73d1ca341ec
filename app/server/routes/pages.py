"""Pages: the slide index, the OpenSeadragon viewer of a slide or an associated image, Mirador,
the viewer's static files, and liveness.

Every URL a page holds starts with the app's path base (``{{BASE}}``). A viewer page asked for
by a browser without credentials under ``Auth:Mode`` apikey or jwt is answered 401 with the
viewer's sign-in page (:func:`sign_in_page`): the same page filled from the URL alone (nothing
about the slide, not even whether it exists), whose script takes a bearer token from the URL
fragment (``#access_token=...``, never sent to a server) and loads everything with it.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse

from app.assets import template
from app.cache.tiles import SlideCacheUse
from app.core.errors import NotAuthenticated
from app.core.iiif import base_path
from app.core.slides import SINGLE_SLIDE_NAME, SlideEntry, SlideRegistry
from app.server.auth import (
    GuardedRoute,
    Permission,
    Requirement,
    principal_of,
    require,
    visible,
)
from app.server.credentials import Principal
from app.server.dependencies import Base, Caller, Registry, Tiles, path_base
from app.server.errors import error_response
from app.server.urls import dzi_url, viewer_url

router = APIRouter(tags=["pages"], route_class=GuardedRoute)
PUBLIC = require(Permission.PUBLIC)
MIB = 1024 * 1024
THUMBNAIL = (160, 120)
"""The box (CSS px) each index thumbnail fits, asked of the IIIF Image API as ``^!w,h`` (tiny
slides are scaled up to it)."""


class SignInRequired(NotAuthenticated):
    """A browser asked for a viewer page without credentials (answered by
    :func:`sign_in_page`)."""


class ViewerRequirement(Requirement):
    """``view`` for viewer pages: a browser without credentials gets :class:`SignInRequired`
    instead of the JSON 401."""

    async def __call__(self, request: Request) -> Principal:
        """As :meth:`Requirement.__call__`; :class:`SignInRequired` for a browser."""
        try:
            return await super().__call__(request)
        except NotAuthenticated as exc:
            principal = principal_of(request)
            if principal.problem is None and "text/html" in request.headers.get("accept", ""):
                raise SignInRequired(exc.detail, challenge=exc.challenge) from None
            raise


VIEWER = Depends(ViewerRequirement(Permission.VIEW))


def viewer_page(name: str, file: str, back_url: str, back_label: str,
                associated: str | None = None, base: str = "", sign_in: bool = False) -> str:
    """The viewer page of one slide, or of one of its associated images, with its DZI, IIIF
    and API URLs filled in (under ``base``).

    Args:
        name: the slide name; file: its file name (the page's title names both), empty
            when clients may not see it.
        back_url: the link back (the index, or the slide's viewer), empty for none.
        back_label: that link's text.
        associated: an associated image's name, or None for the slide.
        base: the path base of every URL.
        sign_in: the page a browser gets without credentials.
    """
    api_url = f"{base}/api/slides/{name}"
    title = name if associated is None else f"{name} \u00b7 {associated}"
    values = {
        "{{PAGE_TITLE}}": f"{title} \u00b7 {file}" if file else title,
        "{{TITLE}}": title,
        "{{FILE}}": file,
        "{{DZI_URL}}": dzi_url(name, associated, base),
        "{{IIIF_URL}}": base + quote(f"{base_path(name, associated)}/info.json"),
        "{{API_URL}}": api_url if associated is None else f"{api_url}/associated/{associated}",
        "{{INDEX_URL}}": back_url,
        "{{INDEX_LABEL}}": back_label,
        "{{MIRADOR_URL}}": base + quote(f"/slide/{name}/mirador.html"),
        "{{MANIFEST_URL}}": base + quote(f"{base_path(name)}/manifest.json"),
        "{{BASE}}": base,
        "{{SIGN_IN}}": "required" if sign_in else "",
    }
    page = template("viewer.html")
    for placeholder, value in values.items():
        page = page.replace(placeholder, html.escape(value, quote=True))
    return page


def _file(registry: SlideRegistry, name: str) -> str:
    """The file name of a slide as clients may see it: none with ``Privacy.SlideNames``
    ``hash``."""
    return "" if registry.privacy.hide_file_names else registry.entry(name).path.name


async def sign_in_page(request: Request, exc: Exception) -> Response:
    """The 401 answer of :class:`SignInRequired`: the viewer page of the URL's slide, marked
    as needing a token, with ``WWW-Authenticate``."""
    params = request.path_params
    page = viewer_page(params.get("name", SINGLE_SLIDE_NAME), "", "", "",
                       params.get("associated"), path_base(request), sign_in=True)
    challenge = exc.challenge if isinstance(exc, NotAuthenticated) else ""
    return HTMLResponse(page, status_code=401, headers={
        "WWW-Authenticate": challenge, "Cache-Control": "no-store"})


@router.get("/", response_class=HTMLResponse, summary="Index of slides (viewer in single mode)",
            dependencies=[require(Permission.LIST)])
async def index(registry: Registry, caller: Caller, base: Base, tiles: Tiles) -> HTMLResponse:
    """The single slide's viewer when only ``Image.Path`` is configured, else the index of the
    slides the caller may see: per slide a lazily loaded IIIF thumbnail, the file (unless
    ``Privacy.SlideNames`` is hash) and its size, the disk cache it uses, and (filled in by
    ``index.js`` for the rows on screen) dimensions, vendor, mpp and objective power. No slide
    is opened to render it."""
    names = visible(caller, registry.names)
    if registry.names == [SINGLE_SLIDE_NAME] and names:
        return HTMLResponse(viewer_page(SINGLE_SLIDE_NAME, _file(registry, SINGLE_SLIDE_NAME),
                                        "", "", base=base))
    usage = await tiles.usage()
    entries = [registry.entry(n) for n in names]
    sizes = await anyio.to_thread.run_sync(_file_sizes, [e.path for e in entries],
                                           limiter=tiles.io_limiter)
    hide_file = registry.privacy.hide_file_names  # Privacy.SlideNames: hash
    rows = "\n".join(_index_row(entry, size, usage.get(entry.name, SlideCacheUse()).bytes,
                                hide_file, base)
                     for entry, size in zip(entries, sizes, strict=True))
    page = template("index.html").replace("{{BASE}}", html.escape(base, quote=True))
    page = page.replace("{{COUNT}}", str(len(names)))
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


def _index_row(entry: SlideEntry, size: int | None, cache_bytes: int, hide_file: bool,
               base: str) -> str:
    """One ``<li>`` of the index (every value escaped; no file name when ``hide_file``)."""
    name = entry.name
    thumb = base + quote(f"{base_path(name)}/full/^!{THUMBNAIL[0]},{THUMBNAIL[1]}/0/"
                         "default.jpg")
    link = html.escape(viewer_url(name, base=base), quote=True)
    size_text = f"{size / MIB:,.1f} MiB" if size is not None else "missing"
    return (
        f'<li data-name="{html.escape(name, quote=True)}">'
        f'<a class="thumb" href="{link}" tabindex="-1"><img loading="lazy" alt="" '
        f'width="{THUMBNAIL[0]}" height="{THUMBNAIL[1]}" src="{html.escape(thumb, quote=True)}">'
        f'</a><div class="about"><a href="{link}">{html.escape(name)}</a>'
        f'<span class="facts"></span>'
        f'<span class="file">{"" if hide_file else html.escape(entry.path.name) + " · "}'
        f'{size_text} \u00b7 cache {cache_bytes / MIB:,.1f} MiB</span></div></li>')


@router.get("/slide/{name}.html", response_class=HTMLResponse, summary="Viewer of one slide",
            dependencies=[VIEWER])
async def slide_page(name: str, registry: Registry, base: Base) -> HTMLResponse:
    """The OpenSeadragon viewer of slide ``name`` (404 for an unknown name); no link back in
    single-slide mode, where there is no index."""
    registry.entry(name)
    back = "" if registry.names == [SINGLE_SLIDE_NAME] else f"{base}/"
    return HTMLResponse(viewer_page(name, _file(registry, name), back, "Slides", base=base))


@router.get("/slide/{name}/mirador.html", response_class=HTMLResponse,
            summary="Mirador viewer of one slide (IIIF)", dependencies=[VIEWER])
async def mirador_page(name: str, registry: Registry, base: Base) -> HTMLResponse:
    """Mirador opening the slide's IIIF manifest (``/iiif/3/{name}/manifest.json``): the
    slide and its associated images as canvases (404 for an unknown name)."""
    registry.entry(name)
    page = template("mirador.html")
    for placeholder, value in (
            ("{{TITLE}}", name), ("{{BASE}}", base),
            ("{{MANIFEST_URL}}", base + quote(f"{base_path(name)}/manifest.json"))):
        page = page.replace(placeholder, html.escape(value, quote=True))
    return HTMLResponse(page)


@router.get("/slide/{name}/associated/{associated}.html", response_class=HTMLResponse,
            summary="Viewer of an associated image", dependencies=[VIEWER])
async def associated_page(name: str, associated: str, registry: Registry,
                          base: Base) -> HTMLResponse:
    """The OpenSeadragon viewer of one associated image (404 if absent or withheld)."""
    handle = await registry.get(name)
    await registry.associated(handle, associated)
    back = f"{base}/" if registry.names == [SINGLE_SLIDE_NAME] else viewer_url(name, base=base)
    return HTMLResponse(viewer_page(name, _file(registry, name), back, name, associated, base))


@router.get("/static/{file}", include_in_schema=False, dependencies=[PUBLIC])
async def static(file: str) -> Response:
    """``viewer.js``, ``index.js`` and ``viewer.css``."""
    media = {"viewer.js": "text/javascript", "viewer.css": "text/css",
             "index.js": "text/javascript"}.get(file)
    if media is None:
        return error_response(404, "not_found", "Not Found")
    return Response(template(file), media_type=media,
                    headers={"Cache-Control": "no-cache"})


@router.get("/healthz", summary="Liveness", dependencies=[PUBLIC])
async def healthz(registry: Registry) -> dict[str, object]:
    """Always 200 while the process serves; lists the configured slide count."""
    return {"status": "ok", "slides": len(registry.names)}
