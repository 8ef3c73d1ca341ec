"""The embedded coordination store: SQLite in WAL mode, shared by the processes of one machine.

``{TileCachePath}/.coordination.sqlite`` holds the job records (``jobs``: the JSON record plus
the columns the rules query), the slides of active jobs (``job_slides``, whose primary key is
the one-job-per-slide rule) and the invalidation log (``invalidations``, whose AUTOINCREMENT key
is the generation). Every change is one ``BEGIN IMMEDIATE`` transaction, so two processes never
interleave a check and its write. SQLite calls block: they run in a worker thread, one at a
time per process.

Where the file cannot be opened (a read-only cache folder), :func:`app.server.app` falls back to
``:memory:``: the rules then hold within the process only (logged).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio import CapacityLimiter

from app.coordination import (
    KEEP_FINISHED,
    KEEP_INVALIDATIONS,
    LEASE_SECONDS,
    MAX_ATTEMPTS,
    ConflictingJob,
    Coordination,
    abandoned,
)
from app.core.sqlite import open_shared

T = TypeVar("T")
BUSY_SECONDS = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL, owner TEXT,
    lease REAL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS job_slides (slide TEXT PRIMARY KEY, job TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invalidations (
    generation INTEGER PRIMARY KEY AUTOINCREMENT, slide TEXT);
"""


_CLAIMABLE = ("SELECT doc FROM jobs WHERE state = 'queued' OR (state = 'running' AND "
              "lease < ?)")


