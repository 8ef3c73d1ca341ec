"""How long the cache statistics take with a million cached tiles.

``python -m bench.cache_stats [--tiles N] [--requests N]``: starts ``tileserver serve`` (2 workers)
on the benchmark slide with a fresh cache, renders one tile (so the current variant is known),
then adds ``N`` tile rows to the cache index (the totals are kept by triggers, as for real
writes; no tile files are created, since the statistics never look at them), and times
``GET /api/images``, ``/api/tiles/stats`` and ``/api/tiles/{name}/stats`` over HTTP: median and
95th percentile of ``--requests`` calls each. The issue's target: under 50 ms.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from app.cache.index import INDEX_NAME
from bench import console
from bench.servers import ours
from bench.slide import SLIDE_NAME, SLIDE_SIZE, ensure_slide

ROUTES = ("/api/images", "/api/tiles/stats", f"/api/tiles/{SLIDE_NAME}/stats")


def add_rows(cache: Path, tiles: int) -> None:
    """Add ``tiles`` rows to the index under the variant the server already wrote."""
    with sqlite3.connect(cache / INDEX_NAME, timeout=30) as db:
        slide, variant = db.execute("SELECT slide, variant FROM tiles LIMIT 1").fetchone()
        rows = ((slide, variant, 5 + i % 12, i, 1_000_000, "jpeg", 15_000, float(i))
                for i in range(tiles))
        db.executemany("INSERT OR IGNORE INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print one line per route."""
    parser = argparse.ArgumentParser(prog="python -m bench.cache_stats", description=__doc__)
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args(argv)
    slide = ensure_slide(*SLIDE_SIZE)
    with tempfile.TemporaryDirectory(prefix="bench-cache-stats-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        with ours(slide, work, cache, 2, "cache-stats") as server:
            base = f"http://127.0.0.1:{server.port}"
            assert httpx.get(f"{base}/storage/{SLIDE_NAME}_files/10/0_0.jpeg").status_code == 200
            time.sleep(0.5)  # the writer thread flushes its first rows
            started = time.monotonic()
            add_rows(cache, args.tiles)
            console.print(f"{args.tiles:,} index rows added in {time.monotonic() - started:.1f} s")
            with httpx.Client(base_url=base, timeout=30) as client:
                stats = client.get("/api/tiles/stats").json()
                console.print(f"cachedTiles {stats['cachedTiles']:,}, "
                              f"cacheSizeBytes {stats['cacheSizeBytes']:,}")
                for route in ROUTES:
                    times = []
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        assert client.get(route).status_code == 200
                        times.append((time.perf_counter() - t0) * 1000)
                    p95 = statistics.quantiles(times, n=20)[-1]
                    console.print(f"{route:32} median {statistics.median(times):6.1f} ms   "
                                  f"p95 {p95:6.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
