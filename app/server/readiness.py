"""Readiness: whether this process should get traffic (``GET /readyz``), apart from liveness.

A process is ready once its first round of start-up checks has finished and while each holds:
the disk cache can be written (a probe every :data:`PROBE_SECONDS`: an unnamed file created in
``TileCachePath`` and written, which leaves nothing behind), the coordination store answers
(the tile service read it within :data:`STORE_STALE_SECONDS`), and the render queue is not full
(``Server.MaxQueuedRenders``). ``/healthz`` stays liveness only: 200 while the process serves.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING

import anyio

from app.cache.disk import TEMP_PREFIX
from app.core.periodic import Periodic

if TYPE_CHECKING:
    from app.cache.tiles import TileService
    from app.settings import Settings

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0
"""How often the cache's writability is probed (and the first round's checks rerun)."""
STORE_STALE_SECONDS = 2.0
"""The coordination store counts as unreachable when not read for this long."""


class Readiness:
    """This process's readiness (see the module docstring). Event-loop only."""

    def __init__(self, settings: Settings, tiles: TileService):
        self.settings = settings
        self.tiles = tiles
        self.checked = False
        """The first round of checks has finished."""
        self.writable: bool | None = None
        """The last probe could write into the cache (None: no disk cache)."""
        self._rounds = Periodic(PROBE_SECONDS, self.check, "readiness probe")

    async def start(self) -> None:
        """Probe now (the app's start-up waits for this first round) and then every
        :data:`PROBE_SECONDS` (from the event loop)."""
        await self.check()
        self._rounds.start()

    def stop(self) -> None:
        """Stop probing."""
        self._rounds.stop()

    async def check(self) -> None:
        """One round of the checks that are probed (the cache's writability)."""
        settings = self.settings
        if settings.EnableDiskCache:
            writable = await anyio.to_thread.run_sync(
                probe_writable, settings.TileCachePath, limiter=self.tiles.io_limiter)
            if writable != self.writable and self.writable is not None:
                log.warning("tile cache %s is %swritable", settings.TileCachePath,
                            "" if writable else "not ")
            self.writable = writable
        self.checked = True

    def problems(self) -> dict[str, str]:
        """What keeps the process from being ready, by check (empty when ready)."""
        out = {}
        tiles = self.tiles
        if not self.checked:
            out["startup"] = "start-up checks are running"
        if self.writable is False:
            out["cache"] = f"the tile cache {self.settings.TileCachePath} is not " \
                           "writable"
        store = tiles.store
        if store is not None and (tiles.followed_at is None
                                  or time.monotonic() - tiles.followed_at
                                  > STORE_STALE_SECONDS):
            out["coordination"] = f"the coordination store ({store.kind}) does not answer"
        if tiles.overloaded:
            out["load"] = (f"{tiles.queued} tile loads in flight (Server.MaxQueuedRenders "
                           f"{tiles.max_queued})")
        return out


def probe_writable(root: str) -> bool:
    """Whether a file can be created and written in ``root`` (blocking). On Linux an unnamed
    file (``O_TMPFILE``), which disappears at close; elsewhere a temporary file, deleted."""
    flags = getattr(os, "O_TMPFILE", 0)
    try:
        if flags:
            try:
                fd = os.open(root, flags | os.O_WRONLY, 0o600)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    flags = 0
                else:
                    raise
        if not flags:
            path = os.path.join(root, f"{TEMP_PREFIX}{os.getpid()}-probe")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.unlink(path)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
