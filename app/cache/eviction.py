"""A disk cache with a size: background eviction, least recently used first.

``TileCacheMaxBytes`` bounds the bytes of the tile files (seals included) under
``TileCachePath``; none means 10% of the size of the file system that holds it
(:func:`cache_limit`). Every server process runs an :class:`Evictor`, which looks at the cache
index's totals every :data:`CHECK_SECONDS`; when they pass the high watermark
(``TileCacheHighWatermark`` of the limit), the one process that takes the eviction lock
(``flock`` on ``.index.sqlite.evict``, so processes never evict at once) deletes, until the
cache is under the low watermark (``TileCacheLowWatermark``):

1. stale variants (an older slide file, older settings, an encoding the policy no longer
   uses: :meth:`app.cache.tiles.TileService.usage`), whole;
2. then tiles by access time, oldest first. The access time is kept by the cache index itself
   (every disk read touches it), since file systems are often mounted ``noatime``.

Slides of running or queued pregeneration jobs (in the coordination store) are left alone while
their job runs. ``TileFormat.OverrideCacheBytes`` bounds, per slide, the tiles in another
encoding than their level's policy encoding (``?format=`` overrides): the least recently used
of them go first beyond it. Deleting a file a request is reading loses nothing: Linux frees an
unlinked file at its last close, and a later request renders the tile again.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, TypeVarTuple, Unpack

import anyio

from app.cache.index import INDEX_NAME
from app.core.errors import TileServerError
from app.core.periodic import Periodic
from app.settings import Settings

if TYPE_CHECKING:
    from app.cache.tiles import TileService

log = logging.getLogger(__name__)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

CHECK_SECONDS = 1.0
"""How often each process compares the cache's bytes with the high watermark."""
BATCH = 500
"""Tiles deleted per step (one index query, one transaction)."""
DEFAULT_SHARE = 0.10
"""``TileCacheMaxBytes`` none: this share of the file system's size."""


def cache_limit(settings: Settings) -> int:
    """The cache's limit in bytes: ``TileCacheMaxBytes``, or 10% of the size of the file
    system that holds ``TileCachePath`` (its nearest existing folder) when none; 0: no limit.
    Blocking (``statvfs``)."""
    if settings.TileCacheMaxBytes is not None:
        return settings.TileCacheMaxBytes
    folder = os.path.abspath(settings.TileCachePath)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    st = os.statvfs(folder)
    return int(st.f_blocks * st.f_frsize * DEFAULT_SHARE)


class Evictor:
    """Keeps one process's view of the disk cache under its limit (see the module docstring).

    Args:
        service: the tile service (its disk cache with the index, planner, registry, store).
        settings: the watermarks and the override quota.
        limit: :func:`cache_limit`.
    """

    def __init__(self, service: TileService, settings: Settings, limit: int):
        self.service = service
        self.limit = limit
        self.high = int(limit * settings.TileCacheHighWatermark)
        self.low = int(limit * settings.TileCacheLowWatermark)
        self.quota = settings.TileFormat.OverrideCacheBytes
        self.quota_low = int(self.quota * settings.TileCacheLowWatermark)
        self._rounds = Periodic(CHECK_SECONDS, self.run_once, "tile cache eviction")
        index = service.disk.index
        self._lock_path = (os.path.join(service.disk.root, INDEX_NAME + ".evict")
                           if index is not None else None)

    def start(self) -> None:
        """Check every :data:`CHECK_SECONDS` (from the event loop)."""
        if self._lock_path is not None and (self.limit or self.quota):
            self._rounds.start()

    def stop(self) -> None:
        """Stop checking."""
        self._rounds.stop()

    async def run_once(self) -> int:
        """One pass: enforce the override quota, then, past the high watermark, bring the
        cache under the low one (in this process, unless another holds the eviction lock).

        Returns:
            Tile files deleted.
        """
        index = self.service.disk.index
        if index is None or self._lock_path is None:
            return 0
        usage = await self._thread(index.usage)
        if not self.quota and not (self.limit and usage.bytes > self.high):
            return 0
        lock = await self._thread(_try_lock, self._lock_path)
        if lock is None:
            return 0  # another process evicts
        try:
            protected = await self._protected()
            removed = await self._quota(protected) if self.quota else 0
            if self.limit:
                usage = await self._thread(index.usage)
                if usage.bytes > self.high:
                    removed += await self._shrink(usage.bytes, protected)
            return removed
        finally:
            await self._thread(os.close, lock)

    async def _thread(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.service.io_limiter)

    async def _protected(self) -> set[str]:
        """Slides of queued or running jobs (left alone while their job runs)."""
        store = self.service.store
        if store is None:
            return set()
        return {slide for job in await store.jobs() if job["state"] in ("queued", "running")
                for slide in job["slides"]}

    async def _shrink(self, used: int, protected: set[str]) -> int:
        """Stale variants, then the least recently used tiles, until under the low
        watermark."""
        service, index = self.service, self.service.disk.index
        assert index is not None
        removed = 0
        started = used
        for slide, use in (await service.usage()).items():
            if used <= self.low:
                break
            if slide in protected or not use.stale:
                continue
            removed += await self._thread(service.disk.clear_variants,
                                          [(slide, variant) for variant in use.stale])
            used -= use.stale_bytes
        while used > self.low:
            batch = await self._thread(index.oldest, BATCH, protected)
            if not batch:
                log.warning("tile cache: %d bytes over its low watermark, and every tile left "
                            "belongs to a running job", used - self.low)
                break
            removed += await self._thread(service.disk.evict, [key for key, _ in batch])
            used -= sum(size for _, size in batch)
        log.info("tile cache: evicted %d tile file(s), %d -> %d bytes (limit %d)", removed,
                 started, max(used, 0), self.limit)
        return removed

    async def _quota(self, protected: set[str]) -> int:
        """Per slide, bring the tiles in other encodings than their level's policy encoding
        under ``TileFormat.OverrideCacheBytes`` (to its low-watermark share)."""
        service, index = self.service, self.service.disk.index
        assert index is not None
        removed = 0
        levels = await self._thread(index.levels)
        for slide, counts in levels.items():
            if slide in protected or slide not in service.registry.catalogue:
                continue
            try:
                handle = await service.registry.get(slide)
            except TileServerError:
                continue
            source, planner = handle.source, service.planner
            level_count = source.pyramid.level_count
            policy = {(planner.key(handle, source, level, 0, 0,
                                   planner.policy.level_encoding(level, level_count)).variant,
                       level) for level in range(level_count)}
            others = [c for c in counts if (c.variant, c.level) not in policy]
            used = sum(c.bytes for c in others)
            groups = [(slide, c.variant, c.level) for c in others]
            while used > self.quota:
                batch = await self._thread(index.oldest, BATCH, (), groups)
                if not batch:
                    break
                for key, size in batch:
                    used -= size
                    if used <= self.quota_low:
                        batch = batch[:batch.index((key, size)) + 1]
                        break
                removed += await self._thread(service.disk.evict, [key for key, _ in batch])
                if used <= self.quota_low:
                    break
        return removed


def _try_lock(path: str) -> int | None:
    """An open file descriptor holding an exclusive ``flock`` on ``path``, or None when
    another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
