"""Cache key, atomic writes, unwritable caches, memory LRU and single-flight."""

import asyncio
import hashlib
import logging
import os

import pytest

from app.cache import disk as cache_module
from app.cache.disk import (
    MARKER,
    TRAILER_SIZE,
    CachedTile,
    DiskTileCache,
    check_location,
    seal,
    unseal,
    write_atomic,
)
from app.cache.flight import SingleFlight
from app.cache.memory import MemoryTileCache
from app.core.errors import ConfigError
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


def stats(cache: DiskTileCache, slide: str | None = None) -> tuple[int, int]:
    """``(tile files, bytes)`` found by walking the cache."""
    files = list(cache.walk(slide))
    return len(files), sum(size for _key, size, _mtime in files)


def key(**kw):
    values = dict(slide="s", variant="0123456789abcdef", level=12, col=3, row=4, ext="jpeg")
    values.update(kw)
    return TileKey(**values)


def test_path_layout(tmp_path):
    cache = DiskTileCache(tmp_path)
    assert cache.path_for(key()) == tmp_path / "s" / "0123456789abcdef" / "12" / "3_4.jpeg"
    with pytest.raises(ValueError):
        cache.path_for(key(slide=".."))


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    cache = DiskTileCache(tmp_path)
    assert cache.write(key(), b"tile-bytes")
    assert cache.read(key()).data == b"tile-bytes"
    assert cache.write(key(), b"replaced")
    assert cache.read(key()) == CachedTile(b"replaced", hashlib.sha256(b"replaced").digest())
    assert os.listdir(cache.path_for(key()).parent) == ["3_4.jpeg"]
    size = len(b"replaced") + TRAILER_SIZE
    assert stats(cache) == (1, size)
    assert stats(cache, "s") == (1, size)
    assert stats(cache, "other") == (0, 0)


def test_temp_files_are_not_served_or_counted(tmp_path):
    cache = DiskTileCache(tmp_path)
    folder = cache.path_for(key()).parent
    folder.mkdir(parents=True)
    (folder / ".tmp-abc").write_bytes(b"partial")  # what a killed writer leaves behind
    assert cache.read(key()) is None
    assert stats(cache) == (0, 0)


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
    assert stats(cache) == (1, 1 + TRAILER_SIZE)
    cache.clear()
    assert stats(cache) == (0, 0)
    assert os.listdir(tmp_path) == []  # the layout's folders go too, nothing else was there


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


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "empty", "no-trailer", "append"])
def test_a_damaged_cache_file_is_reported_corrupt_never_returned(tmp_path, damage):
    cache = DiskTileCache(tmp_path)
    data = bytes(range(256)) * 40
    cache.write(key(), data)
    path = cache.path_for(key())
    stored = path.read_bytes()
    assert unseal(stored) == (data, hashlib.sha256(data).digest())
    damaged = {
        "truncate": stored[:len(stored) // 2],
        "zero": b"\0" * len(stored),
        "flip": stored[:100] + bytes([stored[100] ^ 1]) + stored[101:],
        "empty": b"",
        "no-trailer": data,
        "append": stored + b"x",
    }[damage]
    path.write_bytes(damaged)
    assert cache.read(key()) == CachedTile(corrupt=True)
    assert cache.write(key(), data)  # replaced whole
    assert cache.read(key()).data == data


def test_seal_round_trip():
    assert unseal(seal(b"abc")) == (b"abc", hashlib.sha256(b"abc").digest())
    assert unseal(seal(b"abc")[:-1]) is None


def test_prepare_marks_an_empty_folder_and_refuses_a_foreign_one(tmp_path):
    cache = DiskTileCache(tmp_path / "new")
    cache.prepare()
    assert (tmp_path / "new" / MARKER).is_file()
    cache.prepare()  # idempotent
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a tile cache"):
        DiskTileCache(foreign).prepare()
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    # a cache written before markers existed (only the layout's folders) is adopted
    old = tmp_path / "old"
    DiskTileCache(old).write(key(), b"x")
    DiskTileCache(old).prepare()
    assert (old / MARKER).is_file()


def test_clear_removes_only_the_layout_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "0_0.jpeg").write_bytes(b"precious")
    root = tmp_path / "cache"
    cache = DiskTileCache(root)
    cache.prepare()
    cache.write(key(slide="a"), b"1")
    level = cache.path_for(key(slide="a")).parent
    (level / "notes.txt").write_bytes(b"not a tile")          # a foreign file in a level
    (level / "9_9.jpeg").symlink_to(outside / "0_0.jpeg")    # a link named like a tile
    (root / "b").symlink_to(outside)                         # a slide folder that is a link
    (root / "a" / "0123456789abcdef" / "13").symlink_to(outside, target_is_directory=True)
    (root / "readme").write_text("keep")
    cache.clear()
    cache.clear("b")
    assert (outside / "0_0.jpeg").read_bytes() == b"precious"
    assert (level / "notes.txt").exists() and (level / "9_9.jpeg").is_symlink()
    assert (root / "readme").exists() and (root / MARKER).exists()
    assert not cache.path_for(key(slide="a")).exists()
    assert cache.clear("..") == 0 and cache.clear("/") == 0


@pytest.mark.parametrize(("cache", "other", "relation"), [
    ("slides", "slides", "is"), ("slides/cache", "slides", "lies inside"),
    ("data", "data/slides", "contains"), ("cache", "slides", None),
])
def test_check_location(tmp_path, cache, other, relation):
    (tmp_path / other).mkdir(parents=True, exist_ok=True)
    run = lambda: check_location(tmp_path / cache, {"SlideDirectory": tmp_path / other})  # noqa: E731
    if relation is None:
        run()
    else:
        with pytest.raises(ConfigError, match=f"{relation} SlideDirectory"):
            run()
