"""The tile planner: what one tile address is served as, decided once, without touching pixels.

:meth:`TilePlanner.plan` is the ONE place that decides, for a DZI tile address of a slide (or of
one of its associated images) and what a request asked for (URL extension, ``?format=``,
``Accept``):

- the encoding (format, lossless or not, quality), by the per-level :class:`FormatPolicy`;
- whether the tile is the slide's stored JPEG tile sent as is (``X-Tile-Source: original``):
  ``TileFormat.Passthrough`` is on, the encoding is JPEG, the colour mode converts nothing and
  the DZI tile is exactly one stored tile (:meth:`app.core.pyramid.SlidePyramid.original_at`);
- the cache key (:class:`app.core.keys.TileKey`), whether ``Accept`` took part (``Vary``) and
  whether ``EnforceLossless`` refused an override.

IIIF Image API requests are planned by :meth:`TilePlanner.plan_region` (a
:class:`RegionPlan`): the same format policy at the DZI level of the request's scale, and a
request that is a declared IIIF tile is planned by :meth:`TilePlanner.plan` as the DZI tile of
the pyramid without overlap, so that it shares the DZI tiles' caches and render path.

The server (:class:`app.cache.tiles.TileService`), pregeneration and export
(:mod:`app.batch`) and the ``/api/slides/{name}/policy`` document (:func:`slide_policy`) all
ask it; ``tileserver verify`` keeps an independent reference and never does. Pure: no I/O, no
pixels (the cache variant is memoised on the open slide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel, Field

from app.core.colour import NO_TRANSFORM
from app.core.formats import Encoding, FormatDecision, FormatPolicy, TileFormat
from app.core.iiif import IIIF_NAMES, ImageRequest
from app.core.keys import TileKey, variant_of
from app.core.privacy import Privacy
from app.core.pyramid import ImageSource, SlidePyramid
from app.core.slides import OpenSlide
from app.settings import Settings


class TileRequest(NamedTuple):
    """What a request asked of a tile's format (all optional). A named tuple: it is made and
    hashed on every tile request (a plan memo key, :data:`app.cache.tiles.TILE_PLAN_MEMO`),
    which a frozen dataclass does in Python code at several times the cost.

    Attributes:
        extension: the URL's extension without the dot (``jpeg``, ``png``, ...).
        query_format: the ``?format=`` value.
        accept: the ``Accept`` header.
    """

    extension: str | None = None
    query_format: str | None = None
    accept: str | None = None


@dataclass(frozen=True, slots=True)
class TilePlan:
    """How one tile is served.

    Attributes:
        key: the cache key (slide, variant, DZI level, col, row, extension).
        encoding: the encoding served.
        original: the bytes are the slide's stored JPEG tile, sent as is (no decode, no
            encode); otherwise the tile is rendered (or read from the caches).
        color_transform: ``X-Tile-Color-Transform``: ``none`` or ``srgb-<intent>``.
        vary_accept: ``Accept`` took part in the choice (``Vary: Accept``).
        override_refused: ``EnforceLossless`` refused a lossy override on a lossless level.
    """

    key: TileKey
    encoding: Encoding
    original: bool
    color_transform: str
    vary_accept: bool = False
    override_refused: bool = False

    @property
    def lossless(self) -> bool:
        """``X-Tile-Lossless``: the tile decodes to exactly the slide's pixels."""
        return self.encoding.lossless and self.color_transform == NO_TRANSFORM


@dataclass(frozen=True, slots=True)
class RegionPlan:
    """How one IIIF image request is served (:meth:`TilePlanner.plan_region`).

    Attributes:
        request: the parsed request (region, size, rotation, quality, format).
        encoding: the encoding served.
        color_transform: ``X-Tile-Color-Transform``: ``none`` or ``srgb-<intent>``.
        tile: the pyramid tile the request is exactly, planned by :meth:`TilePlanner.plan`
            (cached and rendered as DZI tiles are), or None: rendered as a region.
        slide_level: the OpenSlide level read (0 = full resolution).
        level: the DZI level whose format policy applied.
        override_refused: ``EnforceLossless`` served the lossless format instead of the lossy
            one the URL asked for.
    """

    request: ImageRequest
    encoding: Encoding
    color_transform: str
    tile: TilePlan | None
    slide_level: int
    level: int
    override_refused: bool = False
    vary_accept: bool = False

    @property
    def lossless(self) -> bool:
        """``X-Tile-Lossless``: the image decodes to exactly the rendered pixels, with the
        slide's colours (a lossless encoding, no colour conversion, quality default/color)."""
        return (self.encoding.lossless and self.color_transform == NO_TRANSFORM
                and self.request.quality in ("default", "color"))


def request_level(level_count: int, downsample: float) -> int:
    """The DZI level of an IIIF request's scale: the finest level whose downsample
    (``2**(level_count - 1 - level)``) is at most ``downsample``; the top level for a
    full-resolution or upscaled request."""
    k = 0
    while k < level_count - 1 and 2 ** (k + 1) <= downsample:
        k += 1
    return level_count - 1 - k


