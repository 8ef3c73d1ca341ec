"""The benchmark slide and its tile addresses: generation, DZI geometry, each server's URLs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ROOT, console

DATA_DIR = ROOT / "bench" / "data"
SLIDE_SIZE = (32000, 24000)
"""Default level-0 size of the generated benchmark slide (at least 30000x20000 px)."""
SLIDE_SEED = 1
SLIDE_NAME = "bench"
"""The slide's name in our server's settings (``/storage/bench_files/...``)."""
WARM_TILES = 2000
WARM_REGION = (50, 40)
"""Deepest-level region (cols, rows) pre-warmed for the warm scenario, centred on the slide."""


def ensure_slide(width: int, height: int) -> Path:
    """``bench/data/bench-{W}x{H}.svs``, generated once (Aperio-style SVS, seed 1)."""
    path = DATA_DIR / f"bench-{width}x{height}.svs"
    if not path.exists():
        from app.tools.demo import write_aperio_svs

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        console.print(f"generating {path.relative_to(ROOT)} (once) ...")
        t0 = time.monotonic()
        write_aperio_svs(path, width, height, seed=SLIDE_SEED)
        console.print(f"  done in {time.monotonic() - t0:.1f} s, "
                      f"{path.stat().st_size / 1e6:.0f} MB")
    return path


@dataclass(frozen=True)
class Geometry:
    """The DZI pyramid: level count and (cols, rows) per level."""

    level_count: int
    tiles: list[tuple[int, int]]

    @property
    def top(self) -> int:
        """The deepest (highest-resolution) DZI level."""
        return self.level_count - 1


def geometry_from_api(doc: dict[str, Any]) -> Geometry:
    """The geometry in ``GET /api/slides/{name}``'s answer."""
    return Geometry(doc["level_count"], [(lv["cols"], lv["rows"]) for lv in doc["levels"]])


def geometry_from_openslide(slide: Path, tile_size: int = 254, overlap: int = 1,
                            limit_bounds: bool = True) -> Geometry:
    """The geometry ``DeepZoomGenerator(tile_size, overlap, limit_bounds)`` has for ``slide``
    (default: the deepzoom baseline's 254/1/limit_bounds)."""
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    with OpenSlide(slide) as osr:
        dz = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap,
                               limit_bounds=limit_bounds)
        return Geometry(dz.level_count, [tuple(t) for t in dz.level_tiles])


def cold_order(cols: int, rows: int) -> list[tuple[int, int]]:
    """Every ``(col, row)`` once, row-major, starting at row ``rows // 4`` and wrapping.

    wrk thread i of T walks the i-th contiguous slice of this list; with the rotation, both
    threads of the default T=2 start inside the tissue instead of on the top glass margin.
    """
    start = rows // 4
    return [(c, (start + r) % rows) for r in range(rows) for c in range(cols)]


def warm_tiles(geo: Geometry, count: int = WARM_TILES) -> list[tuple[int, int, int]]:
    """``(level, col, row)`` of the warm set: a centred 50x40 region of the deepest level,
    topped up (small slides) with whole shallower levels, row-major, up to ``count`` tiles."""
    cols, rows = geo.tiles[geo.top]
    w, h = min(WARM_REGION[0], cols), min(WARM_REGION[1], rows)
    c0, r0 = (cols - w) // 2, (rows - h) // 2
    out = [(geo.top, c, r) for r in range(r0, r0 + h) for c in range(c0, c0 + w)]
    level = geo.top - 1
    while len(out) < count and level >= 0:
        lc, lr = geo.tiles[level]
        out += [(level, c, r) for r in range(lr) for c in range(lc)]
        level -= 1
    return out[:count]


def ours_path(level: int, col: int, row: int, fmt: str) -> str:
    """A tile URL path of our server; ``jpeg`` forces JPEG, ``lossless`` leaves the policy."""
    path = f"/storage/{SLIDE_NAME}_files/{level}/{col}_{row}.jpeg"
    return path + "?format=jpeg" if fmt == "jpeg" else path


def baseline_path(level: int, col: int, row: int, fmt: str) -> str:
    """A tile URL path of the baseline: ``.jpeg`` or ``.png``."""
    return f"/slide_files/{level}/{col}_{row}.{fmt}"


def iipsrv_path(slide: Path, level: int, col: int, row: int) -> str:
    """An iipsrv DeepZoom tile URL path of ``slide``."""
    return f"/fcgi-bin/iipsrv.fcgi?DeepZoom={slide.name}_files/{level}/{col}_{row}.jpg"


def iiif_tiles(width: int, height: int, tile_size: int) -> list[tuple[str, str]]:
    """``(region, size)`` of every full-resolution IIIF tile OpenSeadragon asks for an image
    of ``width`` x ``height`` with ``tile_size`` tiles, in :func:`cold_order`."""
    cols, rows = -(-width // tile_size), -(-height // tile_size)
    out = []
    for col, row in cold_order(cols, rows):
        x, y = col * tile_size, row * tile_size
        w, h = min(tile_size, width - x), min(tile_size, height - y)
        out.append((f"{x},{y},{w},{h}", f"{w},{h}"))
    return out


def iiif_warm_tiles(width: int, height: int, tile_size: int,
                    count: int = WARM_TILES) -> list[tuple[str, str]]:
    """``(region, size)`` of the IIIF warm set: the centred 50x40 full-resolution tiles."""
    cols, rows = -(-width // tile_size), -(-height // tile_size)
    w, h = min(WARM_REGION[0], cols), min(WARM_REGION[1], rows)
    c0, r0 = (cols - w) // 2, (rows - h) // 2
    wanted = {(c, r) for r in range(r0, r0 + h) for c in range(c0, c0 + w)}
    tiles = iiif_tiles(width, height, tile_size)
    order = [(c, r) for c, r in cold_order(cols, rows)]
    return [t for t, address in zip(tiles, order, strict=True) if address in wanted][:count]


def ours_iiif_path(region: str, size: str) -> str:
    """An IIIF image URL path of our server (JPEG, OpenSeadragon's default quality)."""
    return f"/iiif/3/{SLIDE_NAME}/{region}/{size}/0/default.jpg"


def iipsrv_iiif_path(slide: Path, region: str, size: str) -> str:
    """An iipsrv IIIF image URL path of ``slide``."""
    return f"/fcgi-bin/iipsrv.fcgi?IIIF={slide.name}/{region}/{size}/0/default.jpg"
