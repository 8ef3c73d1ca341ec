"""DZI descriptors and tiles: single-slide ``/image.dzi``, multi-slide ``/storage/{name}.dzi``.

Routes stay thin: parse the address, call :meth:`TileService.get_tile`, build the response.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response

from app.dependencies import AppSettings, Registry, Tiles
from app.errors import BadTileRequest
from app.slides import SINGLE_SLIDE_NAME
from app.tiles import Tile

router = APIRouter(tags=["deepzoom"])

_TILE = re.compile(r"(-?\d+)_(-?\d+)(?:\.([^./]*))?")
_MAX_DIGITS = 9


def parse_address(level: str, tile: str) -> tuple[int, int, int, str | None]:
    """Parse ``{level}`` and ``{col}_{row}.{ext}`` of a tile URL.

    Returns:
        ``(level, col, row, extension or None)``; numbers are DZI level and tile address.

    Raises:
        BadTileRequest: not integers, negative, or longer than 9 digits.
    """
    match = _TILE.fullmatch(tile)
    if match is None:
        raise BadTileRequest(f"tile {tile!r}: expected {{col}}_{{row}}.{{ext}}, e.g. 0_0.jpeg")
    col, row, ext = match.groups()
    if ext == "":
        raise BadTileRequest(f"tile {tile!r}: empty extension; use .jpeg, .png or .webp")
    numbers = []
    for what, text in (("level", level), ("col", col), ("row", row)):
        if not re.fullmatch(r"-?\d+", text):
            raise BadTileRequest(f"{what} {text!r} is not an integer")
        if text.startswith("-"):
            raise BadTileRequest(f"{what} {text} is negative")
        if len(text) > _MAX_DIGITS:
            raise BadTileRequest(f"{what} {text} is too large")
        numbers.append(int(text))
    return numbers[0], numbers[1], numbers[2], ext


def tile_response(request: Request, tile: Tile, cache_control: str, allow_origin: str) -> Response:
    """The HTTP response of a tile: body (or 304), and the headers the README lists."""
    headers = {
        "ETag": tile.etag,
        "Cache-Control": cache_control,
        "X-Tile-Format": tile.encoding.format.value,
        "X-Tile-Lossless": "true" if tile.encoding.lossless else "false",
        "X-Tile-Cache": tile.cache,
        "Access-Control-Allow-Origin": allow_origin,
        "Access-Control-Expose-Headers": "ETag, X-Tile-Format, X-Tile-Lossless, X-Tile-Cache",
    }
    if tile.vary_accept:
        headers["Vary"] = "Accept"
    media_type = tile.encoding.format.media_type
    if etag_matches(request.headers.get("if-none-match"), tile.etag):
        return Response(status_code=304, headers=headers)
    return Response(tile.data, media_type=media_type, headers=headers)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of an ``If-None-Match`` list against a strong ETag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.strip('"')
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate.strip('"') == bare:
            return True
    return False


async def _tile(request: Request, tiles: Tiles, settings: AppSettings, name: str, level: str,
                tile: str, format: str | None) -> Response:
    t_level, col, row, ext = parse_address(level, tile)
    result = await tiles.get_tile(name, t_level, col, row, extension=ext, query_format=format,
                                  accept=request.headers.get("accept"))
    server = settings.Server
    return tile_response(request, result, server.CacheControl, server.AccessControlAllowOrigin)


async def _dzi(registry: Registry, tiles: Tiles, settings: AppSettings, name: str) -> Response:
    handle = await registry.get(name)
    xml = handle.pyramid.dzi(tiles.policy.declared.value)
    return Response(xml, media_type="application/xml", headers={
        "Access-Control-Allow-Origin": settings.Server.AccessControlAllowOrigin,
    })


@router.get("/image.dzi", summary="DZI of the single slide")
async def single_dzi(registry: Registry, tiles: Tiles, settings: AppSettings) -> Response:
    """The DZI XML of the ``Image.Path`` slide (``DeepZoomGenerator.get_dzi``)."""
    return await _dzi(registry, tiles, settings, SINGLE_SLIDE_NAME)


@router.get("/image_files/{level}/{tile}",
            summary="Tile of the single slide")
async def single_tile(request: Request, tiles: Tiles, settings: AppSettings, level: str,
                      tile: str, format: str | None = None) -> Response:
    """A tile of the ``Image.Path`` slide: ``/image_files/{level}/{col}_{row}.{ext}``."""
    return await _tile(request, tiles, settings, SINGLE_SLIDE_NAME, level, tile, format)


@router.get("/storage/{name}.dzi", summary="DZI of a slide")
async def multi_dzi(name: str, registry: Registry, tiles: Tiles,
                    settings: AppSettings) -> Response:
    """The DZI XML of slide ``name`` (``DeepZoomGenerator.get_dzi``)."""
    return await _dzi(registry, tiles, settings, name)


@router.get("/storage/{name}_files/{level}/{tile}",
            summary="Tile of a slide")
async def multi_tile(request: Request, name: str, tiles: Tiles, settings: AppSettings,
                     level: str, tile: str, format: str | None = None) -> Response:
    """A tile of slide ``name``: ``/storage/{name}_files/{level}/{col}_{row}.{ext}``."""
    return await _tile(request, tiles, settings, name, level, tile, format)
