"""The native JPEG-tile reader gives exactly OpenSlide's pixels, or nothing."""

import numpy as np
import openslide
import pytest
import tifffile
from openslide.deepzoom import DeepZoomGenerator

from app.core.native import DecodedTileCache, NativeReader
from app.core.pyramid import SlidePyramid
from app.tools.demo import write_aperio_svs
from tests.conftest import drop_page_cache


@pytest.fixture(scope="module", params=[("ycbcr", 2400, 1800), ("rgb", 2400, 1800),
                                        ("ycbcr", 2999, 2001)],
                ids=["ycbcr", "rgb", "odd-size"])
def slide_path(request, tmp_path_factory):
    photometric, width, height = request.param
    path = tmp_path_factory.mktemp("native") / f"{photometric}-{width}.svs"
    return write_aperio_svs(path, width, height, photometric=photometric, seed=5)


@pytest.mark.parametrize("geometry", [(254, 1, True), (240, 0, False), (256, 0, True)])
def test_every_tile_of_every_level_equals_get_tile(slide_path, geometry):
    slide = openslide.OpenSlide(slide_path)
    reader = NativeReader.open(slide, slide_path, DecodedTileCache(64 << 20))
    assert reader is not None and 0 in reader.native_levels
    served = []
    original = reader.read

    def counting(*args):
        region = original(*args)
        served.append(region is not None)
        return region

    reader.read = counting
    pyramid = SlidePyramid(slide, *geometry, native=reader)
    reference = DeepZoomGenerator(openslide.OpenSlide(slide_path), *geometry)
    for level in range(pyramid.level_count):
        cols, rows = pyramid.level_tiles[level]
        for row in range(rows):
            for col in range(cols):
                ours = np.asarray(pyramid.render(level, col, row))  # PIL image or array
                theirs = np.asarray(reference.get_tile(level, (col, row)))
                assert np.array_equal(ours, theirs), (level, col, row)
    assert sum(served) > 0.5 * len(served)  # the native path really did the work


def test_regions_outside_the_level_or_off_grid_are_declined(slide_path):
    slide = openslide.OpenSlide(slide_path)
    reader = NativeReader.open(slide, slide_path, DecodedTileCache(16 << 20))
    w, h = slide.level_dimensions[0]
    assert reader.read((w - 10, 0), 0, (20, 20)) is None        # crosses the right edge
    assert reader.read((0, h - 1), 0, (1, 2)) is None           # crosses the bottom edge
    assert reader.read((0, 0), 0, (w, h)) is not None           # the whole level is fine
    ds = slide.level_downsamples[1]
    assert reader.read((int(3 * ds) + 1, 0), 1, (10, 10)) is None or ds == 1  # fractional


def test_reader_disables_itself_when_pixels_differ(slide_path, monkeypatch):
    slide = openslide.OpenSlide(slide_path)

    def corrupt(self, slide_level, level, index):
        tile = original(self, slide_level, level, index).copy()
        tile[0, 0, 0] ^= 1
        return tile

    original = NativeReader._tile
    monkeypatch.setattr(NativeReader, "_tile", corrupt)
    assert NativeReader.open(slide, slide_path, DecodedTileCache(16 << 20)) is None


def test_non_tiff_slides_get_no_reader(fixtures):
    for name in ["boxes_0.dcm", "boxes.png"]:
        slide = openslide.open_slide(fixtures / name)
        assert NativeReader.open(slide, fixtures / name, DecodedTileCache(1 << 20)) is None


def test_decoded_tile_cache_is_bounded():
    cache = DecodedTileCache(3 * 100)
    for i in range(5):
        cache.put(i, np.zeros((10, 10, 1), np.uint8))
    assert cache.get(0) is None and cache.get(4) is not None


def test_original_nowait_reads_only_the_page_cache(tmp_path):
    """``nowait`` reads answer from the page cache and refuse to wait for the disk; the
    blocking read gives the same bytes and fills the cache."""
    path = write_aperio_svs(tmp_path / "s.svs", 2000, 1500, seed=2)
    reader = NativeReader.open(openslide.OpenSlide(path), path, DecodedTileCache(1 << 20))
    index = reader.original_index((480, 240), 0, (240, 240))
    assert index is not None
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
        tif.filehandle.seek(offset)
        stored = tif.filehandle.read(count)
    blocking = reader.original(0, index)
    assert blocking is not None and blocking.endswith(stored[2:])
    # A refused RWF_NOWAIT read starts the readahead of what it lacks, and on a fast disk the
    # read itself may find that done: 7% to 93% of such reads succeed here, more under load. The
    # kernel promises not to wait, not to refuse; a read that waited would never refuse, and a
    # read that succeeds must give the stored bytes.
    for _ in range(500):
        drop_page_cache(path, offset, count)
        try:
            assert reader.original(0, index, nowait=True) == blocking
        except BlockingIOError:
            break
    else:
        pytest.fail("500 nowait reads of the tile out of the page cache: none refused")
    reader.original(0, index)
    assert reader.original(0, index, nowait=True) == blocking
