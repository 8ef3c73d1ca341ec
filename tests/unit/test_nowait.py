"""Reads that never wait for the disk (app.core.nowait), on this machine's kernel and file
systems."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import time

import pytest

from app.core import nowait
from app.core.nowait import open_cached, pread_nowait, read_cached


def file_system(path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    best = max((m for m in mounts if str(path).startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]))
    return best[1]


def test_a_file_just_written_is_opened_and_read_from_memory(tmp_path):
    path = tmp_path / "tile.jpeg"
    path.write_bytes(b"x" * 20_000)
    fd = open_cached(str(path))
    try:
        if file_system(tmp_path) == "tmpfs":  # no RWF_NOWAIT there: read in a thread
            with pytest.raises(BlockingIOError):
                pread_nowait(fd, 20_000, 0)
            return
        assert pread_nowait(fd, 20_000, 0) == b"x" * 20_000
        with pytest.raises(BlockingIOError):  # past the end: not all there
            pread_nowait(fd, 30_000, 0)
    finally:
        os.close(fd)


def test_names_the_dentry_cache_cannot_answer_would_block(tmp_path):
    with pytest.raises(BlockingIOError):  # never looked up: the directory must be read
        open_cached(str(tmp_path / "never-looked-up.jpeg"))
    with pytest.raises(FileNotFoundError):
        (tmp_path / "looked-up.jpeg").stat()
    # a lookup leaves a negative dentry, so the name is known absent; tmpfs keeps none
    expected = BlockingIOError if file_system(tmp_path) == "tmpfs" else FileNotFoundError
    with pytest.raises(expected):
        open_cached(str(tmp_path / "looked-up.jpeg"))


def test_file_systems_that_cannot_tell_would_block(monkeypatch, tmp_path):
    """tmpfs answers RWF_NOWAIT with EOPNOTSUPP: that means "read it in a thread", not an
    unreadable file."""
    path = tmp_path / "tile.jpeg"
    path.write_bytes(b"y" * 100)

    def unsupported(*args):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(nowait, "_preadv2", unsupported)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            pread_nowait(fd, 100, 0)
    finally:
        os.close(fd)


def test_a_kernel_without_resolve_cached_would_block(monkeypatch, tmp_path):
    path = tmp_path / "tile.jpeg"
    path.write_bytes(b"z")
    monkeypatch.setattr(nowait, "_openat2", None)
    with pytest.raises(BlockingIOError):
        open_cached(str(path))


def _other_thread_runs_during(calls) -> int:
    """How often another thread ran while ``calls`` ran: with the switch interval made huge,
    it runs only when this thread releases the GIL."""
    ran = 0
    stop = False

    def other() -> None:
        nonlocal ran
        while not stop:
            ran += 1
            time.sleep(0)  # hands the GIL back at once

    interval = sys.getswitchinterval()
    thread = threading.Thread(target=other)
    thread.start()
    try:
        while ran == 0:
            time.sleep(0.001)
        sys.setswitchinterval(1000.0)
        before = ran
        calls()
        return ran - before
    finally:
        sys.setswitchinterval(interval)
        stop = True
        thread.join()


def test_the_event_loop_calls_keep_the_gil(tmp_path):
    """The event loop must not hand the GIL to a render thread for these calls: getting it
    back can take up to the switch interval (5 ms) each, which under a flood of refused
    requests stalls the loop for tens of milliseconds."""
    absent = str(tmp_path / "absent.jpeg")
    present = tmp_path / "tile.jpeg"
    present.write_bytes(b"t" * 5000)
    readable = file_system(tmp_path) != "tmpfs"

    def lookups() -> None:
        for _ in range(2000):
            try:
                open_cached(absent)
            except (BlockingIOError, FileNotFoundError):
                pass

    def reads() -> None:
        for _ in range(2000):
            try:
                assert read_cached(str(present)) == b"t" * 5000
            except BlockingIOError:
                assert not readable

    assert _other_thread_runs_during(lookups) <= 2
    assert _other_thread_runs_during(reads) <= 2
    # the instrument: os.pread releases the GIL, and the other thread runs
    big = tmp_path / "big"
    big.write_bytes(bytes(1 << 22))
    fd = os.open(big, os.O_RDONLY)
    try:
        assert _other_thread_runs_during(
            lambda: [os.pread(fd, 1 << 22, 0) for _ in range(100)]) > 10
    finally:
        os.close(fd)
