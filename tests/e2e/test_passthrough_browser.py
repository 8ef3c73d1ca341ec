"""Original (passthrough) tiles show the right colours in a real browser.

A live server with ``DeepZoom.Geometry`` aligned serves an Aperio SVS stored as YCbCr, one stored
as bare RGB (no Adobe marker, component IDs 0, 1, 2: the tiles that show pink when a decoder
guesses) and a generic tiled TIFF. Headless Debian chromium loads original tiles into a canvas;
their pixels must be OpenSlide's. The same RGB scan without the colour marker, loaded the same way,
must come out wrong: proof that the check can fail.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import openslide
import pytest
from playwright.sync_api import Page, sync_playwright

from app.core.native import ADOBE_RGB
from app.tools.demo import write_aperio_svs, write_generic_tiff
from tests.conftest import LiveServer, start_server, stop_server
from tests.e2e.test_browser import CHROMIUM_ARGS, _chromium_path

PIXELS_JS = """async (url) => {
  const img = new Image();
  img.crossOrigin = "anonymous";
  img.src = url;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  // the RGBA bytes as base64: a JSON array of 230,400 numbers takes seconds to pass over
  let text = "";
  for (let i = 0; i < data.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
  }
  return [canvas.width, canvas.height, btoa(text)];
}"""


@pytest.fixture(scope="module")
def aligned_server(tmp_path_factory) -> Iterator[LiveServer]:
    """A live server (aligned geometry, all levels JPEG) over three generated slides."""
    tmp = tmp_path_factory.mktemp("aligned")
    folder = tmp_path_factory.mktemp("aligned-slides")
    slides = {
        "ycbcr": write_aperio_svs(folder / "ycbcr.svs", 2000, 1500, seed=4),
        "rgb": write_aperio_svs(folder / "rgb.svs", 2000, 1500, photometric="rgb", app14=False,
                                seed=4),
        "tiff": write_generic_tiff(folder / "generic.tiff", 2000, 1500, seed=4),
    }
    server = start_server(tmp, {
        "TileCachePath": str(tmp / "cache"),
        "Images": [{"Name": name, "Path": str(path)} for name, path in slides.items()],
        "DeepZoom": {"Geometry": "aligned"},
        "TileFormat": {"LosslessLevelCount": 0},
    })
    server.extra["slides"] = slides
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def page(aligned_server) -> Iterator[Page]:
    """A chromium page on the server's origin."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(aligned_server.base_url + "/healthz")
        yield page
        browser.close()


def _browser_pixels(page: Page, url: str) -> np.ndarray:
    width, height, data = page.evaluate(PIXELS_JS, url)
    rgba = np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3].astype(int)


@pytest.mark.parametrize("name", ["ycbcr", "rgb", "tiff"])
def test_original_tiles_show_openslide_colours(aligned_server, page, name):
    path = aligned_server.extra["slides"][name]
    slide = openslide.OpenSlide(path)
    size = int(slide.properties["openslide.level[0].tile-width"])
    info = aligned_server.get(f"/api/slides/{name}").json()
    top = info["level_count"] - 1
    for col, row in ((1, 1), (2, 3), (4, 2)):
        url = f"/storage/{name}_files/{top}/{col}_{row}.jpeg"
        response = aligned_server.get(url)
        assert response.headers["x-tile-source"] == "original", url
        theirs = np.asarray(slide.read_region((col * size, row * size), 0, (size, size)))
        shown = _browser_pixels(page, aligned_server.base_url + url)
        diff = np.abs(shown - theirs[..., :3].astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 8, f"{url}: colours differ {diff.mean():.2f}"


def test_bare_rgb_scan_without_the_marker_shows_pink(aligned_server, page):
    """The check above can fail: the same bytes minus the Adobe marker render wrongly."""
    slide = openslide.OpenSlide(aligned_server.extra["slides"]["rgb"])
    top = aligned_server.get("/api/slides/rgb").json()["level_count"] - 1
    served = aligned_server.get(f"/storage/rgb_files/{top}/1_1.jpeg").content
    assert ADOBE_RGB in served
    guessed = served.replace(ADOBE_RGB, b"", 1)
    url = "data:image/jpeg;base64," + base64.b64encode(guessed).decode()
    theirs = np.asarray(slide.read_region((240, 240), 0, (240, 240)))[..., :3].astype(int)
    assert np.abs(_browser_pixels(page, url) - theirs).mean() > 10