class EmbeddedCoordination(Coordination):
    """:class:`~app.coordination.Coordination` in an SQLite file (see the module docstring).

    Args:
        path: the database file, or ``:memory:`` (this process only).
    """

    kind = "embedded"

    def __init__(self, path: str | Path):
        self.where = str(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._limiter = CapacityLimiter(1)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                if self._db is None:
                    raise sqlite3.OperationalError("the coordination store is closed")
                return fn(self._db)

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def open(self) -> None:
        """Open (creating) the database. Raises :class:`sqlite3.Error` or :class:`OSError`."""
        def connect() -> sqlite3.Connection:
            if self.where != ":memory:":
                Path(self.where).parent.mkdir(parents=True, exist_ok=True)
            db = open_shared(self.where, BUSY_SECONDS, check_same_thread=False)
            try:
                db.executescript(_SCHEMA)
            except sqlite3.Error:
                db.close()
                raise
            return db

        self._db = await anyio.to_thread.run_sync(connect, limiter=self._limiter)

    async def close(self) -> None:
        """Close the database."""
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await anyio.to_thread.run_sync(close, limiter=self._limiter)

    async def ping(self) -> None:
        """Read one row (raises when the file is unreadable)."""
        await self._run(lambda db: db.execute("SELECT count(*) FROM job_slides").fetchone())

    # ------------------------------------------------------------------ jobs

    async def submit(self, job: dict[str, Any]) -> None:
        """Insert a queued job unless a slide is taken (:class:`ConflictingJob`)."""
        def submit(db: sqlite3.Connection) -> None:
            with _immediate(db):
                for slide in job["slides"]:
                    row = db.execute("SELECT job FROM job_slides WHERE slide = ?",
                                     (slide,)).fetchone()
                    if row is not None:
                        raise ConflictingJob(row[0], slide)
                db.executemany("INSERT INTO job_slides VALUES (?, ?)",
                               [(slide, job["id"]) for slide in job["slides"]])
                db.execute("INSERT INTO jobs VALUES (?, ?, ?, NULL, NULL, ?)",
                           (job["id"], job["state"], job["created_at"], json.dumps(job)))

        await self._run(submit)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, or None."""
        def get(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return json.loads(row[0]) if row else None

        return await self._run(get)

    async def jobs(self) -> list[dict[str, Any]]:
        """Every kept job, newest first."""
        def jobs(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute("SELECT doc FROM jobs ORDER BY created DESC").fetchall()
            return [json.loads(row[0]) for row in rows]

        return await self._run(jobs)

    async def claim(self, owner: str) -> dict[str, Any] | None:
        """Take the oldest queued job, or a running one whose lease ran out."""
        def claim(db: sqlite3.Connection) -> dict[str, Any] | None:
            now = time.time()
            if db.execute(_CLAIMABLE + " LIMIT 1", (now,)).fetchone() is None:
                return None  # idle processes look often: no write lock for nothing
            with _immediate(db):
                row = db.execute(_CLAIMABLE + " ORDER BY created LIMIT 1", (now,)).fetchone()
                if row is None:
                    return None
                job: dict[str, Any] = json.loads(row[0])
                if job["cancel"] or job["attempts"] >= MAX_ATTEMPTS:  # its owner died
                    _store(db, job, {"state": "cancelled", "finished_at": now, "owner": None,
                                     "lease": None} if job["cancel"]
                           else abandoned(job["attempts"]))
                    db.execute("DELETE FROM job_slides WHERE job = ?", (job["id"],))
                    return None
                changes = {"state": "running", "owner": owner, "lease": now + LEASE_SECONDS,
                           "attempts": job["attempts"] + 1,
                           "started_at": job["started_at"] or now}
                return _store(db, job, changes)

        return await self._run(claim)

    async def update(self, job_id: str, owner: str,
                     changes: dict[str, Any]) -> dict[str, Any] | None:
        """Merge changes into a job ``owner`` holds; renew the lease."""
        def update(db: sqlite3.Connection) -> dict[str, Any] | None:
            with _immediate(db):
                job = _held(db, job_id, owner)
                if job is None:
                    return None
                return _store(db, job, {**changes, "lease": time.time() + LEASE_SECONDS})

        return await self._run(update)

    async def finish(self, job_id: str, owner: str | None, changes: dict[str, Any]) -> None:
        """Finish a job, release its slides, drop old finished jobs."""
        def finish(db: sqlite3.Connection) -> None:
            with _immediate(db):
                job = (_held(db, job_id, owner) if owner is not None
                       else _load(db, job_id))
                if job is None:
                    return
                _store(db, job, {"owner": None, "lease": None, **changes})
                db.execute("DELETE FROM job_slides WHERE job = ?", (job_id,))
                db.execute(
                    "DELETE FROM jobs WHERE state NOT IN ('queued', 'running') AND id NOT IN "
                    "(SELECT id FROM jobs WHERE state NOT IN ('queued', 'running') "
                    "ORDER BY created DESC LIMIT ?)", (KEEP_FINISHED,))

        await self._run(finish)

    async def release(self, job_id: str, owner: str) -> None:
        """Give a running job back to the queue."""
        def release(db: sqlite3.Connection) -> None:
            with _immediate(db):
                job = _held(db, job_id, owner)
                if job is not None:
                    _store(db, job, {"state": "queued", "owner": None, "lease": None})

        await self._run(release)

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued job at once; flag a running one."""
        def cancel(db: sqlite3.Connection) -> dict[str, Any] | None:
            with _immediate(db):
                job = _load(db, job_id)
                if job is None or job["state"] not in ("queued", "running"):
                    return job
                if job["state"] == "queued":
                    db.execute("DELETE FROM job_slides WHERE job = ?", (job_id,))
                    return _store(db, job, {"state": "cancelled", "cancel": True,
                                            "finished_at": time.time()})
                return _store(db, job, {"cancel": True})

        return await self._run(cancel)

    # ------------------------------------------------------------------ invalidation

    async def invalidate(self, slide: str | None) -> int:
        """Append to the invalidation log; returns the new generation."""
        def invalidate(db: sqlite3.Connection) -> int:
            with _immediate(db):
                generation = db.execute("INSERT INTO invalidations (slide) VALUES (?)",
                                        (slide,)).lastrowid or 0
                db.execute("DELETE FROM invalidations WHERE generation <= ?",
                           (generation - KEEP_INVALIDATIONS,))
                return generation

        return await self._run(invalidate)

    async def invalidations(self, since: int) -> tuple[int, list[str | None]]:
        """The current generation and what was invalidated after ``since``."""
        def read(db: sqlite3.Connection) -> tuple[int, list[str | None]]:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'invalidations'"
                             ).fetchone()
            generation = row[0] if row else 0
            if generation <= since:
                return generation, []
            if since < generation - KEEP_INVALIDATIONS:
                return generation, [None]
            rows = db.execute("SELECT slide FROM invalidations WHERE generation > ?",
                              (since,)).fetchall()
            return generation, [slide for (slide,) in rows]

        return await self._run(read)


class _immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception): the write lock is
    taken before the first read, so a check and its write are one step for every process."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _load(db: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return json.loads(row[0]) if row else None


def _held(db: sqlite3.Connection, job_id: str, owner: str | None) -> dict[str, Any] | None:
    """The running job if ``owner`` holds it."""
    job = _load(db, job_id)
    if job is None or job["state"] != "running" or job["owner"] != owner:
        return None
    return job


def _store(db: sqlite3.Connection, job: dict[str, Any],
           changes: dict[str, Any]) -> dict[str, Any]:
    """Write ``job`` with ``changes`` merged and its version incremented; return it."""
    job = {**job, **changes, "version": job["version"] + 1}
    db.execute("UPDATE jobs SET state = ?, owner = ?, lease = ?, doc = ? WHERE id = ?",
               (job["state"], job["owner"], job["lease"], json.dumps(job), job["id"]))
    return job
