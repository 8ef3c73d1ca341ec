"""Pure ASGI middleware: HEAD answered by every GET route, and the tile fast path."""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import TileServerError, error_body, status_for
from app.routes.deepzoom import HEAD_SCOPE_KEY, AuditedRequest, answer_tile
from app.slides import SINGLE_SLIDE_NAME

log = logging.getLogger(__name__)


class HeadAsGet:
    """Serve ``HEAD`` with the ``GET`` route: same status and headers, no body.

    FastAPI routes declare GET only; this keeps one route per resource (and one OpenAPI
    operation) while every GET also answers HEAD, as RFC 9110 asks.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: pass everything through, rewriting HEAD to GET without a body."""
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", HEAD_SCOPE_KEY: True}, receive,
                       send_headers_only)


_TILE_PATH = re.compile(r"/(?:storage/(?P<name>[^/]+)_files|image_files)/(?P<level>[^/]+)/"
                        r"(?P<tile>[^/]+)")


class TileFastPath:
    """Answer tile URLs directly, ahead of FastAPI's routing and dependency injection.

    A memory-cache hit is the hot path of a tile server, and FastAPI's per-request work (request
    object, dependency solving, response classes) costs several times the hit itself. This
    handler parses the URL and calls :func:`app.routes.deepzoom.answer_tile`, the function the
    documented FastAPI tile routes call too, and maps errors with :mod:`app.errors`' one table.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: tile GETs are answered here, everything else passes through."""
        match = None
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            match = _TILE_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        audit = None
        audit_log = getattr(state, "audit", None)
        if audit_log is not None:
            client = scope.get("client")
            audit = AuditedRequest.start(audit_log, client[0] if client else None,
                                         scope["path"], scope["query_string"].decode("latin-1"))
        accept = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
            elif name == b"if-none-match":
                if_none_match = value.decode("latin-1")
        query_format = None
        if scope["query_string"]:
            values = parse_qs(scope["query_string"].decode("latin-1"),
                              keep_blank_values=True).get("format")
            query_format = values[-1] if values else None
        try:
            status, headers, body = await answer_tile(
                state.tiles, match["name"] or SINGLE_SLIDE_NAME, match["level"],
                match["tile"], query_format, accept, if_none_match,
                head=scope.get(HEAD_SCOPE_KEY, False), audit=audit)
        except TileServerError as exc:
            status = status_for(exc)
            if status >= 500:
                log.warning("GET %s -> %d %s", scope["path"], status, exc.detail)
            body = json.dumps(error_body(exc.code, exc.detail, exc.slide)).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})
