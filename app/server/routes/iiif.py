"""IIIF documents: Image API 3.0 ``info.json`` and base-URI redirects, Presentation API 3.0
manifests (identifier scheme: :mod:`app.core.iiif`).

The image requests themselves (``/iiif/3/{name}/{region}/{size}/{rotation}/{quality}.{format}``)
are a tile family of the one tile route, :class:`app.server.tiles.TileRoute`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from app.core.formats import accepts_media
from app.core.iiif import PREFIX, Limits, base_path, image_info
from app.core.manifest import CanvasImage, slide_manifest
from app.core.planner import iiif_formats
from app.core.pyramid import ImageSource
from app.server.auth import GuardedRoute, Permission, require
from app.server.dependencies import AppSettings, Planner, PrivacyFilter, Registry
from app.server.routes.api import describe_associated

router = APIRouter(prefix=PREFIX, tags=["iiif"], route_class=GuardedRoute)
VIEW = require(Permission.VIEW)


def base_uri(request: Request, path: str) -> str:
    """The absolute URI of a server path (escaped) as the client addressed the server."""
    return str(request.base_url).rstrip("/") + quote(path)


def json_ld(request: Request, document: dict[str, Any]) -> Response:
    """A IIIF JSON document: ``application/ld+json`` with the document's ``@context`` as
    profile when the client's ``Accept`` asks for JSON-LD, else ``application/json``;
    ``Vary: Accept`` (CORS: the ``Cors`` middleware, as for every response)."""
    media = "application/json"
    if accepts_media(request.headers.get("accept"), "application/ld+json"):
        media = f'application/ld+json;profile="{document["@context"]}"'

    return Response(json.dumps(document, separators=(",", ":")), media_type=media,
                    headers={"Vary": "Accept"})


def _info(request: Request, source: ImageSource, path: str, planner: Planner,
          settings: AppSettings) -> Response:
    pyramid = source.pyramid
    width, height = pyramid.level_dimensions[-1]
    iiif = settings.Iiif
    document = image_info(base_uri(request, path), width, height, pyramid.tile_size,
                          pyramid.level_count, Limits(iiif.MaxWidth, iiif.MaxHeight,
                                                      iiif.MaxArea),
                          iiif_formats(planner))
    return json_ld(request, document)


def _redirect(request: Request, path: str) -> Response:
    return RedirectResponse(base_uri(request, f"{path}/info.json"), status_code=303)


@router.get("/{name}/info.json", summary="IIIF Image API 3.0 information of a slide",
            dependencies=[VIEW])
async def slide_info(name: str, request: Request, registry: Registry, planner: Planner,
                     settings: AppSettings) -> Response:
    """``ImageService3`` at level 2: the slide's DZI region as the image, the DZI tile size
    with scale factors 1, 2, 4, ..., the size limits and the formats of the format policy."""
    handle = await registry.get(name)
    return _info(request, handle.source, base_path(name), planner, settings)


@router.get("/{name}/associated/{associated}/info.json",
            summary="IIIF Image API 3.0 information of an associated image",
            dependencies=[VIEW])
async def associated_info(name: str, associated: str, request: Request, registry: Registry,
                          planner: Planner, settings: AppSettings) -> Response:
    """As for a slide; 404 when the slide has no such image or ``Privacy`` withholds it."""
    handle = await registry.get(name)
    source = await registry.associated(handle, associated)
    return _info(request, source, base_path(name, associated), planner, settings)


@router.get("/{name}", summary="IIIF base URI of a slide: 303 to its info.json",
            status_code=303, response_class=RedirectResponse, dependencies=[VIEW])
async def slide_base(name: str, request: Request, registry: Registry) -> Response:
    """Redirects (303 See Other) to ``/iiif/3/{name}/info.json``."""
    registry.entry(name)
    return _redirect(request, base_path(name))


@router.get("/{name}/associated/{associated}",
            summary="IIIF base URI of an associated image: 303 to its info.json",
            status_code=303, response_class=RedirectResponse, dependencies=[VIEW])
async def associated_base(name: str, associated: str, request: Request,
                          registry: Registry) -> Response:
    """Redirects (303 See Other) to the associated image's info.json."""
    handle = await registry.get(name)
    await registry.associated(handle, associated)
    return _redirect(request, base_path(name, associated))


@router.get("/{name}/manifest.json", summary="IIIF Presentation API 3.0 manifest of a slide",
            dependencies=[VIEW])
async def manifest(name: str, request: Request, registry: Registry, planner: Planner,
                   privacy: PrivacyFilter, settings: AppSettings) -> Response:
    """A canvas for the slide and one for each associated image ``Privacy`` shows, each
    painted by an image with its IIIF Image service; the slide's canvas has a Physical
    Dimensions service from its mpp; metadata (vendor, dimensions, mpp, objective power) from
    the properties ``Privacy`` shows."""
    handle = await registry.get(name)
    width, height = handle.pyramid.level_dimensions[-1]
    images = [CanvasImage(None, width, height)] + [
        CanvasImage(item["name"], item["width"], item["height"])
        for item in describe_associated(planner, privacy, settings, handle)]
    document = await anyio.to_thread.run_sync(
        slide_manifest, str(request.base_url), name, handle.slide.dimensions,
        privacy.slide_properties(handle), images, iiif_formats(planner)[0])
    return json_ld(request, document)
