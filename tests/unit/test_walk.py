"""The pyramid walk: every tile in exactly one batch, blocks aligned across levels, bands."""

from __future__ import annotations

import pytest
from openslide.deepzoom import DeepZoomGenerator

from app.batch.walk import parse_levels, plan_batches, select_levels, split_contiguous


class OneLevelSlide:
    """What DeepZoomGenerator reads of a slide to lay out its pyramid (no pixels)."""

    def __init__(self, width: int, height: int):
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, str] = {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return 0


def pyramid(width: int, height: int, tile_size: int = 254, overlap: int = 1):
    """``level_tiles`` of openslide's DeepZoomGenerator for a slide of that size."""
    return DeepZoomGenerator(OneLevelSlide(width, height), tile_size, overlap, False).level_tiles


@pytest.mark.parametrize("size", [(1, 1), (300, 250), (5000, 3800), (32000, 24000),
                                  (4065, 254 * 16 + 1), (100000, 2000), (255, 90000)])
@pytest.mark.parametrize("block", [2, 16])
def test_every_tile_once(size, block):
    level_tiles = pyramid(*size)
    batches = plan_batches(level_tiles, range(len(level_tiles)), block)
    tiles = [tile for batch in batches for tile in batch.tiles()]
    expected = {(level, col, row) for level, (cols, rows) in enumerate(level_tiles)
                for row in range(rows) for col in range(cols)}
    assert len(tiles) == len(expected) and set(tiles) == expected
    assert sum(batch.count for batch in batches) == len(expected)
    for batch in batches:
        levels = [run.level for run in batch.runs]
        assert levels == sorted(levels, reverse=True)  # top level first: it warms the LRU


def test_a_block_covers_the_same_slide_area_on_every_level():
    level_tiles = pyramid(32000, 24000)
    top = len(level_tiles) - 1
    for batch in plan_batches(level_tiles, range(len(level_tiles)), 16):
        bx, by = batch.block
        for run in batch.runs:
            shift = top - run.level
            for _level, col, row in run.tiles():
                # the tile's top-left corner, in top-level tiles, lies in the block
                assert (col << shift) // 16 == bx or run.cols[1] == level_tiles[run.level][0]
                assert (row << shift) // 16 == by or run.rows[1] == level_tiles[run.level][1]


def test_selected_levels_only():
    level_tiles = pyramid(5000, 3800)
    batches = plan_batches(level_tiles, [10, 12], 16)
    assert {level for b in batches for level, _c, _r in b.tiles()} == {10, 12}


@pytest.mark.parametrize("text, levels", [
    (None, None), ("", None), ("10-12", (10, 11, 12)), ("3,5,8-9", (3, 5, 8, 9)),
    (" 7 ", (7,)), ("5-5,5", (5,)), ("2 - 4", (2, 3, 4)),
])
def test_parse_levels(text, levels):
    assert parse_levels(text) == levels


@pytest.mark.parametrize("text", ["a", "1-", "-1", "5-3", "1;2", "1.5", "1,,2", "1000"])
def test_parse_levels_rejects(text):
    with pytest.raises(ValueError):
        parse_levels(text)


def test_select_levels_clips_to_the_pyramid():
    assert select_levels(None, 3) == (0, 1, 2)
    assert select_levels((1, 2, 5, 9), 3) == (1, 2)


@pytest.mark.parametrize("weights, parts, spans", [
    ([1] * 8, 2, [(0, 4), (4, 8)]),
    ([1] * 8, 3, [(0, 3), (3, 6), (6, 8)]),
    ([5, 1, 1, 1, 1, 1], 2, [(0, 1), (1, 6)]),
    ([1], 4, [(0, 1)]),
    ([], 2, []),
])
def test_split_contiguous(weights, parts, spans):
    assert split_contiguous(weights, parts) == spans
