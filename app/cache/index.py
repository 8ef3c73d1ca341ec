"""The cache index: what the disk cache holds, kept by the cache itself in SQLite.

``{TileCachePath}/.index.sqlite`` (WAL mode, safe for every process of every server and
pregeneration worker that shares the cache on one machine) holds one row per cached tile file
(its slide, variant, DZI address, size in bytes and last access time, which the cache keeps
itself since file systems are often mounted ``noatime``), per-``(slide, variant, level)`` totals
maintained by triggers, what each variant was rendered from (slide identity, encoding, geometry
fingerprint), and counters (corrupt files found, evictions). Statistics are answered from the
totals, never from a walk of the tree, so they cost the same with a million tiles as with ten.

Writers never wait for SQLite: :meth:`CacheIndex.wrote`, :meth:`touched` and :meth:`corrupt`
append to a bounded in-memory queue, and one thread per process writes the queue in one
transaction every :data:`FLUSH_SECONDS`. A queue that overflows (SQLite locked for long) drops
events and marks the index for a rebuild from the files. :meth:`CacheIndex.rebuild` walks the
cache once (at start-up, when the index is new or marked) and replaces the rows.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.core.keys import TileKey
from app.core.sqlite import open_shared

log = logging.getLogger(__name__)

INDEX_NAME = ".index.sqlite"
FLUSH_SECONDS = 0.25
"""How often the writer thread writes queued events."""
MAX_QUEUED = 200_000
"""Events kept in memory at most; beyond, they are dropped and the index rebuilt later."""
BUSY_SECONDS = 10.0
REBUILD_CHUNK = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tiles (
    slide TEXT NOT NULL, variant TEXT NOT NULL, level INTEGER NOT NULL,
    col INTEGER NOT NULL, row INTEGER NOT NULL, ext TEXT NOT NULL,
    bytes INTEGER NOT NULL, atime REAL NOT NULL,
    PRIMARY KEY (slide, variant, level, col, row, ext)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tiles_by_atime ON tiles (atime);
CREATE TABLE IF NOT EXISTS levels (
    slide TEXT NOT NULL, variant TEXT NOT NULL, level INTEGER NOT NULL,
    tiles INTEGER NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (slide, variant, level)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS variants (
    slide TEXT NOT NULL, variant TEXT NOT NULL, identity TEXT NOT NULL,
    encoding TEXT NOT NULL, geometry TEXT NOT NULL,
    PRIMARY KEY (slide, variant)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS content (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (path, size, mtime_ns)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS tiles_inserted AFTER INSERT ON tiles BEGIN
    INSERT INTO levels VALUES (new.slide, new.variant, new.level, 1, new.bytes)
    ON CONFLICT DO UPDATE SET tiles = tiles + 1, bytes = bytes + new.bytes;
END;
CREATE TRIGGER IF NOT EXISTS tiles_deleted AFTER DELETE ON tiles BEGIN
    UPDATE levels SET tiles = tiles - 1, bytes = bytes - old.bytes
    WHERE slide = old.slide AND variant = old.variant AND level = old.level;
END;
CREATE TRIGGER IF NOT EXISTS tiles_resized AFTER UPDATE OF bytes ON tiles BEGIN
    UPDATE levels SET bytes = bytes - old.bytes + new.bytes
    WHERE slide = new.slide AND variant = new.variant AND level = new.level;
END;
"""

_UPSERT = ("INSERT INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
           "bytes = excluded.bytes, atime = excluded.atime")
_INSERT_IF_ABSENT = "INSERT OR IGNORE INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_TOUCH = ("UPDATE tiles SET atime = ? WHERE slide = ? AND variant = ? AND level = ? "
          "AND col = ? AND row = ? AND ext = ?")


@dataclass(frozen=True, slots=True)
class VariantOrigin:
    """What a cache variant was rendered from: the slide identity
    (:func:`app.core.slides.slide_identity`), the encoding (:attr:`Encoding.key`) and the
    geometry fingerprint (:func:`geometry_fingerprint`)."""

    identity: str
    encoding: str
    geometry: str


