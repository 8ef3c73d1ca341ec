"""The baseline of ``make bench-pregen``: what openslide-python's
``examples/deepzoom/deepzoom_tile.py -j N`` does, reduced to the tiling itself.

N worker processes each open the slide and build a ``DeepZoomGenerator``; the main process puts
every tile address of every level on a ``JoinableQueue`` (skipping files that exist, as the
example does); a worker calls ``get_tile`` and ``Image.save(path, quality=Q)``. No associated
images, no viewer page.

Usage: ``python -m bench.deepzoom_tile_baseline SLIDE OUTDIR [-j 2] [-Q 90] [-s 254] [-e 1]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

import openslide
from openslide.deepzoom import DeepZoomGenerator


def _worker(queue, slide: str, tile_size: int, overlap: int, quality: int) -> None:
    dz = DeepZoomGenerator(openslide.open_slide(slide), tile_size, overlap, True)
    while True:
        item = queue.get()
        if item is None:
            queue.task_done()
            return
        level, col, row, path = item
        dz.get_tile(level, (col, row)).save(path, quality=quality)
        queue.task_done()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("slide")
    parser.add_argument("outdir")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("-Q", "--quality", type=int, default=90)
    parser.add_argument("-s", "--size", type=int, default=254)
    parser.add_argument("-e", "--overlap", type=int, default=1)
    args = parser.parse_args(argv)
    queue = multiprocessing.JoinableQueue(2 * args.jobs)
    workers = [multiprocessing.Process(target=_worker, daemon=True, args=(
        queue, args.slide, args.size, args.overlap, args.quality)) for _ in range(args.jobs)]
    for worker in workers:
        worker.start()
    dz = DeepZoomGenerator(openslide.open_slide(args.slide), args.size, args.overlap, True)
    files = os.path.join(args.outdir, "slide_files")
    count = 0
    for level in range(dz.level_count):
        folder = os.path.join(files, str(level))
        os.makedirs(folder, exist_ok=True)
        cols, rows = dz.level_tiles[level]
        for row in range(rows):
            for col in range(cols):
                path = os.path.join(folder, f"{col}_{row}.jpeg")
                if not os.path.exists(path):
                    queue.put((level, col, row, path))
                    count += 1
    for _ in workers:
        queue.put(None)
    queue.join()
    print(f"{count} tiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
