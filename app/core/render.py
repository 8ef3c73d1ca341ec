"""Making a planned tile's bytes: rendered from pixels, or the slide's stored JPEG tile.

Every producer calls these two functions (the server's render threads, pregeneration workers,
export), so a tile's bytes do not depend on which path made it. Both block (slide reads,
encoding): call them from worker threads or processes.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import openslide
from PIL import Image

from app.core.errors import SlideReadError, describe_error
from app.core.icc import jpeg_with_profile
from app.core.planner import RegionPlan, TilePlan
from app.core.pyramid import ImageSource, SlidePyramid
from app.core.slides import OpenSlide

log = logging.getLogger(__name__)


def render_tile(handle: OpenSlide, source: ImageSource, plan: TilePlan) -> bytes:
    """Read, colour-convert (if the mode says so) and encode the planned tile.

    Args:
        handle: the open slide (named in errors).
        source: what the plan was made for (the slide's or an associated image's source).
        plan: from :meth:`app.core.planner.TilePlanner.plan`.

    Returns:
        The complete image file bytes in ``plan.encoding``.

    Raises:
        SlideReadError: OpenSlide cannot read the slide (its message is kept).
    """
    key = plan.key
    try:
        image = source.pyramid.render(key.level, key.col, key.row)
    except Exception as exc:  # OpenSlide, Pillow (ImageSlide), the native reader, the OS
        log.warning("slide %s (%s): tile %s cannot be read: %s: %s", handle.name,
                    handle.entry.path, key.relative_path(), type(exc).__name__, exc)
        raise SlideReadError(f"OpenSlide cannot read {handle.file_label}: "
                             f"{describe_error(exc, handle.entry.path, handle.file_label)}",
                             slide=handle.name) from None
    color = source.color
    return plan.encoding.encode(color.apply(image), color.embed_profile)


RESAMPLING = Image.Resampling.LANCZOS
"""The one filter that scales IIIF regions (Pillow's Lanczos, as ``DeepZoomGenerator`` scales
its tiles)."""
STRIP_PIXELS = 8 * 1024 * 1024
"""Slide-level pixels read at once when a region is rendered: a large region is read and
scaled in strips of output rows, each read with a margin as wide as the filter's support, so
memory stays bounded whatever the scale."""
_ROTATIONS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_90}


def render_region(handle: OpenSlide, source: ImageSource, plan: RegionPlan) -> bytes:
    """Read, scale, mirror, rotate, colour-convert and encode an IIIF region that is not a
    pyramid tile (:meth:`app.core.planner.TilePlanner.plan_region`).

    The region is read with OpenSlide's ``read_region`` from ``plan.slide_level`` (never a
    coarser level than the request's scale), composited onto the slide's background colour
    as ``DeepZoomGenerator`` does, and scaled with :data:`RESAMPLING` to the requested size;
    at full resolution nothing is scaled, so a lossless region is ``read_region``'s pixels
    exactly. Then mirroring, clockwise rotation, ``gray`` (ITU-R 601-2 luma) or ``bitonal``
    (luma thresholded at 128), and the colour mode.

    Returns:
        The image file bytes in ``plan.encoding``.

    Raises:
        SlideReadError: OpenSlide cannot read the slide (its message is kept).
    """
    request = plan.request
    try:
        image = _read_scaled(source.pyramid, plan.slide_level, request.region, request.size)
    except Exception as exc:  # OpenSlide, Pillow (ImageSlide), the OS
        log.warning("slide %s (%s): region %s cannot be read: %s: %s", handle.name,
                    handle.entry.path, request.region, type(exc).__name__, exc)
        raise SlideReadError(f"OpenSlide cannot read {handle.entry.path.name}: "
                             f"{describe_error(exc, handle.entry.path)}",
                             slide=handle.name) from None
    if request.mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if request.rotation:
        image = image.transpose(_ROTATIONS[request.rotation])
    color = source.color
    pixels = color.apply(image)
    if request.quality in ("gray", "bitonal"):
        luma = np.asarray(pixels.convert("L") if isinstance(pixels, Image.Image)
                          else Image.fromarray(pixels).convert("L"))
        if request.quality == "bitonal":
            luma = np.where(luma >= 128, 255, 0).astype(np.uint8)
        pixels = np.repeat(luma[:, :, None], 3, axis=2)
    return plan.encoding.encode(pixels, color.embed_profile)


def _read_scaled(pyramid: SlidePyramid, level: int, region: tuple[int, int, int, int],
                 size: tuple[int, int]) -> Image.Image:
    """The RGB region ``(x, y, w, h)`` of the pyramid's image (full-resolution pixels) read
    from slide level ``level`` and scaled to ``size`` (blocking)."""
    slide = pyramid.slide
    downsample = slide.level_downsamples[level]
    x, y, w, h = region
    out_w, out_h = size
    ox, oy = pyramid.l0_offset
    background = "#" + slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
    src_w, src_h = w / downsample, h / downsample
    read_w, read_h = max(1, math.ceil(src_w)), max(1, math.ceil(src_h))
    if level == 0 and (out_w, out_h) == (w, h):
        return _opaque(slide.read_region((ox + x, oy + y), 0, (w, h)), background)
    scale_y = src_h / out_h
    margin = math.ceil(3 * max(scale_y, 1.0)) + 1
    rows = max(1, int(STRIP_PIXELS / (read_w * max(scale_y, 1.0))) - 2 * margin)
    out = Image.new("RGB", (out_w, out_h))
    for r0 in range(0, out_h, rows):
        r1 = min(out_h, r0 + rows)
        top = max(0, math.floor(r0 * scale_y) - margin)
        bottom = min(read_h, math.ceil(r1 * scale_y) + margin)
        location = (ox + x, oy + y + round(top * downsample))
        strip = _opaque(slide.read_region(location, level, (read_w, bottom - top)), background)
        out.paste(strip.resize((out_w, r1 - r0), RESAMPLING,
                               box=(0, r0 * scale_y - top, src_w, r1 * scale_y - top)),
                  (0, r0))
    return out


def _opaque(region: Image.Image, background: str) -> Image.Image:
    """An RGBA ``read_region`` result composited onto the background colour (RGB)."""
    return Image.composite(region, Image.new("RGB", region.size, background), region)


def original_tile(source: ImageSource, plan: TilePlan, nowait: bool = False) -> bytes | None:
    """The slide's stored JPEG bytes of a tile the plan marks ``original``, as sent.

    The stored tile is made a complete JPEG (:func:`app.core.native.complete_jpeg`); in
    ``embed`` colour mode the slide's profile is spliced in as APP2 (the scan untouched). One
    read, blocking, or with ``nowait`` from the page cache only.

    Returns:
        The bytes, or None when the stored data is not a whole JPEG stream (the caller then
        renders the tile).

    Raises:
        BlockingIOError: ``nowait`` and the read would wait for the disk.
        OSError: the slide file cannot be read.
    """
    key = plan.key
    data = source.pyramid.original(key.level, key.col, key.row, nowait)
    profile = source.color.embed_profile
    if data is not None and profile:
        data = jpeg_with_profile(data, profile)
    return data
