"""File reads that never wait for the disk, so that the event loop may make them.

A tile that is already in memory (the page cache, the dentry cache) can be answered on the event
loop for the price of a few system calls; one that is not must go to a worker thread. Linux
tells the two apart without waiting:

- :func:`pread_nowait`: ``preadv2`` with ``RWF_NOWAIT`` (Linux 4.14) reads only what is in the
  page cache;
- :func:`open_cached`: ``openat2`` with ``RESOLVE_CACHED`` (Linux 5.12) resolves a path only
  from the dentry cache.

Both raise :class:`BlockingIOError` when the answer would need the disk, and also where the
kernel or the file system cannot tell (tmpfs answers ``RWF_NOWAIT`` with ``EOPNOTSUPP``; other
platforms have neither call): the caller then does the blocking call in a worker thread. The
promise is not to wait, not to refuse: a refused ``RWF_NOWAIT`` read starts the readahead of
what it lacks, and on a fast disk the same read may find that done and succeed.

These calls keep the GIL (libc through :class:`ctypes.PyDLL`, not :mod:`os`, whose calls
release it). They return in microseconds by construction, and a thread that releases the GIL
under load gets it back only when the thread that took it lets go: up to the switch interval
(5 ms) when a render thread runs Python code. The event loop making one such call per refused
request then stalls for tens of milliseconds under a flood (docs/benchmarks.md, "Overload").
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Any

NOWAIT = getattr(os, "RWF_NOWAIT", 0)
"""``preadv`` flag: fail instead of waiting for the disk (0: not on this platform)."""

_SYS_OPENAT2 = 437  # one number on every Linux architecture (the unified table of Linux 5.6)
_RESOLVE_CACHED = 0x20
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class _OpenHow(ctypes.Structure):
    """``struct open_how`` of ``openat2(2)``."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _IoVec(ctypes.Structure):
    """``struct iovec`` of ``preadv2(2)``."""

    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _libc(name: str, restype: Any, *argtypes: Any) -> Any:
    """A function of the C library that keeps the GIL while it runs, or None (not Linux, or
    not in this C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.restype = restype
    if argtypes:
        function.argtypes = argtypes
    return function


_openat2 = _libc("syscall", ctypes.c_long)
_preadv2 = _libc("preadv2", ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_IoVec),
                 ctypes.c_int, ctypes.c_int64, ctypes.c_int) if NOWAIT else None
_lseek = _libc("lseek64", ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int)
_close = _libc("close", ctypes.c_int, ctypes.c_int)
# the arguments that never change, made once (a refused tile looks its file up on every try)
_NUMBER = ctypes.c_long(_SYS_OPENAT2)
_WHERE = ctypes.c_long(_AT_FDCWD)
_HOW = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
_HOW_REF = ctypes.byref(_HOW)
_HOW_SIZE = ctypes.c_long(ctypes.sizeof(_HOW))


def open_cached(path: str) -> int:
    """Open ``path`` read-only if its lookup needs nothing but the dentry cache.

    Returns:
        A file descriptor (the caller closes it).

    Raises:
        FileNotFoundError: the dentry cache knows the file does not exist.
        BlockingIOError: the lookup would read a directory from the disk, or this kernel or
            platform has no ``openat2`` with ``RESOLVE_CACHED`` (then every later call raises
            it at once).
        OSError: any other error of the open (permissions, ...).
    """
    global _openat2
    if _openat2 is None:
        raise BlockingIOError("no openat2 RESOLVE_CACHED here")
    # syscall(2) is variadic and reads every argument as a long: give it longs, not ints
    fd = _openat2(_NUMBER, _WHERE, os.fsencode(path), _HOW_REF, _HOW_SIZE)
    if fd >= 0:
        return int(fd)
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        _openat2 = None
        raise BlockingIOError("no openat2 RESOLVE_CACHED here")
    if code == errno.EAGAIN:
        raise BlockingIOError("the path is not all in the dentry cache")
    raise OSError(code, os.strerror(code), path)


def _preadv(fd: int, buffer: bytearray, offset: int) -> int:
    """``preadv2(fd, [buffer], offset, RWF_NOWAIT)``, keeping the GIL where the C library
    has it (else :func:`os.preadv`, which releases it). Returns the bytes read.

    Raises:
        OSError: its errno (``EAGAIN``: :class:`BlockingIOError`).
    """
    if _preadv2 is None:
        return os.preadv(fd, (buffer,), offset, NOWAIT)
    view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    read: int = _preadv2(fd, ctypes.byref(_IoVec(ctypes.addressof(view), len(buffer))), 1,
                         offset, NOWAIT)
    if read < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return read


def pread_nowait(fd: int, count: int, offset: int) -> bytes:
    """``count`` bytes of ``fd`` at ``offset``, if they are all in the page cache.

    Raises:
        BlockingIOError: some of them are not, or the file system or platform cannot tell.
        OSError: the read failed.
    """
    if not NOWAIT:
        raise BlockingIOError("no RWF_NOWAIT on this platform")
    buffer = bytearray(count)
    try:
        read = _preadv(fd, buffer, offset)
    except OSError as exc:  # EAGAIN is a BlockingIOError already
        if exc.errno in _UNSUPPORTED:
            raise BlockingIOError(f"no RWF_NOWAIT on this file system ({exc.strerror})") \
                from None
        raise
    if read != count:
        raise BlockingIOError("partly in the page cache")
    return bytes(buffer)


def read_cached(path: str) -> bytes:
    """The whole file at ``path``, if its lookup needs only the dentry cache and its bytes are
    all in the page cache (:func:`open_cached`, then :func:`pread_nowait`; its size and its
    close keep the GIL too).

    Raises:
        FileNotFoundError, BlockingIOError, OSError: as :func:`open_cached` and
            :func:`pread_nowait`.
    """
    fd = open_cached(path)
    try:
        size = _lseek(fd, 0, os.SEEK_END) if _lseek is not None else os.fstat(fd).st_size
        if size < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return pread_nowait(fd, size, 0)
    finally:
        _close(fd)  # there whenever open_cached is; read-only: no error worth raising
