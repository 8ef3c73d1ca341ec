"""GuardedProtocol on its own: a fake transport, a recording inner protocol, a real parser."""

from __future__ import annotations

import asyncio
import time

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


class TaskInner(Inner):
    """Starts a task per read, as uvicorn starts a request's task while it parses."""

    tasks: list = []

    def data_received(self, data):
        super().data_received(data)
        TaskInner.tasks.append(asyncio.get_running_loop().create_task(self.request()))

    async def request(self):
        return guard.CONNECTION.get()

    def eof_received(self):
        return None  # uvicorn's protocols close on the end of the stream


def test_a_request_sees_its_client_hang_up_before_the_event_loop_does():
    """CONNECTION reaches the request's task; hung_up() reads the socket itself, so a worker
    thread learns of a closed connection while the loop is still busy elsewhere."""
    import socket
    import threading

    async def main():
        loop = asyncio.get_running_loop()
        limits = Limits(head_bytes=1024, header_timeout=60, max_connections=10)
        made: list[GuardedProtocol] = []

        def factory():
            made.append(GuardedProtocol(None, None, {}, loop, inner=TaskInner, limits=limits))
            return made[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for sock in clients:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while len(TaskInner.tasks) < 3:
            await asyncio.sleep(0.01)
        connections = [await task for task in TaskInner.tasks]
        assert set(connections) == set(made) and guard.CONNECTION.get() is None
        assert not any(c.hung_up() for c in made)
        by_port = {c.transport.get_extra_info("peername")[1]: c for c in made}
        closed, half_closed, staying = (by_port[s.getsockname()[1]] for s in clients)
        clients[0].close()
        clients[1].shutdown(socket.SHUT_WR)
        # from another thread, with the loop blocked: it has not read either end yet
        def ask() -> list[bool]:
            seen: list[bool] = []
            thread = threading.Thread(target=lambda: seen.extend(
                c.hung_up() for c in (closed, half_closed, staying)))
            thread.start()
            thread.join()
            return seen

        deadline = time.monotonic() + 5
        seen = ask()
        while seen[:2] != [True, True] and time.monotonic() < deadline:
            time.sleep(0.01)
            seen = ask()
        assert seen == [True, True, False]
        assert not closed.inner.lost and not half_closed.inner.lost  # the loop is behind
        await asyncio.sleep(0.2)
        assert closed.inner.lost and closed.hung_up()  # once the loop has closed it too
        clients[1].close()
        clients[2].close()
        server.close()
        await server.wait_closed()

    TaskInner.tasks = []
    asyncio.run(main())


class Recording(Transport):
    """Records each system-call-sized operation: a write, a writelines, a close."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, chunks):
        self.calls.append(("writelines", b"".join(chunks)))

    def close(self):
        self.calls.append(("close", b""))
        super().close()

    def abort(self):
        self.calls.append(("abort", b""))
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 4242) if name == "peername" else default


def test_a_response_head_and_body_leave_in_one_write():
    """uvicorn writes a head, then a body: the wrapped protocol's transport sends them with
    one writelines; a lone write leaves at the end of the loop's pass; close sends what is
    held first, abort drops it; a mutable buffer is copied when held."""
    loop = asyncio.new_event_loop()
    try:
        limits = Limits(head_bytes=1024, header_timeout=60, max_connections=10)
        protocol = GuardedProtocol(None, None, {}, loop, inner=Inner, limits=limits)
        real = Recording()
        protocol.connection_made(real)
        seen = protocol.inner.transport
        assert seen is not real and seen.get_extra_info("peername") == ("127.0.0.1", 4242)
        seen.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert real.calls == []
        seen.write(b"body")
        assert real.calls == [("writelines", b"HTTP/1.1 200 OK\r\n\r\nbody")]
        buffer = bytearray(b"streamed")
        seen.write(buffer)
        buffer[:] = b"changed!"
        loop.run_until_complete(asyncio.sleep(0))  # the end of this pass of the loop
        assert real.calls[1:] == [("write", b"streamed")]
        seen.write(b"last words")
        seen.close()
        assert real.calls[2:] == [("write", b"last words"), ("close", b"")]
        other = Recording()
        protocol2 = GuardedProtocol(None, None, {}, loop, inner=Inner, limits=limits)
        protocol2.connection_made(other)
        protocol2.inner.transport.write(b"never sent")
        protocol2.inner.transport.abort()
        loop.run_until_complete(asyncio.sleep(0))
        assert other.calls == [("abort", b"")]
    finally:
        pool = guard._pools.pop(loop, None)
        if pool is not None and pool.timer is not None:
            pool.timer.cancel()
        loop.close()
