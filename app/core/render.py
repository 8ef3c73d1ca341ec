"""Making a planned tile's bytes: rendered from pixels, or the slide's stored JPEG tile.

Every producer calls these two functions (the server's render threads, pregeneration workers,
export), so a tile's bytes do not depend on which path made it. Both block (slide reads,
encoding): call them from worker threads or processes.
"""

from __future__ import annotations

import logging

from app.core.errors import SlideReadError, describe_error
from app.core.icc import jpeg_with_profile
from app.core.planner import TilePlan
from app.core.pyramid import ImageSource
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
