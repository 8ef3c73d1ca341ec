"""The pyramid walk of pregeneration: which tiles, in which batches, in which order. Pure.

A DZI pyramid halves from level to level, so a square block of ``BLOCK`` x ``BLOCK`` tiles of the
full-resolution (top) level covers the same slide area as ``BLOCK/2`` x ``BLOCK/2`` tiles one level
down, ``BLOCK/4`` two levels down, and so on. A :class:`Batch` is one such block with the tiles of
every selected level whose top-left corner falls inside it, top level first: the levels read from
one slide level decode the same stored slide tiles, so a worker that renders a batch decodes each
stored tile once and finds it in its decoded-tile LRU (``app.core.native``) for the other levels.
Batches come in row-major block order; :func:`split_contiguous` cuts that order into one
contiguous band per worker process so that neighbouring blocks (which share the stored tiles on
their edge) go to the same process.

Coordinates: ``level`` is a DZI level (0 = 1x1 px), ``col``/``row`` a tile address in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BLOCK = 8
"""Block edge in top-level tiles (even). 8 x 254 px blocks of an Aperio slide with 240 px tiles
touch about 10 x 10 stored tiles (17 MB decoded): a block and its neighbour fit the default
``Pregeneration.WorkerCacheBytes`` of 64 MiB, and a block is about 85 tiles, a tenth of a second
of one worker (progress and cancellation granularity). Measured on the benchmark slide, blocks
of 16 (and a 128 MiB LRU) used the same CPU time and 60 MiB more memory per worker."""


@dataclass(frozen=True, slots=True)
class LevelRun:
    """Tiles ``cols[0] <= col < cols[1]``, ``rows[0] <= row < rows[1]`` of one DZI level."""

    level: int
    cols: tuple[int, int]
    rows: tuple[int, int]

    @property
    def count(self) -> int:
        """Number of tiles in the run."""
        return (self.cols[1] - self.cols[0]) * (self.rows[1] - self.rows[0])

    def tiles(self) -> Iterable[tuple[int, int, int]]:
        """``(level, col, row)`` in row-major order."""
        for row in range(*self.rows):
            for col in range(*self.cols):
                yield self.level, col, row


@dataclass(frozen=True, slots=True)
class Batch:
    """The unit of work a worker renders: tile runs of one block, highest level first."""

    block: tuple[int, int]
    runs: tuple[LevelRun, ...]

    @property
    def count(self) -> int:
        """Number of tiles in the batch."""
        return sum(run.count for run in self.runs)

    def tiles(self) -> Iterable[tuple[int, int, int]]:
        """Every ``(level, col, row)`` of the batch, in render order."""
        for run in self.runs:
            yield from run.tiles()


def parse_levels(text: str | None) -> tuple[int, ...] | None:
    """Parse a level selection: ``"10-17"``, ``"3,5,8-9"``; None or ``""`` means all levels.

    Returns:
        The sorted, distinct DZI levels, or None for all.

    Raises:
        ValueError: malformed text or a range whose end is below its start.
    """
    if text is None or not text.strip():
        return None
    levels: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d{1,3})(?:\s*-\s*(\d{1,3}))?", part)
        if match is None:
            raise ValueError(f"levels {text!r}: expected A-B or a comma-separated list, e.g. 10-17")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise ValueError(f"levels {text!r}: range {part} ends below its start")
        levels.update(range(first, last + 1))
    return tuple(sorted(levels))


def select_levels(requested: Sequence[int] | None, level_count: int) -> tuple[int, ...]:
    """The requested levels that exist in a pyramid of ``level_count`` levels (all if None)."""
    if requested is None:
        return tuple(range(level_count))
    return tuple(level for level in requested if 0 <= level < level_count)


def plan_batches(level_tiles: Sequence[tuple[int, int]], levels: Sequence[int],
         block: int = BLOCK) -> list[Batch]:
    """The batches that cover every tile of ``levels``, in row-major block order.

    Args:
        level_tiles: ``(cols, rows)`` per DZI level of the whole pyramid (``SlidePyramid``).
        levels: the DZI levels to cover.
        block: block edge in top-level tiles (even, >= 2).

    Returns:
        Non-empty batches; every tile of the selected levels is in exactly one.
    """
    if block < 2 or block % 2:
        raise ValueError(f"block {block} must be even and >= 2")
    top = len(level_tiles) - 1
    top_cols, top_rows = level_tiles[top]
    blocks_x, blocks_y = -(-top_cols // block), -(-top_rows // block)
    runs: dict[tuple[int, int], list[LevelRun]] = {}
    for level in sorted(set(levels), reverse=True):
        cols, rows = level_tiles[level]
        shift = top - level
        for by in range(blocks_y):
            r0, r1 = _span(by, block, shift, rows, blocks_y)
            if r0 >= r1:
                continue
            for bx in range(blocks_x):
                c0, c1 = _span(bx, block, shift, cols, blocks_x)
                if c0 < c1:
                    runs.setdefault((bx, by), []).append(LevelRun(level, (c0, c1), (r0, r1)))
    return [Batch(key, tuple(runs[key])) for key in sorted(runs, key=lambda k: (k[1], k[0]))]


def _span(index: int, block: int, shift: int, count: int, blocks: int) -> tuple[int, int]:
    """Tiles ``t`` of a level ``shift`` levels below the top with ``t << shift`` in block
    ``index``: ``ceil(index * block / 2**shift) <= t < ceil((index + 1) * block / 2**shift)``;
    the last block also takes whatever lies beyond (levels rounded up)."""
    scale = 1 << shift
    start = -(-index * block // scale)
    end = count if index == blocks - 1 else min(count, -(-(index + 1) * block // scale))
    return min(start, count), end


def split_contiguous(weights: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``range(len(weights))`` into at most ``parts`` contiguous ``(start, end)`` spans of
    about equal total weight (tiles), in order; empty spans are dropped."""
    total = sum(weights)
    spans: list[tuple[int, int]] = []
    start = 0
    acc = 0
    for i, weight in enumerate(weights):
        acc += weight
        if len(spans) < parts - 1 and acc * parts >= total * (len(spans) + 1):
            spans.append((start, i + 1))
            start = i + 1
    if start < len(weights):
        spans.append((start, len(weights)))
    return spans
