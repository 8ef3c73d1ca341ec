"""Bounded HTTP: request-head size, slow and idle connections, and a connection cap per process.

uvicorn's httptools protocol bounds none of them: a request head has no size limit (httptools
gathers a header value by concatenation, so a 50 MB header held a worker 11 s and was then
served; ``h11_max_incomplete_event_size`` applies to h11 only), a connection that sends nothing
or one byte at a time is never timed out (``timeout_keep_alive`` starts after a response), and
``limit_concurrency`` counts idle connections too, so idle sockets turn every request into a 503.

:class:`GuardedProtocol` is an ``asyncio.Protocol`` that *wraps* the protocol uvicorn would use
(composition: it creates it and forwards every call; no uvicorn class is subclassed). It reads
the byte stream with its own httptools parser, which calls back only at message boundaries
(no header is gathered), and:

- answers ``431`` (JSON) once a request head (request line and headers) passes
  ``Server:MaxRequestHeadBytes`` without its end: the head is fed in slices no longer than what
  is left of the limit, and nothing more of it is passed on (for pipelined requests, whose
  heads may start inside a read, the count is approximate by at most one read, 256 KiB);
- closes a connection that has not sent a whole head ``Server:HeaderTimeoutSeconds`` after it
  opened, or after its head began (nginx's ``client_header_timeout``); idle keep-alive
  connections are closed by uvicorn's ``timeout_keep_alive`` (``Server:KeepAliveTimeoutSeconds``);
- keeps at most ``Server:MaxConnections`` connections per process: a new connection beyond the
  cap replaces the oldest connection still waiting for a head (nginx reuses such connections
  the same way), and when every connection is busy it is answered ``503`` (JSON).

It also tells a request which connection it came from (:data:`CONNECTION`), so that work
done for the request in another thread can ask whether the client is still there
(:meth:`GuardedProtocol.hung_up`) at the moment the kernel knows, before the event loop gets to
the end of the stream (a render queued behind a thousand closing connections is not started
for nobody).

Refused connections get their answer, then a lingering close (the rest of what the client
sends is read and dropped for up to :data:`LINGER_SECONDS`) so that the client reads the answer
instead of a reset. One timer per process sweeps the deadlines every :data:`SWEEP_SECONDS`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import select
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httptools

log = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
LINGER_SECONDS = 2.0
_HUNG_UP = (getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
            | select.POLLNVAL)
"""poll(2) events of a socket whose peer has gone: ``POLLRDHUP`` (Linux: the peer shut down
its writing side, which uvicorn treats as the end of the connection), hang-up, error, closed."""


@dataclass(frozen=True)
class Limits:
    """The bounds of :class:`GuardedProtocol` (``Server`` settings)."""

    head_bytes: int
    header_timeout: float
    max_connections: int


def _answer(status: int, reason: str, code: str, detail: str) -> bytes:
    body = json.dumps({"error": code, "detail": detail}, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n").encode() + body


class _Pool:
    """The guarded connections of one event loop (one uvicorn worker process)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits):
        self.loop = loop
        self.limits = limits
        self.open = 0
        self.waiting: OrderedDict[GuardedProtocol, float] = OrderedDict()
        """Connections without a whole request head, oldest first, with the time their
        header deadline counts from."""
        self.lingering: dict[GuardedProtocol, float] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.evicted = self.rejected = self.timed_out = self.too_large = 0

    def arm(self) -> None:
        if self.timer is None and (self.waiting or self.lingering):
            self.timer = self.loop.call_later(SWEEP_SECONDS, self.sweep)

    def sweep(self) -> None:
        self.timer = None
        now = time.monotonic()
        deadline = now - self.limits.header_timeout
        while self.waiting:
            guard, since = next(iter(self.waiting.items()))
            if since > deadline:
                break
            self.timed_out += 1
            guard.close()
        for guard, until in list(self.lingering.items()):
            if until <= now:
                guard.close()
        self.arm()


_pools: dict[asyncio.AbstractEventLoop, _Pool] = {}

CONNECTION: ContextVar[GuardedProtocol | None] = ContextVar("tileserver_connection",
                                                             default=None)
"""The connection whose bytes :class:`GuardedProtocol` is handing to uvicorn. uvicorn starts a
request's task while it parses those bytes, and a task copies the context it was started in,
so inside a request this is the request's connection (None under another server, or before
uvicorn's parser gets the bytes: callers must treat None as "cannot tell")."""


