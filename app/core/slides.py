"""SlideRegistry: the name -> file catalogue and a bounded LRU of open slides.

Names come only from the configuration (``Image.Path`` as ``image``, ``Images``, the files of
``SlideDirectory`` under their stem); a request's name is looked up in that catalogue and never
joined to a path, so ``..``, ``%2e%2e`` or absolute paths cannot reach any other file.

Open slides are shared by threads (OpenSlide handles are thread-safe) and share one
``OpenSlideCache`` of decoded slide tiles. A slide is opened once under concurrent requests
(per-name lock), re-stat'ed at most every ``Server.RevalidateSeconds`` so that a replaced file is
reopened with its new identity, and dropped after any read error (OpenSlide errors latch: the
handle is dead after one).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import openslide
from anyio import CapacityLimiter

from app.core.colour import ColorTransform
from app.core.digest import file_sha256
from app.core.errors import (
    AssociatedImageNotFound,
    SlideGone,
    SlideNotFound,
    SlideOpenError,
    SlideReadError,
    describe_error,
)
from app.core.names import name_problem
from app.core.native import DecodedTileCache, NativeReader
from app.core.privacy import Privacy
from app.core.pyramid import ImageSource, SlidePyramid, open_associated, pyramid_geometry
from app.settings import Settings

log = logging.getLogger(__name__)

SINGLE_SLIDE_NAME = "image"
SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".svslide", ".bif",
    ".dcm", ".czi",
})


@dataclass(frozen=True, slots=True)
class SlideEntry:
    """A configured slide: its URL name and its file."""

    name: str
    path: Path


@dataclass(eq=False)
class OpenSlide:
    """An open slide with its DZI pyramid and identity.

    Attributes:
        entry: the configured name and file.
        slide: OpenSlide's handle (thread-safe; dead after its first error).
        source: the slide's pyramid and colour transform (what its tiles are cut from).
        identity: what the cache key, ETags' variants and audit lines name the file by; it
            changes whenever the file can have changed (:func:`slide_identity`).
        signature: ``(size, mtime_ns, inode)`` of the file when opened.
        file_label: how error details name the file (its name, or words without it under
            ``Privacy.SlideNames: hash``: :meth:`app.core.privacy.Privacy.file_label`).
        checked_at: ``time.monotonic()`` of the last stat that found the file unchanged.
        variants: cache variants memoised by the planner, ``(Encoding, scope, overlap) ->
            hex``.
        associated: associated images' sources, opened on first use.
        iiif_plans: IIIF request plans memoised by the tile service,
            ``(associated or None, URL segments) -> RegionPlan``.
        tile_plans: DZI tile plans memoised by the tile service,
            ``(ImageSource, level, col, row, TileRequest or None) -> TilePlan``.
    """

    entry: SlideEntry
    slide: openslide.AbstractSlide
    source: ImageSource
    identity: str
    signature: tuple[int, int, int]
    file_label: str
    checked_at: float = field(default_factory=time.monotonic)
    variants: dict[tuple[Any, ...], str] = field(default_factory=dict)
    associated: dict[str, ImageSource] = field(default_factory=dict)
    iiif_plans: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    tile_plans: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    @property
    def pyramid(self) -> SlidePyramid:
        """The slide's DZI pyramid."""
        return self.source.pyramid

    @property
    def quickhash(self) -> str | None:
        """``openslide.quickhash-1`` of the slide (a hash of part of the file), or None."""
        return self.slide.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)

    @property
    def color(self) -> ColorTransform:
        """The slide's colour transform under ``DeepZoom.ColorMode``."""
        return self.source.color

    @property
    def name(self) -> str:
        """The slide's URL name."""
        return self.entry.name

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's properties of the slide."""
        return dict(self.slide.properties)

    def mpp(self) -> tuple[float, float] | None:
        """Microns per pixel at slide level 0, ``(x, y)``, or None when the slide lacks it."""
        props = self.slide.properties
        try:
            return (float(props[openslide.PROPERTY_NAME_MPP_X]),
                    float(props[openslide.PROPERTY_NAME_MPP_Y]))
        except (KeyError, ValueError):
            return None


