"""Single-flight: concurrent requests for one uncached tile render it once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Client(Protocol):
    """The client a request came from, as the caches see it (the server layer implements it
    over the ASGI ``receive`` channel)."""

    async def disconnected(self) -> None:
        """Return once the client has gone (closed its connection)."""

    def gone(self) -> bool:
        """Whether the client is known to have gone; False when it cannot tell. Called from
        worker threads, so it must not touch the event loop."""


class ClientGone(Exception):
    """Every client that waited for a computation has gone; nobody wants its result."""


class SingleFlight(Generic[T]):
    """Runs one computation per key at a time; concurrent callers share its result.

    Used so that concurrent requests for one uncached tile render it once. The computation runs
    as its own task, so a client that disconnects does not cancel it for the others (and a
    tile being written to the cache is always finished). The callers of a key are kept:
    :meth:`wanted` tells a computation (in any thread) whether any of them is still there,
    and when the last caller's client goes, a computation not yet started is cancelled.
    Event-loop only (except :meth:`wanted`). ``T`` is the result type of the computations.
    """

    def __init__(self) -> None:
        self._running: dict[object, asyncio.Task[T]] = {}
        self._waiting: dict[object, list[Client | None]] = {}

    async def run(self, key: object, compute: Callable[[], Awaitable[T]],
                  client: Client | None = None) -> T:
        """Await ``compute()``, or the run already in flight for ``key``; errors propagate
        to every waiter.

        Args:
            client: the caller's client; when it goes before the result is there, this call
                raises :class:`ClientGone` (and the computation is cancelled if nobody else
                waits and it has not started its work).
        """
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            self._running[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = self._waiting[key] = []
        waiting.append(client)
        try:
            if client is None:
                return await asyncio.shield(task)
            gone = asyncio.ensure_future(client.disconnected())
            try:
                await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if task.done():
                return task.result()
            raise ClientGone()
        finally:
            waiting.remove(client)
            if not waiting:
                del self._waiting[key]
                if not task.done():
                    task.cancel()  # a load still queued for a thread never starts

    def wanted(self, key: object) -> bool:
        """Whether any caller still waits for ``key``'s computation and its client is not
        known to have gone (:meth:`Client.gone`, which sees a closed connection before the
        event loop does). Safe from any thread: a computation checks it before it starts
        costly work."""
        waiting = self._waiting.get(key)
        if not waiting:
            return False
        return any(client is None or not client.gone() for client in tuple(waiting))

    def _finished(self, key: object, task: asyncio.Task[T]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody awaits is not reported twice

    @property
    def in_flight(self) -> int:
        """How many computations are running."""
        return len(self._running)

    def __contains__(self, key: object) -> bool:
        return key in self._running
