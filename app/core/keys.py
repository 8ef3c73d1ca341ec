"""Cache keys: which encoded tile a request, a pregeneration worker or an export names.

A :class:`TileKey` is pure data: the slide name, a variant hash of everything that changes a
tile's bytes (:func:`variant_of`), and the DZI address. The planner (:mod:`app.core.planner`)
makes keys; the caches (:mod:`app.cache.disk`) store under them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def variant_of(slide_identity: str, tile_size: int, overlap: int, limit_bounds: bool,
               encoding_key: str, color_key: str = "", scope: str = "") -> str:
    """The cache variant: 16 hex digits of SHA-256 over what changes a tile's bytes.

    Args:
        slide_identity: ``openslide.quickhash-1``, else the file's size and mtime.
        tile_size: DZI tile size in pixels; overlap: DZI overlap in pixels.
        limit_bounds: whether the pyramid covers only the slide's bounds.
        encoding_key: :attr:`app.core.formats.Encoding.key` (format, lossless, quality, level).
        color_key: :attr:`app.core.colour.ColorTransform.key` (colour mode, transform, profile).
        scope: which image of the slide: empty for the slide, ``associated:<name>`` for an
            associated image. Only its hash reaches the disk, so cache paths name no
            associated image.
    """
    text = (f"v1|{slide_identity}|{tile_size}|{overlap}|{int(limit_bounds)}|{encoding_key}"
            f"|{color_key}|{scope}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class TileKey:
    """Address of one encoded tile: slide name, variant, DZI level, col, row, extension."""

    slide: str
    variant: str
    level: int
    col: int
    row: int
    ext: str

    def relative_path(self) -> str:
        """``{slide}/{variant}/{level}/{col}_{row}.{ext}``, relative to the cache root."""
        return f"{self.slide}/{self.variant}/{self.level}/{self.col}_{self.row}.{self.ext}"