@dataclass
class LevelCount:
    """Cached tiles and their bytes (tile bytes plus the seal) of one variant at one level."""

    variant: str
    level: int
    tiles: int
    bytes: int
    origin: VariantOrigin | None


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """The whole cache: tile files, their bytes (seals included) and the tiles evicted so far
    (by every process)."""

    tiles: int
    bytes: int
    evicted: int


RowKey = tuple[str, str, int, int, int, str]
"""A tile's key columns in the index: slide, variant, DZI level, col, row, extension."""


@dataclass
class _Pending:
    writes: dict[RowKey, tuple[int, float]] = field(default_factory=dict)
    touches: dict[RowKey, float] = field(default_factory=dict)
    origins: dict[tuple[str, str], VariantOrigin] = field(default_factory=dict)
    corrupt: int = 0

    def __len__(self) -> int:
        return len(self.writes) + len(self.touches)


class CacheIndex:
    """The index of one cache root (see the module docstring). Thread-safe.

    Args:
        root: ``TileCachePath``.
        flush_seconds: how often queued events are written (the writer thread).

    :meth:`open` starts the writer thread; :meth:`close` writes what is queued and stops it.
    Every method that touches SQLite blocks: call from worker threads.
    """

    def __init__(self, root: str | Path, flush_seconds: float = FLUSH_SECONDS):
        self.root = Path(root)
        self.path = self.root / INDEX_NAME
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()  # the connection and the pending events
        self._pending = _Pending()
        self._known: set[tuple[str, str]] = set()
        self._db: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        """Events dropped because the queue was full (the index is then rebuilt)."""

    # ------------------------------------------------------------------ lifetime

    def open(self, writer: bool = True) -> bool:
        """Open (creating) the database; with ``writer``, start the writer thread. Blocking.

        Returns:
            True when the index is new or marked for a rebuild (call :meth:`rebuild`).

        Raises:
            sqlite3.Error, OSError: the database cannot be opened.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        db = open_shared(self.path, BUSY_SECONDS, check_same_thread=False)
        with db:
            db.executescript(_SCHEMA)
        self._db = db
        if writer:
            self._thread = threading.Thread(target=self._run, name="cache-index", daemon=True)
            self._thread.start()
        fresh = db.execute("SELECT value FROM counters WHERE name = 'built'").fetchone()
        return fresh is None or fresh[0] == 0

    def close(self) -> None:
        """Write what is queued and close. Blocking; idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------ events (cheap)

    def wrote(self, key: TileKey, size: int, origin: VariantOrigin) -> None:
        """A tile file of ``size`` bytes (seal included) was written."""
        with self._lock:
            if not self._room():
                return
            self._pending.writes[_row_key(key)] = (size, time.time())
            variant = (key.slide, key.variant)
            if variant not in self._known:
                self._pending.origins[variant] = origin

    def touched(self, key: TileKey) -> None:
        """A tile file was read (its access time, for least-recently-used eviction)."""
        with self._lock:
            if self._room():
                self._pending.touches[_row_key(key)] = time.time()

    def corrupt(self) -> None:
        """A corrupt tile file was found (and replaced)."""
        with self._lock:
            self._pending.corrupt += 1

    def _room(self) -> bool:
        if len(self._pending) < MAX_QUEUED:
            return True
        self.dropped += 1
        return False

    # ------------------------------------------------------------------ writing

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except sqlite3.Error as exc:
                log.warning("cache index %s: %s; retrying", self.path, exc)

    def flush(self) -> None:
        """Write the queued events now, in one transaction. Blocking."""
        with self._lock:
            db = self._db
            pending = self._pending
            if db is None or not (len(pending) or pending.corrupt or pending.origins
                                  or self.dropped):
                return
            self._pending = _Pending()
            now_dropped, self.dropped = self.dropped, 0
            try:
                with db:
                    db.executemany(_UPSERT, [(*k, size, atime)
                                             for k, (size, atime) in pending.writes.items()])
                    db.executemany(_TOUCH, [(atime, *k)
                                            for k, atime in pending.touches.items()])
                    db.executemany(
                        "INSERT OR REPLACE INTO variants VALUES (?, ?, ?, ?, ?)",
                        [(*v, o.identity, o.encoding, o.geometry)
                         for v, o in pending.origins.items()])
                    if pending.corrupt:
                        _add(db, "corrupt", pending.corrupt)
                    if now_dropped:
                        db.execute("INSERT OR REPLACE INTO counters VALUES ('built', 0)")
            except sqlite3.Error:
                self._pending = pending  # keep them: retried with the next flush
                self.dropped += now_dropped
                raise
            self._known.update(pending.origins)

    def forget(self, slide: str | None = None) -> None:
        """Drop the rows of one slide, or all, after their files were deleted. Blocking."""
        self.flush()
        with self._lock:
            db = self._require()
            where, args = ("WHERE slide = ?", (slide,)) if slide is not None else ("", ())
            with db:
                db.execute(f"DELETE FROM tiles {where}", args)
                db.execute(f"DELETE FROM levels {where}", args)
                db.execute(f"DELETE FROM variants {where}", args)
            self._known = {v for v in self._known if slide is not None and v[0] != slide}

    def forget_variants(self, variants: Iterable[tuple[str, str]]) -> None:
        """Drop the rows of some ``(slide, variant)`` pairs. Blocking."""
        self.flush()
        with self._lock:
            db = self._require()
            pairs = list(variants)
            with db:
                for table in ("tiles", "levels", "variants"):
                    db.executemany(f"DELETE FROM {table} WHERE slide = ? AND variant = ?",
                                   pairs)
            self._known.difference_update(pairs)

    def rebuild(self, files: Iterable[tuple[TileKey, int, float]]) -> int:
        """Replace every tile row with ``(key, bytes, atime)`` of the files found by a walk
        of the cache. Variants keep what is known of their origin. Blocking.

        Runs on a connection of its own, in transactions of :data:`REBUILD_CHUNK` rows, so
        that writers (and the tiles they serve) never wait for the walk; a tile written while
        it runs keeps its fresher row.

        Returns:
            The number of tiles indexed.
        """
        self.flush()
        db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        try:
            with db:
                db.execute("DELETE FROM tiles")
                db.execute("DELETE FROM levels")
            count = 0
            batch: list[tuple[str, str, int, int, int, str, int, float]] = []
            for key, size, atime in files:
                batch.append((*_row_key(key), size, atime))
                if len(batch) >= REBUILD_CHUNK:
                    with db:
                        db.executemany(_INSERT_IF_ABSENT, batch)
                    count, batch = count + len(batch), []
            with db:
                db.executemany(_INSERT_IF_ABSENT, batch)
                db.execute("INSERT OR REPLACE INTO counters VALUES ('built', 1)")
            return count + len(batch)
        finally:
            db.close()

    # ------------------------------------------------------------------ reading

    def levels(self, slide: str | None = None) -> dict[str, list[LevelCount]]:
        """Per slide, the tiles and bytes of each ``(variant, level)``, with the variant's
        origin when known. Reads only the totals. Blocking.
        """
        self.flush()
        with self._lock:
            db = self._require()
            sql = ("SELECT l.slide, l.variant, l.level, l.tiles, l.bytes, v.identity, "
                   "v.encoding, v.geometry FROM levels l LEFT JOIN variants v "
                   "USING (slide, variant) WHERE l.tiles > 0")
            if slide is not None:
                rows = db.execute(sql + " AND l.slide = ?", (slide,)).fetchall()
            else:
                rows = db.execute(sql).fetchall()
        out: dict[str, list[LevelCount]] = {}
        for name, variant, level, tiles, size, identity, encoding, geometry in rows:
            origin = (VariantOrigin(identity, encoding, geometry) if identity is not None
                      else None)
            out.setdefault(name, []).append(LevelCount(variant, level, tiles, size, origin))
        return out

    def usage(self) -> CacheUsage:
        """Totals over every slide, from the per-level totals (no walk). Blocking."""
        self.flush()
        with self._lock:
            db = self._require()
            tiles, size = db.execute("SELECT coalesce(sum(tiles), 0), coalesce(sum(bytes), 0) "
                                     "FROM levels").fetchone()
            row = db.execute("SELECT value FROM counters WHERE name = 'evicted'").fetchone()
        return CacheUsage(tiles, size, row[0] if row else 0)

    def oldest(self, count: int, exclude: Iterable[str] = (),
               among: Iterable[tuple[str, str, int]] | None = None
               ) -> list[tuple[TileKey, int]]:
        """The ``count`` least recently used tiles (oldest access time first) with their
        bytes, leaving out the slides in ``exclude``; with ``among``, only tiles of those
        ``(slide, variant, level)``. Blocking."""
        self.flush()
        skip = sorted(set(exclude))
        sql = "SELECT slide, variant, level, col, row, ext, bytes FROM tiles"
        where: list[str] = []
        args: list[object] = []
        if skip:
            where.append(f"slide NOT IN ({', '.join('?' * len(skip))})")
            args += skip
        if among is not None:
            groups = sorted(set(among))
            if not groups:
                return []
            where.append("(" + " OR ".join(["(slide = ? AND variant = ? AND level = ?)"]
                                            * len(groups)) + ")")
            args += [part for group in groups for part in group]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY atime LIMIT ?"
        with self._lock:
            rows = self._require().execute(sql, (*args, count)).fetchall()
        return [(TileKey(*row[:6]), row[6]) for row in rows]

    def evicted(self, keys: Iterable[TileKey]) -> None:
        """Drop the rows of evicted tiles and count them (``evicted``). Blocking."""
        rows = [_row_key(key) for key in keys]
        if not rows:
            return
        self.flush()
        with self._lock:
            db = self._require()
            with db:
                db.executemany("DELETE FROM tiles WHERE slide = ? AND variant = ? AND "
                               "level = ? AND col = ? AND row = ? AND ext = ?", rows)
                _add(db, "evicted", len(rows))

    def counter(self, name: str) -> int:
        """A counter's value (``corrupt``, ``evicted``). Blocking."""
        self.flush()
        with self._lock:
            row = self._require().execute("SELECT value FROM counters WHERE name = ?",
                                          (name,)).fetchone()
        return row[0] if row else 0

    def content_sha256(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The stored SHA-256 (hex) of a slide file as it was at ``(size, mtime_ns)``."""
        with self._lock:
            row = self._require().execute(
                "SELECT sha256 FROM content WHERE path = ? AND size = ? AND mtime_ns = ?",
                (path, size, mtime_ns)).fetchone()
        return row[0] if row else None

    def store_content_sha256(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        """Keep a slide file's SHA-256 (older entries of the same path are dropped)."""
        with self._lock:
            db = self._require()
            with db:
                db.execute("DELETE FROM content WHERE path = ?", (path,))
                db.execute("INSERT INTO content VALUES (?, ?, ?, ?)",
                           (path, size, mtime_ns, sha256))

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the cache index is not open")
        return self._db


def _row_key(key: TileKey) -> RowKey:
    return (key.slide, key.variant, key.level, key.col, key.row, key.ext)


def _add(db: sqlite3.Connection, name: str, value: int) -> None:
    db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT DO UPDATE SET "
               "value = value + excluded.value", (name, value))


def geometry_fingerprint(deepzoom_json: str) -> str:
    """16 hex digits naming the ``DeepZoom`` settings (tile size, overlap, bounds, geometry,
    colour mode) tiles were rendered under: a variant rendered under other ones is stale."""
    return hashlib.sha256(deepzoom_json.encode()).hexdigest()[:16]
