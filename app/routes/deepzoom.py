"""DZI descriptors and tiles: single-slide ``/image.dzi``, multi-slide ``/storage/{name}.dzi``.

Routes stay thin: parse the address, call :meth:`TileService.get_tile`, build the response.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response

from app.dependencies import AppSettings, Registry, Tiles
from app.errors import BadTileRequest
from app.slides import SINGLE_SLIDE_NAME
from app.tiles import Tile, TileService

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


def tile_headers(tile: Tile, cache_control: str, allow_origin: str) -> list[tuple[bytes, bytes]]:
    """The response headers of a tile, as raw ASGI pairs (the README's list)."""
    encoding = tile.encoding
    headers = [
        (b"content-type", encoding.format.media_type.encode()),
        (b"etag", tile.etag.encode()),
        (b"cache-control", cache_control.encode()),
        (b"x-tile-format", encoding.format.value.encode()),
        (b"x-tile-lossless", b"true" if tile.lossless else b"false"),
        (b"x-tile-color-transform", tile.color_transform.encode()),
        (b"x-tile-cache", tile.cache.encode()),
        (b"x-tile-source", tile.source.encode()),
        (b"access-control-allow-origin", allow_origin.encode()),
        (b"access-control-expose-headers",
         b"ETag, X-Tile-Format, X-Tile-Lossless, X-Tile-Color-Transform, X-Tile-Cache, "
         b"X-Tile-Source"),
    ]
    if tile.vary_accept:
        headers.append((b"vary", b"Accept"))
    return headers


async def answer_tile(tiles: TileService, name: str, level: str, tile: str,
                      query_format: str | None, accept: str | None,
                      if_none_match: str | None, associated: str | None = None,
                      ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Serve one tile URL: ``(status, raw headers, body)``; 304 when ``If-None-Match`` matches.

    Used by the FastAPI routes below and by :class:`app.middleware.TileFastPath`, which answers
    the same URLs without FastAPI's per-request machinery; ``associated`` names an associated
    image of the slide (:mod:`app.routes.associated`).

    Raises:
        TileServerError: every 4xx/5xx case (mapped by :mod:`app.errors`).
    """
    t_level, col, row, ext = parse_address(level, tile)
    result = await tiles.get_tile(name, t_level, col, row, extension=ext,
                                  query_format=query_format, accept=accept,
                                  associated=associated)
    server = tiles.settings.Server
    headers = tile_headers(result, server.CacheControl, server.AccessControlAllowOrigin)
    if etag_matches(if_none_match, result.etag):
        return 304, [h for h in headers if h[0] != b"content-type"], b""
    headers.append((b"content-length", str(len(result.data)).encode()))
    return 200, headers, result.data


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


async def _tile(request: Request, tiles: TileService, name: str, level: str, tile: str,
                format: str | None, associated: str | None = None) -> Response:
    status, headers, body = await answer_tile(
        tiles, name, level, tile, format, request.headers.get("accept"),
        request.headers.get("if-none-match"), associated)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


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
async def single_tile(request: Request, tiles: Tiles, level: str, tile: str,
                      format: str | None = None) -> Response:
    """A tile of the ``Image.Path`` slide: ``/image_files/{level}/{col}_{row}.{ext}``."""
    return await _tile(request, tiles, SINGLE_SLIDE_NAME, level, tile, format)


@router.get("/storage/{name}.dzi", summary="DZI of a slide")
async def multi_dzi(name: str, registry: Registry, tiles: Tiles,
                    settings: AppSettings) -> Response:
    """The DZI XML of slide ``name`` (``DeepZoomGenerator.get_dzi``)."""
    return await _dzi(registry, tiles, settings, name)


@router.get("/storage/{name}_files/{level}/{tile}",
            summary="Tile of a slide")
async def multi_tile(request: Request, name: str, tiles: Tiles, level: str, tile: str,
                     format: str | None = None) -> Response:
    """A tile of slide ``name``: ``/storage/{name}_files/{level}/{col}_{row}.{ext}``."""
    return await _tile(request, tiles, name, level, tile, format)
