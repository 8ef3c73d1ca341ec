"""End to end: the viewer and index pages in a real browser against a live tile server.

Drives Debian's chromium (``/usr/bin/chromium``, or ``$CHROMIUM_PATH``) through Playwright for
Python; no browser is ever downloaded. The ``live_server`` fixture (``tests/conftest.py``) runs
``tileserver serve`` under uvicorn and exposes ``.base_url`` and ``.slide_names``.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import Browser, ConsoleMessage, Page, Response, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 20_000
MIN_TILES = 4
# A channel must differ from the background by more than this to count as drawn.
BACKGROUND_TOLERANCE = 10
MIN_DRAWN_FRACTION = 0.2
MIN_LUMA_STDDEV = 2.0
MIN_DISTINCT_COLOURS = 16


def _chromium_path() -> str:
    """Return Debian's chromium executable; fail (never skip, never download) when absent."""
    candidates = [os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("chromium not found: install Debian's `chromium` package (or set CHROMIUM_PATH)")


@dataclass
class PageLog:
    """Everything a page reported that a clean page load should not produce."""

    console_errors: list[str] = field(default_factory=list)
    console_warnings: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        """Record console errors and warnings with their source location."""
        loc = message.location
        text = f"{message.text} ({loc.get('url', '')}:{loc.get('lineNumber', '')})"
        if message.type == "error":
            self.console_errors.append(text)
        elif message.type == "warning":
            self.console_warnings.append(text)

    def on_response(self, response: Response) -> None:
        """Record HTTP error responses (they usually explain a console error)."""
        if response.status >= 400:
            self.bad_responses.append(f"{response.status} {response.url}")

    def summary(self) -> str:
        """Describe everything recorded, for assertion messages."""
        return (
            f"console errors: {self.console_errors}\n"
            f"console warnings: {self.console_warnings}\n"
            f"page errors: {self.page_errors}\n"
            f"HTTP >= 400: {self.bad_responses}\n"
            f"failed requests: {self.failed_requests}"
        )

    def on_request_failed(self, request) -> None:
        """Record failed requests, except tile loads the viewer itself cancelled: OpenSeadragon
        aborts the image jobs of tiles it no longer needs after a zoom (``net::ERR_ABORTED``)."""
        if request.failure == "net::ERR_ABORTED" and "_files/" in request.url:
            return
        self.failed_requests.append(f"{request.failure} {request.url}")

    def assert_clean(self) -> None:
        """Fail on any console error, uncaught page error or failed request."""
        assert not self.console_errors, self.summary()
        assert not self.page_errors, self.summary()
        assert not self.failed_requests, self.summary()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Debian chromium for the module."""
    executable = _chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page_and_log(browser: Browser) -> Iterator[tuple[Page, PageLog]]:
    """A fresh page (1280x800 CSS px, device scale 1) with its console and network log."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog()
    page.on("console", log.on_console)
    page.on("pageerror", lambda error: log.page_errors.append(str(error)))
    page.on("response", log.on_response)
    page.on("requestfailed", log.on_request_failed)
    try:
        yield page, log
    finally:
        context.close()


def _slide_url(base_url: str, name: str) -> str:
    return f"{base_url}/slide/{quote(name)}.html"


def _wait_for_viewer(page: Page, log: PageLog) -> None:
    """Wait for tiles, the legend and a fully drawn, settled image."""
    try:
        page.wait_for_function(
            f"() => window.tileStats && window.tileStats.loaded >= {MIN_TILES}",
            timeout=TIMEOUT_MS,
        )
        page.wait_for_function(
            """() => {
                const legend = document.getElementById('legend');
                return window.slideInfo && legend && legend.dataset.state === 'ready'
                    && document.querySelectorAll('#level-rows tr[data-level]').length > 0;
            }""",
            timeout=TIMEOUT_MS,
        )
        page.wait_for_function(
            """() => {
                const item = window.viewer.world.getItemAt(0);
                return item && item.getFullyLoaded() && !window.viewer.isAnimating()
                    && document.querySelector('#level-rows tr.current') !== null;
            }""",
            timeout=TIMEOUT_MS,
        )
    except Exception as exc:  # add what the page said to the timeout
        stats = page.evaluate("() => window.tileStats")
        message = f"viewer did not load: {exc}\ntileStats={stats}\n{log.summary()}"
        raise AssertionError(message) from exc
    # One more frame so the last tile is painted, not just loaded.
    _next_frames(page)


def _next_frames(page: Page) -> None:
    """Let the page render two animation frames (OpenSeadragon updates once per frame)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _canvas_image(page: Page) -> Image.Image:
    """The OpenSeadragon drawer canvas as RGBA (readable: tiles load as CORS-anonymous)."""
    data_url = page.evaluate("() => window.viewer.drawer.canvas.toDataURL('image/png')")
    header, _, payload = data_url.partition(",")
    assert header == "data:image/png;base64", header[:40]
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGBA")


def _background_rgb(page: Page) -> tuple[int, int, int]:
    """The viewer's CSS background colour, which shows where nothing is drawn."""
    css = page.evaluate("() => getComputedStyle(document.getElementById('viewer')).backgroundColor")
    parts = css[css.index("(") + 1 : css.index(")")].split(",")
    r, g, b = (int(float(v)) for v in parts[:3])
    return r, g, b


def _assert_not_blank(canvas: Image.Image, background: tuple[int, int, int]) -> str:
    """Assert enough of the canvas is drawn and the drawn pixels vary; return a summary."""
    flat = Image.new("RGBA", canvas.size, (*background, 255))
    flat.alpha_composite(canvas)
    rgb = flat.convert("RGB")
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, background))
    # Per pixel: the largest channel difference from the background.
    r, g, b = diff.split()
    biggest = ImageChops.lighter(ImageChops.lighter(r, g), b)
    mask = biggest.point(lambda v: 255 if v > BACKGROUND_TOLERANCE else 0, mode="L")
    total = canvas.width * canvas.height
    drawn = mask.histogram()[255]
    fraction = drawn / total
    assert fraction >= MIN_DRAWN_FRACTION, (
        f"canvas looks blank: {fraction:.1%} of {canvas.size} px differ from background"
    )
    luma_stddev = ImageStat.Stat(rgb.convert("L"), mask).stddev[0]
    colours = rgb.getcolors(maxcolors=total) or []
    drawn_colours = len({c for _, c in colours} - {background})
    assert luma_stddev >= MIN_LUMA_STDDEV, f"drawn pixels are flat: luma stddev {luma_stddev:.2f}"
    assert drawn_colours >= MIN_DISTINCT_COLOURS, f"only {drawn_colours} distinct colours drawn"
    return f"{fraction:.1%} drawn, luma stddev {luma_stddev:.1f}, {drawn_colours} colours"


