"""Tile caches and the tile service: the disk cache shared by processes, the memory LRU,
single-flight, and :class:`app.cache.tiles.TileService` that reads through them or renders."""
