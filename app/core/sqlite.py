"""SQLite databases that several processes share: the cache index and the embedded
coordination store, both in ``TileCachePath``."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

_RETRY_SECONDS = (0.005, 0.05)
"""The range of the random pause between two attempts to switch to WAL."""


def open_shared(path: str | Path, busy_seconds: float, *,
                check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection to the database at ``path`` (created if absent) in WAL mode with
    ``synchronous=NORMAL``, autocommit (``isolation_level=None``), and a busy timeout of
    ``busy_seconds``.

    The switch to WAL is retried until ``busy_seconds`` have passed: while another process
    creates the same database (two uvicorn workers starting on a fresh cache), SQLite answers
    ``PRAGMA journal_mode=WAL`` with "database is locked" at once, without waiting through the
    busy timeout (seen in 2 of 40 races of two processes on this machine under load).

    Raises:
        sqlite3.Error: the database cannot be opened, or stayed locked for ``busy_seconds``.
    """
    db = sqlite3.connect(path, timeout=busy_seconds, check_same_thread=check_same_thread,
                         isolation_level=None)
    deadline = time.monotonic() + busy_seconds
    try:
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(*_RETRY_SECONDS))
        db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        db.close()
        raise
    return db
