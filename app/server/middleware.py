"""Pure ASGI middleware: HEAD answered by every GET route, a request id on every request, and
cross-origin access (CORS)."""

from __future__ import annotations

import itertools
import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_ID
from app.server.tiles import HEAD_SCOPE_KEY

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
    request's log lines and returned as ``X-Request-Id`` on every response.
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
        token = REQUEST_ID.set(request_id)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


EXPOSED_HEADERS = ("Location", "ETag", "Content-Digest", "Repr-Digest", "X-Tile-Format",
                   "X-Tile-Lossless", "X-Tile-Color-Transform", "X-Tile-Cache", "X-Tile-Source",
                   "X-Tile-Override")
"""Response fields a cross-origin script may read beyond the CORS-safelisted ones: the
``Location`` of a 202 job and the tile headers (docs/api.md)."""
ALLOWED_METHODS = ("GET", "HEAD")
"""Methods a preflight allows: reading. A state-changing request (POST, DELETE) from another
origin is not offered; a browser refuses to send one that needs a preflight."""
ALLOWED_HEADERS = ("Accept", "If-None-Match", "Authorization", "X-Api-Key")
"""Request fields a preflight allows beyond the CORS-safelisted ones (``If-None-Match``: a
viewer revalidating its tiles with ``fetch``; ``Authorization`` and ``X-Api-Key``: a viewer on
another origin sending its credentials, app.server.auth)."""
PREFLIGHT_MAX_AGE = 600
"""Seconds a browser may reuse a preflight's answer."""


class Cors:
    """Cross-origin access to every response: the one place of ``Server.AccessControlAllowOrigin``.

    Every HTTP response (tiles, DZIs, the JSON API, pages, errors) carries
    ``Access-Control-Allow-Origin: <setting>`` and ``Access-Control-Expose-Headers``, the same
    whatever the request's ``Origin``: a response never varies by origin, so a shared cache (a
    CDN in front of the tiles, which are ``Cache-Control: public``) may store one copy for every
    origin. A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is
    answered here with ``204`` and :data:`ALLOWED_METHODS`, :data:`ALLOWED_HEADERS` and
    :data:`PREFLIGHT_MAX_AGE`; any other ``OPTIONS`` goes on to the routes (a JSON 405).

    Starlette's ``CORSMiddleware`` is not used: it adds ``Access-Control-Allow-Origin`` only
    to requests that carry ``Origin`` and ``Vary: Origin`` to every response (a CDN that ignores
    ``Vary`` can then hand a copy without the header to a cross-origin viewer), and answers a
    refused preflight with a plain-text 400 rather than the app's JSON error body.

    Args:
        app: the ASGI app.
        allow_origin: ``*``, one origin (``https://viewer.example.org``), or empty for no CORS
            headers at all (same-origin only; preflights then get the routes' 405).
    """

    def __init__(self, app: ASGIApp, allow_origin: str):
        self.app = app
        self.enabled = bool(allow_origin)
        self.headers = [
            (b"access-control-allow-origin", allow_origin.encode("latin-1")),
            (b"access-control-expose-headers", ", ".join(EXPOSED_HEADERS).encode()),
        ]
        self.preflight = [
            (b"access-control-allow-origin", allow_origin.encode("latin-1")),
            (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(ALLOWED_HEADERS).encode()),
            (b"access-control-max-age", str(PREFLIGHT_MAX_AGE).encode()),
            (b"content-length", b"0"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: answer a preflight, else add the CORS headers to the response."""
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and _is_preflight(scope["headers"]):
            await send({"type": "http.response.start", "status": 204,
                        "headers": self.preflight})
            await send({"type": "http.response.body", "body": b""})
            return
        extra = self.headers

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _is_preflight(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {name for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names
