"""The JSON API: slides, their pyramids and format policy, and the tile cache's stats."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app import __version__
from app.dependencies import Registry, Tiles
from app.errors import TileServerError
from app.policy import SlidePolicy, level_policies, slide_policy
from app.slides import SINGLE_SLIDE_NAME, OpenSlide
from app.tiles import TileService

router = APIRouter(prefix="/api", tags=["api"])

MB = 1024 * 1024


def dzi_url(name: str) -> str:
    """The DZI URL of a slide: ``/image.dzi`` for the single slide, else under ``/storage``."""
    return "/image.dzi" if name == SINGLE_SLIDE_NAME else f"/storage/{name}.dzi"


def describe_slide(tiles: TileService, handle: OpenSlide) -> dict[str, Any]:
    """The ``/api/slides/{name}`` document: slide facts and, per DZI level, the policy."""
    pyramid = handle.pyramid
    slide = handle.slide
    levels = [lv.model_dump() for lv in level_policies(tiles, handle)]
    settings = tiles.settings
    return {
        "name": handle.name,
        "vendor": slide.properties.get("openslide.vendor"),
        "dimensions": list(slide.dimensions),
        "mpp": list(mpp) if (mpp := handle.mpp()) else None,
        "slide_level_count": slide.level_count,
        "slide_level_dimensions": [list(d) for d in slide.level_dimensions],
        "slide_level_downsamples": list(slide.level_downsamples),
        "associated_images": sorted(slide.associated_images),
        "quickhash": slide.properties.get("openslide.quickhash-1"),
        "dzi_url": dzi_url(handle.name),
        "tile_size": settings.DeepZoom.TileSize,
        "overlap": settings.DeepZoom.Overlap,
        "limit_bounds": settings.DeepZoom.LimitBounds,
        "declared_format": tiles.policy.declared.value,
        "level_count": pyramid.level_count,
        "tile_count": pyramid.tile_count,
        "levels": levels,
    }


@router.get("/images", summary="All slides with their size and cache state")
async def images(registry: Registry, tiles: Tiles) -> list[dict[str, Any]]:
    """Every configured slide: name, dimensions, DZI level count, cached tiles.

    A slide that cannot be opened is listed with its ``error`` instead of its dimensions.
    """
    out = []
    for name in registry.names:
        count, size = await tiles.stats(name)
        item: dict[str, Any] = {"name": name, "file": registry.entry(name).path.name,
                                "cachedTiles": count, "cacheSizeMB": round(size / MB, 2)}
        try:
            handle = await registry.get(name)
        except TileServerError as exc:
            item["error"] = exc.detail
        else:
            item.update(dimensions=list(handle.slide.dimensions),
                        level_count=handle.pyramid.level_count, dzi_url=dzi_url(name))
        out.append(item)
    return out


@router.get("/slides/{name}", summary="A slide's properties, pyramid and per-level format")
async def slide(name: str, registry: Registry, tiles: Tiles) -> dict[str, Any]:
    """Dimensions, mpp, vendor, DZI levels with dimensions, tile counts and served format."""
    return describe_slide(tiles, await registry.get(name))


@router.get("/slides/{name}/policy", summary="A slide's per-level format policy",
            response_model=SlidePolicy)
async def policy(name: str, registry: Registry, tiles: Tiles) -> SlidePolicy:
    """Per DZI level: dimensions, tile count, format, lossless, the slide level read from.

    The single slide (``Image.Path``) is ``/api/slides/image/policy``.
    """
    return slide_policy(tiles, await registry.get(name))


@router.get("/tiles/stats", summary="Disk cache totals")
async def cache_stats(tiles: Tiles) -> dict[str, Any]:
    """Cached tile files and bytes over all slides (the original servers' fields)."""
    count, size = await tiles.stats()
    return {"cachedTiles": count, "cacheSizeBytes": size, "cacheSizeMB": round(size / MB, 2)}


@router.get("/tiles/{name}/stats", summary="Disk cache of one slide")
async def slide_cache_stats(name: str, registry: Registry, tiles: Tiles) -> dict[str, Any]:
    """Cached tiles of one slide against its pyramid's tile count (the original's fields)."""
    handle = await registry.get(name)
    count, size = await tiles.stats(name)
    total = handle.pyramid.tile_count
    return {
        "imageName": name, "cachedTiles": count, "totalTiles": total,
        "cachePercentage": round(100 * count / total, 2) if total else 0,
        "cacheSizeBytes": size, "cacheSizeMB": round(size / MB, 2),
    }


@router.delete("/tiles/cache", summary="Delete the whole disk cache")
async def clear_cache(tiles: Tiles) -> dict[str, str]:
    """Delete every cached tile (disk, and this worker's memory cache)."""
    await tiles.clear()
    return {"status": "all cache cleared"}


@router.delete("/tiles/{name}/cache", summary="Delete one slide's cached tiles")
async def clear_slide_cache(name: str, registry: Registry, tiles: Tiles) -> dict[str, str]:
    """Delete one slide's cached tiles."""
    registry.entry(name)
    await tiles.clear(name)
    return {"status": "cache cleared", "imageName": name}


@router.get("/version", include_in_schema=False)
async def version() -> dict[str, str]:
    """The server's version."""
    return {"version": __version__}
