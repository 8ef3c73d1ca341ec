"""``make bench``: HTTP load benchmark of the tile server against openslide's deepzoom_server."""
