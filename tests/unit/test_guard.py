"""GuardedProtocol on its own: a fake transport, a recording inner protocol, a real parser."""

from __future__ import annotations

import asyncio

from app.server import guard
from app.server.guard import GuardedProtocol, Limits


class Transport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.out = b""
        self.closed = self.eof = False

    def write(self, data):
        self.out += data

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


class Inner:
    def __init__(self, config, server_state, app_state, _loop=None):
        self.data = b""
        self.transport = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def connection_lost(self, exc):
        self.lost = True


def connect(loop, limits):
    protocol = GuardedProtocol(None, None, {}, loop, inner=Inner, limits=limits)
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


def test_heads_are_bounded_and_requests_pass_through():
    loop = asyncio.new_event_loop()
    try:
        limits = Limits(head_bytes=1024, header_timeout=60, max_connections=10)
        ok, ok_t = connect(loop, limits)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
        for piece in (request[:10], request[10:] + request):  # split, then pipelined
            ok.data_received(piece)
        assert ok.inner.data == request * 2 and ok_t.out == b""
        big, big_t = connect(loop, limits)
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000
        big.data_received(head[:700])
        big.data_received(head[700:] + b"\r\n\r\n")  # past the limit without its end
        assert big_t.out.startswith(b"HTTP/1.1 431 ") and big_t.eof
        assert b'"error":"request_header_fields_too_large"' in big_t.out
        assert len(big.inner.data) <= 1024  # nothing past the limit reached uvicorn
        big.data_received(b"more" * 1000)  # lingering: dropped
        assert len(big.inner.data) <= 1024
        exact, exact_t = connect(loop, limits)
        fits = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
        fits += b"p" * (1024 - len(fits) - 4) + b"\r\n\r\n"
        assert len(fits) == 1024
        exact.data_received(fits)
        assert exact_t.out == b"" and exact.inner.data == fits
    finally:
        guard._pools.pop(loop, None)
        loop.close()


def test_the_cap_evicts_waiting_connections_then_answers_503(monkeypatch):
    loop = asyncio.new_event_loop()
    try:
        limits = Limits(head_bytes=1024, header_timeout=5, max_connections=3)
        idle, idle_t = connect(loop, limits)
        busy = [connect(loop, limits) for _ in range(2)]
        for protocol, _ in busy:
            protocol.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")  # heads complete
        fresh, fresh_t = connect(loop, limits)
        assert idle_t.closed and not fresh_t.closed  # the waiting one made room
        idle.connection_lost(None)
        fresh.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        extra, extra_t = connect(loop, limits)
        assert extra_t.out.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in extra_t.out
        assert extra.inner.transport is None  # never reached uvicorn
        extra.connection_lost(None)
        assert not extra.inner.lost
        # a slow head times out
        slow, slow_t = connect(loop, Limits(1024, 5, 10))
        slow.data_received(b"GET / HTTP/1.1\r\n")
        pool = guard._pools[loop]
        now = guard.time.monotonic()
        monkeypatch.setattr(guard.time, "monotonic", lambda: now + 6)
        pool.sweep()
        assert slow_t.closed and pool.timed_out == 1
        assert not any(t.closed for _, t in busy)
    finally:
        pool = guard._pools.pop(loop, None)
        if pool is not None and pool.timer is not None:
            pool.timer.cancel()
        loop.close()
