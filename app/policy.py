"""The per-level format policy of a slide, as ``GET /api/slides/{name}/policy`` returns it.

One record per DZI level (0 = 1x1 px): its size in pixels, its tiles, the format and losslessness
the policy serves it in (no request override), and the OpenSlide level it is read from. The
viewer's legend and the README's table show these records. Each record is a small pydantic model
so that further facts (a colour transform, say) can be added as fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.deepzoom import ImageSource
from app.formats import TileFormat
from app.slides import OpenSlide
from app.tiles import TileService


class LevelPolicy(BaseModel):
    """The policy of one DZI level.

    Coordinates: ``level`` is a DZI level (0 = 1x1 px, ``level_count - 1`` full resolution);
    ``slide_level`` is the OpenSlide level (0 = full resolution) its pixels are read from,
    ``slide_downsample`` that level's downsample factor against slide level 0.
    """

    level: int = Field(description="DZI level, 0 = 1x1 px")
    width: int = Field(description="level width, pixels")
    height: int = Field(description="level height, pixels")
    cols: int = Field(description="tile columns")
    rows: int = Field(description="tile rows")
    tiles: int = Field(description="cols x rows")
    format: str = Field(description="format served without override: jpeg, png, webp, avif")
    lossless: bool = Field(description="tiles decode to exactly DeepZoomGenerator.get_tile: "
                           "a lossless format and a colour mode that converts nothing")
    quality: int | None = Field(description="lossy quality 1..100, null when lossless")
    color_transform: str = Field(description="X-Tile-Color-Transform: none or srgb-<intent>")
    slide_level: int = Field(description="OpenSlide level read (0 = full resolution)")
    slide_downsample: float = Field(description="that OpenSlide level's downsample")
    original_tiles: int = Field(description="tiles served as the slide's stored JPEG bytes "
                                "(X-Tile-Source: original) under this policy")


class SlidePolicy(BaseModel):
    """The format policy of a slide: settings that shape it and one record per DZI level."""

    name: str
    quickhash: str | None = Field(description="openslide.quickhash-1 of the slide")
    identity: str = Field(description="quickhash-1:<hex>, else stat:<size>:<mtime_ns>")
    tile_size: int = Field(description="DZI tile size of this slide (DeepZoom.Geometry)")
    overlap: int
    limit_bounds: bool
    geometry: str = Field(description="DeepZoom.Geometry: configured or aligned")
    color: dict[str, Any] = Field(description="colour mode, ICC profile, transform (app.colour)")
    declared_format: str = Field(description="the DZI's Format")
    lossless_format: str
    lossless_level_count: int
    enforce_lossless: bool
    allow_format_override: bool
    level_count: int
    tile_count: int
    levels: list[LevelPolicy]


def level_policies(tiles: TileService, handle: OpenSlide,
                   source: ImageSource | None = None) -> list[LevelPolicy]:
    """The policy record of every DZI level of an open slide (or of ``source``, one of its
    associated images), level 0 first. No I/O."""
    source = source or handle.source
    pyramid, color = source.pyramid, source.color
    downsamples = (handle.slide.level_downsamples if source is handle.source
                   else (1.0,))
    out = []
    for level, ((width, height), (cols, rows)) in enumerate(
            zip(pyramid.level_dimensions, pyramid.level_tiles, strict=True)):
        encoding = tiles.policy.level_encoding(level, pyramid.level_count)
        slide_level = pyramid.slide_levels[level]
        original = (pyramid.original_count(level) if tiles.passthrough and not color.converts
                    and encoding.format is TileFormat.JPEG else 0)
        out.append(LevelPolicy(
            level=level, width=width, height=height, cols=cols, rows=rows, tiles=cols * rows,
            format=encoding.format.value, lossless=encoding.lossless and not color.converts,
            quality=encoding.quality, color_transform=color.name, slide_level=slide_level,
            slide_downsample=downsamples[slide_level], original_tiles=original))
    return out


def slide_policy(tiles: TileService, handle: OpenSlide) -> SlidePolicy:
    """The ``/api/slides/{name}/policy`` document of an open slide. No I/O."""
    dz, fmt = tiles.settings.DeepZoom, tiles.settings.TileFormat
    pyramid = handle.pyramid
    return SlidePolicy(
        name=handle.name,
        quickhash=tiles.privacy.properties(handle.slide.properties).get(
            "openslide.quickhash-1"),
        identity=handle.identity, tile_size=pyramid.tile_size, overlap=pyramid.overlap,
        limit_bounds=pyramid.limit_bounds, geometry=dz.Geometry,
        color=handle.source.color.describe(), declared_format=tiles.policy.declared.value,
        lossless_format=fmt.LosslessFormat.value, lossless_level_count=fmt.LosslessLevelCount,
        enforce_lossless=fmt.EnforceLossless, allow_format_override=fmt.AllowFormatOverride,
        level_count=handle.pyramid.level_count, tile_count=handle.pyramid.tile_count,
        levels=level_policies(tiles, handle))
