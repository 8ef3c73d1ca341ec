"""Shared coordination: what every process and every replica of a deployment agrees on.

Job records, the one-job-per-slide rule, job cancellation and cache invalidation live in one
store that every server process reads and writes, so that ``tileserver serve --workers N`` and
replicas behind a load balancer behave as one server:

* :class:`~app.coordination.embedded.EmbeddedCoordination` (the default): an SQLite database in
  WAL mode, ``{TileCachePath}/.coordination.sqlite``, shared by the processes of one machine;
  nothing to install.
* :class:`~app.coordination.redisstore.RedisCoordination` (``Coordination.RedisUrl``): Redis,
  shared by replicas on several machines, through the ``redis`` package's asyncio client; every
  rule that must hold across processes is one Lua script (atomic on the server).

:func:`open_coordination` picks one from the settings. Both implement :class:`Coordination`.

A job record is a JSON object (:func:`new_job`); its ``state`` goes queued -> running ->
succeeded | failed | cancelled. A process *claims* a queued job and holds a *lease* on it, which
it renews with every progress update; a job whose lease ran out (its process died) is claimed
again by any process and resumes where it stopped (pregeneration skips whole tiles), up to
:data:`MAX_ATTEMPTS` times, after which it is marked failed with the reason.

Cache invalidation is a generation counter with a log of what each generation invalidated (one
slide, or everything): every process polls the counter (:data:`POLL_SECONDS`) and drops those
slides from its memory cache.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import time
import uuid
from typing import Any

from app.settings import Settings

log = logging.getLogger(__name__)

COORDINATION_NAME = ".coordination.sqlite"
"""The embedded store's file in ``TileCachePath``."""
LEASE_SECONDS = 10.0
"""How long a claimed job stays with its process without a renewal (a progress update)."""
MAX_ATTEMPTS = 3
"""Claims of one job at most: a job whose process died this often is marked failed."""
KEEP_FINISHED = 100
"""Finished jobs kept (oldest dropped first)."""
KEEP_INVALIDATIONS = 1000
"""Invalidations kept in the log; a process further behind drops its whole memory cache."""
POLL_SECONDS = 0.1
"""How often each process reads the invalidation generation (well within one second)."""
ACTIVE = ("queued", "running")
"""Job states that hold their slides (the one-job-per-slide rule)."""
ALL = None
"""An invalidation of every slide."""


class ConflictingJob(Exception):
    """A slide of a new job is already in a queued or running job.

    Attributes:
        job: that job's id; slide: the slide.
    """

    def __init__(self, job: str, slide: str):
        super().__init__(f"job {job} holds slide {slide!r}")
        self.job = job
        self.slide = slide


class Coordination(abc.ABC):
    """The store every process shares (see the module docstring). Async; every method may
    raise the back end's connection errors (:class:`OSError` and its kin)."""

    kind: str
    """``embedded`` or ``redis``."""
    where: str
    """What the store is, for logs and readiness (a path, or the Redis URL without password)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (and create the schema). Raises the back end's errors."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """A round trip to the store (readiness). Raises when it is unreachable."""

    # ------------------------------------------------------------------ jobs

    @abc.abstractmethod
    async def submit(self, job: dict[str, Any]) -> None:
        """Store a new queued job, unless one of its ``slides`` is in an active job.

        Raises:
            ConflictingJob: a slide is taken (atomic with the insert: two processes that
                submit jobs for one slide at once get one job and one conflict).
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, or None."""

    @abc.abstractmethod
    async def jobs(self) -> list[dict[str, Any]]:
        """Every kept job, newest first."""

    @abc.abstractmethod
    async def claim(self, owner: str) -> dict[str, Any] | None:
        """Take the oldest queued job, or a running one whose lease ran out, for ``owner``:
        it becomes running, with a lease of :data:`LEASE_SECONDS`. A job claimed more than
        :data:`MAX_ATTEMPTS` times is marked failed instead. None when there is nothing to
        run."""

    @abc.abstractmethod
    async def update(self, job_id: str, owner: str,
                     changes: dict[str, Any]) -> dict[str, Any] | None:
        """Merge ``changes`` into a running job that ``owner`` holds and renew its lease.

        Returns:
            The stored record (its ``cancel`` tells the owner to stop), or None when the
            job is no longer this owner's (its lease ran out and another process took it).
        """

    @abc.abstractmethod
    async def finish(self, job_id: str, owner: str | None, changes: dict[str, Any]) -> None:
        """Merge ``changes`` (a finished ``state``, error, counts) into the job, release its
        slides and drop the oldest finished jobs beyond :data:`KEEP_FINISHED`. With an
        ``owner``, only while that owner holds it."""

    @abc.abstractmethod
    async def release(self, job_id: str, owner: str) -> None:
        """Give a running job back to the queue (a process shutting down): another process,
        or the next one to start, resumes it."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job: a queued one at once, a running one by setting its ``cancel`` flag
        (its owner stops it within a second). Returns the record as it is then (a finished
        job unchanged), or None when there is no such job."""

    # ------------------------------------------------------------------ invalidation

    @abc.abstractmethod
    async def invalidate(self, slide: str | None) -> int:
        """Record that every process must drop one slide's tiles (None: every tile) from its
        memory cache. Returns the new generation."""

    @abc.abstractmethod
    async def invalidations(self, since: int) -> tuple[int, list[str | None]]:
        """``(generation, slides)``: the current generation and the slides invalidated after
        generation ``since`` (``None`` in the list: every slide, also when ``since`` is older
        than the kept log)."""


def owner_id() -> str:
    """This process as a lease owner: ``host:pid:random`` (unique across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def new_job(slides: list[str], levels: list[int] | None, overwrite: bool,
            engine: str) -> dict[str, Any]:
    """A queued job record.

    Fields: ``id`` (12 hex digits), ``slides``, ``levels`` (None: all), ``overwrite``,
    ``engine``, ``state``, ``progress`` (``slide``, ``done``, ``skipped``, ``total``,
    ``bytes``), ``error``, ``error_code``, ``created_at``/``started_at``/``finished_at`` (UTC
    seconds since the epoch), ``owner``, ``lease`` (wall-clock expiry of the owner's claim),
    ``cancel``, ``attempts`` (claims so far) and ``version`` (incremented by every change).
    """
    return {"id": uuid.uuid4().hex[:12], "slides": list(slides), "levels": levels,
            "overwrite": overwrite, "engine": engine, "state": "queued",
            "progress": {"slide": "", "done": 0, "skipped": 0, "total": 0, "bytes": 0},
            "error": None, "error_code": None, "created_at": time.time(), "started_at": None,
            "finished_at": None, "owner": None, "lease": None, "cancel": False, "attempts": 0,
            "version": 0}


def abandoned(attempts: int) -> dict[str, Any]:
    """The changes that fail a job whose processes died ``attempts`` times."""
    return {"state": "failed", "error_code": "job_abandoned", "finished_at": time.time(),
            "owner": None, "lease": None,
            "error": f"the server process running it stopped {attempts} times; the tiles "
                     "written so far are kept: submit it again to resume"}


def open_coordination(settings: Settings) -> Coordination:
    """The store of ``settings`` (not yet opened): Redis with ``Coordination.RedisUrl``, else
    the embedded SQLite store in ``TileCachePath``."""
    options = settings.Coordination
    if options.RedisUrl:
        from app.coordination.redisstore import RedisCoordination

        return RedisCoordination(options.RedisUrl, options.KeyPrefix)
    from app.coordination.embedded import EmbeddedCoordination

    return EmbeddedCoordination(os.path.join(settings.TileCachePath, COORDINATION_NAME))