def _signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def slide_identity(quickhash: str | None, size: int, mtime_ns: int) -> str:
    """The identity of a slide file: ``quickhash-1:<hex>;size=<bytes>;mtime_ns=<ns>``, or
    ``size=<bytes>;mtime_ns=<ns>`` for formats without a quickhash.

    OpenSlide's quickhash covers only part of a file (its header and the lowest-resolution
    level), so a slide whose full-resolution tiles were rewritten keeps it; the file's size and
    modification time in nanoseconds change with any rewrite, so together they make a new
    identity, and with it new cache keys, whenever the pixels can have changed.
    """
    stat_part = f"size={size};mtime_ns={mtime_ns}"
    return f"quickhash-1:{quickhash};{stat_part}" if quickhash else stat_part


def build_catalogue(settings: Settings) -> dict[str, SlideEntry]:
    """Every configured slide by name. Blocking (lists ``SlideDirectory``).

    ``Image.Path`` is served as ``image`` (the single-slide routes); ``Images`` keep their names
    (validated with the settings); ``SlideDirectory`` adds its slide files under
    :func:`file_slide_name` unless the name is taken (a second copy of one slide, under
    ``SlideNames: hash``: skipped with a warning). A file of ``SlideDirectory`` is skipped, with a
    warning, when its stem is not a valid slide name (:mod:`app.core.names`), or it is a
    symbolic link to a file outside ``SlideDirectory`` and ``SlideDirectoryFollowSymlinks`` is
    false, or (``SlideNames: hash``) it cannot be read.
    """
    entries: dict[str, SlideEntry] = {}
    if settings.Image.Path:
        entries[SINGLE_SLIDE_NAME] = SlideEntry(SINGLE_SLIDE_NAME, Path(settings.Image.Path))
    for item in settings.Images:
        entries[item.Name] = SlideEntry(item.Name, Path(item.Path))
    if settings.SlideDirectory:
        for path in _directory_slides(Path(settings.SlideDirectory),
                                      settings.SlideDirectoryFollowSymlinks):
            try:
                name = file_slide_name(path, settings.Privacy.SlideNames)
            except OSError as exc:
                log.warning("SlideDirectory: skipping %r: %s", path.name, exc.strerror)
                continue
            known = entries.setdefault(name, SlideEntry(name, path))
            if known.path != path:
                log.warning("SlideDirectory: skipping %r: its name %r is %s's", path.name, name,
                            known.path.name)
            elif name != path.stem:
                log.info("slide %s: %s", name, path.name)  # the server log maps hash names
    return entries


def file_slide_name(path: Path, slide_names: str) -> str:
    """The name of a slide file that no setting names (``SlideDirectory``, a file given to
    ``tileserver pregenerate``): its stem, or with ``Privacy.SlideNames: hash`` its
    :func:`opaque_slide_name`. Blocking for ``hash``.

    Raises:
        OSError: ``hash``, and the file cannot be read.
    """
    return opaque_slide_name(path) if slide_names == "hash" else path.stem


def opaque_slide_name(path: Path) -> str:
    """A slide file's name under ``Privacy.SlideNames: hash``: the first 24 hex digits of a
    SHA-256 over its fingerprint, which carries nothing of the file's name and is the same for
    every copy of the file, wherever it lies and whatever its timestamps.

    The fingerprint is ``openslide.quickhash-1`` (a SHA-256 OpenSlide computes over the file's
    header and lowest-resolution level, so opening the file is enough) when OpenSlide opens the
    file and has one; otherwise the SHA-256 of the whole file (the images openslide-python
    opens with Pillow, which have no quickhash and are read whole anyway, and files nothing can
    open, which stay listed with their error). The name is not the quickhash itself, so a
    withheld quickhash stays withheld. Blocking.

    Raises:
        OSError: the file cannot be read.
    """
    try:
        with openslide.open_slide(path) as slide:
            quickhash = slide.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
    except Exception:  # any format, any damage: the file's bytes are its fingerprint then
        quickhash = None
    fingerprint = f"quickhash-1:{quickhash}" if quickhash else f"sha256:{file_sha256(path)}"
    return hashlib.sha256(b"tileserver slide name\0" + fingerprint.encode()).hexdigest()[:24]