def test_viewer_draws_tiles_and_legend(live_server, page_and_log, tmp_path: Path) -> None:
    """The slide viewer draws real tiles, lists every DZI level and logs nothing bad."""
    page, log = page_and_log
    name = live_server.slide_names[0]
    page.goto(_slide_url(live_server.base_url, name), wait_until="load")
    _wait_for_viewer(page, log)

    screenshot = tmp_path / "viewer.png"
    page.screenshot(path=str(screenshot))
    canvas = _canvas_image(page)
    canvas.save(tmp_path / "canvas.png")
    print(f"viewer screenshot: {screenshot}  (drawer canvas: {tmp_path / 'canvas.png'})")
    print(_assert_not_blank(canvas, _background_rgb(page)))

    stats = page.evaluate("() => window.tileStats")
    assert stats["loaded"] >= MIN_TILES, stats
    assert stats["failed"] == 0, f"{stats}\n{log.summary()}"

    # Legend: one row per DZI level of the policy endpoint, lossless levels badged as such.
    info = page.evaluate("() => window.slidePolicy")
    assert info["level_count"] == len(info["levels"]), info
    assert info == live_server.get(f"/api/slides/{name}/policy").json()
    rows = page.locator("#level-rows tr[data-level]")
    assert rows.count() == info["level_count"]
    shown_levels = sorted(int(v) for v in rows.evaluate_all("rs => rs.map(r => r.dataset.level)"))
    assert shown_levels == list(range(info["level_count"]))
    lossless = [lv for lv in info["levels"] if lv["lossless"]]
    badges = page.locator('#level-rows tr[data-lossless="true"] .badge.lossless')
    assert badges.count() == len(lossless)
    if lossless:
        assert badges.count() >= 1
        assert "lossless" in badges.first.inner_text().lower()
    for lv in info["levels"]:
        if not lv["lossless"] and lv.get("quality") is not None:
            badge = page.locator(f'#level-rows tr[data-level="{lv["level"]}"] .badge.lossy')
            assert f"q{lv['quality']}" in badge.inner_text()
    assert page.locator("#level-rows tr.current").count() == 1

    # Zoom all the way in: the highlight follows to the full-resolution level, tiles still load.
    page.evaluate(
        "() => { const vp = window.viewer.viewport; vp.zoomTo(vp.getMaxZoom(), null, true); }"
    )
    last = info["level_count"] - 1
    page.wait_for_function(
        f"() => document.getElementById('legend').dataset.currentLevel === '{last}'"
    )
    _next_frames(page)
    _wait_for_viewer(page, log)
    current = page.locator("#level-rows tr.current")
    assert current.count() == 1
    assert current.get_attribute("data-level") == str(last)
    print(_assert_not_blank(_canvas_image(page), _background_rgb(page)))
    stats = page.evaluate("() => window.tileStats")
    assert stats["failed"] == 0, f"{stats}\n{log.summary()}"

    log.assert_clean()


