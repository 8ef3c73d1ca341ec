"""The one tile entry path: a single ASGI layer answers every tile family.

:class:`TileRoute` is the app's innermost middleware, in front of FastAPI's router. It recognises
the tile URLs of every family (see below), parses the address, asks
:class:`app.cache.tiles.TileService` for the tile, and builds the response: headers
(:func:`tile_headers`), ETag and ``304 Not Modified``, ``HEAD``, JSON errors through
:mod:`app.server.errors`' one table, and one audit line per request (:mod:`app.server.audit`).
No route of the router can answer a tile URL, so a rule added here applies to every tile.

Families (``{tile}`` is ``{col}_{row}.{ext}``; ``level`` is a DZI level, 0 = 1x1 px;
``{image}`` is ``{region}/{size}/{rotation}/{quality}.{format}`` of the IIIF Image API 3.0):

=========================  ==========================================================
slide tile                 ``/storage/{name}_files/{level}/{tile}``
single-slide tile          ``/image_files/{level}/{tile}`` (the slide ``image``)
associated-image tile      ``/storage/{name}/associated/{associated}_files/{level}/{tile}``
single-slide associated    ``/image/associated/{associated}_files/{level}/{tile}``
IIIF image of a slide      ``/iiif/3/{name}/{image}`` (the single slide: ``name`` image)
IIIF associated image      ``/iiif/3/{name}/associated/{associated}/{image}``
=========================  ==========================================================

:func:`match_tile_path` is the one parser of every family: it names the slide (and the
associated image) of any tile URL, so a rule about who may see a slide applies to all.

FastAPI's router never sees these requests (its per-request machinery costs a fifth of a
memory-cache hit), so the OpenAPI document gets their description from :func:`openapi_paths`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from app.cache.flight import ClientGone
from app.cache.tiles import Tile
from app.core.digest import EMPTY_DIGEST
from app.core.errors import (
    AuditUnavailable,
    BadTileRequest,
    Overloaded,
    TileNotFound,
    TileServerError,
)
from app.core.formats import TileFormat
from app.core.planner import RegionPlan, TileRequest
from app.core.slides import SINGLE_SLIDE_NAME
from app.server.audit import AuditLog, Caller, TileRequestRecord, cap
from app.server.auth import Permission, authorize
from app.server.credentials import PRINCIPAL_KEY
from app.server.errors import error_json, headers_for, status_for
from app.server.guard import CONNECTION

log = logging.getLogger(__name__)

HEAD_SCOPE_KEY = "tileserver.head"
"""ASGI scope key :class:`app.server.middleware.HeadAsGet` sets on a HEAD request it passes on
as GET."""
CLIENT_CLOSED = 499
"""The status audit lines and metrics give a request whose client went before its tile was
there (nginx's convention; nothing is sent)."""

_MAX_DIGITS = 9

AuditAddress = tuple[int | None, int | None, int | None, str | None]
"""What the audit line records of a request's address: DZI level, col, row (None where there
is none) and the extension or IIIF format asked for."""


@dataclass(frozen=True, slots=True)
class TilePath:
    """A tile URL, split but not yet checked: the slide, an associated image or None, and the
    level and ``{col}_{row}.{ext}`` segments as text."""

    slide: str
    associated: str | None
    level: str
    tile: str


@dataclass(frozen=True, slots=True)
class IiifPath:
    """An IIIF Image API image URL, split but not yet checked: the slide, an associated image
    or None, and the ``region``, ``size``, ``rotation`` and ``quality.format`` segments."""

    slide: str
    associated: str | None
    segments: tuple[str, str, str, str]


def match_tile_path(path: str) -> TilePath | IiifPath | None:
    """The :class:`TilePath` or :class:`IiifPath` of a URL path of any tile family, or None
    (see the module docstring). Only the shape is checked here; :func:`parse_address` and
    :func:`app.core.iiif.parse_image_request` check the rest."""
    parts = path.split("/")
    n = len(parts)
    if n >= 8 and parts[1] == "iiif" and parts[2] == "3":
        if n == 8:
            return IiifPath(parts[3], None, (parts[4], parts[5], parts[6], parts[7]))
        if n == 10 and parts[4] == "associated":
            return IiifPath(parts[3], parts[5], (parts[6], parts[7], parts[8], parts[9]))
        return None
    if n == 5 and parts[1] == "storage" and parts[2].endswith("_files") and len(parts[2]) > 6:
        return TilePath(parts[2][:-6], None, parts[3], parts[4])
    if n == 4 and parts[1] == "image_files":
        return TilePath(SINGLE_SLIDE_NAME, None, parts[2], parts[3])
    if (n == 7 and parts[1] == "storage" and parts[3] == "associated"
            and parts[4].endswith("_files") and len(parts[4]) > 6):
        return TilePath(parts[2], parts[4][:-6], parts[5], parts[6])
    if (n == 6 and parts[1] == "image" and parts[2] == "associated"
            and parts[3].endswith("_files") and len(parts[3]) > 6):
        return TilePath(SINGLE_SLIDE_NAME, parts[3][:-6], parts[4], parts[5])
    return None


def parse_address(level: str, tile: str) -> tuple[int, int, int, str | None]:
    """Parse ``{level}`` and ``{col}_{row}.{ext}`` of a tile URL.

    Numbers are canonical: ASCII digits without leading zeros (``0`` itself aside), at most
    :data:`_MAX_DIGITS` of them, so each tile has exactly one URL (one CDN cache entry, one
    audit trail).

    Returns:
        ``(level, col, row, extension or None)``; numbers are DZI level and tile address.

    Raises:
        TileNotFound: the segments do not name a tile (``-1``, ``01``, ``１``, ``x``, no ``_``).
        BadTileRequest: an empty extension (``0_0.``).
    """
    col, sep, rest = tile.partition("_")
    row, dot, ext = rest.partition(".")
    if not sep:
        raise TileNotFound(f"tile {tile!r}: expected {{col}}_{{row}}.{{ext}}, e.g. 0_0.jpeg")
    if dot and not ext:
        raise BadTileRequest(f"tile {tile!r}: empty extension; use .jpeg, .png or .webp")
    return (_number("level", level), _number("col", col), _number("row", row),
            ext if dot else None)


def _number(what: str, text: str) -> int:
    if (text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS
            and (text[0] != "0" or text == "0")):
        return int(text)
    raise TileNotFound(f"{what} {text!r} is not a tile address: ASCII digits without leading "
                       "zeros expected")


@functools.lru_cache(maxsize=256)
def _query_format(query: bytes) -> str | None:
    """The last ``format`` parameter of a tile URL's query string, or None. Memoised: a
    viewer sends the same few query strings (``format=png``, a signed-URL grant) over and
    over."""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("format")
    return values[-1] if values else None


def tile_headers(tile: Tile, cache_control: str, head: bool = False) -> list[tuple[bytes, bytes]]:
    """The response headers of a tile, as raw ASGI pairs (docs/api.md lists them); the CORS
    fields are added by :class:`app.server.middleware.Cors`, as to every response.

    Integrity fields (RFC 9530): ``Repr-Digest`` is the SHA-256 of the tile (the selected
    representation); ``Content-Digest`` is that of the message content, so the same on a GET
    and the digest of empty content on a HEAD, which has none (RFC 9530 Appendix B.2).
    """
    digest, plan = tile.digest, tile.plan
    headers = [
        *_fixed_headers(plan.encoding.format, tile.lossless, plan.color_transform, tile.cache,
                        tile.source, cache_control),
        (b"etag", digest.etag.encode()),
        (b"content-digest", (EMPTY_DIGEST if head else digest).content_digest.encode()),
        (b"repr-digest", digest.content_digest.encode()),
    ]
    if plan.vary_accept:
        headers.append((b"vary", b"Accept"))
    if plan.override_refused:
        headers.append((b"x-tile-override", b"refused"))
    return headers


@functools.lru_cache(maxsize=256)
def _fixed_headers(tile_format: TileFormat, lossless: bool, color_transform: str, cache: str,
                   source: str, cache_control: str) -> tuple[tuple[bytes, bytes], ...]:
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
    )


