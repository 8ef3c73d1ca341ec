"""Full-content SHA-256 of slide files, computed once in the background.

Enabled by ``Integrity:ContentSha256``.

OpenSlide's quickhash covers only part of a file; the slide identity adds its size and
modification time (:func:`app.core.slides.slide_identity`). For the strongest statement, "the
server's file is byte for byte this file", this module hashes whole slide files: once per
``(path, size, mtime_ns)``, in one background thread per process, with the result stored in the
cache index beside the cache (so other processes and restarts reuse it). Only one process of a
cache hashes a file at a time (a lock file). The SHA-256 is reported by ``/api/slides/{name}``
and the policy document, and ``tileserver verify`` compares it with the local file's.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
from pathlib import Path

from app.cache.index import INDEX_NAME, CacheIndex
from app.core.digest import file_sha256
from app.core.slides import SlideEntry

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000


class ContentHasher:
    """Hashes slide files in a background thread and remembers the results in the index.

    Args:
        index: the cache index (where results are kept), or None to keep them in memory.
        root: the cache root (for the lock file that lets one process hash at a time).
    """

    def __init__(self, index: CacheIndex | None, root: str | Path):
        self.index = index
        self.lock_path = Path(root) / (INDEX_NAME + ".hash-lock")
        self._known: dict[tuple[str, int, int], str] = {}
        self._queue: queue.Queue[tuple[str, int, int]] = queue.Queue(MAX_QUEUED)
        self._queued: set[tuple[str, int, int]] = set()
        self._thread = threading.Thread(target=self._run, name="content-sha256", daemon=True)
        self._thread.start()

    def sha256(self, entry: SlideEntry, size: int, mtime_ns: int) -> str | None:
        """The file's SHA-256 if known; otherwise None, and the file is queued for hashing.
        Blocking only for a lookup in the index (call from a worker thread)."""
        key = (os.path.abspath(entry.path), size, mtime_ns)
        known = self._known.get(key)
        if known is None and self.index is not None:
            known = self.index.content_sha256(*key)
        if known is not None:
            self._known[key] = known
            return known
        if key not in self._queued:
            try:
                self._queue.put_nowait(key)
                self._queued.add(key)
            except queue.Full:
                pass  # asked again later
        return None

    def _run(self) -> None:
        while True:
            key = self._queue.get()
            try:
                self._known[key] = self._hash(key)
            except OSError as exc:
                log.warning("content SHA-256 of %s: %s", key[0], exc)
            finally:
                self._queued.discard(key)

    def _hash(self, key: tuple[str, int, int]) -> str:
        path, size, mtime_ns = key
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be hashing it right now
            stored = self.index.content_sha256(*key) if self.index is not None else None
            if stored is not None:
                return stored
            st = os.stat(path)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise OSError(f"changed while queued for hashing: {Path(path).name}")
            sha256 = file_sha256(path)
            if self.index is not None:
                self.index.store_content_sha256(path, size, mtime_ns, sha256)
            log.info("content SHA-256 of %s: %s", Path(path).name, sha256)
            return sha256