def test_index_lists_slides_with_links(live_server, page_and_log) -> None:
    """The index page links every slide to its viewer page, and the links work."""
    page, log = page_and_log
    page.goto(f"{live_server.base_url}/", wait_until="load")
    items = page.locator("#slides li")
    assert items.count() >= len(live_server.slide_names)
    links = page.locator("#slides li a")
    paths = [
        unquote(urlsplit(href).path)
        for href in links.evaluate_all("as => as.map(a => a.getAttribute('href'))")
    ]
    texts = [text.strip() for text in links.all_inner_texts()]
    by_path = dict(zip(paths, texts, strict=True))
    for name in live_server.slide_names:
        assert by_path.get(f"/slide/{name}.html") == name, (name, by_path)

    # facts of the rows on screen, lazily loaded thumbnails, and the filter
    page.wait_for_function(
        "() => document.querySelector('li[data-name=\"generated\"] .facts').textContent"
        ".includes('aperio')")
    facts = page.inner_text('li[data-name="generated"] .facts')
    assert "5,000 \u00d7 3,800 px" in facts and "0.499" in facts and "20\u00d7" in facts, facts
    page.wait_for_function(
        "() => document.querySelector('li[data-name=\"generated\"] img').naturalWidth > 0")
    page.wait_for_function(
        "() => document.querySelector('li[data-name=\"unreadable\"]').classList"
        ".contains('broken') || document.querySelector('li[data-name=\"unreadable\"] .facts')"
        ".textContent !== ''")
    page.fill("#filter", "gener")
    visible = page.evaluate(
        "() => [...document.querySelectorAll('#slides li')].filter(li => !li.hidden)"
        ".map(li => li.dataset.name)")
    assert visible == ["generated"]
    assert page.inner_text("#shown") == f"1 of {items.count()} slides"
    page.fill("#filter", "")

    first = live_server.slide_names[0]
    target = f"/slide/{first}.html"
    links.nth(paths.index(target)).click()
    page.wait_for_url(lambda url: unquote(urlsplit(url).path) == target)
    page.wait_for_function("() => window.tileStats && window.tileStats.loaded >= 1")
    # the unreadable slide's thumbnail is its only error (a 500: OpenSlide cannot read it)
    assert all("/iiif/3/unreadable/" in e for e in log.console_errors), log.summary()
    log.console_errors.clear()
    log.assert_clean()


