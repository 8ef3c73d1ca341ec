"""A byte-bounded LRU of encoded tiles, per process."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from app.core.keys import TileKey


class MemoryTileCache:
    """A byte-bounded LRU of encoded tiles, per process. Event-loop only (not thread-safe).

    Each tile is kept with its ``facts``: what the caller computed once from the bytes (the
    tile service keeps its digest: SHA-256, ETag, Content-Digest; its source; and when it last
    reported an access to the disk cache's index), so that a hit hashes nothing.

    Args:
        capacity: the most bytes of tile data it holds; 0 disables it.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[TileKey, tuple[bytes, Any]] = OrderedDict()

    def get(self, key: TileKey) -> tuple[bytes, Any] | None:
        """``(bytes, facts)`` of the tile, marking it recently used; None if absent."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: TileKey, data: bytes, facts: Any) -> None:
        """Insert a tile and its facts, evicting the least recently used ones beyond
        ``capacity``."""
        if len(data) > self.capacity:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= len(old[0])
        self._items[key] = (data, facts)
        self.size += len(data)
        while self.size > self.capacity:
            _, (evicted, _facts) = self._items.popitem(last=False)
            self.size -= len(evicted)

    def discard(self, slide: str | None = None) -> None:
        """Forget every tile, or one slide's."""
        if slide is None:
            self._items.clear()
            self.size = 0
            return
        for key in [k for k in self._items if k.slide == slide]:
            self.size -= len(self._items.pop(key)[0])
