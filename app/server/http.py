"""uvicorn's httptools protocol, sending a small response's head and body in one write.

uvicorn writes the status line and headers of a response as soon as the app sends
``http.response.start``, and the body when it sends ``http.response.body``: two ``send``
syscalls and, with ``TCP_NODELAY``, two TCP segments for every tile. On this project's
benchmark (2 cores, loopback) those two writes were 23% of the time a worker held the GIL on
cold tiles (py-spy ``--gil``); with one write instead of two, ``python -m bench.tiles
--scenarios warm`` (median of 3) served 16,016-16,540 warm tiles/s against 14,783-15,093.

:class:`TileHttpProtocol` is ``HttpToolsProtocol`` with the transport of each request's
response wrapped in a :class:`HeadHoldingTransport`, which holds the head of a response with
a ``Content-Length`` and a body back until the first body write, and then writes both at once.
Everything else goes straight through: interim responses (``100 Continue``), HEAD responses,
responses without a body, chunked and streamed ones (server-sent events keep their headers
immediate), and uvicorn's own error responses. A held head is written before the transport
is closed, so no path can lose it. Used by ``tileserver serve`` (``uvicorn.run(http=...)``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger(__name__)


class HeadHoldingTransport(asyncio.Transport):
    """The transport one uvicorn ``RequestResponseCycle`` writes to (see the module docstring).

    The cycle calls ``write``, ``close`` and ``is_closing``; ``get_extra_info`` and any other
    attribute not defined by :class:`asyncio.Transport` go to the connection's transport.

    Args:
        transport: the connection's asyncio transport.
        cycle: the request's ``RequestResponseCycle``; read for ``response_started``,
            ``chunked_encoding``, ``expected_content_length`` and ``scope["method"]``, which
            uvicorn sets before it writes the head.
    """

    __slots__ = ("_transport", "_cycle", "_head", "_state")

    _WAITING, _HOLDING, _PASSING = 0, 1, 2

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle):
        super().__init__()
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._state = self._WAITING

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold the head of a response with a body; write it with the next write."""
        if self._state == self._WAITING and self._cycle.response_started:
            cycle = self._cycle
            self._state = self._PASSING
            if (cycle.chunked_encoding is False and cycle.expected_content_length > 0
                    and cycle.scope["method"] != "HEAD"):
                self._head, self._state = bytes(data), self._HOLDING
                return
        if self._head is not None:
            data, self._head = self._head + data, None
        self._transport.write(data)

    def flush(self) -> None:
        """Write a held head now."""
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        """Write a held head, then close the connection (what uvicorn does after an app
        error or on ``Connection: close``)."""
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        """Whether the connection is closing or closed."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The connection transport's extra information (``peername``, ``socket``, ...)."""
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TileHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose responses go out through a :class:`HeadHoldingTransport`."""

    def on_headers_complete(self) -> None:
        """uvicorn makes the request's cycle here; its transport is then wrapped."""
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, HeadHoldingTransport):
            cycle.transport = HeadHoldingTransport(cycle.transport, cycle)


def _uvicorn_has_what_we_read() -> bool:
    """Whether the installed uvicorn's cycle still has the attributes this module reads."""
    from uvicorn.protocols.http import httptools_impl

    names = ("response_started", "chunked_encoding", "expected_content_length", "scope",
             "transport", "response_complete")
    init = getattr(httptools_impl.RequestResponseCycle, "__init__", None)
    code = getattr(init, "__code__", None)
    return code is not None and all(name in code.co_names for name in names)


HTTP_PROTOCOL = ("app.server.http:TileHttpProtocol" if _uvicorn_has_what_we_read() else "httptools")
HTTP_PROTOCOL_CLASS: type = (TileHttpProtocol if HTTP_PROTOCOL != "httptools"
                             else HttpToolsProtocol)
"""The class of :data:`HTTP_PROTOCOL`, which ``tileserver serve`` wraps in
:class:`app.server.guard.GuardedProtocol`."""
"""What ``tileserver serve`` passes as uvicorn's ``http``: this module's protocol, or plain
httptools if a uvicorn upgrade renamed what :class:`HeadHoldingTransport` reads."""
if HTTP_PROTOCOL == "httptools":
    log.warning("uvicorn %s changed its response cycle; responses are written by plain "
                "httptools", __import__("uvicorn").__version__)
