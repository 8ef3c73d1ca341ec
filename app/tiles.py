"""TileService.get_tile(): the one pipeline that turns a DZI address into encoded bytes.

Order of work for one request: resolve the slide (404 before any I/O), check the address, let the
:class:`~app.formats.FormatPolicy` pick the encoding (pure), then memory LRU, disk cache, and on a
miss one render thread that renders with OpenSlide and encodes, shared by concurrent requests for
the same tile (single-flight). The result is written to the disk cache atomically
before it is returned; a tile that failed is never cached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio
import openslide
from anyio import CapacityLimiter

from app.cache import DiskTileCache, MemoryTileCache, SingleFlight, TileKey, variant_of
from app.colour import NO_TRANSFORM
from app.deepzoom import ImageSource, open_associated
from app.errors import AssociatedImageNotFound, SlideReadError
from app.formats import Encoding, FormatDecision, FormatPolicy, TileFormat
from app.icc import jpeg_with_profile
from app.privacy import Privacy
from app.settings import Settings
from app.slides import OpenSlide, SlideRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TileDigest:
    """What one SHA-256 of a tile's bytes gives; computed once per tile (when it is rendered,
    read from disk or from the slide) and kept beside the bytes in the memory cache.

    Attributes:
        sha256: 64 hex digits (the audit log's ``sha256``; ``sha256sum`` prints the same).
        etag: strong ETag, quoted: the first 32 of those hex digits.
        content_digest: the RFC 9530 field value ``sha-256=:<base64 of the 32 bytes>:``.
    """

    sha256: str
    etag: str
    content_digest: str


def digest_of(data: bytes) -> TileDigest:
    """SHA-256 of tile bytes as hex, ETag and RFC 9530 ``Content-Digest`` value."""
    digest = hashlib.sha256(data).digest()
    hexdigest = digest.hex()
    return TileDigest(hexdigest, '"' + hexdigest[:32] + '"',
                      "sha-256=:" + base64.b64encode(digest).decode("ascii") + ":")


EMPTY_DIGEST = digest_of(b"")
"""The digest of empty content: RFC 9530's ``Content-Digest`` of a HEAD response (its Appendix
B.2), whose message has no content."""


@dataclass(frozen=True, slots=True)
class Tile:
    """An encoded tile and the facts its response headers state.

    Attributes:
        data: the complete image file bytes.
        encoding: what the bytes are (format, lossless, quality).
        cache: ``hit`` (memory or disk) or ``miss`` (rendered or read for this request).
        digest: SHA-256 of ``data`` with the ETag and Content-Digest made from it.
        vary_accept: the choice depended on ``Accept``.
        color_transform: ``X-Tile-Color-Transform``: ``none`` (pixels are the slide's) or
            ``srgb-<intent>`` (converted by the colour mode, see :mod:`app.colour`).
        source: ``original`` (the slide's stored JPEG tile, not decoded or re-encoded) or
            ``rendered`` (read, scaled where needed, and encoded by this server).
        identity: the slide's identity (``quickhash-1:<hex>``, else ``stat:<size>:<mtime>``).
        override_refused: ``EnforceLossless`` refused a lossy override on a lossless level.
    """

    data: bytes
    encoding: Encoding
    cache: str
    digest: TileDigest
    vary_accept: bool
    color_transform: str = NO_TRANSFORM
    source: str = "rendered"
    identity: str = ""
    override_refused: bool = False

    @property
    def etag(self) -> str:
        """Strong ETag, quoted: the first 32 hex digits of the bytes' SHA-256."""
        return self.digest.etag

    @property
    def lossless(self) -> bool:
        """``X-Tile-Lossless``: the tile decodes to exactly the slide's pixels."""
        return self.encoding.lossless and self.color_transform == NO_TRANSFORM


class TileService:
    """Tiles of every configured slide.

    Args:
        registry: the slide catalogue and open-slide LRU.
        settings: the loaded settings (``DeepZoom``, ``TileFormat``, caches).
        render_limiter: bounds the other blocking work of tiles in worker threads (original
            tiles' reads that would wait for the disk, associated images' opening); its total
            is also the number of render threads, which load tiles (cache read, render,
            encode, cache write).
        io_limiter: bounds concurrent cache statistics and deletions (worker threads).

    Call :meth:`close` when done (it waits for the render threads).
    """

    def __init__(self, registry: SlideRegistry, settings: Settings,
                 render_limiter: CapacityLimiter, io_limiter: CapacityLimiter):
        self.registry = registry
        self.settings = settings
        self.policy = FormatPolicy(settings.TileFormat)
        self.disk = DiskTileCache(settings.TileCachePath, settings.EnableDiskCache)
        self.memory = MemoryTileCache(settings.Server.MemoryCacheBytes)
        self.privacy = Privacy(settings.Privacy)
        self.render_limiter = render_limiter
        self.passthrough = settings.TileFormat.Passthrough
        self.io_limiter = io_limiter
        self._flight = SingleFlight()
        # Tile loads hop to these threads with run_in_executor: 18 µs of CPU per hop under
        # 16 concurrent requests, against 60 µs through anyio.to_thread (its limiter and
        # worker bookkeeping), on a path that costs about 1 ms per cold tile.
        self._render_threads = ThreadPoolExecutor(
            max_workers=int(render_limiter.total_tokens), thread_name_prefix="render")

    async def close(self) -> None:
        """Let the tile loads in flight finish (their cache writes included), then stop the
        render threads."""
        await anyio.to_thread.run_sync(self._render_threads.shutdown, limiter=self.io_limiter)

    def key_for(self, handle: OpenSlide, level: int, col: int, row: int,
                encoding: Encoding, source: ImageSource | None = None) -> TileKey:
        """The cache key of a tile (:func:`tile_key`); ``source`` defaults to the slide."""
        return tile_key(handle, level, col, row, encoding, source)

    async def associated_source(self, handle: OpenSlide, name: str) -> ImageSource:
        """An associated image of an open slide as a DZI source, opened once per handle.

        Raises:
            AssociatedImageNotFound: the slide has no such image, or ``Privacy`` withholds it
                (the same answer, so a hidden label's existence is not revealed).
            SlideReadError: OpenSlide cannot read it.
        """
        source = handle.associated.get(name)
        if source is not None:
            return source
        if name not in self.privacy.associated_names(handle.slide.associated_images):
            raise AssociatedImageNotFound(
                f"slide {handle.name!r} has no associated image {name!r}", slide=handle.name)
        dz = self.settings.DeepZoom

        def load() -> ImageSource:
            try:
                return open_associated(handle.slide, name, dz.TileSize, dz.Overlap,
                                       dz.LimitBounds, dz.ColorMode)
            except (openslide.OpenSlideError, OSError) as exc:
                raise SlideReadError(f"OpenSlide cannot read the {name} image of "
                                     f"{handle.entry.path.name}: {exc}",
                                     slide=handle.name) from None

        source = await anyio.to_thread.run_sync(load, limiter=self.render_limiter)
        return handle.associated.setdefault(name, source)

    async def get_tile(self, name: str, level: int, col: int, row: int,
                       extension: str | None = None, query_format: str | None = None,
                       accept: str | None = None, associated: str | None = None) -> Tile:
        """The encoded tile at a DZI address of a slide, or of one of its associated images.

        Args:
            name: slide name (catalogue key).
            level, col, row: DZI level (0 = 1x1 px) and tile address in that level.
            extension, query_format, accept: what the request asked for (see FormatPolicy).
            associated: an associated image's name (``label``, ``macro``, ...), or None for
                the slide itself.

        Returns:
            The tile bytes and their facts.

        Raises:
            SlideNotFound, TileNotFound, BadTileRequest: 404/400 cases, before any pixel read.
            AssociatedImageNotFound: no such associated image, or ``Privacy`` withholds it.
            SlideOpenError, SlideReadError: OpenSlide failed (its message is kept).
        """
        handle = await self.registry.get(name)
        source = (handle.source if associated is None
                  else await self.associated_source(handle, associated))
        pyramid = source.pyramid
        pyramid.check_address(level, col, row)
        decision = self.policy.decide(level, pyramid.level_count, extension, query_format, accept)
        key = self.key_for(handle, level, col, row, decision.encoding, source)
        color = source.color.name
        if (self.passthrough and decision.encoding.format is TileFormat.JPEG
                and not source.color.converts and pyramid.original_at(level, col, row)):
            return await self._original(handle, source, key, decision)
        cached = self.memory.get(key)
        if cached is not None:
            data, digest, status = cached[0], cached[1], "hit"
        else:
            data, digest, status = await self._flight.run(
                key, lambda: self._load(handle, key, decision.encoding, source))
        return Tile(data, decision.encoding, status, digest, decision.vary_accept, color,
                    identity=handle.identity, override_refused=decision.override_refused)

    async def _original(self, handle: OpenSlide, source: ImageSource, key: TileKey,
                        decision: FormatDecision) -> Tile:
        """A tile that is one stored JPEG tile: the slide file's bytes, no decode, no encode.

        The read is tried on the event loop first with ``RWF_NOWAIT``, which answers only
        from the page cache and never waits for the disk; when it would wait, one worker
        thread reads. (``make bench``, aligned row: the thread hop cost a third of the
        throughput when every read hit the page cache.) Original tiles join the memory LRU but
        not the disk cache, where they would only copy the slide (``python -m
        bench.passthrough_read``: 7 µs CPU per tile from the slide, 20 µs from the cache, and
        430 µs to create the cache file). In ``embed`` colour mode the slide's profile is
        spliced in (APP2), the scan still untouched; converting modes never get here. Stored
        data that is not a whole JPEG stream falls back to rendering.
        """
        color = source.color
        facts = {"identity": handle.identity, "override_refused": decision.override_refused}
        cached = self.memory.get(key)
        if cached is not None:
            return Tile(cached[0], decision.encoding, "hit", cached[1], decision.vary_accept,
                        color.name, "original", **facts)
        args = (handle, key.level, key.col, key.row, decision.encoding, True, source)
        try:
            try:
                data = original_tile(*args, nowait=True)
            except BlockingIOError:
                data = await anyio.to_thread.run_sync(
                    original_tile, *args, limiter=self.render_limiter)
        except OSError as exc:
            self.registry.discard(handle.name, handle)
            raise SlideReadError(f"cannot read {handle.entry.path.name}: {exc.strerror}",
                                 slide=handle.name) from None
        if data is None:  # damaged stored tile: render it, and let OpenSlide report it
            data, digest, status = await self._flight.run(
                key, lambda: self._load(handle, key, decision.encoding, source, remember=False))
            return Tile(data, decision.encoding, status, digest, decision.vary_accept,
                        color.name, **facts)
        digest = digest_of(data)
        self.memory.put(key, data, digest)
        return Tile(data, decision.encoding, "miss", digest, decision.vary_accept, color.name,
                    "original", **facts)

    async def _load(self, handle: OpenSlide, key: TileKey, encoding: Encoding,
                    source: ImageSource,
                    remember: bool = True) -> tuple[bytes, TileDigest, str]:
        """Disk cache, else render + encode + store, in ONE worker-thread hop; the result
        joins the memory LRU when ``remember``.

        Returns:
            ``(bytes, digest, hit|miss)``.
        """
        loop = asyncio.get_running_loop()
        try:
            data, digest, status = await loop.run_in_executor(
                self._render_threads, self._load_blocking, handle, key, encoding, source)
        except SlideReadError:
            self.registry.discard(handle.name, handle)
            raise
        if remember:
            self.memory.put(key, data, digest)
        return data, digest, status

    def _load_blocking(self, handle: OpenSlide, key: TileKey, encoding: Encoding,
                       source: ImageSource) -> tuple[bytes, TileDigest, str]:
        data = self.disk.read(key)
        status = "hit"
        if data is None:
            data = self._render(handle, key, encoding, source)
            self.disk.write(key, data)
            status = "miss"
        return data, digest_of(data), status

    def _render(self, handle: OpenSlide, key: TileKey, encoding: Encoding,
                source: ImageSource) -> bytes:
        """Read, colour-convert (if the mode says so) and encode one tile (worker thread)."""
        return render_tile(handle, key.level, key.col, key.row, encoding, source)

    async def clear(self, name: str | None = None) -> None:
        """Delete cached tiles of one slide or all (disk and this process's memory)."""
        self.memory.discard(name)
        await anyio.to_thread.run_sync(self.disk.clear, name, limiter=self.io_limiter)

    async def stats(self, name: str | None = None) -> tuple[int, int]:
        """``(cached tile files, bytes)`` on disk for one slide or all."""
        return await anyio.to_thread.run_sync(self.disk.stats, name, limiter=self.io_limiter)


def tile_key(handle: OpenSlide, level: int, col: int, row: int, encoding: Encoding,
             source: ImageSource | None = None) -> TileKey:
    """The cache key of a tile at a DZI address (level, col, row) of an open slide.

    The variant hashes the slide identity, the pyramid's geometry (``DeepZoom.Geometry`` may
    make it per slide), the encoder options, the colour mode and which image (``source``: the
    slide by default, or one of its associated images). Pure apart from memoising the variant
    on ``handle``; used by :class:`TileService` and by pregeneration workers
    (:mod:`app.pregenerate`), so both write the same cache paths.
    """
    source = source or handle.source
    variant = handle.variants.get((encoding, source.scope))
    if variant is None:
        pyramid = source.pyramid
        variant = handle.variants[(encoding, source.scope)] = variant_of(
            handle.identity, pyramid.tile_size, pyramid.overlap, pyramid.limit_bounds,
            encoding.key, source.color.key, source.scope)
    return TileKey(handle.name, variant, level, col, row, encoding.format.value)


def render_tile(handle: OpenSlide, level: int, col: int, row: int, encoding: Encoding,
                source: ImageSource | None = None) -> bytes:
    """Read, colour-convert (if the mode says so) and encode the tile at a DZI address: the
    bytes every path serves or stores.

    Blocking (slide read + encode): call it from a worker thread or process. On-demand
    requests (:class:`TileService`) and pregeneration (:mod:`app.pregenerate`) both call it,
    so a tile's bytes do not depend on which path made it.

    Raises:
        SlideReadError: OpenSlide cannot read the slide (its message is kept).
    """
    source = source or handle.source
    try:
        image = source.pyramid.render(level, col, row)
    except openslide.OpenSlideError as exc:
        raise SlideReadError(f"OpenSlide cannot read {handle.entry.path.name}: {exc}",
                             slide=handle.name) from None
    color = source.color
    return encoding.encode(color.apply(image), color.embed_profile)


def original_tile(handle: OpenSlide, level: int, col: int, row: int, encoding: Encoding,
                  passthrough: bool, source: ImageSource | None = None,
                  nowait: bool = False) -> bytes | None:
    """The slide's stored JPEG bytes when they ARE the tile served at this address, else None.

    They are when ``TileFormat.Passthrough`` is on, the encoding is JPEG, the colour mode
    converts nothing, and the DZI tile is exactly one stored tile
    (:meth:`app.deepzoom.SlidePyramid.original`); in ``embed`` mode the slide's profile is
    spliced in as APP2 (the scan untouched). Used by :class:`TileService` and by export, so
    both send the same bytes. One read, blocking, or with ``nowait`` from the page cache only.

    Raises:
        BlockingIOError: ``nowait`` and the read would wait for the disk.
        OSError: the slide file cannot be read.
    """
    source = source or handle.source
    color = source.color
    if not passthrough or encoding.format is not TileFormat.JPEG or color.converts:
        return None
    data = source.pyramid.original(level, col, row, nowait)
    if data is not None and color.embed_profile:
        data = jpeg_with_profile(data, color.embed_profile)
    return data


def default_render_threads() -> int:
    """Two render threads per CPU core: decoding and encoding release the GIL, and while one
    thread writes the cache another renders (``make bench``: 1115 vs 898 cold JPEG tiles/s
    with 2 workers on 2 cores, against one thread per core)."""
    return 2 * (os.cpu_count() or 1)
