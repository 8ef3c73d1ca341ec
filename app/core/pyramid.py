"""DZI pyramid geometry and tile rendering, with openslide-python's ``DeepZoomGenerator`` semantics.

The geometry and the pixels ARE openslide-python's: :class:`SlidePyramid` wraps a
``DeepZoomGenerator`` and renders with its ``get_tile``, so a lossless tile decodes to exactly the
pixels ``DeepZoomGenerator.get_tile`` returns and the DZI XML equals its ``get_dzi``.

Coordinate systems (openslide-python's prefixes): ``level`` here is always a DZI level, 0 being
1x1 px and ``level_count - 1`` full resolution; ``slide_level`` is an OpenSlide level, 0 being
full resolution. ``col``/``row`` address tiles within a DZI level.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import openslide
from openslide import AbstractSlide, ImageSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from app.core.colour import ColorMode, ColorTransform
from app.core.errors import TileNotFound
from app.core.native import NativeReader


class SlidePyramid:
    """The DZI pyramid of one open slide.

    Args:
        slide: an open OpenSlide (or ImageSlide) object; shared by threads.
        tile_size: tile edge in DZI pixels, overlap excluded.
        overlap: pixels added to each interior tile edge.
        limit_bounds: cover only the slide's ``openslide.bounds-*`` region.

    Attributes:
        level_count: number of DZI levels.
        level_tiles: ``(cols, rows)`` per DZI level.
        level_dimensions: ``(width, height)`` in pixels per DZI level.
        slide_levels: the OpenSlide level each DZI level is read from.
    """

    def __init__(self, slide: AbstractSlide, tile_size: int, overlap: int, limit_bounds: bool,
                 native: NativeReader | None = None):
        self.native = native
        self.tile_size = tile_size
        self.overlap = overlap
        self.limit_bounds = limit_bounds
        self._dz = DeepZoomGenerator(slide, tile_size, overlap, limit_bounds)
        # OpenSlide handles are thread-safe; an ImageSlide is one PIL image, whose lazy load
        # and crop are not (concurrent reads of a PNG slide failed inside Pillow)
        self._read_lock = threading.Lock() if isinstance(slide, ImageSlide) else None
        self.level_count: int = self._dz.level_count
        self.level_tiles: tuple[tuple[int, int], ...] = self._dz.level_tiles
        self.level_dimensions: tuple[tuple[int, int], ...] = self._dz.level_dimensions
        self.tile_count: int = self._dz.tile_count
        self.slide_levels: tuple[int, ...] = tuple(
            self._dz.get_tile_coordinates(level, (0, 0))[1] for level in range(self.level_count)
        )
        # Per DZI level, the read_region arguments and the DZI size of each column's and each
        # row's tiles: every one of them depends on the column alone (x) or the row alone (y),
        # so (level, col, row) is two lookups, not DeepZoomGenerator's ~20 µs of Python per
        # call on every cold tile.
        self._cols: list[tuple[tuple[int, int, int], ...]] = []
        self._rows: list[tuple[tuple[int, int, int], ...]] = []
        for level in range(self.level_count):
            cols, rows = self.level_tiles[level]
            self._cols.append(tuple(self._axis(level, (col, 0), 0) for col in range(cols)))
            self._rows.append(tuple(self._axis(level, (0, row), 1) for row in range(rows)))
        # Per DZI level, the stored tile column of each DZI column and the stored tile row of
        # each DZI row that is exactly one stored tile (None elsewhere); a tile is original
        # where both are (x depends on col only, y on row only), and its stored index is
        # row * stored columns + col: no geometry on the tile path.
        self._original_cols: list[tuple[int | None, ...]] = []
        self._original_rows: list[tuple[int | None, ...]] = []
        self._stored_cols: list[int] = []
        for level in range(self.level_count):
            cols, rows = self.level_tiles[level]
            stride = (self.native.stored_cols(self.slide_levels[level])
                      if self.native is not None else 0) or 1
            col_index = [self._original_index(level, col, 0) for col in range(cols)]
            row_index = [self._original_index(level, 0, row) for row in range(rows)]
            self._original_cols.append(tuple(None if i is None else i % stride
                                             for i in col_index))
            self._original_rows.append(tuple(None if i is None else i // stride
                                             for i in row_index))
            self._stored_cols.append(stride)
        self.original_levels: frozenset[int] = frozenset(
            level for level in range(self.level_count) if self.original_count(level))

    def _axis(self, level: int, address: tuple[int, int], axis: int) -> tuple[int, int, int]:
        """``(level-0 position, slide-level size, DZI size)`` along one axis (0: x, 1: y) of
        the tile at ``address``, from ``DeepZoomGenerator`` itself."""
        l0_location, _, l_size = self._dz.get_tile_coordinates(level, address)
        return (l0_location[axis], l_size[axis],
                self._dz.get_tile_dimensions(level, address)[axis])

    def tile_coordinates(self, level: int, col: int, row: int
                         ) -> tuple[tuple[tuple[int, int], int, tuple[int, int]], tuple[int, int]]:
        """``((l0_location, slide_level, l_size), z_size)`` of a DZI tile: the arguments of
        the ``read_region`` that renders it and its size in pixels of the DZI level, equal to
        ``DeepZoomGenerator.get_tile_coordinates`` and ``get_tile_dimensions`` (precomputed
        per column and row). The address must be valid (:meth:`check_address`)."""
        x, y = self._cols[level][col], self._rows[level][row]
        return ((x[0], y[0]), self.slide_levels[level], (x[1], y[1])), (x[2], y[2])

    def _original_index(self, level: int, col: int, row: int) -> int | None:
        """The stored tile that is DZI tile (level, col, row), unscaled, or None."""
        if self.native is None or self.overlap:
            return None
        (l0_location, slide_level, l_size), z_size = self.tile_coordinates(level, col, row)
        if l_size != z_size:
            return None  # scaled: the slide level is not this DZI level
        return self.native.original_index(l0_location, slide_level, l_size)

    def original_at(self, level: int, col: int, row: int) -> bool:
        """Whether DZI tile (level, col, row) is exactly one stored JPEG tile of the slide:
        the DZI level is a slide level (no scaling), the tile grids coincide, and the stored
        tile is interior (not padded). O(1); the address must be valid."""
        return (self._original_cols[level][col] is not None
                and self._original_rows[level][row] is not None)

    def original_count(self, level: int) -> int:
        """How many tiles of a DZI level are stored tiles (see :meth:`original_at`)."""
        return (sum(c is not None for c in self._original_cols[level])
                * sum(r is not None for r in self._original_rows[level]))

    def original(self, level: int, col: int, row: int, nowait: bool = False) -> bytes | None:
        """The slide's stored JPEG bytes for DZI tile (level, col, row), made a complete JPEG
        (:func:`app.core.native.complete_jpeg`); None where :meth:`original_at` is false or the
        stored data is not a whole JPEG stream. One read: blocking, or with ``nowait`` only
        from the page cache (see :meth:`app.core.native.NativeReader.original`).

        Raises:
            BlockingIOError: ``nowait`` and the read would wait for the disk.
            OSError: the file cannot be read.
        """
        stored_col, stored_row = self._original_cols[level][col], self._original_rows[level][row]
        if stored_col is None or stored_row is None or self.native is None:
            return None  # (stored tiles are only known through a native reader)
        index = stored_row * self._stored_cols[level] + stored_col
        return self.native.original(self.slide_levels[level], index, nowait)

    def check_address(self, level: int, col: int, row: int) -> None:
        """Raise :class:`TileNotFound` unless (level, col, row) is a tile of this pyramid."""
        if not 0 <= level < self.level_count:
            raise TileNotFound(f"level {level} is outside 0..{self.level_count - 1}")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(
                f"tile {col}_{row} is outside level {level}, which has {cols}x{rows} tiles"
            )

    def render(self, level: int, col: int, row: int) -> Image.Image | np.ndarray:
        """The RGB tile at a DZI address, as ``DeepZoomGenerator.get_tile`` renders it.

        Blocking (slide read + Pillow): call it from a worker thread. Regions the
        :class:`~app.core.native.NativeReader` can read exactly come from it; the rest, and every
        other slide, from OpenSlide through ``DeepZoomGenerator.get_tile`` itself. Either way
        the pixels are ``get_tile``'s: the native region is OpenSlide's opaque region, its
        composite onto the background is the identity, and the same Lanczos ``thumbnail``
        scales it.

        Returns:
            An RGB image of ``tile_size`` plus overlap on interior edges, smaller at the
            right and bottom borders: a PIL image, or the ``(height, width, 3)`` uint8 array
            itself where the native reader read it unscaled (saves two copies).

        Raises:
            openslide.OpenSlideError: the slide cannot be read.
        """
        if self.native is not None:
            (l0_location, slide_level, l_size), z_size = self.tile_coordinates(level, col, row)
            region = self.native.read(l0_location, slide_level, l_size)
            if region is not None:
                if (region.shape[1], region.shape[0]) == z_size:
                    return region
                tile = Image.fromarray(region)
                tile.thumbnail(z_size, Image.Resampling.LANCZOS)
                return tile
        if self._read_lock is not None:
            with self._read_lock:
                return self._dz.get_tile(level, (col, row))
        return self._dz.get_tile(level, (col, row))

    def dzi(self, tile_format: str) -> str:
        """The DZI XML, byte for byte ``DeepZoomGenerator.get_dzi(tile_format)``."""
        return self._dz.get_dzi(tile_format)


def pyramid_geometry(slide: AbstractSlide, tile_size: int, overlap: int, limit_bounds: bool,
                     geometry: str) -> tuple[int, int, bool]:
    """The ``(tile_size, overlap, limit_bounds)`` a slide's DZI uses under ``DeepZoom.Geometry``.

    ``configured`` returns the settings as they are. ``aligned`` makes the DZI tile grid the
    slide's stored tile grid, so that where a DZI level is a slide level each DZI tile is one
    stored tile: ``tile_size`` = the stored tile size of slide level 0 (OpenSlide's
    ``openslide.level[0].tile-width``/``-height``, when square; else the configured size),
    overlap 0, and ``limit_bounds`` kept only when the bounds origin
    (``openslide.bounds-x``/``-y``, level-0 pixels) falls on the tile grid, since otherwise
    every DZI tile would straddle four stored tiles.

    Args:
        slide: the open slide.
        tile_size, overlap, limit_bounds: ``DeepZoom.TileSize``, ``Overlap``, ``LimitBounds``.
        geometry: ``DeepZoom.Geometry``: ``configured`` or ``aligned``.
    """
    if geometry != "aligned":
        return tile_size, overlap, limit_bounds
    props = slide.properties
    width, height = props.get("openslide.level[0].tile-width"), props.get(
        "openslide.level[0].tile-height")
    if width and width == height and int(width) > 0:
        tile_size = int(width)
    x = int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0)
    y = int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0)
    return tile_size, 0, limit_bounds and x % tile_size == 0 and y % tile_size == 0


@dataclass(frozen=True, eq=False)
class ImageSource:
    """What tiles are cut from: a pyramid, its colour transform, and its cache scope.

    A slide has one (its own pyramid, ``scope`` empty); each associated image served as a
    DZI has another (``scope`` ``associated:<name>``, which enters the cache variant).
    """

    pyramid: SlidePyramid
    color: ColorTransform
    scope: str = ""


def open_associated(slide: AbstractSlide, name: str, tile_size: int, overlap: int,
                    limit_bounds: bool, color_mode: ColorMode | str) -> ImageSource:
    """An associated image (label, macro, thumbnail) as a DZI source. Blocking.

    The image is read once and served through openslide-python's ``ImageSlide``, so its tiles
    are ``DeepZoomGenerator(ImageSlide(image)).get_tile``'s, as in openslide-python's
    deepzoom servers; its own ICC profile (OpenSlide reads one per associated image) drives
    the colour mode.

    Raises:
        KeyError: the slide has no associated image ``name``.
        openslide.OpenSlideError: it cannot be read.
    """
    image_slide = ImageSlide(slide.associated_images[name])
    pyramid = SlidePyramid(image_slide, tile_size, overlap, limit_bounds)
    color = ColorTransform.for_slide(image_slide, color_mode)
    return ImageSource(pyramid, color, f"associated:{name}")


def single_tile_level(width: int, height: int, tile_size: int) -> int:
    """The highest DZI level of a ``width`` x ``height`` image that fits in one tile.

    DZI levels halve (rounding up) from full size down to 1x1 px, as ``DeepZoomGenerator``
    computes them; level 0 is 1x1.
    """
    dims = [(width, height)]
    while dims[-1] != (1, 1):
        w, h = dims[-1]
        dims.append((max(1, (w + 1) // 2), max(1, (h + 1) // 2)))
    dims.reverse()
    return max(i for i, (w, h) in enumerate(dims) if w <= tile_size and h <= tile_size)
