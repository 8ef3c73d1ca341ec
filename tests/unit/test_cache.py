"""Cache key, atomic writes, unwritable caches, memory LRU and single-flight."""

import asyncio
import logging
import os

import pytest

from app.cache import disk as cache_module
from app.cache.disk import DiskTileCache, write_atomic
from app.cache.flight import SingleFlight
from app.cache.memory import MemoryTileCache
from app.core.keys import TileKey, variant_of

BASE = dict(slide_identity="quickhash-1:abc", tile_size=254, overlap=1, limit_bounds=True,
            encoding_key="jpeg-q90")


@pytest.mark.parametrize(("field", "value"), [
    ("slide_identity", "quickhash-1:abd"), ("slide_identity", "stat:100:200"),
    ("tile_size", 256), ("overlap", 0), ("limit_bounds", False),
    ("encoding_key", "jpeg-q80"), ("encoding_key", "png-lossless-z1"),
])
def test_variant_changes_with_everything_that_changes_bytes(field, value):
    assert variant_of(**{**BASE, field: value}) != variant_of(**BASE)


def test_variant_is_stable_and_short():
    assert variant_of(**BASE) == variant_of(**BASE)
    assert len(variant_of(**BASE)) == 16


def key(**kw):
    values = dict(slide="s", variant="v" * 16, level=12, col=3, row=4, ext="jpeg")
    values.update(kw)
    return TileKey(**values)


def test_path_layout(tmp_path):
    cache = DiskTileCache(tmp_path)
    assert cache.path_for(key()) == tmp_path / "s" / ("v" * 16) / "12" / "3_4.jpeg"


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    cache = DiskTileCache(tmp_path)
    assert cache.write(key(), b"tile-bytes")
    assert cache.read(key()) == b"tile-bytes"
    assert cache.write(key(), b"replaced")
    assert cache.read(key()) == b"replaced"
    assert os.listdir(cache.path_for(key()).parent) == ["3_4.jpeg"]
    assert cache.stats() == (1, len(b"replaced"))
    assert cache.stats("s") == (1, len(b"replaced"))
    assert cache.stats("other") == (0, 0)


def test_temp_files_are_not_served_or_counted(tmp_path):
    cache = DiskTileCache(tmp_path)
    folder = cache.path_for(key()).parent
    folder.mkdir(parents=True)
    (folder / ".tmp-abc").write_bytes(b"partial")  # what a killed writer leaves behind
    assert cache.read(key()) is None
    assert cache.stats() == (0, 0)


def test_read_only_cache_still_serves(tmp_path, caplog):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        cache = DiskTileCache(root)
        with caplog.at_level(logging.WARNING):
            ok = cache.write(key(), b"x")
        if os.geteuid() == 0:  # root ignores permissions: use a path under a file instead
            cache = DiskTileCache(tmp_path / "file")
            (tmp_path / "file").write_bytes(b"")
            with caplog.at_level(logging.WARNING):
                ok = cache.write(key(), b"x")
        assert ok is False
        assert "not writable" in caplog.text
        assert cache.read(key()) is None
    finally:
        root.chmod(0o755)


def test_disabled_cache(tmp_path):
    cache = DiskTileCache(tmp_path, enabled=False)
    assert cache.write(key(), b"x") is False
    assert cache.read(key()) is None
    assert not any(tmp_path.iterdir())


def test_clear(tmp_path):
    cache = DiskTileCache(tmp_path)
    cache.write(key(slide="a"), b"1")
    cache.write(key(slide="b"), b"2")
    cache.clear("a")
    assert cache.stats() == (1, 1)
    cache.clear()
    assert cache.stats() == (0, 0)


def test_memory_lru_evicts_by_bytes():
    mem = MemoryTileCache(10)
    mem.put(key(col=1), b"aaaa", "e1")
    mem.put(key(col=2), b"bbbb", "e2")
    assert mem.get(key(col=1)) == (b"aaaa", "e1")  # now most recent
    mem.put(key(col=3), b"cccc", "e3")            # evicts col=2
    assert mem.get(key(col=2)) is None
    assert mem.get(key(col=1)) is not None and mem.get(key(col=3)) is not None
    assert mem.size == 8
    mem.put(key(col=4), b"x" * 11, "big")         # larger than capacity: not kept
    assert mem.get(key(col=4)) is None
    mem.discard("s")
    assert mem.size == 0


def test_single_flight_runs_once_and_shares_errors():
    calls = 0

    async def main():
        nonlocal calls
        flight = SingleFlight()

        async def compute():
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return calls

        results = await asyncio.gather(*(flight.run("k", compute) for _ in range(20)))
        assert results == [1] * 20 and flight.in_flight == 0

        async def fail():
            await asyncio.sleep(0.01)
            raise ValueError("boom")

        outcomes = await asyncio.gather(*(flight.run("e", fail) for _ in range(3)),
                                        return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)
        # a cancelled waiter does not cancel the computation for the others
        first = asyncio.ensure_future(flight.run("c", compute))
        second = asyncio.ensure_future(flight.run("c", compute))
        await asyncio.sleep(0.01)
        first.cancel()
        assert await second == 2

    asyncio.run(main())
    assert calls == 2


def test_write_atomic_links_an_unnamed_file(tmp_path, monkeypatch):
    """Linux: the bytes go to an O_TMPFILE file linked into place; no name ever holds part."""
    target = tmp_path / "a" / "b" / "1_2.jpeg"

    def no_rename(*args):
        raise AssertionError("a new file must not go through a temporary name")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", no_rename)
        write_atomic(target, b"first")  # makes the missing folders
    assert target.read_bytes() == b"first"
    inode = target.stat().st_ino
    write_atomic(str(target), b"second, longer")  # an existing file is replaced
    assert target.read_bytes() == b"second, longer"
    assert target.stat().st_ino != inode
    assert os.listdir(target.parent) == ["1_2.jpeg"]


def test_write_atomic_without_o_tmpfile(tmp_path, monkeypatch):
    """Platforms without O_TMPFILE take the temporary-name path: same result, no leftovers."""
    monkeypatch.setattr(cache_module, "_TMPFILE", 0)
    target = tmp_path / "x" / "3_4.png"
    write_atomic(target, b"png bytes")
    write_atomic(target, b"replaced")
    assert target.read_bytes() == b"replaced"
    assert os.listdir(target.parent) == ["3_4.png"]


def test_write_atomic_failure_leaves_nothing(tmp_path):
    """A write the disk refuses raises, and leaves neither the file nor a temporary one."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "file" / "sub" / "0_0.jpeg", b"x")  # a folder under a file
    assert os.listdir(tmp_path) == ["file"]
