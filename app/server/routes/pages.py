"""Pages: the slide index, the OpenSeadragon viewer of a slide or an associated image, the
viewer's static files, and liveness.

Every URL a page holds starts with the app's path base (``{{BASE}}``). A viewer page asked for
by a browser without credentials under ``Auth:Mode`` apikey or jwt is answered 401 with the
viewer's sign-in page (:func:`sign_in_page`): the same page filled from the URL alone (nothing
about the slide, not even whether it exists), whose script takes a bearer token from the URL
fragment (``#access_token=...``, never sent to a server) and loads everything with it.
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse

from app.assets import template
from app.core.errors import NotAuthenticated
from app.core.slides import SINGLE_SLIDE_NAME
from app.server.auth import (
    GuardedRoute,
    Permission,
    Requirement,
    principal_of,
    require,
    visible,
)
from app.server.credentials import Principal
from app.server.dependencies import Base, Caller, Registry, path_base
from app.server.errors import error_response
from app.server.urls import dzi_url, viewer_url

router = APIRouter(tags=["pages"], route_class=GuardedRoute)
PUBLIC = require(Permission.PUBLIC)


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


def viewer_page(name: str, index_url: str, associated: str | None = None, base: str = "",
                sign_in: bool = False) -> str:
    """The viewer page of one slide, or of one of its associated images, with its DZI and
    API URLs filled in (under ``base``); ``sign_in`` marks the page a browser gets without
    credentials."""
    api_url = f"{base}/api/slides/{name}"
    values = {
        "{{TITLE}}": name if associated is None else f"{name} \u00b7 {associated}",
        "{{DZI_URL}}": dzi_url(name, associated, base),
        "{{API_URL}}": api_url if associated is None else f"{api_url}/associated/{associated}",
        "{{INDEX_URL}}": index_url,
        "{{BASE}}": base,
        "{{SIGN_IN}}": "required" if sign_in else "",
    }
    page = template("viewer.html")
    for placeholder, value in values.items():
        page = page.replace(placeholder, html.escape(value, quote=True))
    return page


async def sign_in_page(request: Request, exc: Exception) -> Response:
    """The 401 answer of :class:`SignInRequired`: the viewer page of the URL's slide, marked
    as needing a token, with ``WWW-Authenticate``."""
    params = request.path_params
    page = viewer_page(params.get("name", SINGLE_SLIDE_NAME), "", params.get("associated"),
                       path_base(request), sign_in=True)
    challenge = exc.challenge if isinstance(exc, NotAuthenticated) else ""
    return HTMLResponse(page, status_code=401, headers={
        "WWW-Authenticate": challenge, "Cache-Control": "no-store"})


@router.get("/", response_class=HTMLResponse, summary="Index of slides (viewer in single mode)",
            dependencies=[require(Permission.LIST)])
async def index(registry: Registry, caller: Caller, base: Base) -> HTMLResponse:
    """The single slide's viewer when only ``Image.Path`` is configured, else the index of the
    slides the caller may see."""
    names = visible(caller, registry.names)
    if registry.names == [SINGLE_SLIDE_NAME] and names:
        return HTMLResponse(viewer_page(SINGLE_SLIDE_NAME, "", base=base))
    hide_file = registry.privacy.hide_file_names  # Privacy.SlideNames: hash
    rows = "\n".join(
        f'<li><a href="{html.escape(viewer_url(n, base=base), quote=True)}">{html.escape(n)}'
        + "</a>" + ("" if hide_file else
                    f'<span class="file">{html.escape(registry.entry(n).path.name)}</span>')
        + "</li>"
        for n in names
    )
    page = template("index.html").replace("{{BASE}}", html.escape(base, quote=True))
    return HTMLResponse(page.replace("{{ROWS}}", rows))


@router.get("/slide/{name}.html", response_class=HTMLResponse, summary="Viewer of one slide",
            dependencies=[VIEWER])
async def slide_page(name: str, registry: Registry, base: Base) -> HTMLResponse:
    """The OpenSeadragon viewer of slide ``name`` (404 for an unknown name)."""
    registry.entry(name)
    return HTMLResponse(viewer_page(name, f"{base}/", base=base))


@router.get("/slide/{name}/associated/{associated}.html", response_class=HTMLResponse,
            summary="Viewer of an associated image", dependencies=[VIEWER])
async def associated_page(name: str, associated: str, registry: Registry,
                          base: Base) -> HTMLResponse:
    """The OpenSeadragon viewer of one associated image (404 if absent or withheld)."""
    handle = await registry.get(name)
    await registry.associated(handle, associated)
    back = f"{base}/" if registry.names == [SINGLE_SLIDE_NAME] else viewer_url(name, base=base)
    return HTMLResponse(viewer_page(name, back, associated, base))


@router.get("/static/{file}", include_in_schema=False, dependencies=[PUBLIC])
async def static(file: str) -> Response:
    """``viewer.js`` and ``viewer.css``."""
    media = {"viewer.js": "text/javascript", "viewer.css": "text/css"}.get(file)
    if media is None:
        return error_response(404, "not_found", "Not Found")
    return Response(template(file), media_type=media,
                    headers={"Cache-Control": "no-cache"})


@router.get("/healthz", summary="Liveness", dependencies=[PUBLIC])
async def healthz(registry: Registry) -> dict[str, object]:
    """Always 200 while the process serves; lists the configured slide count."""
    return {"status": "ok", "slides": len(registry.names)}
