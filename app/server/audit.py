"""The audit log: one JSON line per tile request and per admin action, in a SHA-256 hash chain.

Enabled by ``Audit.Enabled``; the file is ``Audit.Path``. Every tile request of every tile family
(all answered by :class:`app.server.tiles.TileRoute`), 200, 304, HEAD and errors alike, becomes one
``kind: "tile"`` line::

    {"time": "2026-01-02T03:04:05.678901Z", "pid": 4242, "kind": "tile",
     "client": "10.0.0.7", "subject": "alice", "auth": "jwt",
     "method": "GET", "path": "/storage/CMU-1_files/17/40_30.jpeg", "slide": "CMU-1",
     "quickhash": "5b7f...", "identity": "quickhash-1:5b7f...;size=..;mtime_ns=..",
     "level": 17, "col": 40,
     "row": 30, "requested": {"extension": "jpeg", "format": null, "accept": "image/webp,*/*",
     "if_none_match": null}, "served": {"format": "png", "lossless": true,
     "override": null}, "cache": "hit", "status": 200, "bytes": 48213,
     "sha256": "9f86d0...", "duration_ms": 0.412, "error": null, "truncated": null,
     "prev": "3a7bd3..."}

and every call of a route that changes state or signs a URL (:class:`app.server.auth.GuardedRoute`)
one ``kind: "action"`` line (:data:`ACTION_FIELDS`) with its outcome. ``subject`` is the token's
``sub``, ``apikey:<Id>`` or ``anonymous``; ``auth`` the method (``jwt``, ``apikey``,
``signed-url``, ``none``); ``client`` the address :mod:`app.server.proxy` established (the
``X-Forwarded-For`` entry of a known proxy, else the peer). Request-supplied text (path, query,
``Accept``, ``If-None-Match``, subject, ...) is cut to ``Audit.MaxFieldChars`` characters, and
``truncated`` then lists the keys cut, so no request can make a line large.

**The hash chain.** ``prev`` is the hex SHA-256 of the previous line of the log (its bytes
without the newline), across rotation (the first line of a new file chains to the last line of
the file rotated away); the first line ever has 64 zeros. Several processes append to the one
file, so each process writes a batch while holding an exclusive ``flock`` on ``{Path}.lock``:
under the lock it reads the hash of the file's last line (remembered when that line is its own),
chains its batch to it, appends it with ``O_APPEND`` writes and rotates when needed. One chain,
whatever the number of workers; :func:`verify_chain` (``tileserver audit verify``) checks it and
names the first line that does not follow from the one before (a line edited, removed or
inserted). The last line has no successor: ship it (or its hash) off the machine to pin the head.

**Writing.** The event loop only appends a record to a :class:`queue.SimpleQueue`; one writer
thread per process wakes every :data:`FLUSH_SECONDS`, formats what was queued and writes it. The
queue is bounded (``Audit.QueueLines``, lines queued and not yet written): beyond it, or while
the file cannot be written, :meth:`AuditLog.record` refuses the line (``accepting`` is false);
with ``Audit:FailClosed`` the server then answers 503 instead of serving, otherwise it serves
and the log counts the lines it lost in a ``kind: "dropped"`` line. At shutdown
:meth:`AuditLog.close` writes the rest and ``fsync``s.

**Rotation** by size, under the same lock: the file at ``Audit.MaxBytes`` becomes ``{Path}.1``
(``.1`` -> ``.2`` ...). Files beyond ``Audit.BackupCount`` are deleted unless younger than
``Audit.RetentionDays``. Every write happens under the lock after the writer has followed a
rotation, and idle writers follow it within :data:`FLUSH_SECONDS`, so a rotated file is complete
and closed long before it can be deleted. Not for NFS, where ``O_APPEND`` and ``flock`` are not
reliable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from app.server.credentials import PRINCIPAL_KEY

if TYPE_CHECKING:
    from starlette.types import Scope

    from app.settings import AuditSettings

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.05
"""How often the writer thread wakes to write what was queued. Waking per line instead made
the thread compete for the GIL with the event loop on every request."""

GENESIS = "0" * 64
"""``prev`` of the first line ever written."""

FIELDS = ("time", "pid", "kind", "client", "subject", "auth", "method", "path", "slide",
          "quickhash", "identity", "level", "col", "row", "requested", "served", "cache",
          "status", "bytes", "sha256", "duration_ms", "error", "truncated", "prev")
"""The keys of every tile line, in order."""
ACTION_FIELDS = ("time", "pid", "kind", "client", "subject", "auth", "method", "path",
                 "route", "status", "error", "location", "truncated", "prev")
"""The keys of every action line, in order (``route`` is the route's path template)."""



def cap(value: str | None, limit: int, key: str, cut: list[str]) -> str | None:
    """``value`` cut to ``limit`` characters; ``key`` appended to ``cut`` when it was."""
    if value is None or len(value) <= limit:
        return value
    cut.append(key)
    return value[:limit]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as the audit log names them (capped).

    Attributes:
        client: the client address, or None.
        subject: the principal's subject.
        auth: the authentication method.
        path: URL path and query string.
        truncated: the keys cut so far.
    """

    client: str | None
    subject: str
    auth: str
    path: str
    truncated: tuple[str, ...]

    @classmethod
    def of(cls, scope: Scope, limit: int) -> Caller:
        """The caller of a request's ASGI scope (path and query with ``root_path``)."""
        client = scope.get("client")
        principal = scope.get(PRINCIPAL_KEY)
        query = scope.get("query_string", b"")
        path = scope["path"]
        if query:
            path = f"{path}?{query.decode('latin-1')}"
        cut: list[str] = []
        return cls(cap(client[0], limit, "client", cut) if client else None,
                   cap(principal.subject if principal else "anonymous", limit, "subject", cut)
                   or "", principal.method if principal else "none",
                   cap(path, limit, "path", cut) or "", tuple(cut))


class TileRequestRecord(NamedTuple):
    """One tile request as the audit log records it (built on the event loop: a tuple, cheap;
    formatted by the writer thread).

    Attributes:
        time: ``time.time()`` when the request arrived (UTC seconds since the epoch).
        caller: client, subject, auth method, path (:class:`Caller`).
        method: ``GET`` or ``HEAD``.
        slide: the slide name of the URL.
        identity: the slide identity (:func:`app.core.slides.slide_identity`), or
            None when the slide was not opened (unknown name, open error).
        level, col, row: the DZI address, or None where the URL did not parse.
        extension, query_format, accept, if_none_match: what was requested (capped).
        served_format, lossless, override: what was served (None on errors); ``override`` is
            ``refused`` when ``EnforceLossless`` refused a lossy override.
        cache: ``hit``, ``miss``, or None on errors.
        status: the HTTP status.
        body_bytes: body bytes sent (0 for HEAD and 304), None on errors.
        sha256: hex SHA-256 of the tile (also for HEAD and 304), None on errors.
        duration_s: seconds from arrival to the response being ready.
        error: the error code (``tile_not_found``, ...) or None.
        truncated: keys cut to ``Audit.MaxFieldChars`` (beyond those of ``caller``).
    """

    time: float
    caller: Caller
    method: str
    slide: str
    identity: str | None
    level: int | None
    col: int | None
    row: int | None
    extension: str | None
    query_format: str | None
    accept: str | None
    if_none_match: str | None
    served_format: str | None
    lossless: bool | None
    override: str | None
    cache: str | None
    status: int
    body_bytes: int | None
    sha256: str | None
    duration_s: float
    error: str | None
    truncated: tuple[str, ...] = ()

    def to_line(self, pid: int, prev: str = GENESIS) -> bytes:
        """The JSON line (keys in :data:`FIELDS` order, ``\\n``-terminated, ASCII).

        Written with an f-string and the json module's C string escaper: 4x faster than
        ``json.dumps`` of a dict, which matters at 10,000 lines/s.
        """
        identity = self.identity
        quickhash = (identity.split(";", 1)[0][12:]
                     if identity and identity.startswith("quickhash-1:") else None)
        served = ("null" if self.served_format is None else
                  f'{{"format":{_s(self.served_format)},"lossless":{_b(self.lossless)},'
                  f'"override":{_s(self.override)}}}')
        c = self.caller
        return (
            f'{{"time":"{_utc(self.time)}","pid":{pid},"kind":"tile",'
            f'"client":{_s(c.client)},"subject":{_s(c.subject)},"auth":{_s(c.auth)},'
            f'"method":{_s(self.method)},"path":{_s(c.path)},"slide":{_s(self.slide)},'
            f'"quickhash":{_s(quickhash)},"identity":{_s(identity)},"level":{_n(self.level)},'
            f'"col":{_n(self.col)},"row":{_n(self.row)},"requested":{{"extension":'
            f'{_s(self.extension)},"format":{_s(self.query_format)},"accept":{_s(self.accept)},'
            f'"if_none_match":{_s(self.if_none_match)}}},"served":{served},'
            f'"cache":{_s(self.cache)},"status":{self.status},"bytes":{_n(self.body_bytes)},'
            f'"sha256":{_s(self.sha256)},"duration_ms":{round(self.duration_s * 1000, 3)!r},'
            f'"error":{_s(self.error)},"truncated":{_keys(c.truncated + self.truncated)},'
            f'"prev":"{prev}"}}\n').encode("ascii")


class ActionRecord(NamedTuple):
    """One call of an audited route (a change of state, a signed URL issued) and its outcome.

    Attributes:
        time: UNIX time the line was made (after the route answered).
        caller: client, subject, auth method, path.
        method: the HTTP method.
        route: the route's path template (``/api/tiles/{name}/cache``).
        status: the HTTP status answered.
        error: the error code, or None on success.
        location: the ``Location`` the route answered (a job's URL), or None.
    """

    time: float
    caller: Caller
    method: str
    route: str
    status: int
    error: str | None
    location: str | None

    def to_line(self, pid: int, prev: str = GENESIS) -> bytes:
        """The JSON line (keys in :data:`ACTION_FIELDS` order)."""
        c = self.caller
        return (
            f'{{"time":"{_utc(self.time)}","pid":{pid},"kind":"action",'
            f'"client":{_s(c.client)},"subject":{_s(c.subject)},"auth":{_s(c.auth)},'
            f'"method":{_s(self.method)},"path":{_s(c.path)},"route":{_s(self.route)},'
            f'"status":{self.status},"error":{_s(self.error)},'
            f'"location":{_s(self.location)},"truncated":{_keys(c.truncated)},'
            f'"prev":"{prev}"}}\n').encode("ascii")


class DroppedRecord(NamedTuple):
    """How many lines this process could not queue (``Audit:FailClosed`` off) since the last
    line it wrote."""

    time: float
    lines: int

    def to_line(self, pid: int, prev: str = GENESIS) -> bytes:
        """The JSON line: ``{"time", "pid", "kind": "dropped", "count", "prev"}``."""
        return (f'{{"time":"{_utc(self.time)}","pid":{pid},"kind":"dropped",'
                f'"count":{self.lines},"prev":"{prev}"}}\n').encode("ascii")


Record = TileRequestRecord | ActionRecord | DroppedRecord
"""What the writer thread formats: one line each."""


def _s(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _n(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def _b(value: bool | None) -> str:
    return "null" if value is None else ("true" if value else "false")


def _keys(keys: tuple[str, ...]) -> str:
    return "null" if not keys else "[" + ",".join(f'"{k}"' for k in keys) + "]"


_SECOND = [-1, ""]


def _utc(t: float) -> str:
    """``2026-01-02T03:04:05.678901Z`` for epoch seconds ``t`` (the second's text cached)."""
    seconds = int(t)
    if _SECOND[0] != seconds:
        _SECOND[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return f"{_SECOND[1]}.{int((t - seconds) * 1_000_000):06d}Z"


def line_hash(line: bytes) -> str:
    """The hex SHA-256 the next line's ``prev`` holds: of the line without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def last_line(fd: int, size: int) -> bytes | None:
    """The last line of an open file of ``size`` bytes (without its newline), None if empty."""
    if size == 0:
        return None
    end = size
    if os.pread(fd, 1, size - 1) == b"\n":
        end -= 1
    start, chunk = end, 4096
    while start > 0:
        step = min(chunk, start)
        data = os.pread(fd, step, start - step)
        at = data.rfind(b"\n")
        if at >= 0:
            start = start - step + at + 1
            break
        start -= step
        chunk *= 4
    return os.pread(fd, end - start, start)


class AuditLog:
    """The audit log of one process: a bounded queue on the event-loop side, a writer thread
    behind (see the module docstring).

    Args:
        settings: the ``Audit`` section.

    :meth:`record`, :meth:`action` and :attr:`accepting` are what the event loop uses;
    :meth:`open` and :meth:`close` block (file system, thread join): call them from a worker
    thread.
    """

    def __init__(self, settings: AuditSettings):
        self.path = Path(settings.Path)
        self.max_bytes = settings.MaxBytes
        self.backup_count = settings.BackupCount
        self.retention_s = settings.RetentionDays * 86400
        self.queue_lines = settings.QueueLines
        self.field_chars = settings.MaxFieldChars
        self.pid = os.getpid()
        self.written = 0
        """Lines written by this process so far."""
        self.dropped = 0
        """Lines this process refused (queue full or log failing) so far."""
        self._queue: queue.SimpleQueue[Record] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._ino = -1
        self._lock_fd = -1
        self._failed: str | None = None
        self._pending: list[Record] = []
        self._unreported = 0
        self._drops = threading.Lock()
        self._tail: tuple[int, int, str] | None = None
        """``(inode, size, hash)`` after this process's last write: the file's last line is
        its own while inode and size are still these."""

    def open(self) -> None:
        """Create the folder, open the file and its lock file, start the writer thread.
        Blocking.

        Raises:
            OSError: the file cannot be opened (start-up then fails: an audit log that was
                asked for and cannot be written is not silently skipped).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        self._reopen()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Lines queued and not yet written (approximate: ``qsize``)."""
        return self._queue.qsize() + len(self._pending)

    @property
    def accepting(self) -> bool:
        """Whether a line queued now will be written: the queue has room and the file is
        writable."""
        return self._failed is None and (self._queue.qsize() + len(self._pending)
                                         < self.queue_lines)

    def record(self, entry: TileRequestRecord | ActionRecord) -> bool:
        """Queue one line (event loop; never blocks). False when it was refused (see
        :attr:`accepting`); the refusal is counted in the next ``dropped`` line."""
        if not self.accepting:
            with self._drops:
                self.dropped += 1
                self._unreported += 1
            return False
        self._queue.put(entry)
        return True

    def action(self, scope: Scope, route: str, status: int, error: str | None,
               location: str | None) -> bool:
        """Queue the line of an audited route's call (see :class:`ActionRecord`)."""
        return self.record(ActionRecord(time.time(), Caller.of(scope, self.field_chars),
                                        scope["method"], route, status, error, location))

    def close(self) -> None:
        """Write everything queued, fsync and close. Blocking; idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._pending:
            log.error("audit log %s: %d line(s) could not be written", self.path,
                      len(self._pending))

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        get_nowait = self._queue.get_nowait
        stopping = False
        while not stopping:
            stopping = self._stop.wait(FLUSH_SECONDS)
            records = []
            while True:
                try:
                    records.append(get_nowait())
                except queue.Empty:
                    break
            if self._unreported:
                with self._drops:
                    count, self._unreported = self._unreported, 0
                records.insert(0, DroppedRecord(time.time(), count))
            if records or self._pending:
                self._write(records)
            else:
                self._idle()

    def _idle(self) -> None:
        """Close a descriptor of a file another process rotated away."""
        try:
            self._follow_rotation()
        except OSError:
            pass

    def _write(self, records: list[Record]) -> None:
        """Chain and append records under the lock; rotate between writes as the size limit
        asks. On a disk error keep the unwritten records (formatted again, with the right
        ``prev``, on the next try)."""
        self._pending += records
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._write_locked()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except OSError as exc:
            if self._failed != exc.strerror:
                self._failed = exc.strerror
                log.error("audit log %s: cannot write (%s); %d line(s) kept in memory and "
                          "retried; new lines are refused meanwhile", self.path, exc.strerror,
                          len(self._pending))
            return
        if self._failed:
            log.warning("audit log %s is writable again", self.path)
            self._failed = None

    def _write_locked(self) -> None:
        self._follow_rotation()
        size = os.fstat(self._fd).st_size
        prev = self._previous_hash(size)
        while self._pending:
            room = self.max_bytes - size if self.rotating else 1 << 62
            lines: list[bytes] = []
            used = 0
            for record in self._pending:
                line = record.to_line(self.pid, prev)
                if (lines or size) and used + len(line) > room:
                    break
                lines.append(line)
                used += len(line)
                prev = line_hash(line)
            if not lines:  # the file is full: the rest goes to a new file
                self._rotate()
                size = 0
                continue
            data = b"".join(lines)
            written = 0
            while written < len(data):
                written += os.write(self._fd, memoryview(data)[written:])
            size += len(data)
            del self._pending[:len(lines)]
            self.written += len(lines)
            self._tail = (self._ino, size, prev)

    def _previous_hash(self, size: int) -> str:
        """The hash of the line before the next one written: this process's last line's if
        nobody wrote since, else read from the end of the file (or of the last rotated file
        when this one is empty)."""
        tail = self._tail
        if tail is not None and tail[0] == self._ino and tail[1] == size:
            return tail[2]
        line = last_line(self._fd, size)
        if line is None:
            rotated = audit_files(self.path)[:-1]
            if rotated:
                fd = os.open(rotated[-1], os.O_RDONLY)
                try:
                    line = last_line(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
        elif os.pread(self._fd, 1, size - 1) != b"\n":  # a torn last write: end its line
            os.write(self._fd, b"\n")
        return GENESIS if line is None else line_hash(line)

    @property
    def rotating(self) -> bool:
        """Whether the file rotates by size (``MaxBytes`` and ``BackupCount`` both > 0)."""
        return bool(self.max_bytes and self.backup_count)

    def _reopen(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._ino = fd, os.fstat(fd).st_ino

    def _follow_rotation(self) -> None:
        """Reopen if another process rotated (the path names another inode, or none)."""
        try:
            same = os.stat(self.path).st_ino == self._ino
        except FileNotFoundError:
            same = False
        if not same:
            self._reopen()

    def _rotate(self) -> None:
        """Under the lock: ``{Path}.N`` -> ``.N+1`` ..., ``{Path}`` -> ``.1``; delete the files
        beyond ``BackupCount`` that are older than ``RetentionDays``."""
        rotated = audit_files(self.path)[:-1]  # oldest first
        for older in rotated:
            n = int(older.suffix[1:])
            os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._reopen()
        now = time.time()
        for old in audit_files(self.path)[:-1]:
            n = int(old.suffix[1:])
            if n > self.backup_count and now - old.stat().st_mtime >= self.retention_s:
                old.unlink()


def audit_files(path: str | Path) -> list[Path]:
    """The log and its rotated files, oldest first (``{Path}.N`` ... ``{Path}.1``, ``{Path}``)."""
    base = Path(path)
    rotated = sorted((p for p in base.parent.glob(base.name + ".*")
                      if p.suffix[1:].isdigit()), key=lambda p: -int(p.suffix[1:]))
    return [*rotated, *([base] if base.exists() else [])]


# ------------------------------------------------------------------------------ verification


@dataclass(frozen=True)
class ChainReport:
    """What :func:`verify_chain` found.

    Attributes:
        lines: lines checked.
        files: files checked, in order.
        start: ``prev`` of the first line (64 zeros when the log starts there).
        head: hash of the last line: compare with a copy kept elsewhere.
        broken: ``(file, line number from 1, why)`` of the first line that does not follow,
            or None when the chain holds.
    """

    lines: int
    files: list[str]
    start: str | None
    head: str | None
    broken: tuple[str, int, str] | None


def chain_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files ``tileserver audit verify`` checks, in chain order: a path with rotated files
    beside it (``{Path}.1`` ...) stands for all of them, oldest first; other paths stay in the
    order given; a file named twice is checked once."""
    out: list[Path] = []
    for path in map(Path, paths):
        group = (audit_files(path) if not path.suffix[1:].isdigit() else [path])
        for file in group or [path]:
            if file not in out:
                out.append(file)
    return out


def _lines(file: Path) -> Iterator[bytes]:
    with file.open("rb") as fh:
        yield from fh


def verify_chain(paths: Iterable[str | Path]) -> ChainReport:
    """Check the hash chain over files (see :func:`chain_files` for their order).

    Each line must be JSON with a ``prev`` equal to the SHA-256 of the line before it (the
    first line checked is the anchor: its ``prev`` is reported as ``start``).

    Raises:
        OSError: a file cannot be read.
    """
    files = chain_files(paths)
    prev_hash: str | None = None
    start = None
    count = 0
    for file in files:
        for number, raw in enumerate(_lines(file), 1):
            count += 1
            where = (str(file), number)
            if not raw.endswith(b"\n"):
                return ChainReport(count, list(map(str, files)), start, prev_hash,
                                   (*where, "the line is not terminated (a torn write)"))
            try:
                prev = json.loads(raw)["prev"]
            except (ValueError, KeyError, TypeError):
                return ChainReport(count, list(map(str, files)), start, prev_hash,
                                   (*where, "not a JSON line with a prev key"))
            if prev_hash is None:
                start = prev
            elif prev != prev_hash:
                return ChainReport(count, list(map(str, files)), start, prev_hash, (
                    *where, "prev is not the SHA-256 of the line before: that line was "
                    "changed, or lines between them were removed or inserted"))
            prev_hash = line_hash(raw)
    return ChainReport(count, list(map(str, files)), start, prev_hash, None)
