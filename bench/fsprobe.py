"""File-system effects between benchmark runs: ext4's inode reuse, file-creation cost, clean-up.

Deleting many tile files makes the next file creations dearer on ext4 without a journal, a cost
of the benchmark's own clean-up, not of the server under test. So tile caches of finished
scenarios are kept until the run is over (:class:`SpentCaches`), the time of that deletion is
noted (:func:`note_deletion`), the next run waits out the window in which ext4 will not reuse
those inodes (:func:`wait_for_inode_reuse`), and cold scenarios first time one file creation
(:func:`file_create_probe`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType

from app.cache.disk import write_atomic
from bench import RESULTS_DIR, console

DELETED_AT = RESULTS_DIR / ".caches-deleted-at"
"""When the last run deleted its tile caches (seconds since the epoch)."""
INODE_REUSE_SECONDS = 305
"""ext4 without a journal reuses no inode freed less than 60 s ago whose inode table block is
written back, 300 s while the block is dirty (``RECENTCY_MIN``, ``RECENTCY_DIRTY`` in Linux
fs/ext4/ialloc.c, ``recently_deleted``); new files land in the same blocks and dirty them
again, so in practice 300 s (measured: still 490 µs per file 70 s after a ``sync``); 5 s of
margin."""
PROBE_FILES = 200
SLOW_CREATE_US = 150.0
"""A file creation dearer than this (µs, :func:`file_create_probe`) gets a warning."""


class SpentCaches:
    """Folders (tile caches of finished scenarios, probe files) kept until the whole run is
    over, then deleted; ``with SpentCaches() as spent:`` deletes them on exit."""

    def __init__(self) -> None:
        self._folders: list[Path] = []

    def __enter__(self) -> SpentCaches:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.delete_all()

    def folder(self, prefix: str, parent: Path | None = None) -> Path:
        """A fresh empty folder (``tempfile.mkdtemp``) in ``parent`` (default: the temporary
        folder), already retired: it is deleted with the others when the run is over."""
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.retire(folder)
        return folder

    def retire(self, folder: Path) -> None:
        """Keep a finished scenario's tile cache until the run is over, then delete it.

        Deleting a scenario's ~10,000 tile files right away made the next scenario's file
        creation 10x dearer on this VM (ext4 without a journal: inode allocation skips, one by
        one, every inode freed in the last 1-5 minutes; ``recently_deleted()`` in Linux's
        fs/ext4/ialloc.c, which ``perf`` showed at the top of the server's kernel time), a cost
        of the benchmark's own clean-up, not of the server under test.
        """
        self._folders.append(folder)

    def delete_all(self) -> None:
        """Delete every retired folder (end of the run), and note when, for the next run
        (:func:`wait_for_inode_reuse`)."""
        deleted = bool(self._folders)
        while self._folders:
            shutil.rmtree(self._folders.pop(), ignore_errors=True)
        if deleted:
            note_deletion()


def note_deletion() -> None:
    """Note that a benchmark deleted its tile files now (:func:`wait_for_inode_reuse`)."""
    DELETED_AT.parent.mkdir(parents=True, exist_ok=True)
    DELETED_AT.write_text(f"{time.time():.0f}\n")


def ext4_without_journal(path: Path) -> bool:
    """Whether ``path`` is on an ext4 file system mounted without a journal, where inode
    allocation skips, one by one, every inode freed in the last minutes (Linux
    fs/ext4/ialloc.c, ``find_inode_bit`` and ``recently_deleted``; with a journal it does
    not). Reads ``/proc/self/mountinfo`` and ``/sys/fs/ext4/<device>/journal_task``."""
    try:
        dev = os.stat(path).st_dev
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                rest = fields[fields.index("-") + 1:]
                if fields[2] == wanted and rest[0] == "ext4":
                    task = Path("/sys/fs/ext4", os.path.basename(rest[1]), "journal_task")
                    return task.read_text().strip() == "<none>"
    except (OSError, ValueError, IndexError):
        pass
    return False


def wait_for_inode_reuse(parent: Path) -> None:
    """Before a run: write the page cache back, and when the last run's clean-up deleted its
    tile caches less than :data:`INODE_REUSE_SECONDS` ago on an ext4 without a journal, wait
    for the rest of that window. Otherwise every file the cold scenarios create pays for
    scanning past the ~100,000 inodes that clean-up freed (perf: ``recently_deleted`` and
    ``find_get_block_common`` at the top of the server's kernel time; 1,360-1,575 cold JPEG
    tiles/s right after a run against 1,750-2,340 later)."""
    os.sync()
    try:
        deleted_at = float(DELETED_AT.read_text())
    except (OSError, ValueError):
        return
    left = deleted_at + INODE_REUSE_SECONDS - time.time()
    if left > 0 and ext4_without_journal(parent):
        console.print(f"[yellow]the last run deleted its tile caches "
                      f"{INODE_REUSE_SECONDS - left:.0f} s ago on an ext4 without a journal, "
                      f"which reuses no freed inode for {INODE_REUSE_SECONDS} s and makes "
                      f"every file creation scan past them: waiting {left:.0f} s[/]")
        time.sleep(left)


def file_create_probe(parent: Path, spent: SpentCaches, count: int = PROBE_FILES) -> float:
    """Microseconds (wall) to create one tile-sized file as the cache does
    (:func:`app.cache.disk.write_atomic`), over ``count`` files in a fresh folder of ``parent``.

    The cold scenarios create one file per tile; this says what that costs on the file system
    at the start of the scenario (6-60 µs on a quiet disk here, up to 700 µs on this VM's ext4
    in the minutes after many files were deleted: :meth:`SpentCaches.retire`). The files stay
    until the run is over (``spent``).
    """
    folder = spent.folder("create-probe-", parent)
    data = os.urandom(8 * 1024)
    start = time.perf_counter()
    for i in range(count):
        write_atomic(folder / f"{i}.jpeg", data)
    elapsed = time.perf_counter() - start
    return 1e6 * elapsed / count