def tile_address(pyramid: SlidePyramid, request: ImageRequest) -> tuple[int, int, int] | None:
    """The ``(level, col, row)`` of the pyramid tile an IIIF request is exactly, or None.

    The pyramid has no overlap; its tile at DZI level ``L`` (scale factor
    ``s = 2**(level_count - 1 - L)``) and ``(col, row)`` is the region
    ``x = col * tile_size * s``, ``y = row * tile_size * s``, cut at the image's edges, at the
    level's size: what OpenSeadragon asks for the declared tiles, and ``full`` at the size of
    a level that fits one tile.
    """
    x, y, w, h = request.region
    out_w, out_h = request.size
    ratio = w / out_w
    if ratio < 0.75:
        return None
    k = round(math.log2(ratio))
    top = pyramid.level_count - 1
    if k > top:
        return None
    level, span, ts = top - k, pyramid.tile_size << k, pyramid.tile_size
    if x % span or y % span:
        return None
    col, row = x // span, y // span
    width, height = pyramid.level_dimensions[-1]
    level_width, level_height = pyramid.level_dimensions[level]
    if (w == min(span, width - x) and h == min(span, height - y)
            and out_w == min(ts, level_width - col * ts)
            and out_h == min(ts, level_height - row * ts)):
        return level, col, row
    return None


class TilePlanner:
    """Plans tiles under one configuration (see the module docstring).

    Args:
        settings: the loaded settings (``TileFormat`` decides formats and passthrough).
    """

    def __init__(self, settings: Settings):
        self.policy = FormatPolicy(settings.TileFormat)
        self.passthrough = settings.TileFormat.Passthrough

    @property
    def declared(self) -> TileFormat:
        """The format every DZI declares (``TileFormat.Default``)."""
        return self.policy.declared

    def plan(self, handle: OpenSlide, source: ImageSource, level: int, col: int, row: int,
             request: TileRequest | None = None) -> TilePlan:
        """Plan the tile at a DZI address of ``source`` (the slide's or an associated image's).

        Args:
            handle: the open slide (its identity enters the cache key).
            source: ``handle.source`` or one of its associated images' sources.
            level, col, row: DZI level (0 = 1x1 px) and tile address in that level.
            request: what the request asked for; None plans the policy's own encoding of the
                level (what pregeneration and export write).

        Raises:
            TileNotFound: the address is outside the pyramid.
            BadTileRequest: unknown extension or ``?format=`` value.
        """
        pyramid = source.pyramid
        pyramid.check_address(level, col, row)
        decision = self._decide(level, pyramid.level_count, request)
        encoding = decision.encoding
        original = (self.sends_originals(encoding, source)
                    and pyramid.original_at(level, col, row))
        return TilePlan(self.key(handle, source, level, col, row, encoding), encoding,
                        original, source.color.name, decision.vary_accept,
                        decision.override_refused)

    def _decide(self, level: int, level_count: int,
                request: TileRequest | None) -> FormatDecision:
        """The format policy's decision for a DZI level: the level's own encoding without a
        request, else :meth:`FormatPolicy.decide`."""
        if request is None:
            return FormatDecision(self.policy.level_encoding(level, level_count))
        return self.policy.decide(level, level_count, request.extension,
                                  request.query_format, request.accept)

    def plan_region(self, handle: OpenSlide, source: ImageSource,
                    request: ImageRequest) -> RegionPlan:
        """Plan an IIIF image request of ``source`` (the slide's or an associated image's).

        The format policy applies at the DZI level of the request's scale (the finest level
        whose downsample is at most the request's: a full-resolution or upscaled request is
        at the top level), and the URL's format is an explicit request, like ``?format=``:
        ``EnforceLossless`` upgrades a lossy format on a lossless level, and without
        ``AllowFormatOverride`` the level's own format is served.

        A request that is exactly a tile of the pyramid without overlap
        (:meth:`ImageSource.without_overlap`; :func:`tile_address`) is planned as that tile by
        :meth:`plan`, so it shares the DZI tiles' caches, passthrough and render path (the
        DZI tiles themselves where the overlap is 0). Any other request is rendered from the
        nearest slide level that is not coarser than it (:func:`app.core.render.render_region`).
        """
        pyramid = source.pyramid
        level = request_level(pyramid.level_count, request.downsample)
        tile_request = TileRequest(query_format=request.extension)
        if request.plain:
            tiles = source.without_overlap()
            address = tile_address(tiles.pyramid, request)
            if address is not None:
                tile = self.plan(handle, tiles, *address, tile_request)
                return RegionPlan(request, tile.encoding, tile.color_transform, tile,
                                  tiles.pyramid.slide_levels[address[0]], address[0],
                                  tile.override_refused)
        decision = self._decide(level, pyramid.level_count, tile_request)
        slide_level = pyramid.slide.get_best_level_for_downsample(max(request.downsample, 1.0))
        return RegionPlan(request, decision.encoding, source.color.name, None, slide_level,
                          level, decision.override_refused)

    def sends_originals(self, encoding: Encoding, source: ImageSource) -> bool:
        """Whether tiles of ``encoding`` from ``source`` are sent as the slide's stored JPEG
        bytes wherever a DZI tile is exactly one stored tile: passthrough is on, the encoding
        is JPEG and the colour mode converts nothing (``embed`` only splices the profile in)."""
        return (self.passthrough and encoding.format is TileFormat.JPEG
                and not source.color.converts)

    @staticmethod
    def key(handle: OpenSlide, source: ImageSource, level: int, col: int, row: int,
            encoding: Encoding) -> TileKey:
        """The cache key of a tile: the variant hashes the slide identity, the pyramid's
        geometry (``DeepZoom.Geometry`` may make it per slide), the encoder options, the colour
        mode and which image (``source.scope``); memoised per open slide (with the overlap:
        IIIF tiles are cut without it, :meth:`ImageSource.without_overlap`)."""
        memo = (encoding, source.scope, source.pyramid.overlap)
        variant = handle.variants.get(memo)
        if variant is None:
            pyramid = source.pyramid
            variant = handle.variants[memo] = variant_of(
                handle.identity, pyramid.tile_size, pyramid.overlap, pyramid.limit_bounds,
                encoding.key, source.color.key, source.scope)
        return TileKey(handle.name, variant, level, col, row, encoding.format.value)


