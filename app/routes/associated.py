"""Associated images (label, macro, thumbnail) as DZIs of their own, and their viewer page.

Multi-slide: ``/storage/{name}/associated/{associated}.dzi`` and
``/storage/{name}/associated/{associated}_files/{level}/{col}_{row}.{ext}``; single slide:
``/image/associated/{associated}.dzi`` and ``/image/associated/{associated}_files/...``. Tiles
go through :meth:`app.tiles.TileService.get_tile` like the slide's: same format policy, colour
mode, caches and headers. ``Privacy.HideAssociatedImages`` makes every one of them 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from app.dependencies import AppSettings, Registry, Tiles
from app.routes.deepzoom import _tile
from app.routes.web import viewer_page
from app.slides import SINGLE_SLIDE_NAME

router = APIRouter(tags=["associated images"])


async def _dzi(registry: Registry, tiles: Tiles, settings: AppSettings, name: str,
               associated: str) -> Response:
    handle = await registry.get(name)
    source = await tiles.associated_source(handle, associated)
    xml = source.pyramid.dzi(tiles.policy.declared.value)
    return Response(xml, media_type="application/xml", headers={
        "Access-Control-Allow-Origin": settings.Server.AccessControlAllowOrigin,
    })


@router.get("/storage/{name}/associated/{associated}.dzi",
            summary="DZI of an associated image of a slide")
async def multi_associated_dzi(name: str, associated: str, registry: Registry, tiles: Tiles,
                               settings: AppSettings) -> Response:
    """The DZI XML of associated image ``associated`` (label, macro, ...) of slide ``name``."""
    return await _dzi(registry, tiles, settings, name, associated)


@router.get("/storage/{name}/associated/{associated}_files/{level}/{tile}",
            summary="Tile of an associated image of a slide")
async def multi_associated_tile(request: Request, name: str, associated: str, tiles: Tiles,
                                level: str, tile: str, format: str | None = None) -> Response:
    """A tile of an associated image: ``.../{associated}_files/{level}/{col}_{row}.{ext}``."""
    return await _tile(request, tiles, name, level, tile, format, associated)


@router.get("/image/associated/{associated}.dzi",
            summary="DZI of an associated image of the single slide")
async def single_associated_dzi(associated: str, registry: Registry, tiles: Tiles,
                                settings: AppSettings) -> Response:
    """The DZI XML of an associated image of the ``Image.Path`` slide."""
    return await _dzi(registry, tiles, settings, SINGLE_SLIDE_NAME, associated)


@router.get("/image/associated/{associated}_files/{level}/{tile}",
            summary="Tile of an associated image of the single slide")
async def single_associated_tile(request: Request, associated: str, tiles: Tiles, level: str,
                                 tile: str, format: str | None = None) -> Response:
    """A tile of an associated image of the ``Image.Path`` slide."""
    return await _tile(request, tiles, SINGLE_SLIDE_NAME, level, tile, format, associated)


@router.get("/slide/{name}/associated/{associated}.html", response_class=HTMLResponse,
            summary="Viewer of an associated image")
async def associated_page(name: str, associated: str, registry: Registry,
                          tiles: Tiles) -> HTMLResponse:
    """The OpenSeadragon viewer of one associated image (404 if absent or withheld)."""
    handle = await registry.get(name)
    await tiles.associated_source(handle, associated)
    back = "/" if registry.names == [SINGLE_SLIDE_NAME] else f"/slide/{name}.html"
    return HTMLResponse(viewer_page(name, back, associated))