class GuardedProtocol(asyncio.Protocol):
    """The protocol ``tileserver serve`` gives uvicorn (see the module docstring; build it with
    :func:`guarded`).

    Args:
        config, server_state, app_state, _loop: what uvicorn passes to its protocols.
        inner: the protocol class wrapped (uvicorn's httptools protocol, which
            ``uvicorn.run(http="httptools")`` would use).
        limits: the bounds.
    """

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, inner: type,
                 limits: Limits):
        self.inner = inner(config=config, server_state=server_state, app_state=app_state,
                           _loop=_loop)
        loop = _loop or asyncio.get_event_loop()
        pool = _pools.get(loop)
        if pool is None:
            pool = _pools[loop] = _Pool(loop, limits)
        self.pool = pool
        self.limits = limits
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.head = 0
        """Bytes of the current request head so far; -1 between a head's end and the next."""
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        """The socket's file descriptor (for :meth:`hung_up`); -1 before it is made."""
        self.passing = True
        """Whether bytes go on to the wrapped protocol (false once refused)."""

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        pool = self.pool
        pool.open += 1
        if pool.open > self.limits.max_connections:
            if pool.waiting:
                victim = next(iter(pool.waiting))
                pool.evicted += 1
                victim.close()
            else:
                pool.rejected += 1
                self.passing = False
                self._refuse(_answer(503, "Service Unavailable", "too_many_connections",
                                     "this server process has as many connections as it "
                                     "takes (Server:MaxConnections); retry shortly"))
                return
        self.inner.connection_made(_OneWrite(transport, self.pool.loop))  # type: ignore[arg-type]
        self._wait()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if not self.passing:
            return  # refused: lingering, the rest is dropped
        parser = self.parser
        if parser is not None:
            try:
                if not self._scan(data):
                    return
            except httptools.HttpParserUpgrade:
                self.parser = None  # upgrades are the wrapped protocol's business
            except httptools.HttpParserError:
                self.parser = None  # the wrapped protocol answers 400 for it
        token = CONNECTION.set(self)
        try:
            self.inner.data_received(data)
        finally:
            CONNECTION.reset(token)

    def eof_received(self) -> bool | None:  # noqa: D102
        return self.inner.eof_received() if self.passing else None

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        pool = self.pool
        pool.open -= 1
        pool.waiting.pop(self, None)
        pool.lingering.pop(self, None)
        if self.passing or self.inner.transport is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:  # noqa: D102
        self.inner.pause_writing()

    def resume_writing(self) -> None:  # noqa: D102
        self.inner.resume_writing()

    def hung_up(self) -> bool:
        """Whether the client has closed its connection (or its writing side). Safe from any
        thread: it reads the transport's closing flag and polls the socket without waiting.

        The event loop sets the flag before it closes the socket, so a descriptor can be
        closed (and reused by a new connection) only after the flag said False here because
        the client was leaving anyway: whatever the poll of a reused descriptor says, a client
        that is still there is never reported gone.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return transport is not None
        if self.fd < 0:
            return False
        poller = select.poll()
        poller.register(self.fd, _HUNG_UP)
        return any(events & _HUNG_UP for _, events in poller.poll(0))

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        """A request head begins: its bytes count from here (its deadline from now, unless
        the connection was already waiting for its first head)."""
        self.head = 0
        if self not in self.pool.waiting:
            self._wait()

    def on_headers_complete(self) -> None:
        """The head ended within the limit."""
        self.head = -1
        self.pool.waiting.pop(self, None)

    # ---------------------------------------------------------------- internals

    def _scan(self, data: bytes) -> bool:
        """Feed the parser; False (and the 431 answered) when a head passes the limit."""
        limit = self.limits.head_bytes
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            if self.head < 0:  # between heads: a body, or the end of the last request
                self.parser.feed_data(view[pos:])  # type: ignore[union-attr]
                return True
            if self.head >= limit:
                self.pool.too_large += 1
                self.passing = False
                self._refuse(_answer(431, "Request Header Fields Too Large",
                                     "request_header_fields_too_large",
                                     f"the request line and headers exceed {limit} bytes "
                                     "(Server:MaxRequestHeadBytes)"))
                return False
            step = min(size - pos, limit - self.head)
            self.parser.feed_data(view[pos:pos + step])  # type: ignore[union-attr]
            if self.head >= 0:
                self.head += step
            pos += step
        return True

    def _wait(self) -> None:
        """Count the header deadline from now."""
        waiting = self.pool.waiting
        waiting.pop(self, None)
        waiting[self] = time.monotonic()
        self.pool.arm()

    def _refuse(self, answer: bytes) -> None:
        """Write an answer, end the writing side, drop what comes for a while, then close."""
        pool = self.pool
        pool.waiting.pop(self, None)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        pool.lingering[self] = time.monotonic() + LINGER_SECONDS
        pool.arm()

    def close(self) -> None:
        """Close the connection (timed out, evicted, done lingering)."""
        self.pool.waiting.pop(self, None)
        self.pool.lingering.pop(self, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _OneWrite:
    """The transport as the wrapped protocol sees it: each write is held until the next one
    or the end of the event loop's pass, whichever comes first, and two writes leave together
    (``writelines``: one ``writev``). uvicorn writes a response's head and its body one after
    the other, so a response leaves in one system call and one TCP segment instead of two;
    on loopback each ``write`` costs the sender the receiver's TCP processing too.

    Everything else is the transport's own (attributes are forwarded); ``close`` and
    ``write_eof`` send what is held first, ``abort`` drops it.
    """

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold ``data`` (a copy of anything mutable), or send it with what is held."""
        held = self._held
        if held is None:
            self._held = data if type(data) is bytes else bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._held = None
            self._transport.writelines((held, data))

    def writelines(self, chunks: Any) -> None:
        """Send what is held, then ``chunks``."""
        self._flush()
        self._transport.writelines(chunks)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        """Send what is held, then close."""
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        """Send what is held, then end the writing side."""
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        """Close at once; what is held is dropped, as the transport drops its buffer."""
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        """Bytes not yet sent, the held write included."""
        held = self._held
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded(inner: type, limits: Limits) -> Any:
    """The protocol factory to pass to uvicorn as ``http``: :class:`GuardedProtocol` around
    ``inner`` (picklable, for uvicorn's worker processes)."""
    return functools.partial(GuardedProtocol, inner=inner, limits=limits)
