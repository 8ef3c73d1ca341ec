"""Pure ASGI middleware: HEAD answered by every GET route."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.server.tiles import HEAD_SCOPE_KEY


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
