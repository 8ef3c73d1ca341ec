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
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio import CapacityLimiter

from app.cache.disk import DiskTileCache
from app.cache.eviction import Evictor
from app.cache.flight import Client, ClientGone, SingleFlight
from app.cache.index import LevelCount, VariantOrigin, geometry_fingerprint
from app.cache.memory import MemoryTileCache
from app.coordination import POLL_SECONDS, Coordination
from app.core.digest import TileDigest, digest_from_sha256, digest_of
from app.core.errors import Overloaded, SlideGone, SlideReadError, TileServerError
from app.core.iiif import Limits, parse_image_request
from app.core.planner import RegionPlan, TilePlan, TilePlanner, TileRequest
from app.core.pyramid import ImageSource
from app.core.render import original_tile, render_region, render_tile
from app.core.slides import OpenSlide, SlideRegistry
from app.settings import Settings

log = logging.getLogger(__name__)

IIIF_PLAN_MEMO = 8192
"""IIIF request plans kept per open slide (then forgotten at once and made again)."""
TILE_PLAN_MEMO = 4096
"""DZI tile plans kept per open slide (then forgotten at once and made again): a viewer's
screenful and its neighbours, a few hundred bytes each."""
ACCESS_REPORT_SECONDS = 60.0
"""A tile served from the memory cache reports an access to the disk cache's index at most
this often (per process): its file then counts as recently used for eviction."""
MEMO_ACCEPT_CHARS = 512
"""Plans of requests whose ``Accept`` is longer are not kept (browsers send under 200
characters), so that the memo stays a few megabytes whatever clients send."""
QUEUED_PER_CORE = 8
"""``Server.MaxQueuedRenders`` 0: this many tile loads per CPU core, per process (a few
milliseconds of rendering each, so an accepted tile waits well under a second; 16 on 2 cores,
what 4 per render thread gave when each process had 4)."""
RETRY_AFTER_MAX_SECONDS = 30
"""The longest ``Retry-After`` of a refused request (:class:`RetryPacer`)."""
CACHE_READ_THREADS = 2
"""Threads that read the disk cache for tiles asked for while the render queue is full
(:meth:`TileService._shed`) whose file is not known to be in memory. Such a read is made only
while one of them is free: queued behind others it would wait for the GIL at every step (up to
5 ms each, :func:`sys.getswitchinterval`) and turn a refusal into a wait."""


class TileEvents:
    """What the tile service tells an observer (the server's metrics); these do nothing.
    Methods may be called from render threads."""

    def rendered(self, seconds: float) -> None:
        """A tile was rendered and encoded in ``seconds``."""

    def shed(self) -> None:
        """A request found the render queue full and was refused."""

    def abandoned(self) -> None:
        """A tile load was dropped before its render because every client had gone."""

    def unwanted(self) -> None:
        """A render ended after every client that asked for it had gone (it began while
        one was there)."""

    def corrupt(self) -> None:
        """A corrupt disk-cache file was found (it is rendered again and replaced)."""



class _Remembered:
    """What the memory cache keeps beside a tile's bytes: its digest, its ``X-Tile-Source``,
    and when this process last reported an access to the disk cache's index (``time.monotonic``
    seconds; a tile served from memory is read from disk by nobody, so without the report the
    index's least-recently-used eviction would take the tiles most in use)."""

    __slots__ = ("digest", "source", "reported")

    def __init__(self, digest: TileDigest, source: str):
        self.digest = digest
        self.source = source
        self.reported = time.monotonic()


