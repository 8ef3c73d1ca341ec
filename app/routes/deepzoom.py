"""DZI descriptors and tiles: single-slide ``/image.dzi``, multi-slide ``/storage/{name}.dzi``.

Routes stay thin: parse the address, call :meth:`TileService.get_tile`, build the response.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response

from app.audit import AuditLog, TileRequestRecord
from app.dependencies import AppSettings, Registry, Tiles
from app.errors import BadTileRequest, TileServerError, status_for
from app.formats import TileFormat
from app.slides import SINGLE_SLIDE_NAME
from app.tiles import EMPTY_DIGEST, Tile, TileService

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
    return _number("level", level), _number("col", col), _number("row", row), ext


def _number(what: str, text: str) -> int:
    if text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS:
        return int(text)  # every well-formed address: no regular expression
    if not _INTEGER.fullmatch(text):
        raise BadTileRequest(f"{what} {text!r} is not an integer")
    if text.startswith("-"):
        raise BadTileRequest(f"{what} {text} is negative")
    if len(text) > _MAX_DIGITS:
        raise BadTileRequest(f"{what} {text} is too large")
    return int(text)


_INTEGER = re.compile(r"-?\d+")


HEAD_SCOPE_KEY = "tileserver.head"
"""ASGI scope key :class:`app.middleware.HeadAsGet` sets on a HEAD request it passes on as GET."""

_EXPOSED = (b"ETag, Content-Digest, Repr-Digest, X-Tile-Format, X-Tile-Lossless, "
            b"X-Tile-Color-Transform, X-Tile-Cache, X-Tile-Source, X-Tile-Override")


def tile_headers(tile: Tile, cache_control: str, allow_origin: str,
                 head: bool = False) -> list[tuple[bytes, bytes]]:
    """The response headers of a tile, as raw ASGI pairs (the README's list).

    Integrity fields (RFC 9530): ``Repr-Digest`` is the SHA-256 of the tile (the selected
    representation); ``Content-Digest`` is that of the message content, so the same on a GET
    and the digest of empty content on a HEAD, which has none (RFC 9530 Appendix B.2).
    """
    digest = tile.digest
    headers = [
        *_fixed_headers(tile.encoding.format, tile.lossless, tile.color_transform, tile.cache,
                        tile.source, cache_control, allow_origin),
        (b"etag", digest.etag.encode()),
        (b"content-digest", (EMPTY_DIGEST if head else digest).content_digest.encode()),
        (b"repr-digest", digest.content_digest.encode()),
    ]
    if tile.vary_accept:
        headers.append((b"vary", b"Accept"))
    if tile.override_refused:
        headers.append((b"x-tile-override", b"refused"))
    return headers


@functools.lru_cache(maxsize=256)
def _fixed_headers(tile_format: TileFormat, lossless: bool, color_transform: str, cache: str,
                   source: str, cache_control: str, allow_origin: str
                   ) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of a tile that do not depend on its bytes, encoded once per combination
    (a handful per server) rather than on every response."""
    return (
        (b"content-type", tile_format.media_type.encode()),
        (b"cache-control", cache_control.encode()),
        (b"x-tile-format", tile_format.value.encode()),
        (b"x-tile-lossless", b"true" if lossless else b"false"),
        (b"x-tile-color-transform", color_transform.encode()),
        (b"x-tile-cache", cache.encode()),
        (b"x-tile-source", source.encode()),
        (b"access-control-allow-origin", allow_origin.encode()),
        (b"access-control-expose-headers", _EXPOSED),
    )


NOT_MODIFIED_DROPS = frozenset({b"content-type", b"content-digest", b"repr-digest"})
"""Fields a 304 leaves out: RFC 9110 section 15.4.5 keeps ETag, Cache-Control, Vary and drops
other representation metadata; a 304 has no content to digest."""


@dataclass(frozen=True, slots=True)
class AuditedRequest:
    """What the audit log needs beyond :func:`answer_tile`'s arguments.

    Attributes:
        log: the process's audit log.
        client: the client address (host), or None.
        path: URL path and query string.
        started: ``time.perf_counter()`` at arrival; ``arrived``: ``time.time()`` at arrival.
    """

    log: AuditLog
    client: str | None
    path: str
    started: float
    arrived: float

    @classmethod
    def start(cls, log: AuditLog | None, client: str | None, path: str,
              query: str = "") -> AuditedRequest | None:
        """The record of a request arriving now, or None when the audit log is off."""
        if log is None:
            return None
        return cls(log, client, f"{path}?{query}" if query else path, time.perf_counter(),
                   time.time())


async def answer_tile(tiles: TileService, name: str, level: str, tile: str,
                      query_format: str | None, accept: str | None,
                      if_none_match: str | None, associated: str | None = None, *,
                      head: bool = False, audit: AuditedRequest | None = None,
                      ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Serve one tile URL: ``(status, raw headers, body)``; 304 when ``If-None-Match`` matches.

    Used by the FastAPI routes below and by :class:`app.middleware.TileFastPath`, which answers
    the same URLs without FastAPI's per-request machinery; ``associated`` names an associated
    image of the slide (:mod:`app.routes.associated`). With ``audit``, every outcome (200,
    304, and each error with the status :mod:`app.errors` maps it to) is queued as one audit
    line.

    Args:
        head: the request is a HEAD (the body is still returned; the server drops it).

    Raises:
        TileServerError: every 4xx/5xx case (mapped by :mod:`app.errors`).
    """
    address = None
    try:
        address = parse_address(level, tile)
        t_level, col, row, ext = address
        result = await tiles.get_tile(name, t_level, col, row, extension=ext,
                                      query_format=query_format, accept=accept,
                                      associated=associated)
    except Exception as exc:
        if audit is not None:
            status = status_for(exc) if isinstance(exc, TileServerError) else 500
            code = exc.code if isinstance(exc, TileServerError) else "internal_error"
            handle = tiles.registry.peek(name)
            _audit(audit, name, address, query_format, accept, if_none_match, head, None,
                   handle.identity if handle else None, status, None, code)
        raise
    server = tiles.settings.Server
    headers = tile_headers(result, server.CacheControl, server.AccessControlAllowOrigin, head)
    if etag_matches(if_none_match, result.etag):
        status, body = 304, b""
        headers = [h for h in headers if h[0] not in NOT_MODIFIED_DROPS]
    else:
        status, body = 200, result.data
        headers.append((b"content-length", str(len(result.data)).encode()))
    if audit is not None:
        _audit(audit, name, address, query_format, accept, if_none_match, head, result,
               result.identity, status, 0 if head else len(body), None)
    return status, headers, body


def _audit(audit: AuditedRequest, name: str, address: tuple | None, query_format: str | None,
           accept: str | None, if_none_match: str | None, head: bool, tile: Tile | None,
           identity: str | None, status: int, body_bytes: int | None,
           error: str | None) -> None:
    level, col, row, ext = address if address is not None else (None, None, None, None)
    encoding = tile.encoding if tile is not None else None
    audit.log.record(TileRequestRecord(
        audit.arrived, audit.client, "HEAD" if head else "GET", audit.path, name, identity,
        level, col, row, ext, query_format, accept, if_none_match,
        encoding.format.value if encoding else None,
        tile.lossless if tile is not None else None,
        "refused" if tile is not None and tile.override_refused else None,
        tile.cache if tile is not None else None, status, body_bytes,
        tile.digest.sha256 if tile is not None else None,
        time.perf_counter() - audit.started, error))


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
    scope = request.scope
    audit = AuditedRequest.start(getattr(request.app.state, "audit", None),
                                 request.client.host if request.client else None,
                                 scope["path"], scope["query_string"].decode("latin-1"))
    status, headers, body = await answer_tile(
        tiles, name, level, tile, format, request.headers.get("accept"),
        request.headers.get("if-none-match"), associated, head=scope.get(HEAD_SCOPE_KEY, False),
        audit=audit)
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