def iiif_formats(planner: TilePlanner) -> list[str]:
    """info.json ``preferredFormats`` under the format policy: the IIIF name of
    ``TileFormat.Default`` (``jpg`` where it has none, AVIF), then ``LosslessFormat`` where
    some levels are lossless. OpenSeadragon asks its tiles in the first it can show."""
    policy = planner.policy.settings
    out = [IIIF_NAMES.get(policy.Default, "jpg")]
    lossless = IIIF_NAMES[policy.LosslessFormat]
    if policy.LosslessLevelCount != 0 and lossless not in out:
        out.append(lossless)
    return out


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
    quickhash: str | None = Field(description="openslide.quickhash-1 of the slide (null when "
                                  "the format has none or Privacy withholds it)")
    identity: str = Field(description="quickhash-1:<hex>;size=<bytes>;mtime_ns=<ns> "
                          "(without the quickhash part for formats that have none); when "
                          "Privacy.HideProperties withholds anything, opaque:<32 hex digits>, "
                          "which changes exactly when that identity does")
    sha256: str | None = Field(None, description="the whole file's SHA-256 "
                               "(Integrity.ContentSha256; null until computed, when off, or "
                               "when Privacy withholds openslide.quickhash-1)")
    tile_size: int = Field(description="DZI tile size of this slide (DeepZoom.Geometry)")
    overlap: int
    limit_bounds: bool
    geometry: str = Field(description="DeepZoom.Geometry: configured or aligned")
    color: dict[str, Any] = Field(
        description="colour mode, ICC profile, transform (app.core.colour)")
    declared_format: str = Field(description="the DZI's Format")
    lossless_format: str
    lossless_level_count: int
    enforce_lossless: bool
    allow_format_override: bool
    level_count: int
    tile_count: int
    levels: list[LevelPolicy]


def level_policies(planner: TilePlanner, handle: OpenSlide,
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
        encoding = planner.policy.level_encoding(level, pyramid.level_count)
        slide_level = pyramid.slide_levels[level]
        original = (pyramid.original_count(level) if planner.sends_originals(encoding, source)
                    else 0)
        out.append(LevelPolicy(
            level=level, width=width, height=height, cols=cols, rows=rows, tiles=cols * rows,
            format=encoding.format.value, lossless=encoding.lossless and not color.converts,
            quality=encoding.quality, color_transform=color.name, slide_level=slide_level,
            slide_downsample=downsamples[slide_level], original_tiles=original))
    return out


def slide_policy(planner: TilePlanner, privacy: Privacy, settings: Settings,
                 handle: OpenSlide) -> SlidePolicy:
    """The ``/api/slides/{name}/policy`` document of an open slide. No I/O."""
    dz, fmt = settings.DeepZoom, settings.TileFormat
    pyramid = handle.pyramid
    return SlidePolicy(
        name=handle.name,
        quickhash=privacy.quickhash(handle), identity=privacy.identity(handle.identity),
        tile_size=pyramid.tile_size, overlap=pyramid.overlap,
        limit_bounds=pyramid.limit_bounds, geometry=dz.Geometry,
        color=handle.source.color.describe(), declared_format=planner.declared.value,
        lossless_format=fmt.LosslessFormat.value, lossless_level_count=fmt.LosslessLevelCount,
        enforce_lossless=fmt.EnforceLossless, allow_format_override=fmt.AllowFormatOverride,
        level_count=pyramid.level_count, tile_count=pyramid.tile_count,
        levels=level_policies(planner, handle))
