"""The cache index: totals kept by the cache, shared by processes, rebuilt from the files."""

import multiprocessing
import os
import sqlite3

import pytest

from app.cache.disk import DiskTileCache
from app.cache.index import CacheIndex, VariantOrigin
from app.core.keys import TileKey

ORIGIN = VariantOrigin("quickhash-1:ab;size=1;mtime_ns=2", "jpeg-q90", "g" * 16)


def key(**kw) -> TileKey:
    values = dict(slide="s", variant="0123456789abcdef", level=3, col=1, row=2, ext="jpeg")
    values.update(kw)
    return TileKey(**values)


@pytest.fixture
def cache(tmp_path):
    index = CacheIndex(tmp_path, flush_seconds=60)  # flushed by reads, not by time
    assert index.open() is True  # new: needs a rebuild
    cache = DiskTileCache(tmp_path, True, index)
    cache.prepare()
    yield cache
    index.close()


def totals(cache, slide="s"):
    counts = cache.index.levels(slide).get(slide, [])
    return sum(c.tiles for c in counts), sum(c.bytes for c in counts)


def test_writes_reads_and_deletes_keep_the_totals(cache):
    cache.write(key(col=1), b"a" * 100, origin=ORIGIN)
    cache.write(key(col=2), b"b" * 50, origin=ORIGIN)
    cache.write(key(col=2), b"b" * 70, origin=ORIGIN)  # replaced: counted once, new size
    cache.write(key(slide="t"), b"c", origin=ORIGIN)
    tiles, size = totals(cache)
    assert tiles == 2 and size == sum(os.path.getsize(cache.path_for(key(col=c))) for c in (1, 2))
    (count,) = cache.index.levels("s")["s"]
    assert count.origin == ORIGIN and (count.variant, count.level) == ("0123456789abcdef", 3)
    cache.read(key(col=1))
    cache.path_for(key(col=1)).write_bytes(b"damaged")
    assert cache.read(key(col=1)).corrupt
    assert cache.index.counter("corrupt") == 1
    cache.clear("s")
    assert totals(cache) == (0, 0) and totals(cache, "t")[0] == 1
    cache.clear()
    assert cache.index.levels() == {}


def test_rebuild_from_files_matches_what_was_written(cache, tmp_path):
    for col in range(5):
        cache.write(key(col=col), bytes(col + 1), origin=ORIGIN)
    before = totals(cache)
    with sqlite3.connect(cache.index.path) as db:  # the tile rows lost, the files still there
        db.execute("DELETE FROM tiles")
    assert totals(cache) == (0, 0)
    assert cache.rebuild_index() == 5
    assert totals(cache) == before
    assert cache.index.levels("s")["s"][0].origin == ORIGIN  # the variant's origin is kept


def _writer(root: str, slide: str, n: int) -> None:
    index = CacheIndex(root)
    index.open()
    cache = DiskTileCache(root, True, index)
    for col in range(n):
        cache.write(key(slide=slide, col=col), b"x" * 10, origin=ORIGIN)
    index.close()


def test_processes_share_one_index(cache, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"p{i}", 300)) for i in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    for i in range(3):
        assert totals(cache, f"p{i}")[0] == 300
