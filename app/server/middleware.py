"""Pure ASGI middleware: HEAD answered by every GET route; a request id on every request."""

from __future__ import annotations

import itertools
import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_ID
from app.server.tiles import HEAD_SCOPE_KEY, REQUEST_ID_SCOPE_KEY, match_tile_path

_INCOMING = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


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


class RequestId:
    """Give every HTTP request an id: the client's ``X-Request-Id`` when it is 1-128 of
    ``A-Z a-z 0-9 . _ : -`` (a proxy's id), else ``{process}-{serial}`` (12 random hex digits
    per process, then a counter). The id is set in :data:`app.logs.REQUEST_ID` for the
    request's log lines and returned as ``X-Request-Id``: tile responses add it themselves
    (:class:`app.server.tiles.TileRoute`, from the scope), other responses here.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self._prefix = os.urandom(6).hex()
        self._serial = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: set the id, pass the request on, add the header."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _INCOMING.fullmatch(value):
                request_id = value.decode("ascii")
                break
        if request_id is None:
            request_id = f"{self._prefix}-{next(self._serial)}"
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        token = REQUEST_ID.set(request_id)
        try:
            if match_tile_path(scope["path"]) is not None:
                await self.app(scope, receive, send)
                return
            header = (b"x-request-id", request_id.encode("ascii"))

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), header]}
                await send(message)

            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
