"""The response head waits for the body and leaves with it in one write, or goes straight out."""

from types import SimpleNamespace

import pytest

from app.server.http import HTTP_PROTOCOL, HeadHoldingTransport


class Recording:
    """An asyncio transport's write side that records each write (one write = one send)."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def cycle(method="GET", chunked=False, length=5):
    return SimpleNamespace(response_started=False, chunked_encoding=None,
                           expected_content_length=0, scope={"method": method},
                           _after_start=dict(chunked_encoding=chunked,
                                             expected_content_length=length))


def start(c):
    """What uvicorn's cycle sets before it writes the head."""
    c.response_started = True
    for name, value in c._after_start.items():
        setattr(c, name, value)


def test_head_and_body_leave_in_one_write():
    transport, c = Recording(), cycle()
    writer = HeadHoldingTransport(transport, c)
    start(c)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    assert transport.writes == []
    writer.write(b"hello")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
    writer.write(b"more")  # anything later goes straight out
    assert transport.writes[-1] == b"more"


@pytest.mark.parametrize(("method", "chunked", "length"), [
    ("HEAD", False, 5),   # no body will be written
    ("GET", True, 0),     # chunked: a stream (server-sent events) keeps its head immediate
    ("GET", None, 0),     # no Content-Length (304, 204)
    ("GET", False, 0),    # Content-Length: 0
])
def test_heads_without_a_following_body_go_straight_out(method, chunked, length):
    transport, c = Recording(), cycle(method, chunked, length)
    writer = HeadHoldingTransport(transport, c)
    start(c)
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]


def test_interim_response_is_not_held():
    transport, c = Recording(), cycle()
    writer = HeadHoldingTransport(transport, c)
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    start(c)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    writer.write(b"hello")
    assert transport.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]


def test_close_writes_a_held_head_first():
    transport, c = Recording(), cycle()
    writer = HeadHoldingTransport(transport, c)
    start(c)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    writer.close()  # uvicorn after an app error: the head still leaves, then the connection
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]
    assert transport.closed and writer.is_closing()


def test_serve_uses_this_protocol_with_the_pinned_uvicorn():
    """If a uvicorn upgrade renamed what the wrapper reads, serve falls back to plain
    httptools (and logs it); this makes that fallback visible here."""
    assert HTTP_PROTOCOL == "app.server.http:TileHttpProtocol"