@dataclass(frozen=True, slots=True)
class Tile:
    """An encoded tile and the facts its response headers state.

    Attributes:
        data: the complete image file bytes.
        plan: how it was planned (encoding, colour transform, Vary, refused override): a
            DZI tile's :class:`TilePlan`, or an IIIF request's :class:`RegionPlan`.
        cache: ``hit`` (memory or disk) or ``miss`` (rendered or read for this request).
        digest: SHA-256 of ``data`` with the ETag and Content-Digest made from it.
        source: ``original`` (the slide's stored JPEG tile, not decoded or re-encoded) or
            ``rendered`` (read, scaled where needed, and encoded by this server).
        identity: the slide's identity (:func:`app.core.slides.slide_identity`).
    """

    data: bytes
    plan: TilePlan | RegionPlan
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
        settings: ``Server.MemoryCacheBytes``, the ``Iiif`` limits.
        render_limiter: bounds the other blocking work of tiles in worker threads (original
            tiles' reads that would wait for the disk); its total is also the number of render
            threads, which load tiles (cache read, render, encode, cache write).
        io_limiter: bounds concurrent cache statistics and deletions (worker threads).
        store: the coordination store whose invalidations this process follows (:meth:`start`)
            and tells (:meth:`invalidate`); None: this process alone.
        events: an observer of renders, refusals and corrupt files (the server's metrics).
        cache_limit: the disk cache's limit in bytes (:func:`app.cache.eviction.cache_limit`;
            0: no limit).

    Call :meth:`start` on the event loop (invalidations, eviction) and :meth:`close` when done
    (it waits for the render threads).
    """

    def __init__(self, registry: SlideRegistry, planner: TilePlanner, disk: DiskTileCache,
                 settings: Settings, render_limiter: CapacityLimiter,
                 io_limiter: CapacityLimiter, store: Coordination | None = None,
                 events: TileEvents | None = None, cache_limit: int = 0):
        self.registry = registry
        self.planner = planner
        self.disk = disk
        self.geometry = geometry_fingerprint(settings.DeepZoom.model_dump_json())
        """The fingerprint of the ``DeepZoom`` settings every variant is rendered under."""
        self.memory = MemoryTileCache(settings.Server.MemoryCacheBytes)
        iiif = settings.Iiif
        self.iiif_limits = Limits(iiif.MaxWidth, iiif.MaxHeight, iiif.MaxArea)
        """The IIIF Image API's size limits (``Iiif`` settings)."""
        self.render_limiter = render_limiter
        self.io_limiter = io_limiter
        self._flight: SingleFlight[tuple[bytes, TileDigest, str]] = SingleFlight()
        self._swept: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.corrupt_tiles = 0
        self._regions = 0  # IIIF region renders in flight (they share the render queue)
        """Disk-cache files this process found corrupt (never served; rendered again)."""
        # Tile loads hop to these threads with run_in_executor rather than anyio.to_thread,
        # whose limiter and worker bookkeeping cost three times as much per hop
        # (docs/benchmarks.md, "Where the time goes").
        self.render_threads = int(render_limiter.total_tokens)
        """Threads that load tiles: renders, and disk-cache reads that may wait for the disk."""
        self._render_threads = ThreadPoolExecutor(
            max_workers=self.render_threads, thread_name_prefix="render",
            initializer=lower_thread_priority, initargs=(settings.Server.RenderNice,))
        self._cache_reads = ThreadPoolExecutor(max_workers=CACHE_READ_THREADS,
                                               thread_name_prefix="cache-read")
        self._cache_reads_busy = 0
        self.max_queued = (settings.Server.MaxQueuedRenders
                           or QUEUED_PER_CORE * (os.cpu_count() or 1))
        """Tile loads (disk read or render, running ones included) queued at most."""
        self.store = store
        self.pacer = RetryPacer()
        """The ``Retry-After`` of refused requests."""
        self.events = events or TileEvents()
        self.generation = 0
        """The last invalidation generation of the coordination store applied here."""
        self.followed_at: float | None = None
        """``time.monotonic()`` of the last successful read of the store (readiness)."""
        self._follower: asyncio.Task[None] | None = None
        self.evictor = (Evictor(self, settings, cache_limit)
                        if disk.enabled and disk.index is not None else None)
        """Keeps the disk cache under ``cache_limit`` bytes (:mod:`app.cache.eviction`)."""

    @property
    def queued(self) -> int:
        """Tile loads and IIIF region renders in flight in this process (waiting for a
        render thread or running)."""
        return self._flight.in_flight + self._regions

    @property
    def overloaded(self) -> bool:
        """The render queue is full: a tile in no cache is refused (503)."""
        return self.queued >= self.max_queued

    async def start(self) -> None:
        """Follow the coordination store's invalidations (every :data:`POLL_SECONDS`), from
        its current generation on. Call from the event loop (the app's lifespan)."""
        if self.evictor is not None:
            self.evictor.start()
        if self.store is None:
            return
        try:
            self.generation = (await self.store.invalidations(1 << 62))[0]
            self.followed_at = time.monotonic()
        except Exception as exc:
            log.warning("coordination store %s: %s", self.store.where, exc)
        self._follower = asyncio.ensure_future(self._follow())
        self.registry.on_replaced = self._replaced

    async def _follow(self) -> None:
        """Apply invalidations recorded by any process: drop those slides from this process's
        memory cache and revalidate their files on next use."""
        assert self.store is not None
        failing = False
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                generation, slides = await self.store.invalidations(self.generation)
            except Exception as exc:
                if not failing:
                    log.warning("coordination store %s unreachable: %s", self.store.where, exc)
                failing = True
                continue
            failing = False
            self.followed_at = time.monotonic()
            for slide in dict.fromkeys(slides):
                self.memory.discard(slide)
                self.registry.expire(slide)
            self.generation = max(self.generation, generation)

    async def invalidate(self, name: str | None) -> None:
        """Drop a slide's tiles (None: every tile) from this process's memory cache now and
        from every other process's within a second (through the coordination store)."""
        self.memory.discard(name)
        if self.store is None:
            return
        try:
            await self.store.invalidate(name)
        except Exception as exc:
            log.warning("coordination store %s: cannot tell the other processes to drop %s "
                        "(%s)", self.store.where, name or "every slide", exc)

    def _replaced(self, name: str) -> None:
        """The registry found a slide's file replaced: every process forgets its tiles."""
        task = asyncio.ensure_future(self.invalidate(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop following the store; let the tile loads in flight finish (their cache writes
        included), then stop the render threads."""
        if self._follower is not None:
            self._follower.cancel()
        if self.evictor is not None:
            self.evictor.stop()
        await anyio.to_thread.run_sync(self._render_threads.shutdown, limiter=self.io_limiter)
        await anyio.to_thread.run_sync(self._cache_reads.shutdown, limiter=self.io_limiter)

    async def get_tile(self, name: str, level: int, col: int, row: int,
                       request: TileRequest | None = None,
                       associated: str | None = None, client: Client | None = None) -> Tile:
        """The encoded tile at a DZI address of a slide, or of one of its associated images.

        Args:
            name: slide name (catalogue key).
            level, col, row: DZI level (0 = 1x1 px) and tile address in that level.
            request: what the request asked for (extension, ``?format=``, ``Accept``).
            associated: an associated image's name (``label``, ``macro``, ...), or None for
                the slide itself.
            client: the requesting client; when it goes while the tile waits for a render
                thread, the wait ends (:class:`ClientGone`) and nothing is rendered for it.

        Raises:
            Overloaded: the tile is in no cache and :attr:`max_queued` loads are in flight.
            ClientGone: ``client`` went before the tile was there.
            SlideNotFound, TileNotFound, BadTileRequest: 404/400 cases, before any pixel read.
            AssociatedImageNotFound: no such associated image, or ``Privacy`` withholds it.
            SlideOpenError, SlideReadError: OpenSlide failed (its message is kept).
        """
        handle = await self._open(name)
        source = (handle.source if associated is None
                  else await self.registry.associated(handle, associated))
        # a plan is a pure function of the open slide's image (its pyramid, colour, identity)
        # and of these; the image object is that open slide's own, so a replaced slide file
        # (a new handle) never meets its predecessor's plans
        memo = handle.tile_plans
        memo_key = (source, level, col, row, request)
        plan = memo.get(memo_key)
        if plan is None:
            plan = self.planner.plan(handle, source, level, col, row, request)
            if request is None or len(request.accept or "") <= MEMO_ACCEPT_CHARS:
                if len(memo) >= TILE_PLAN_MEMO:
                    memo.clear()
                memo[memo_key] = plan
        return await self._planned(handle, source, plan, client)

    async def get_region(self, name: str, segments: tuple[str, str, str, str],
                         associated: str | None = None, client: Client | None = None) -> Tile:
        """The encoded image of an IIIF Image API request of a slide or an associated image.

        Args:
            name: slide name (catalogue key).
            segments: the URL's ``region``, ``size``, ``rotation`` and ``quality.format``.
            associated: an associated image's name, or None for the slide itself.
            client: the requesting client (as for :meth:`get_tile`'s pyramid tiles).

        A request that is a tile of the pyramid is served as that tile (memory, disk cache,
        passthrough, one render); any other is rendered in a render thread and not cached.
        Plans are memoised per open slide (:data:`IIIF_PLAN_MEMO`), so a viewer's repeated
        requests cost what a DZI tile's do.
        ``Tile.plan`` is the :class:`~app.core.planner.RegionPlan`.

        Raises:
            SlideNotFound, AssociatedImageNotFound: 404, before any I/O of the image.
            BadTileRequest, FeatureNotImplemented: 400/501, before any pixel is read.
            Overloaded: the image is in no cache and the render queue is full (region
                renders count in :attr:`queued` like tile loads).
            ClientGone: ``client`` went before an aligned tile was there.
            SlideOpenError, SlideReadError: OpenSlide failed (its message is kept).
        """
        handle = await self._open(name)
        source = (handle.source if associated is None
                  else await self.registry.associated(handle, associated))
        memo = handle.iiif_plans
        plan = memo.get((associated, segments))
        if plan is None:
            width, height = source.pyramid.level_dimensions[-1]
            request = parse_image_request(*segments, width, height, self.iiif_limits)
            plan = self.planner.plan_region(handle, source, request)
            if len(memo) >= IIIF_PLAN_MEMO:
                memo.clear()
            memo[(associated, segments)] = plan
        if plan.tile is not None:
            tile = await self._planned(handle, source.without_overlap(), plan.tile, client)
            return Tile(tile.data, plan, tile.cache, tile.digest, tile.source, tile.identity)
        if self.overloaded:
            self.events.shed()
            raise Overloaded(f"{self.queued} images are being rendered; try again",
                             slide=handle.name, retry_after=self.pacer.refused())
        loop = asyncio.get_running_loop()
        self._regions += 1
        try:
            data = await loop.run_in_executor(self._render_threads, self._region_blocking,
                                              handle, source, plan, client)
        except SlideReadError:
            self.registry.discard(handle.name, handle)
            raise
        finally:
            self._regions -= 1
        self.pacer.rendered()
        return Tile(data, plan, "miss", digest_of(data), "rendered", handle.identity)

    def _region_blocking(self, handle: OpenSlide, source: ImageSource, plan: RegionPlan,
                         client: Client | None) -> bytes:
        """An IIIF region's image (render thread), unless its client has gone meanwhile."""
        if client is not None and client.gone():
            self.events.abandoned()
            raise ClientGone()
        return render_region(handle, source, plan)

    async def _open(self, name: str) -> OpenSlide:
        """The open slide; a slide whose file is gone has its cached tiles swept."""
        try:
            handle = await self.registry.get(name)
        except SlideGone:
            self._sweep(name)
            raise
        if self._swept:
            self._swept.discard(name)  # back again: a later disappearance sweeps again
        return handle

    async def _planned(self, handle: OpenSlide, source: ImageSource, plan: TilePlan,
                       client: Client | None) -> Tile:
        """A planned tile: memory LRU, the slide's stored tile, else the disk cache or one
        render (single-flight; ``client`` going ends its wait)."""
        cached = self.memory.get(plan.key)
        if cached is not None:
            stored, facts = cached
            if facts.source == "rendered":
                now = time.monotonic()
                if now - facts.reported >= ACCESS_REPORT_SECONDS:
                    facts.reported = now
                    index = self.disk.index
                    if index is not None:  # the file's last access, for LRU eviction
                        index.touched(plan.key)
            return Tile(stored, plan, "hit", facts.digest, facts.source, handle.identity)
        if plan.original:
            data = await self._original(handle, source, plan)
            if data is not None:
                digest = digest_of(data)
                self.memory.put(plan.key, data, _Remembered(digest, "original"))
                return Tile(data, plan, "miss", digest, "original", handle.identity)
            # a damaged stored tile: render it, and let OpenSlide report what it finds
        if plan.key not in self._flight and self.overloaded:
            return await self._shed(handle, plan)
        data, digest, status = await self._flight.run(
            plan.key, lambda: self._load(handle, source, plan), client)
        return Tile(data, plan, status, digest, "rendered", handle.identity)

    async def _shed(self, handle: OpenSlide, plan: TilePlan) -> Tile:
        """The render queue is full: the tile from the disk cache, else :class:`Overloaded`
        at once.

        The cache file is read on the event loop when its path and bytes are in memory
        (:meth:`DiskTileCache.read_nowait`: a few system calls, no thread), which is where a
        tile served in the last minutes is; else by one of :data:`CACHE_READ_THREADS`
        threads of its own (not a render thread) if one is free. A tile looked up once is
        known absent from then on (the kernel keeps the negative lookup; tmpfs does not), so a
        client asking again is refused on the loop.
        """
        try:
            cached = self.disk.read_nowait(plan.key)
        except BlockingIOError:
            cached = None
            if self._cache_reads_busy < CACHE_READ_THREADS:
                self._cache_reads_busy += 1
                try:
                    cached = await asyncio.get_running_loop().run_in_executor(
                        self._cache_reads, self.disk.read, plan.key)
                finally:
                    self._cache_reads_busy -= 1
        if cached is not None and not cached.corrupt:
            digest = digest_from_sha256(cached.sha256)
            self.memory.put(plan.key, cached.data, _Remembered(digest, "rendered"))
            return Tile(cached.data, plan, "hit", digest, "rendered", handle.identity)
        self.events.shed()
        raise Overloaded(f"{self.queued} tiles are being rendered; try again",
                         slide=handle.name, retry_after=self.pacer.refused())

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
        queued = self._render_threads.submit(self._load_blocking, handle, source, plan)
        try:
            data, digest, status, corrupt = await asyncio.wrap_future(queued)
        except SlideReadError:
            self.registry.discard(handle.name, handle)
            raise
        except asyncio.CancelledError:
            if queued.cancelled():  # every client went while it waited for a thread
                self.events.abandoned()
            raise
        self.corrupt_tiles += corrupt
        if status == "miss":
            self.pacer.rendered()
        self.memory.put(plan.key, data, _Remembered(digest, "rendered"))
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
        if cached is not None:
            self.events.corrupt()
        if not self._flight.wanted(plan.key):  # every client went while this waited
            self.events.abandoned()
            raise ClientGone()
        started = time.perf_counter()
        data = render_tile(handle, source, plan)
        self.events.rendered(time.perf_counter() - started)
        if not self._flight.wanted(plan.key):
            self.events.unwanted()
        sha256 = hashlib.sha256(data).digest()
        self.disk.write(plan.key, data, sha256,
                        VariantOrigin(handle.identity, plan.encoding.key, self.geometry))
        return data, digest_from_sha256(sha256), "miss", cached is not None

    async def clear(self, name: str | None = None, stale_only: bool = False) -> int:
        """Delete cached tiles of one slide or all: the disk cache, and the memory cache of
        every process (this one at once, the others within a second).

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
        removed = await anyio.to_thread.run_sync(self.disk.clear, name,
                                                 limiter=self.io_limiter)
        await self.invalidate(name)  # after the files: no process reloads a deleted tile
        return removed

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


class RetryPacer:
    """The ``Retry-After`` of refused requests: refused clients are spread over the seconds
    this process's renders need to serve them, so that clients that honour it come back at
    about the rate tiles are rendered, instead of all together one second later (where each
    wave of returns is refused again, at the price of a full request each).

    Refusals and renders are counted per whole second of ``clock``. A refusal gets a whole
    number of seconds drawn uniformly from ``1..n``, where ``n`` is the refusals of the last
    whole second divided by its renders (rounded up; at least 1, at most
    :data:`RETRY_AFTER_MAX_SECONDS`): one second while refusals are few. The jitter is the
    usual cure for synchronised retries (AWS Architecture Blog, "Exponential Backoff And
    Jitter", 2015). Event-loop only.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self._clock = clock
        self._rng = rng or random.Random()
        self._second = 0
        self._refused = self._rendered = 0
        self._last = (0, 0)

    def _roll(self) -> None:
        second = int(self._clock())
        if second != self._second:
            self._last = ((self._refused, self._rendered) if second == self._second + 1
                          else (0, 0))
            self._second, self._refused, self._rendered = second, 0, 0

    def rendered(self) -> None:
        """A tile or region was rendered."""
        self._roll()
        self._rendered += 1

    def refused(self) -> int:
        """A request is refused: its ``Retry-After`` in seconds."""
        self._roll()
        self._refused += 1
        refused, rendered = self._last
        spread = min(RETRY_AFTER_MAX_SECONDS, max(1, -(-refused // max(rendered, 1))))
        return self._rng.randint(1, spread)


def lower_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux, where niceness is per thread;
    elsewhere nothing): a thread pool's ``initializer``.

    Render threads run below the event loop so that the loop, which answers cache hits and
    refusals in microseconds, gets a core at once when both want one (under a flood of cold
    tiles on 2 cores, the loop otherwise shares them with every render thread; docs/
    benchmarks.md, "Overload").
    """
    if not nice or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread,
                       min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as exc:  # pragma: no cover - a sandbox that forbids it
        log.warning("cannot lower the render threads' priority: %s", exc)
