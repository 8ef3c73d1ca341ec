"""The JSON API: slides, their pyramids and format policy, and the tile cache's stats."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import openslide
from fastapi import APIRouter, Query

from app import __version__
from app.cache.content import ContentHasher
from app.cache.tiles import SlideCacheUse
from app.core.errors import SignedUrlsDisabled, SlideGone, TileServerError
from app.core.planner import SlidePolicy, TilePlanner, level_policies, slide_policy
from app.core.privacy import Privacy
from app.core.pyramid import ImageSource, single_tile_level
from app.core.slides import OpenSlide
from app.server.auth import GuardedRoute, Permission, require, visible
from app.server.credentials import exact_grant
from app.server.dependencies import (
    AppSettings,
    Base,
    Caller,
    Content,
    Planner,
    PrivacyFilter,
    Registry,
    Signer,
    Tiles,
)
from app.server.urls import dzi_url, viewer_url
from app.settings import Settings

router = APIRouter(prefix="/api", tags=["api"], route_class=GuardedRoute)
VIEW = require(Permission.VIEW)
ADMIN = require(Permission.ADMIN)
CHANGE = require(Permission.CHANGE)

MIB = 1024 * 1024


def describe_levels(planner: TilePlanner, handle: OpenSlide,
                    source: ImageSource) -> list[dict[str, Any]]:
    """Per DZI level of a source (the slide or an associated image): the policy records of
    :func:`app.core.planner.level_policies` (size, tiles, format, lossless, colour, slide
    level)."""
    return [lv.model_dump() for lv in level_policies(planner, handle, source)]


def describe_associated(planner: TilePlanner, privacy: Privacy, settings: Settings,
                        handle: OpenSlide, base: str = "") -> list[dict[str, Any]]:
    """The associated images clients may see: name, size, DZI URL and a one-tile preview URL
    (URLs under ``base``, the app's path base).

    Sizes come from OpenSlide's ``openslide.associated.<name>.*`` properties: no image is read.
    """
    out = []
    props = handle.slide.properties
    tile_size = settings.DeepZoom.TileSize
    ext = planner.declared.value
    for name in privacy.associated_names(handle.slide.associated_images):
        try:
            width = int(props[f"openslide.associated.{name}.width"])
            height = int(props[f"openslide.associated.{name}.height"])
        except (KeyError, ValueError):
            continue
        dzi = dzi_url(handle.name, name, base)
        level = single_tile_level(width, height, tile_size)
        out.append({"name": name, "width": width, "height": height, "dzi_url": dzi,
                    "preview_url": f"{dzi[:-4]}_files/{level}/0_0.{ext}",
                    "viewer_url": viewer_url(handle.name, name, base)})
    return out


def describe_slide(planner: TilePlanner, privacy: Privacy, settings: Settings,
                   handle: OpenSlide, base: str = "") -> dict[str, Any]:
    """The ``/api/slides/{name}`` document: slide facts and, per DZI level, the policy (URLs
    under ``base``).

    Properties ``Privacy`` withholds are absent or redacted (:mod:`app.core.privacy`), and so
    are the facts read from them (vendor, mpp, quickhash); withheld associated images are not
    listed.
    """
    pyramid = handle.pyramid
    slide = handle.slide
    props = privacy.slide_properties(handle)
    mpp = handle.mpp() if all(p in props for p in (
        openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)) else None
    associated = describe_associated(planner, privacy, settings, handle, base)
    return {
        "name": handle.name,
        "vendor": props.get(openslide.PROPERTY_NAME_VENDOR),
        "dimensions": list(slide.dimensions),
        "mpp": list(mpp) if mpp else None,
        "slide_level_count": slide.level_count,
        "slide_level_dimensions": [list(d) for d in slide.level_dimensions],
        "slide_level_downsamples": list(slide.level_downsamples),
        "associated_images": [item["name"] for item in associated],
        "associated": associated,
        "quickhash": props.get(openslide.PROPERTY_NAME_QUICKHASH1),
        "dzi_url": dzi_url(handle.name, base=base),
        "tile_size": pyramid.tile_size,
        "overlap": pyramid.overlap,
        "limit_bounds": pyramid.limit_bounds,
        "geometry": settings.DeepZoom.Geometry,
        "color": handle.color.describe(),
        "declared_format": planner.declared.value,
        "level_count": pyramid.level_count,
        "tile_count": pyramid.tile_count,
        "levels": describe_levels(planner, handle, handle.source),
        "properties": props,
    }


@router.get("/images", summary="All slides with their size and cache state",
            dependencies=[require(Permission.LIST)])
async def images(registry: Registry, tiles: Tiles, caller: Caller,
                 base: Base) -> list[dict[str, Any]]:
    """Every slide the caller may see: name, dimensions, DZI level count, cached tiles and
    bytes.

    A slide that cannot be opened is listed with its ``error`` (and ``errorCode``) instead of
    its dimensions; a slide whose file is gone is not listed. Cache figures come from the
    cache index (current variants only). ``file`` is the slide's file name, null under
    ``Privacy.SlideNames: hash``.
    """
    usage = await tiles.usage()
    hide_file = registry.privacy.hide_file_names
    out = []
    for name in visible(caller, registry.names):
        use = usage.get(name, SlideCacheUse())
        item: dict[str, Any] = {"name": name,
                                "file": None if hide_file else registry.entry(name).path.name,
                                **_sizes(use.tiles, use.bytes)}
        try:
            handle = await registry.get(name)
        except SlideGone:
            continue
        except TileServerError as exc:
            item.update(error=exc.detail, errorCode=exc.code)
        else:
            item.update(dimensions=list(handle.slide.dimensions),
                        level_count=handle.pyramid.level_count,
                        dzi_url=dzi_url(name, base=base))
        out.append(item)
    return out


def _sizes(tiles: int, size: int, prefix: str = "cache") -> dict[str, Any]:
    """Tile count and size in bytes, plus MiB (2**20 bytes) for people."""
    return {"cachedTiles" if prefix == "cache" else f"{prefix}Tiles": tiles,
            f"{prefix}SizeBytes": size, f"{prefix}SizeMiB": round(size / MIB, 2)}


@router.get("/slides/{name}", summary="A slide's properties, pyramid and per-level format",
            dependencies=[VIEW])
async def slide(name: str, registry: Registry, planner: Planner, privacy: PrivacyFilter,
                settings: AppSettings, content: Content, base: Base) -> dict[str, Any]:
    """Dimensions, mpp, vendor, DZI levels with dimensions, tile counts and served format.

    ``sha256`` is the whole file's SHA-256 with ``Integrity.ContentSha256`` once computed
    (null while it is being computed, when the setting is off, and when ``Privacy`` withholds
    ``openslide.quickhash-1``).
    """
    handle = await registry.get(name)
    doc = describe_slide(planner, privacy, settings, handle, base)
    doc["sha256"] = await content_sha256(content, privacy, handle)
    return doc


async def content_sha256(content: ContentHasher | None, privacy: Privacy,
                         handle: OpenSlide) -> str | None:
    """The slide file's SHA-256 when ``Integrity.ContentSha256`` has computed it and
    ``Privacy`` shows fingerprints (:attr:`~app.core.privacy.Privacy.shows_fingerprints`), else
    None (and then nothing is hashed)."""
    if content is None or not privacy.shows_fingerprints:
        return None
    size, mtime_ns, _inode = handle.signature
    return await anyio.to_thread.run_sync(content.sha256, handle.entry, size, mtime_ns)


@router.get("/slides/{name}/associated/{associated}",
            summary="An associated image's pyramid and per-level format", dependencies=[VIEW])
async def associated_image(name: str, associated: str, registry: Registry, planner: Planner,
                           settings: AppSettings, base: Base) -> dict[str, Any]:
    """Dimensions, colour and DZI levels of one associated image (label, macro, thumbnail);
    404 when the slide has none of that name or ``Privacy`` withholds it."""
    handle = await registry.get(name)
    source = await registry.associated(handle, associated)
    pyramid = source.pyramid
    return {
        "name": handle.name,
        "associated": associated,
        "dimensions": list(pyramid.level_dimensions[-1]),
        "mpp": None,
        "dzi_url": dzi_url(name, associated, base),
        "tile_size": settings.DeepZoom.TileSize,
        "overlap": settings.DeepZoom.Overlap,
        "color": source.color.describe(),
        "declared_format": planner.declared.value,
        "level_count": pyramid.level_count,
        "tile_count": pyramid.tile_count,
        "levels": describe_levels(planner, handle, source),
    }


@router.get("/slides/{name}/policy", summary="A slide's per-level format policy",
            response_model=SlidePolicy, dependencies=[VIEW])
async def policy(name: str, registry: Registry, planner: Planner, privacy: PrivacyFilter,
                 settings: AppSettings, content: Content) -> SlidePolicy:
    """Per DZI level: dimensions, tile count, format, lossless, the slide level read from.

    The single slide (``Image.Path``) is ``/api/slides/image/policy``.
    """
    handle = await registry.get(name)
    doc = slide_policy(planner, privacy, settings, handle)
    return doc.model_copy(update={"sha256": await content_sha256(content, privacy, handle)})


@router.get("/tiles/stats", summary="Disk cache totals", dependencies=[ADMIN])
async def cache_stats(registry: Registry, tiles: Tiles) -> dict[str, Any]:
    """Cached tiles and bytes over all slides, from the cache index (no walk of the tree).

    ``cachedTiles``/``cacheSizeBytes`` count the current variants of this server's slides;
    ``staleTiles``/``staleSizeBytes`` their older variants (a changed slide or changed
    settings: ``DELETE /api/tiles/cache?stale=true`` removes them); ``otherTiles`` the tiles
    of slides this server does not serve (other servers sharing the cache);
    ``corruptTiles`` the cache files found damaged (never served, rendered again).
    ``limitBytes`` is ``TileCacheMaxBytes`` in force (0: no limit), ``usedBytes`` every tile
    file's bytes (all of the above), ``evictedTiles`` the files evicted so far by every process
    (:mod:`app.cache.eviction`).
    """
    usage = await tiles.usage()
    mine = [u for name, u in usage.items() if name in registry.catalogue]
    other = [u for name, u in usage.items() if name not in registry.catalogue]
    corrupt = await anyio.to_thread.run_sync(tiles.corrupt_count, limiter=tiles.io_limiter)
    index = tiles.disk.index
    totals = (await anyio.to_thread.run_sync(index.usage, limiter=tiles.io_limiter)
              if index is not None else None)
    evictor = tiles.evictor
    return {
        **_sizes(sum(u.tiles for u in mine), sum(u.bytes for u in mine)),
        **_sizes(sum(u.stale_tiles for u in mine), sum(u.stale_bytes for u in mine), "stale"),
        **_sizes(sum(u.tiles + u.stale_tiles for u in other),
                 sum(u.bytes + u.stale_bytes for u in other), "other"),
        "corruptTiles": corrupt,
        "limitBytes": evictor.limit if evictor is not None else 0,
        "highWatermarkBytes": evictor.high if evictor is not None else 0,
        "lowWatermarkBytes": evictor.low if evictor is not None else 0,
        "usedBytes": totals.bytes if totals is not None else 0,
        "evictedTiles": totals.evicted if totals is not None else 0,
    }


@router.get("/tiles/{name}/stats", summary="Disk cache of one slide", dependencies=[ADMIN])
async def slide_cache_stats(name: str, registry: Registry, tiles: Tiles) -> dict[str, Any]:
    """One slide's cached tiles (current variants) against its pyramid's tile count.

    ``cachePercentage`` is the share of the pyramid's tiles served without rendering: tiles of
    each level's own format in the cache, and tiles sent as the slide's stored bytes.
    """
    handle = await registry.get(name)
    use = (await tiles.usage(name)).get(name, SlideCacheUse())
    total = handle.pyramid.tile_count
    covered = await tiles.coverage(handle, use)
    return {
        "imageName": name, **_sizes(use.tiles, use.bytes), "totalTiles": total,
        "cachePercentage": round(100 * covered / total, 2) if total else 0,
        **_sizes(use.stale_tiles, use.stale_bytes, "stale"),
    }


Seconds = Annotated[int | None, Query(ge=1, description="lifetime in seconds (default "
                                   "Auth:SignedUrls:DefaultSeconds, at most MaxSeconds)")]


@router.get("/slides/{name}/token", summary="A signed URL of the slide (Auth:SignedUrls)",
            dependencies=[require(Permission.TOKEN)])
async def token(name: str, caller: Caller, signer: Signer, base: Base,
                seconds: Seconds = None) -> dict[str, Any]:
    """Sign the slide's DZI and viewer URLs for the caller: their query string (``grant``,
    ``exp``, ``sub``, ``sig``) grants this slide alone until ``expires`` (UNIX seconds) to
    clients that cannot send headers; OpenSeadragon copies a DZI URL's query onto every tile
    URL. 409 without ``Auth:SignedUrls`` key; each URL issued is an audit line."""
    if signer is None:
        raise SignedUrlsDisabled("signed URLs need Auth:SignedUrls:KeyFile or KeyEnvironment")
    query, expires = signer.sign(exact_grant(name), caller.subject, seconds)
    return {"name": name, "query": query, "expires": expires,
            "dzi_url": f"{dzi_url(name, base=base)}?{query}",
            "viewer_url": f"{viewer_url(name, base=base)}?{query}"}


Stale = Annotated[bool, Query(description="delete only stale variants (older slide files "
                                          "or settings); keep the current tiles")]


@router.delete("/tiles/cache", summary="Delete the whole disk cache", dependencies=[CHANGE])
async def clear_cache(tiles: Tiles, stale: Stale = False) -> dict[str, Any]:
    """Delete every cached tile (disk, and this worker's memory cache); with ``?stale=true``
    only the stale variants of every slide."""
    removed = await tiles.clear(stale_only=stale)
    return {"status": "stale tiles deleted" if stale else "all cache cleared",
            "deletedTiles": removed}


@router.delete("/tiles/{name}/cache", summary="Delete one slide's cached tiles",
               dependencies=[CHANGE])
async def clear_slide_cache(name: str, registry: Registry, tiles: Tiles,
                            stale: Stale = False) -> dict[str, Any]:
    """Delete one slide's cached tiles; with ``?stale=true`` only its stale variants."""
    registry.entry(name)
    removed = await tiles.clear(name, stale_only=stale)
    return {"status": "stale tiles deleted" if stale else "cache cleared", "imageName": name,
            "deletedTiles": removed}


@router.get("/version", include_in_schema=False, dependencies=[require(Permission.PUBLIC)])
async def version() -> dict[str, str]:
    """The server's version."""
    return {"version": __version__}