def _directory_slides(folder: Path, follow_symlinks: bool) -> list[Path]:
    root = folder.resolve()
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        problem = name_problem(path.stem)
        if problem is not None:
            log.warning("SlideDirectory: skipping %r: %s is not a valid slide name (%s)",
                        path.name, repr(path.stem), problem)
            continue
        if path.is_symlink() and not follow_symlinks and not path.resolve().is_relative_to(root):
            log.warning("SlideDirectory: skipping %r: a symbolic link to a file outside the "
                        "folder (SlideDirectoryFollowSymlinks is false)", path.name)
            continue
        if path.is_file():
            out.append(path)
    return out


class SlideRegistry:
    """Configured slides by name, and an LRU of the open ones.

    Args:
        catalogue: name -> entry, from :func:`build_catalogue`.
        settings: for the DZI geometry, the ``Server`` bounds and ``Privacy``.
        limiter: the thread limiter for opening slides and associated images.
    """

    def __init__(self, catalogue: dict[str, SlideEntry], settings: Settings,
                 limiter: CapacityLimiter | None = None):
        self.catalogue = catalogue
        self.settings = settings
        self.privacy = Privacy(settings.Privacy)
        self._open: OrderedDict[str, OpenSlide] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._limiter = limiter
        server = settings.Server
        self._cache = (openslide.OpenSlideCache(server.OpenSlideCacheBytes)
                       if server.OpenSlideCacheBytes else None)
        self._decoded = DecodedTileCache(server.OpenSlideCacheBytes)
        self.on_replaced: Callable[[str], None] | None = None
        """Called on the event loop with a slide's name when :meth:`get` found its file
        replaced (the tile service tells every process to drop its tiles)."""

    @property
    def names(self) -> list[str]:
        """Slide names in catalogue order."""
        return list(self.catalogue)

    def entry(self, name: str) -> SlideEntry:
        """The configured slide of that name.

        Raises:
            SlideNotFound: no slide has that name.
        """
        entry = self.catalogue.get(name)
        if entry is None:
            raise SlideNotFound.named(name)
        return entry

    def cached(self, name: str) -> OpenSlide | None:
        """The open slide if it is open and was validated recently; no I/O (hot path)."""
        handle = self._open.get(name)
        if handle is not None and (time.monotonic() - handle.checked_at
                                   < self.settings.Server.RevalidateSeconds):
            return handle
        return None

    def peek(self, name: str) -> OpenSlide | None:
        """The open slide of that name if any, without revalidating it; no I/O."""
        return self._open.get(name)

    async def get(self, name: str) -> OpenSlide:
        """The open slide, opening or revalidating it in a worker thread when needed.

        Raises:
            SlideNotFound: unknown name.
            SlideGone: the slide's file no longer exists (a 404 too).
            SlideOpenError: OpenSlide cannot open the file (its message is the detail).
        """
        handle = self.cached(name)
        if handle is not None:
            self._open.move_to_end(name)
            return handle
        entry = self.entry(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            handle = self.cached(name)
            if handle is not None:
                return handle
            previous = self._open.get(name)
            try:
                handle = await anyio.to_thread.run_sync(self._open_or_revalidate, entry,
                                                        previous, limiter=self._limiter)
            except SlideGone:
                self._open.pop(name, None)
                raise
            if previous is not None and handle is not previous and self.on_replaced:
                self.on_replaced(name)
            self._open[name] = handle
            self._open.move_to_end(name)
            while len(self._open) > self.settings.Server.MaxOpenSlides:
                self._open.popitem(last=False)  # closed by OpenSlide when unreferenced
            return handle

    async def associated(self, handle: OpenSlide, name: str) -> ImageSource:
        """An associated image of an open slide as a DZI source, opened once per handle (in a
        worker thread).

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
            except Exception as exc:
                log.warning("slide %s (%s): the %s image cannot be read: %s", handle.name,
                            handle.entry.path, name, exc)
                raise SlideReadError(f"OpenSlide cannot read the {name} image of "
                                     f"{handle.file_label}: "
                                     f"{describe_error(exc, handle.entry.path, handle.file_label)}",
                                     slide=handle.name) from None

        source = await anyio.to_thread.run_sync(load, limiter=self._limiter)
        return handle.associated.setdefault(name, source)

    def open_blocking(self, name: str) -> OpenSlide:
        """The open slide, opened or revalidated in the calling thread.

        For processes without an event loop (pregeneration workers, the CLI); do not mix
        with :meth:`get` on one registry.

        Raises:
            SlideNotFound: unknown name.
            SlideOpenError: OpenSlide cannot open the file (its message is the detail).
        """
        handle = self._open_or_revalidate(self.entry(name), self._open.get(name))
        self._open[name] = handle
        self._open.move_to_end(name)
        while len(self._open) > self.settings.Server.MaxOpenSlides:
            self._open.popitem(last=False)
        return handle

    def expire(self, name: str | None = None) -> None:
        """Make the next :meth:`get` of a slide (None: of every slide) re-stat its file, as
        if ``Server.RevalidateSeconds`` had passed; no I/O."""
        for key, handle in self._open.items():
            if name is None or key == name:
                handle.checked_at = float("-inf")

    def discard(self, name: str, handle: OpenSlide | None = None) -> None:
        """Drop an open slide (after a read error, the handle is dead); reopened on next use."""
        if handle is None or self._open.get(name) is handle:
            self._open.pop(name, None)

    def _open_or_revalidate(self, entry: SlideEntry, handle: OpenSlide | None) -> OpenSlide:
        try:
            signature = _signature(entry.path)
        except FileNotFoundError:
            raise SlideGone(f"no slide named {entry.name!r}: its file is gone",
                            slide=entry.name) from None
        except OSError as exc:
            label = self.privacy.file_label(entry.name, entry.path)
            raise SlideOpenError(f"cannot open {label}: {exc.strerror}",
                                 slide=entry.name) from None
        if handle is not None and handle.signature == signature:
            handle.checked_at = time.monotonic()
            return handle
        if handle is not None:
            log.info("slide %s changed on disk; reopening", entry.name)
        return self._open_blocking(entry, signature)

    def _open_blocking(self, entry: SlideEntry, signature: tuple[int, int, int]) -> OpenSlide:
        label = self.privacy.file_label(entry.name, entry.path)
        try:
            slide = openslide.open_slide(entry.path)
            native = (NativeReader.open(slide, entry.path, self._decoded)
                      if self.settings.Server.NativeReader else None)
            deepzoom = self.settings.DeepZoom
            geometry = pyramid_geometry(slide, deepzoom.TileSize, deepzoom.Overlap,
                                        deepzoom.LimitBounds, deepzoom.Geometry)
            pyramid = SlidePyramid(slide, *geometry, native)
            color = ColorTransform.for_slide(slide, deepzoom.ColorMode)  # LittleCMS: OSError
        except Exception as exc:  # OpenSlide, Pillow (bombs included), tifffile, LittleCMS, OS
            log.warning("slide %s (%s) cannot be opened: %s: %s", entry.name, entry.path,
                        type(exc).__name__, exc)
            raise SlideOpenError(f"OpenSlide cannot open {label}: "
                                 f"{describe_error(exc, entry.path, label)}",
                                 slide=entry.name) from None
        if self._cache is not None:
            slide.set_cache(self._cache)
        identity = slide_identity(slide.properties.get(openslide.PROPERTY_NAME_QUICKHASH1),
                                  signature[0], signature[1])
        return OpenSlide(entry, slide, ImageSource(pyramid, color), identity, signature, label)
