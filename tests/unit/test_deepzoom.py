"""SlidePyramid's precomputed geometry is DeepZoomGenerator's, tile for tile."""

import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator

from app.core.pyramid import SlidePyramid
from app.tools.demo import write_aperio_svs


@pytest.fixture(scope="module")
def slides(fixtures, tmp_path_factory):
    """Real fixtures (with and without bounds) and a generated SVS of odd size."""
    generated = write_aperio_svs(tmp_path_factory.mktemp("geometry") / "odd.svs", 2999, 2001,
                                 seed=3)
    return [fixtures / "small.svs", fixtures / "boxes.tiff", fixtures / "boxes_0.dcm",
            generated]


@pytest.mark.parametrize("geometry", [(254, 1, True), (254, 1, False), (240, 0, True),
                                      (100, 3, True), (1, 0, False)])
def test_tile_coordinates_equal_deepzoom_generator(slides, geometry):
    checked = 0
    for path in slides:
        slide = openslide.open_slide(path)
        pyramid = SlidePyramid(slide, *geometry)
        reference = DeepZoomGenerator(slide, *geometry)
        assert pyramid.level_tiles == reference.level_tiles
        for level in range(pyramid.level_count):
            cols, rows = pyramid.level_tiles[level]
            if cols * rows > 40_000:  # tile size 1: the deepest levels are millions of tiles
                continue
            for row in range(rows):
                for col in range(cols):
                    expected = (reference.get_tile_coordinates(level, (col, row)),
                                reference.get_tile_dimensions(level, (col, row)))
                    assert pyramid.tile_coordinates(level, col, row) == expected, \
                        (path.name, level, col, row)
                    checked += 1
    assert checked > 100


def test_an_image_slide_renders_correctly_from_many_threads(fixtures):
    """A PNG slide (openslide's ImageSlide: one PIL image) read by the render threads at
    once: every tile is get_tile's (Pillow's lazy load is not thread-safe)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from app.core.pyramid import SlidePyramid

    reference = DeepZoomGenerator(openslide.open_slide(fixtures / "boxes.png"), 64, 1, True)
    for _ in range(5):  # a fresh, unloaded image each round
        pyramid = SlidePyramid(openslide.open_slide(fixtures / "boxes.png"), 64, 1, True)
        top = pyramid.level_count - 1
        cols, rows = pyramid.level_tiles[top]
        addresses = [(c, r) for c in range(cols) for r in range(rows)] * 3
        with ThreadPoolExecutor(8) as pool:
            tiles = list(pool.map(lambda a, p=pyramid, t=top: p.render(t, *a), addresses))
        for (col, row), tile in zip(addresses, tiles, strict=True):
            assert np.array_equal(np.asarray(tile), np.asarray(reference.get_tile(top, (col, row))))