NOT_MODIFIED_DROPS = frozenset({b"content-type", b"content-digest", b"repr-digest"})
"""Fields a 304 leaves out: RFC 9110 section 15.4.5 keeps ETag, Cache-Control, Vary and drops
other representation metadata; a 304 has no content to digest."""


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


class TileRoute:
    """The ASGI layer that answers every tile URL (see the module docstring).

    It is the app's innermost middleware: after the layers every request passes (request id,
    proxy, CORS, authentication, HEAD as GET), before FastAPI's exception handling and router,
    which never see a tile URL (they cost about 4 µs of a 20 µs memory-cache hit). Any other
    path goes on to ``app``. ``GET`` and ``HEAD`` are answered; any other method on a tile URL
    gets a JSON 405. Services come from ``app.state.services``
    (:class:`app.server.dependencies.Services`), the same object the FastAPI routes receive
    as dependencies. An exception that escapes it (a bug) reaches the app's 500 handler.

    Args:
        app: the rest of the application (FastAPI's exception layer and router).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: a tile URL is answered here, anything else goes on."""
        if scope["type"] == "http":
            path = match_tile_path(self.route_path(scope))
            if path is not None:
                await self.handle(scope, path, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def route_path(scope: Scope) -> str:
        """The path the app routes: ``path`` without the ``root_path`` it starts with (as
        Starlette's router reads it; :mod:`app.server.proxy` sets ``root_path``)."""
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
            return path[len(root):]
        return path

    async def handle(self, scope: Scope, path: TilePath | IiifPath, receive: Receive,
                     send: Send) -> None:
        """Answer the request of a tile URL (``path``, from :func:`match_tile_path`)."""
        if scope["method"] not in ("GET", "HEAD"):
            status, body = error_json(405, "method_not_allowed", "Method Not Allowed")
            await _send(send, status, [(b"allow", b"GET, HEAD"), *_json_headers(body)], body,
                        False)
            return
        head = scope["method"] == "HEAD" or scope.get(HEAD_SCOPE_KEY, False)
        services = scope["app"].state.services
        accept = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
            elif name == b"if-none-match":
                if_none_match = value.decode("latin-1")
        query = scope["query_string"]
        query_format = _query_format(query) if query else None
        audit = _AuditedRequest.start(services, scope)
        metrics = services.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        address: AuditAddress | None = None
        try:
            if isinstance(path, IiifPath):
                authorize(scope[PRINCIPAL_KEY], Permission.VIEW, path.slide)
                tile = await services.tiles.get_region(path.slide, path.segments,
                                                       path.associated, _Client(receive))
                address = _iiif_address(tile)
            else:
                level, col, row, ext = address = parse_address(path.level, path.tile)
                authorize(scope[PRINCIPAL_KEY], Permission.VIEW, path.slide)
                tile = await services.tiles.get_tile(
                    path.slide, level, col, row, TileRequest(ext, query_format, accept),
                    path.associated, _Client(receive))
        except Exception as exc:
            status = await self._error(send, services, scope, path, exc, audit, head, address,
                                       query_format, accept, if_none_match)
            if metrics is not None:
                metrics.tile("", False, "", "", status, time.perf_counter() - started)
            return
        headers = tile_headers(tile, services.settings.Server.CacheControl, head)
        if etag_matches(if_none_match, tile.etag):
            status, body = 304, b""
            headers = [h for h in headers if h[0] not in NOT_MODIFIED_DROPS]
        else:
            status, body = 200, tile.data
            headers.append((b"content-length", str(len(body)).encode()))
        if audit is not None and not audit.record(
                path.slide, address, query_format, accept, if_none_match, head, tile,
                tile.identity, status, 0 if head else len(body), None):
            status = await self._error(send, services, scope, path, AuditUnavailable(
                "the audit log cannot record this tile now"), None, head)
        else:
            await _send(send, status, headers, body, head)
        if metrics is not None:
            plan = tile.plan
            metrics.tile(plan.encoding.format.value, tile.lossless, tile.cache, tile.source,
                         status, time.perf_counter() - started)

    @staticmethod
    async def _error(send: Send, services: Any, scope: Scope, path: TilePath | IiifPath,
                     exc: Exception,
                     audit: _AuditedRequest | None, head: bool, *request: Any) -> int:
        """Answer an error as JSON (a bug as 500), with its audit line when ``audit`` is
        given; a line that cannot be queued under ``Audit:FailClosed`` makes it a 503. A
        client that went before its tile was there (:class:`ClientGone`) gets nothing; its
        audit line says :data:`CLIENT_CLOSED`.

        Returns:
            The status answered (or recorded).
        """
        gone = isinstance(exc, ClientGone)
        if gone:
            exc = TileServerError("the client closed the connection", slide=path.slide)
            exc.code = "client_closed_request"
            status = CLIENT_CLOSED
        else:
            if not isinstance(exc, TileServerError):  # a bug: answer 500, keep serving
                log.exception("GET %s failed", scope["path"])
                exc = TileServerError("internal error", slide=path.slide)
            status = status_for(exc)
        if audit is not None:
            handle = services.registry.peek(path.slide)
            address, query_format, accept, if_none_match = request
            if not audit.record(path.slide, address, query_format, accept, if_none_match, head,
                                None, handle.identity if handle else None, status,
                                None, exc.code) and not gone:
                exc = AuditUnavailable("the audit log cannot record this request now")
                status = status_for(exc)
        if gone:
            return status  # nobody to answer
        status, body = error_json(status, exc.code, exc.detail, exc.slide, exc.extra)
        if status >= 500 and not isinstance(exc, Overloaded):
            log.warning("GET %s -> %d %s", scope["path"], status, exc.detail)
        extra = headers_for(exc)
        headers = _json_headers(body)
        if extra:
            headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()]
        await _send(send, status, headers, body, head)
        return status


