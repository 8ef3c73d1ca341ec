"""Precompressed tiles: with ``DeepZoom.Geometry`` aligned, JPEG tiles at native levels are the
slide's stored bytes (``X-Tile-Source: original``); everything else is rendered as before.

Every tile of every DZI level of four generated slides is fetched through the app and checked:
an original tile's scan is byte for byte the stored tile's, and it decodes to exactly the
pixels OpenSlide reads; a rendered tile is byte for byte what the server sends with
passthrough off.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from app.core.icc import rgb_matrix_profile
from app.core.native import ADOBE_RGB, JFIF, complete_jpeg
from app.tools.demo import write_aperio_svs, write_generic_tiff
from tests.conftest import decode, drop_page_cache

SLIDES = {
    # name: (writer, width, height, photometric, app14)
    "svs-ycbcr": (write_aperio_svs, 3000, 2200, "ycbcr", True),
    "svs-rgb-bare": (write_aperio_svs, 3000, 2200, "rgb", False),
    "tiff-ycbcr": (write_generic_tiff, 2900, 2100, "ycbcr", True),
    "tiff-rgb-bare": (write_generic_tiff, 2900, 2100, "rgb", False),
}
ALIGNED = {"Geometry": "aligned"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """The generated slides, by name (Aperio SVS 240 px tiles, generic TIFF 256 px tiles)."""
    root = tmp_path_factory.mktemp("passthrough")
    out = {}
    for name, (write, width, height, photometric, app14) in SLIDES.items():
        suffix = ".svs" if write is write_aperio_svs else ".tiff"
        out[name] = write(root / f"{name}{suffix}", width, height, photometric=photometric,
                          app14=app14, seed=3)
    return out


def _stored_tiles(path: Path) -> dict[tuple[int, int], tuple[bytes, bytes, int]]:
    """``{(width, height) of a tiled JPEG page: (JPEGTables, first stored tile, tiles/row)}``."""
    out = {}
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            if page.is_tiled and page.compression == 7:
                tif.filehandle.seek(page.dataoffsets[0])
                out[(page.imagewidth, page.imagelength)] = (
                    page.jpegtables, tif.filehandle.read(page.databytecounts[0]),
                    -(-page.imagewidth // page.tilewidth))
    return out


def _stored_tile(path: Path, dims: tuple[int, int], index: int) -> bytes:
    with tifffile.TiffFile(path) as tif:
        page = next(p for p in tif.pages
                    if p.is_tiled and (p.imagewidth, p.imagelength) == dims)
        tif.filehandle.seek(page.dataoffsets[index])
        return tif.filehandle.read(page.databytecounts[index])


@pytest.mark.parametrize("name", SLIDES)
def test_every_tile_is_original_or_rendered_exactly(client_for, slides, tmp_path, name):
    path = slides[name]
    all_jpeg = {"LosslessLevelCount": 0}
    on = client_for(Images=[{"Name": "s", "Path": str(path)}], DeepZoom=ALIGNED,
                    TileFormat=all_jpeg)
    off = client_for(Images=[{"Name": "s", "Path": str(path)}], DeepZoom=ALIGNED,
                     TileFormat={**all_jpeg, "Passthrough": False},
                     TileCachePath=str(tmp_path / "off"))
    info = on.get("/api/slides/s").json()
    slide = openslide.OpenSlide(path)
    tile_size = int(slide.properties["openslide.level[0].tile-width"])
    assert (info["tile_size"], info["overlap"]) == (tile_size, 0)
    dz = DeepZoomGenerator(slide, tile_size, 0, info["limit_bounds"])
    assert on.get("/storage/s.dzi").text == dz.get_dzi("jpeg")

    originals = 0
    for level in range(dz.level_count):
        cols, rows = dz.level_tiles[level]
        for row in range(rows):
            for col in range(cols):
                url = f"/storage/s_files/{level}/{col}_{row}.jpeg"
                got, ref = on.get(url), off.get(url)
                assert got.status_code == ref.status_code == 200
                assert ref.headers["x-tile-source"] == "rendered"
                l0, slide_level, l_size = dz.get_tile_coordinates(level, (col, row))
                dims = slide.level_dimensions[slide_level]
                ds = slide.level_downsamples[slide_level]
                x, y = int(l0[0] / ds), int(l0[1] / ds)
                expect_original = (
                    l_size == dz.get_tile_dimensions(level, (col, row)) == (tile_size,) * 2
                    and x % tile_size == 0 and y % tile_size == 0
                    and x + tile_size <= dims[0] and y + tile_size <= dims[1])
                if not expect_original:
                    assert got.headers["x-tile-source"] == "rendered", url
                    assert got.content == ref.content, url
                    continue
                originals += 1
                assert got.headers["x-tile-source"] == "original", url
                assert got.headers["content-type"] == "image/jpeg"
                assert got.headers["x-tile-lossless"] == "false"
                index = (y // tile_size) * -(-dims[0] // tile_size) + x // tile_size
                stored = _stored_tile(path, dims, index)
                assert got.content.endswith(stored[2:]), f"{url}: scan data is not the stored one"
                theirs = np.asarray(slide.read_region(l0, slide_level, l_size))[..., :3]
                assert np.array_equal(decode(got.content), theirs), url
    level0 = slide.level_dimensions[0]
    assert originals >= (level0[0] // tile_size) * (level0[1] // tile_size)
    assert originals == sum(lv["original_tiles"] for lv in info["levels"])


def test_bare_rgb_tiles_need_the_adobe_marker(slides):
    """The stored RGB tile with its tables but without a colour marker decodes pink (every
    IJG-style decoder guesses YCbCr); the served stream says RGB and decodes right."""
    path = slides["svs-rgb-bare"]
    tables, stored, _ = _stored_tiles(path)[(3000, 2200)]
    served = complete_jpeg(stored, tables, photometric=2)
    assert served.startswith(b"\xff\xd8" + ADOBE_RGB)
    guessed = b"\xff\xd8" + tables[2:-2] + stored[2:]
    slide = openslide.OpenSlide(path)
    theirs = np.asarray(slide.read_region((0, 0), 0, (240, 240)))[..., :3].astype(int)
    assert np.array_equal(decode(served), theirs)
    assert np.abs(decode(guessed).astype(int) - theirs).mean() > 10  # pink


def test_colour_marker_is_not_added_twice(tmp_path):
    """Tiles that already carry Adobe APP14 (libjpeg's RGB) or JFIF keep theirs alone."""
    path = write_aperio_svs(tmp_path / "rgb.svs", 500, 400, photometric="rgb", seed=1)
    tables, stored, _ = _stored_tiles(path)[(500, 400)]
    served = complete_jpeg(stored, tables, photometric=2)
    assert served.count(b"Adobe") == 1 and JFIF not in served
    with Image.open(io.BytesIO(served)) as im:
        assert im.mode == "RGB"
    path = write_aperio_svs(tmp_path / "ycbcr.svs", 500, 400, seed=1)
    tables, stored, _ = _stored_tiles(path)[(500, 400)]
    served = complete_jpeg(stored, tables, photometric=6)
    assert served.startswith(b"\xff\xd8" + JFIF) and b"Adobe" not in served


def test_png_lossless_and_configured_geometry_are_rendered(client_for, slides, tmp_path):
    path = slides["svs-ycbcr"]
    slide = openslide.OpenSlide(path)
    dz = DeepZoomGenerator(slide, 240, 0, True)
    top = dz.level_count - 1
    aligned = client_for(Images=[{"Name": "s", "Path": str(path)}], DeepZoom=ALIGNED)
    # the top level is lossless by default (PNG): rendered, exact
    got = aligned.get(f"/storage/s_files/{top}/1_1.jpeg")
    assert got.headers["x-tile-format"] == "png" and got.headers["x-tile-source"] == "rendered"
    assert np.array_equal(decode(got.content), np.asarray(dz.get_tile(top, (1, 1))))
    for query in ("?format=png", "?format=webp"):
        got = aligned.get(f"/storage/s_files/{top}/1_1.jpeg{query}",
                          headers={"Accept": "image/webp"})
        assert got.headers["x-tile-source"] == "rendered", query
    # explicit JPEG at the top level is original
    got = aligned.get(f"/storage/s_files/{top}/1_1.jpeg?format=jpeg")
    assert got.headers["x-tile-source"] == "original"
    # a second request is a memory hit with the same bytes and source
    again = aligned.get(f"/storage/s_files/{top}/1_1.jpeg?format=jpeg")
    assert (again.headers["x-tile-cache"], again.headers["x-tile-source"]) == ("hit", "original")
    assert again.content == got.content
    # the default 254/1 grid never coincides with stored tiles; 240/0 configured by hand does
    configured = client_for(Images=[{"Name": "s", "Path": str(path)}])
    got = configured.get(f"/storage/s_files/{top}/1_1.jpeg?format=jpeg")
    assert got.headers["x-tile-source"] == "rendered"
    by_hand = client_for(Images=[{"Name": "s", "Path": str(path)}],
                         DeepZoom={"TileSize": 240, "Overlap": 0}, TileCachePath=str(tmp_path))
    got = by_hand.get(f"/storage/s_files/{top}/1_1.jpeg?format=jpeg")
    assert got.headers["x-tile-source"] == "original"


def test_fixtures_fall_back(client_for, fixtures):
    """The real scanner fixtures are 16x16 px in one padded 64 px stored tile: with the
    aligned geometry every tile is an edge tile, rendered exactly as before (PNG equals
    ``get_tile``); the unreadable SVS still answers OpenSlide's error."""
    client = client_for(Images=[
        {"Name": "small", "Path": str(fixtures / "small.svs")},
        {"Name": "dicom", "Path": str(fixtures / "boxes_0.dcm")},
        {"Name": "bad", "Path": str(fixtures / "unreadable.svs")},
    ], DeepZoom=ALIGNED)
    for name, file in (("small", "small.svs"), ("dicom", "boxes_0.dcm")):
        info = client.get(f"/api/slides/{name}").json()
        assert (info["tile_size"], info["overlap"]) == (64, 0)
        assert sum(level["original_tiles"] for level in info["levels"]) == 0
        dz = DeepZoomGenerator(openslide.OpenSlide(fixtures / file), 64, 0, True)
        top = dz.level_count - 1
        got = client.get(f"/storage/{name}_files/{top}/0_0.jpeg?format=png")
        assert got.headers["x-tile-source"] == "rendered"
        assert np.array_equal(decode(got.content), np.asarray(dz.get_tile(top, (0, 0))))
    bad = client.get("/storage/bad_files/4/0_0.jpeg")
    assert bad.status_code == 500 and "Bogus marker length" in bad.json()["detail"]


def test_original_from_disk_and_from_page_cache_are_equal(client_for, tmp_path):
    """A slide file out of the page cache is read by a worker thread (the event loop's
    ``RWF_NOWAIT`` read refuses); the bytes are the same as from the page cache."""
    (tmp_path / "slides").mkdir()
    path = write_aperio_svs(tmp_path / "slides" / "cold.svs", 2000, 1500, seed=6)
    url = "/storage/s_files/11/2_2.jpeg?format=jpeg"  # level 11: the slide's level 0
    client = client_for(Images=[{"Name": "s", "Path": str(path)}], DeepZoom=ALIGNED,
                        Server={"MemoryCacheBytes": 0})
    client.get("/api/slides/s")
    drop_page_cache(path)
    from_disk = client.get(url)
    from_cache = client.get(url)
    assert from_disk.headers["x-tile-source"] == from_cache.headers["x-tile-source"] == "original"
    assert from_disk.headers["x-tile-cache"] == from_cache.headers["x-tile-cache"] == "miss"
    assert from_disk.content == from_cache.content
    slide = openslide.OpenSlide(path)
    theirs = np.asarray(slide.read_region((480, 480), 0, (240, 240)))[..., :3]
    assert np.array_equal(decode(from_disk.content), theirs)


def test_original_tiles_of_a_slide_on_tmpfs(client_for, tmp_path):
    """tmpfs cannot do ``RWF_NOWAIT`` reads (EOPNOTSUPP): the original tile is read in a
    worker thread, not reported as an unreadable slide."""
    shm = Path("/dev/shm")
    assert any(line.split()[1:3] == ["/dev/shm", "tmpfs"]
               for line in Path("/proc/mounts").read_text().splitlines())
    folder = shm / f"tileserver-test-{os.getpid()}"
    folder.mkdir()
    try:
        path = write_aperio_svs(folder / "shm.svs", 2000, 1500, seed=8)
        client = client_for(Images=[{"Name": "s", "Path": str(path)}], DeepZoom=ALIGNED)
        got = client.get("/storage/s_files/11/2_2.jpeg?format=jpeg")
        assert got.status_code == 200 and got.headers["x-tile-source"] == "original"
        assert got.content.endswith(_stored_tile(path, (2000, 1500), 2 * 9 + 2)[2:])
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_colour_modes_and_original_tiles(client_for, tmp_path):
    """``embed``: the original tile carries the slide's profile (APP2) and its scan is still
    the stored one; a converting mode changes pixels, so its tiles are rendered."""
    profile = rgb_matrix_profile("wide-gamut scanner (passthrough test)",
                                 ((0.70, 0.29), (0.17, 0.79), (0.13, 0.05)), (0.3127, 0.3290), 2.2)
    (tmp_path / "slides").mkdir()
    path = write_aperio_svs(tmp_path / "slides" / "icc.svs", 2000, 1500, seed=7,
                            icc_profile=profile)
    url = "/storage/s_files/11/2_1.jpeg?format=jpeg"
    stored = _stored_tile(path, (2000, 1500), 1 * 9 + 2)
    embed = client_for(Images=[{"Name": "s", "Path": str(path)}], DeepZoom=ALIGNED)
    got = embed.get(url)
    assert got.headers["x-tile-source"] == "original"
    assert got.headers["x-tile-color-transform"] == "none"
    assert got.content.endswith(stored[2:])
    with Image.open(io.BytesIO(got.content)) as im:
        assert im.info["icc_profile"] == profile
    slide = openslide.OpenSlide(path)
    theirs = np.asarray(slide.read_region((480, 240), 0, (240, 240)))[..., :3]
    assert np.array_equal(decode(got.content), theirs)
    converting = client_for(Images=[{"Name": "s", "Path": str(path)}],
                            DeepZoom={**ALIGNED, "ColorMode": "perceptual"},
                            TileCachePath=str(tmp_path / "c2"))
    got = converting.get(url)
    assert got.headers["x-tile-source"] == "rendered"
    assert got.headers["x-tile-color-transform"] == "srgb-perceptual"
