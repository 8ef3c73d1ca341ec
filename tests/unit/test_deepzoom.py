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