class _Client:
    """The requesting client as the tile service sees it
    (:class:`app.cache.flight.Client`): gone once ``receive`` says ``http.disconnect``
    (awaited while a tile waits for a render thread), or, from a render thread, once its
    connection is closed (:meth:`GuardedProtocol.hung_up`, under ``tileserver serve``)."""

    __slots__ = ("_receive", "_connection")

    def __init__(self, receive: Receive):
        self._receive = receive
        self._connection = CONNECTION.get()

    def gone(self) -> bool:
        """Whether the connection is known to be closed (any thread; False: cannot tell)."""
        connection = self._connection
        return connection is not None and connection.hung_up()

    async def disconnected(self) -> None:
        """Return when the connection is closed. The request's body messages are skipped;
        a server that keeps answering ``receive`` with body messages after the last one (none
        should) is not watched further."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body", False):
                break
        message = await self._receive()  # ASGI: waits until the client goes
        if message["type"] == "http.disconnect":
            return
        await asyncio.Event().wait()  # not ASGI-conformant: never report the client gone


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]


def _iiif_address(tile: Tile) -> AuditAddress:
    """What the audit line records of an IIIF request: the DZI address of the pyramid tile it
    is (None where it was rendered as a region) and the IIIF format asked for."""
    plan = tile.plan
    key = plan.tile.key if isinstance(plan, RegionPlan) and plan.tile is not None else None
    extension = plan.request.extension if isinstance(plan, RegionPlan) else ""
    if key is None:
        return None, None, None, extension
    return key.level, key.col, key.row, extension


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                head: bool) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


@dataclass(frozen=True, slots=True)
class _AuditedRequest:
    """What the audit log needs of a request beyond its tile: arrival and caller."""

    log: AuditLog
    fail_closed: bool
    caller: Caller
    started: float
    arrived: float

    @classmethod
    def start(cls, services: Any, scope: Scope) -> _AuditedRequest | None:
        """The record of a request arriving now, or None when the audit log is off."""
        log = services.audit
        if log is None:
            return None
        return cls(log, services.settings.audit_fail_closed, Caller.of(scope, log.field_chars),
                   time.perf_counter(), time.time())

    def record(self, slide: str, address: AuditAddress | None,
               query_format: str | None,
               accept: str | None, if_none_match: str | None, head: bool, tile: Tile | None,
               identity: str | None, status: int, body_bytes: int | None,
               error: str | None) -> bool:
        """Queue the request's audit line (200, 304, HEAD and errors alike). False when the
        line was refused and ``Audit:FailClosed`` asks for a 503 instead."""
        level, col, row, ext = address if address is not None else (None, None, None, None)
        plan = tile.plan if tile is not None else None
        limit = self.log.field_chars
        cut: list[str] = []
        accepted = self.log.record(TileRequestRecord(
            self.arrived, self.caller, "HEAD" if head else "GET",
            cap(slide, limit, "slide", cut) or "", identity,
            level, col, row, cap(ext, limit, "requested.extension", cut),
            cap(query_format, limit, "requested.format", cut),
            cap(accept, limit, "requested.accept", cut),
            cap(if_none_match, limit, "requested.if_none_match", cut),
            plan.encoding.format.value if plan else None,
            tile.lossless if tile is not None else None,
            "refused" if plan is not None and plan.override_refused else None,
            tile.cache if tile is not None else None, status, body_bytes,
            tile.digest.sha256 if tile is not None else None,
            time.perf_counter() - self.started, error, tuple(cut)))
        return accepted or not self.fail_closed


# ------------------------------------------------------------------------------ OpenAPI

_TILE_HEADERS = {
    name: {"description": text, "schema": {"type": "string"}} for name, text in (
        ("ETag", "strong ETag: the first 32 hex digits of the tile's SHA-256"),
        ("Content-Digest", "RFC 9530 sha-256 of the content (of nothing on HEAD)"),
        ("Repr-Digest", "RFC 9530 sha-256 of the tile"),
        ("X-Tile-Format", "jpeg, png, webp or avif"),
        ("X-Tile-Lossless", "true when the tile decodes to exactly the slide's pixels"),
        ("X-Tile-Color-Transform", "none, or srgb-<intent> where the colour mode converts"),
        ("X-Tile-Cache", "hit or miss"),
        ("X-Tile-Source", "original (the slide's stored JPEG tile) or rendered"),
        ("X-Tile-Override", "refused when EnforceLossless refused a lossy ?format="),
        ("X-Request-Id", "the request's id (the client's X-Request-Id when valid)"),
    )}


def _parameter(name: str, where: str, description: str, example: str | None = None
               ) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "in": where, "required": where == "path",
                           "description": description, "schema": {"type": "string"}}
    if example is not None:
        out["example"] = example
    return out


def openapi_paths() -> dict[str, dict[str, Any]]:
    """The OpenAPI path items of the tile families, IIIF images included (GET; HEAD answers
    the same)."""
    level = _parameter("level", "path", "DZI level, 0 = 1x1 px", "12")
    tile = _parameter("tile", "path", "{col}_{row}.{ext}, ext jpeg, png, webp or avif",
                      "3_4.jpeg")
    name = _parameter("name", "path", "slide name", "CMU-1")
    associated = _parameter("associated", "path", "associated image name", "label")
    fmt = _parameter("format", "query", "format override: jpeg, png, webp or avif "
                     "(TileFormat:AllowFormatOverride)")
    responses = {
        "200": {"description": "the tile", "headers": _TILE_HEADERS, "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("image/jpeg", "image/png", "image/webp", "image/avif")}},
        "304": {"description": "If-None-Match matched the ETag"},
        "400": {"description": "malformed address or format (JSON error)"},
        "404": {"description": "unknown slide, image, level or tile (JSON error)"},
        "500": {"description": "the slide cannot be read (JSON error)"},
        "503": {"description": "the render queue is full (Server.MaxQueuedRenders): try "
                "again after Retry-After seconds; cached tiles are still served"},
    }

    def item(summary: str, *parameters: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"tags": ["tiles"], "summary": summary,
                        "parameters": [*parameters, level, tile, fmt],
                        "responses": responses}}

    iiif = [
        _parameter("region", "path", "full, square, x,y,w,h or pct:x,y,w,h (full-resolution "
                   "pixels of the slide's DZI region)", "0,0,1024,1024"),
        _parameter("size", "path", "max, w,, ,h, pct:n, w,h or !w,h; ^ in front allows "
                   "upscaling; beyond Iiif:MaxWidth/MaxHeight/MaxArea: 400", "256,256"),
        _parameter("rotation", "path", "0, 90, 180 or 270 degrees clockwise, ! in front "
                   "mirrors (other angles: 501)", "0"),
        _parameter("quality", "path", "default, color, gray or bitonal", "default"),
        _parameter("format", "path", "jpg, png or webp (the format policy applies: "
                   "EnforceLossless may serve the lossless format)", "png"),
    ]
    iiif_responses = {**responses, "501": {"description": "a rotation that is not a "
                                                          "multiple of 90 (JSON error)"}}

    def iiif_item(summary: str, *parameters: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"tags": ["iiif"], "summary": summary,
                        "description": "IIIF Image API 3.0 image request (compliance level 2). "
                        "Requests that are the declared tiles are DZI tiles of the pyramid "
                        "without overlap (cached); others are rendered from the nearest slide "
                        "level with Lanczos. Same headers as tiles.",
                        "parameters": [*parameters, *iiif], "responses": iiif_responses}}

    return {
        "/iiif/3/{name}/{region}/{size}/{rotation}/{quality}.{format}": iiif_item(
            "IIIF image of a slide (single slide: name image)", name),
        "/iiif/3/{name}/associated/{associated}/{region}/{size}/{rotation}/{quality}.{format}":
            iiif_item("IIIF image of an associated image", name, associated),
        "/storage/{name}_files/{level}/{tile}": item("Tile of a slide", name),
        "/image_files/{level}/{tile}": item("Tile of the single slide"),
        "/storage/{name}/associated/{associated}_files/{level}/{tile}": item(
            "Tile of an associated image of a slide", name, associated),
        "/image/associated/{associated}_files/{level}/{tile}": item(
            "Tile of an associated image of the single slide", associated),
    }