def test_viewer_shows_associated_images_and_a_scale_bar(live_server, page_and_log) -> None:
    """The legend links label, macro and thumbnail, each opening its own DZI viewer, and a
    scale bar computed from mpp follows the zoom."""
    page, log = page_and_log
    page.goto(_slide_url(live_server.base_url, "generated"), wait_until="load")
    _wait_for_viewer(page, log)
    links = page.locator("#associated-list a")
    names = links.evaluate_all("as => as.map(a => a.dataset.associated)")
    assert names == ["label", "macro", "thumbnail"]
    page.wait_for_function(
        "() => [...document.querySelectorAll('#associated-list img')]"
        ".every(i => i.complete && i.naturalWidth > 0)")

    def scale() -> dict:
        return page.evaluate("""() => {
            const item = window.viewer.world.getItemAt(0);
            const zoom = item.viewportToImageZoom(window.viewer.viewport.getZoom(true));
            const bar = document.getElementById('scale-bar');
            return {...window.scaleBar, zoom, mpp: window.slideInfo.mpp[0],
                    width: bar.getBoundingClientRect().width, hidden: bar.hidden,
                    label: bar.textContent.trim()};
        }""")

    before = scale()
    assert not before["hidden"]
    # the bar's on-screen length is the length it names, at this zoom
    assert before["width"] == pytest.approx(before["pixels"], abs=1)
    assert before["microns"] == pytest.approx(
        before["pixels"] * before["mpp"] / before["zoom"], rel=1e-6)
    assert 60 <= before["pixels"] <= 160
    assert before["label"] in (f"{before['microns'] / 1000:g} mm", f"{before['microns']:g} µm")
    page.evaluate(
        "() => { const vp = window.viewer.viewport; vp.zoomTo(vp.getMaxZoom(), null, true); }")
    _next_frames(page)
    after = scale()
    assert after["microns"] < before["microns"] / 4

    links.nth(0).click()
    page.wait_for_url("**/slide/generated/associated/label.html")
    page.wait_for_function("() => window.tileStats && window.tileStats.loaded >= 1"
                           " && window.slideInfo !== null")
    page.wait_for_function("() => window.viewer.world.getItemAt(0)"
                           " && window.viewer.world.getItemAt(0).getFullyLoaded()")
    info = page.evaluate("() => window.slideInfo")
    assert info["associated"] == "label" and info["dimensions"] == [400, 460]
    # the page itself shows no error (viewer.js writes failures into the legend)
    page.wait_for_function("() => document.getElementById('legend').dataset.state === 'ready'")
    text = page.inner_text("body")
    assert "not a function" not in text and "unavailable" not in text, text
    assert page.locator("#index-link").inner_text().strip() == "\u2190 generated"
    assert page.evaluate("() => document.getElementById('scale-bar').hidden")  # no mpp
    canvas = _canvas_image(page)
    print(_assert_not_blank(canvas, _background_rgb(page)))
    assert page.evaluate("() => window.tileStats.failed") == 0
    log.assert_clean()


def _request_paths(page: Page) -> list[str]:
    """Record the paths of every request the page makes from now on."""
    paths: list[str] = []
    page.on("request", lambda request: paths.append(unquote(urlsplit(request.url).path)))
    return paths


