"""The baseline of ``make bench``: what openslide-python's ``examples/deepzoom/deepzoom_server.py``
does for one slide, as a Flask app for gunicorn.

At import: ``OpenSlide(path)`` and ``DeepZoomGenerator(slide, tile_size=254, overlap=1,
limit_bounds=True)``. Per tile request: ``dz.get_tile(level, (col, row))``, then
``PIL.Image.save(buf, format, quality=90)`` (``format`` is ``jpeg`` or ``png``; PNG ignores
``quality`` and uses Pillow's default compression). No cache of any kind: every request renders.

Run (the slide path comes from ``BENCH_SLIDE``)::

    BENCH_SLIDE=bench/data/bench-32000x24000.svs \
        gunicorn -w 2 --threads 4 -b 127.0.0.1:8000 bench.baseline_server:app
"""

from __future__ import annotations

import os
from io import BytesIO

from flask import Flask, abort, make_response
from flask.typing import ResponseReturnValue
from openslide import OpenSlide
from openslide.deepzoom import DeepZoomGenerator

SLIDE_ENV = "BENCH_SLIDE"
TILE_SIZE = 254
OVERLAP = 1
LIMIT_BOUNDS = True
TILE_QUALITY = 90
SLIDE_NAME = "slide"

app = Flask(__name__)
slide = OpenSlide(os.environ[SLIDE_ENV])
dz = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=LIMIT_BOUNDS)


@app.route(f"/{SLIDE_NAME}.dzi")
def dzi() -> ResponseReturnValue:
    """The DZI XML of the slide (JPEG declared), as ``deepzoom_server.py`` serves it."""
    resp = make_response(dz.get_dzi("jpeg"))
    resp.mimetype = "application/xml"
    return resp


@app.route(f"/{SLIDE_NAME}_files/<int:level>/<int:col>_<int:row>.<format>")
def tile(level: int, col: int, row: int, format: str) -> ResponseReturnValue:
    """Render one tile: ``DeepZoomGenerator.get_tile`` then ``PIL.Image.save``."""
    format = format.lower()
    if format != "jpeg" and format != "png":
        abort(404)  # not supported by Deep Zoom
    try:
        image = dz.get_tile(level, (col, row))
    except ValueError:
        abort(404)  # invalid level or coordinates
    buf = BytesIO()
    image.save(buf, format, quality=TILE_QUALITY)
    resp = make_response(buf.getvalue())
    resp.mimetype = f"image/{format}"
    return resp
