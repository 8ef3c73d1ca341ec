"""TileService.get_tile(): a planned tile's bytes, from the caches or made once.

Order of work for one request: resolve the slide (404 before any I/O), let the planner
(:class:`app.core.planner.TilePlanner`) decide the encoding, the cache key and whether the tile
is the slide's stored JPEG tile (pure), then the memory LRU, the disk cache, and on a miss one
render thread that renders with OpenSlide and encodes, shared by concurrent requests for the
same tile (single-flight). The result is written to the disk cache atomically before it is
returned; a tile that failed is never cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import anyio
from anyio import CapacityLimiter

from app.cache.disk import DiskTileCache
from app.cache.flight import SingleFlight
from app.cache.index import LevelCount, VariantOrigin, geometry_fingerprint
from app.cache.memory import MemoryTileCache
from app.core.digest import TileDigest, digest_from_sha256, digest_of
from app.core.errors import SlideGone, SlideReadError, TileServerError
from app.core.planner import TilePlan, TilePlanner, TileRequest
from app.core.pyramid import ImageSource
from app.core.render import original_tile, render_tile
from app.core.slides import OpenSlide, SlideRegistry
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tile:
    """An encoded tile and the facts its response headers state.

    Attributes:
        data: the complete image file bytes.
        plan: how it was planned (encoding, colour transform, Vary, refused override).
        cache: ``hit`` (memory or disk) or ``miss`` (rendered or read for this request).
        digest: SHA-256 of ``data`` with the ETag and Content-Digest made from it.
        source: ``original`` (the slide's stored JPEG tile, not decoded or re-encoded) or
            ``rendered`` (read, scaled where needed, and encoded by this server).
        identity: the slide's identity (:func:`app.core.slides.slide_identity`).
    """

    data: bytes
    plan: TilePlan
    cache: str
    digest: TileDigest
    source: str
    identity: str

    @property
    def etag(self) -> str:
        """Strong ETag, quoted: the first 32 hex digits of the bytes' SHA-256."""
        return self.digest.etag

    @property
    def lossless(self) -> bool:
        """``X-Tile-Lossless``: the tile decodes to exactly the slide's pixels."""
        return self.plan.lossless


class TileService:
    """Tiles of every configured slide.

    Args:
        registry: the slide catalogue and open-slide LRU.
        planner: decides every tile's encoding, key and source.
        disk: the disk cache (:func:`app.cache.disk.open_disk_cache`).
        settings: ``Server.MemoryCacheBytes``.
        render_limiter: bounds the other blocking work of tiles in worker threads (original
            tiles' reads that would wait for the disk); its total is also the number of render
            threads, which load tiles (cache read, render, encode, cache write).
        io_limiter: bounds concurrent cache statistics and deletions (worker threads).

    Call :meth:`close` when done (it waits for the render threads).
    """

    def __init__(self, registry: SlideRegistry, planner: TilePlanner, disk: DiskTileCache,
                 settings: Settings, render_limiter: CapacityLimiter,
                 io_limiter: CapacityLimiter):
        self.registry = registry
        self.planner = planner
        self.disk = disk
        self.geometry = geometry_fingerprint(settings.DeepZoom.model_dump_json())
        """The fingerprint of the ``DeepZoom`` settings every variant is rendered under."""
        self.memory = MemoryTileCache(settings.Server.MemoryCacheBytes)
        self.render_limiter = render_limiter
        self.io_limiter = io_limiter
        self._flight: SingleFlight[tuple[bytes, TileDigest, str]] = SingleFlight()
        self._swept: set[str] = set()
        self._tasks: set[asyncio.Task[int]] = set()
        self.corrupt_tiles = 0
        """Disk-cache files this process found corrupt (never served; rendered again)."""
        # Tile loads hop to these threads with run_in_executor rather than anyio.to_thread,
        # whose limiter and worker bookkeeping cost three times as much per hop
        # (docs/benchmarks.md, "Where the time goes").
        self._render_threads = ThreadPoolExecutor(
            max_workers=int(render_limiter.total_tokens), thread_name_prefix="render")

    async def close(self) -> None:
        """Let the tile loads in flight finish (their cache writes included), then stop the
        render threads."""
        await anyio.to_thread.run_sync(self._render_threads.shutdown, limiter=self.io_limiter)

    async def get_tile(self, name: str, level: int, col: int, row: int,
                       request: TileRequest | None = None,
                       associated: str | None = None) -> Tile:
        """The encoded tile at a DZI address of a slide, or of one of its associated images.

        Args:
            name: slide name (catalogue key).
            level, col, row: DZI level (0 = 1x1 px) and tile address in that level.
            request: what the request asked for (extension, ``?format=``, ``Accept``).
            associated: an associated image's name (``label``, ``macro``, ...), or None for
                the slide itself.

        Raises:
            SlideNotFound, TileNotFound, BadTileRequest: 404/400 cases, before any pixel read.
            AssociatedImageNotFound: no such associated image, or ``Privacy`` withholds it.
            SlideOpenError, SlideReadError: OpenSlide failed (its message is kept).
        """
        try:
            handle = await self.registry.get(name)
        except SlideGone:
            self._sweep(name)
            raise
        if self._swept:
            self._swept.discard(name)  # back again: a later disappearance sweeps again
        source = (handle.source if associated is None
                  else await self.registry.associated(handle, associated))
        plan = self.planner.plan(handle, source, level, col, row, request)
        cached = self.memory.get(plan.key)
        if cached is not None:
            return Tile(cached[0], plan, "hit", cached[1][0], cached[1][1], handle.identity)
        if plan.original:
            data = await self._original(handle, source, plan)
            if data is not None:
                digest = digest_of(data)
                self.memory.put(plan.key, data, (digest, "original"))
                return Tile(data, plan, "miss", digest, "original", handle.identity)
            # a damaged stored tile: render it, and let OpenSlide report what it finds
        data, digest, status = await self._flight.run(
            plan.key, lambda: self._load(handle, source, plan))
        return Tile(data, plan, status, digest, "rendered", handle.identity)

    def _sweep(self, name: str) -> None:
        """Forget the tiles of a slide whose file is gone: this process's memory cache now,
        the disk cache in a worker thread (once per disappearance)."""
        if name in self._swept:
            return
        self._swept.add(name)
        self.memory.discard(name)
        log.info("slide %s is gone; deleting its cached tiles", name)
        task = asyncio.ensure_future(self.clear(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _original(self, handle: OpenSlide, source: ImageSource,
                        plan: TilePlan) -> bytes | None:
        """The slide's stored JPEG bytes of an ``original`` tile: no decode, no encode.

        The read is tried on the event loop first with ``RWF_NOWAIT``, which answers only
        from the page cache and never waits for the disk; when it would wait, one worker
        thread reads. Original tiles join the memory LRU but not the disk cache, where they
        would only copy the slide (docs/benchmarks.md, "Precompressed tiles").
        """
        try:
            try:
                return original_tile(source, plan, nowait=True)
            except BlockingIOError:
                return await anyio.to_thread.run_sync(
                    original_tile, source, plan, limiter=self.render_limiter)
        except OSError as exc:
            self.registry.discard(handle.name, handle)
            raise SlideReadError(f"cannot read {handle.file_label}: {exc.strerror}",
                                 slide=handle.name) from None

    async def _load(self, handle: OpenSlide, source: ImageSource,
                    plan: TilePlan) -> tuple[bytes, TileDigest, str]:
        """Disk cache, else render + encode + store, in ONE worker-thread hop; the result
        joins the memory LRU.

        Returns:
            ``(bytes, digest, hit|miss)``.
        """
        loop = asyncio.get_running_loop()
        try:
            data, digest, status, corrupt = await loop.run_in_executor(
                self._render_threads, self._load_blocking, handle, source, plan)
        except SlideReadError:
            self.registry.discard(handle.name, handle)
            raise
        self.corrupt_tiles += corrupt
        self.memory.put(plan.key, data, (digest, "rendered"))
        return data, digest, status

    def _load_blocking(self, handle: OpenSlide, source: ImageSource,
                       plan: TilePlan) -> tuple[bytes, TileDigest, str, bool]:
        """Disk cache, else render, encode and store (worker thread).

        Returns:
            ``(bytes, digest, hit|miss, whether a corrupt cache file was replaced)``.
        """
        cached = self.disk.read(plan.key)
        if cached is not None and not cached.corrupt:
            return cached.data, digest_from_sha256(cached.sha256), "hit", False
        data = render_tile(handle, source, plan)
        sha256 = hashlib.sha256(data).digest()
        self.disk.write(plan.key, data, sha256,
                        VariantOrigin(handle.identity, plan.encoding.key, self.geometry))
        return data, digest_from_sha256(sha256), "miss", cached is not None

    async def clear(self, name: str | None = None, stale_only: bool = False) -> int:
        """Delete cached tiles of one slide or all (disk and this process's memory).

        Args:
            stale_only: delete only stale variants (:meth:`usage`), keep the current ones.

        Returns:
            How many tile files were deleted.
        """
        if stale_only:
            usage = await self.usage(name)
            stale = [(slide, variant) for slide, u in usage.items() for variant in u.stale]
            return await anyio.to_thread.run_sync(self.disk.clear_variants, stale,
                                                  limiter=self.io_limiter)
        self.memory.discard(name)
        return await anyio.to_thread.run_sync(self.disk.clear, name, limiter=self.io_limiter)

    async def usage(self, name: str | None = None) -> dict[str, SlideCacheUse]:
        """What the disk cache holds, per slide, from the cache index's totals (no walk).

        A variant is current when it was rendered from the slide file as it is now (its
        identity), under the ``DeepZoom`` settings in force, with an encoding the format
        policy still uses; every other variant of a slide is stale. Slides the catalogue does
        not know (other servers' slides on a shared cache) are reported under their name
        with every variant stale.

        Args:
            name: one slide, or None for every slide in the index.
        """
        index = self.disk.index
        if index is None:
            return {}
        levels = await anyio.to_thread.run_sync(index.levels, name, limiter=self.io_limiter)
        encodings = self.planner.policy.encoding_keys()
        out = {}
        for slide, counts in levels.items():
            identity = await self._identity(slide)
            use = SlideCacheUse()
            for count in counts:
                origin = count.origin
                current = (origin is not None and identity is not None
                           and origin.identity == identity and origin.geometry == self.geometry
                           and origin.encoding in encodings)
                use.add(count, current)
            out[slide] = use
        return out

    async def _identity(self, name: str) -> str | None:
        """The slide's current identity, or None when it is unknown, gone or unopenable."""
        if name not in self.registry.catalogue:
            return None
        try:
            return (await self.registry.get(name)).identity
        except TileServerError:
            return None

    async def coverage(self, handle: OpenSlide, use: SlideCacheUse) -> int:
        """How many tiles of the slide's pyramid need no rendering: tiles of the policy's own
        encoding of each level in the disk cache, and tiles sent as the slide's stored
        bytes (``original``)."""
        source, planner = handle.source, self.planner
        pyramid = source.pyramid
        covered = 0
        for level in range(pyramid.level_count):
            encoding = planner.policy.level_encoding(level, pyramid.level_count)
            if planner.sends_originals(encoding, source):
                covered += pyramid.original_count(level)
            variant = planner.key(handle, source, level, 0, 0, encoding).variant
            covered += use.level_tiles.get((variant, level), 0)
        return covered

    def corrupt_count(self) -> int:
        """Corrupt cache files found by every process sharing the cache (blocking)."""
        index = self.disk.index
        return index.counter("corrupt") if index is not None else self.corrupt_tiles


@dataclass
class SlideCacheUse:
    """One slide's tiles in the disk cache: current and stale variants, in files and bytes
    (tile bytes plus each file's seal).

    Attributes:
        level_tiles: ``{(variant, level): tiles}`` of the current variants.
        stale: the stale variants' names.
    """

    tiles: int = 0
    bytes: int = 0
    stale_tiles: int = 0
    stale_bytes: int = 0
    level_tiles: dict[tuple[str, int], int] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)

    def add(self, count: LevelCount, current: bool) -> None:
        """Count one ``(variant, level)`` total."""
        if current:
            self.tiles += count.tiles
            self.bytes += count.bytes
            self.level_tiles[(count.variant, count.level)] = count.tiles
        else:
            self.stale_tiles += count.tiles
            self.stale_bytes += count.bytes
            self.stale.add(count.variant)


def default_render_threads() -> int:
    """Two render threads per CPU core: decoding and encoding release the GIL, and while one
    thread writes the cache another renders (docs/benchmarks.md: more cold tiles per second
    than one thread per core)."""
    return 2 * (os.cpu_count() or 1)