def test_viewer_reads_iiif_tiles_beside_the_legend(live_server, page_and_log) -> None:
    """?source=iiif: OpenSeadragon reads the IIIF info.json and IIIF tiles and draws tissue;
    the title names the file; the objective magnification follows the zoom; the home view
    lies beside the legend; the navigator is opaque."""
    page, log = page_and_log
    paths = _request_paths(page)
    page.goto(_slide_url(live_server.base_url, "generated") + "?source=iiif", wait_until="load")
    _wait_for_viewer(page, log)
    print(_assert_not_blank(_canvas_image(page), _background_rgb(page)))
    assert page.evaluate("() => window.tileSourceKind") == "iiif"
    tiles = [p for p in paths if p.startswith("/iiif/3/generated/") and "/info" not in p]
    assert len(tiles) >= MIN_TILES and "/iiif/3/generated/info.json" in paths
    assert not [p for p in paths if p.startswith("/storage/generated_files/")], paths
    assert all(p.endswith("/0/default.jpg") for p in tiles), tiles
    assert "generated.svs" in page.title() and "generated" in page.title()

    state = page.evaluate("""() => {
        const item = window.viewer.world.getItemAt(0);
        const zoom = item.viewportToImageZoom(window.viewer.viewport.getZoom(true));
        const box = window.viewer.viewport.viewportToWindowCoordinates(
            item.getBounds(true).getTopRight());
        const legend = document.getElementById('legend').getBoundingClientRect();
        const nav = window.viewer.navigator.element;
        return {zoom, mag: window.magnification, imageRight: box.x, legendLeft: legend.left,
                text: document.getElementById('magnification').textContent,
                navOpacity: getComputedStyle(nav).opacity,
                navBackground: getComputedStyle(nav).backgroundColor};
    }""")
    assert state["mag"] == pytest.approx(20 * state["zoom"], rel=1e-6), state
    assert state["text"].endswith("\u00d7"), state
    assert state["imageRight"] <= state["legendLeft"] + 1, state  # the legend hides no tissue
    assert state["navOpacity"] == "1" and state["navBackground"] == "rgb(255, 255, 255)", state
    page.evaluate(
        "() => { const vp = window.viewer.viewport; vp.zoomTo(vp.getMaxZoom(), null, true); }")
    _next_frames(page)
    _wait_for_viewer(page, log)
    zoomed = page.evaluate("() => window.magnification")
    assert zoomed > state["mag"] * 4
    assert page.evaluate("() => window.tileStats.failed") == 0
    log.assert_clean()


def test_mirador_shows_the_slide_from_its_manifest(live_server, page_and_log,
                                                    tmp_path: Path) -> None:
    """Mirador (from npm) opens the slide's IIIF manifest and draws its tissue from IIIF
    tiles."""
    page, log = page_and_log
    paths = _request_paths(page)
    page.goto(f"{live_server.base_url}/slide/generated/mirador.html", wait_until="load")
    page.wait_for_function("() => window.mirador !== undefined")
    page.wait_for_function(
        "() => document.querySelector('#mirador .openseadragon-canvas canvas') !== null",
        timeout=TIMEOUT_MS * 2)
    page.wait_for_function("() => [...performance.getEntriesByType('resource')].filter("
                           "e => e.name.includes('/iiif/3/generated/') && "
                           "e.name.endsWith('/0/default.jpg')).length >= 4",
                           timeout=TIMEOUT_MS * 2)
    page.wait_for_timeout(500)  # OpenSeadragon blends tiles in
    assert "/iiif/3/generated/manifest.json" in paths
    assert "/iiif/3/generated/info.json" in paths
    shot = tmp_path / "mirador.png"
    page.locator("#mirador .openseadragon-canvas").screenshot(path=str(shot))
    image = Image.open(shot).convert("RGB")
    corner = image.getpixel((2, 2))
    print(f"mirador screenshot: {shot}",
          _assert_not_blank(image.convert("RGBA"), corner))
    bad = [e for e in log.bad_responses if "/iiif/" in e]
    assert not bad, log.summary()
    assert not log.page_errors, log.summary()


def test_unknown_slide_page_is_html_for_browsers(live_server, page_and_log) -> None:
    """A browser gets an HTML error page; an API client the JSON error."""
    page, _ = page_and_log
    response = page.goto(f"{live_server.base_url}/slide/nope.html", wait_until="load")
    assert response is not None and response.status == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "404" in page.title() and "nope" in page.inner_text("#error-detail")
    api = live_server.get("/slide/nope.html", headers={"Accept": "application/json"})
    assert api.status_code == 404 and api.json()["error"] == "slide_not_found"
