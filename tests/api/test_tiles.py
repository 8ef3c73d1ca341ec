"""Tiles through the app: pixels equal DeepZoomGenerator's, headers, cache, overrides."""

import io
import shutil
import threading

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from tests.conftest import decode

FIXTURE_SLIDES = ["boxes.tiff", "small.svs", "boxes_0.dcm", "boxes.png"]


@pytest.fixture
def slides(fixtures, generated_svs):
    paths = {name.split(".")[0]: fixtures / name for name in FIXTURE_SLIDES}
    paths["generated"] = generated_svs
    return paths


def reference(path, level, col, row, tile_size=254, overlap=1, limit_bounds=True):
    dz = DeepZoomGenerator(openslide.open_slide(path), tile_size, overlap, limit_bounds)
    return dz, np.asarray(dz.get_tile(level, (col, row)).convert("RGB"))


def addresses(dz, level, limit=6):
    """Corner, edge and interior tiles of a level (all of them for small levels)."""
    cols, rows = dz.level_tiles[level]
    picks = {(0, 0), (cols - 1, rows - 1), (cols - 1, 0), (0, rows - 1),
             (cols // 2, rows // 2), (min(1, cols - 1), min(1, rows - 1))}
    return sorted(picks)[:limit]


@pytest.mark.parametrize("geometry", [
    {"TileSize": 254, "Overlap": 1, "LimitBounds": True},
    {"TileSize": 256, "Overlap": 0, "LimitBounds": False},
    {"TileSize": 510, "Overlap": 2, "LimitBounds": True},
], ids=lambda g: f"{g['TileSize']}-{g['Overlap']}-{g['LimitBounds']}")
def test_lossless_tiles_equal_deepzoom_generator(client_for, slides, geometry):
    images = [{"Name": name, "Path": str(path)} for name, path in slides.items()]
    client = client_for(Images=images, DeepZoom=geometry,
                        TileFormat={"LosslessLevelCount": -1})
    ts, ov, lb = geometry["TileSize"], geometry["Overlap"], geometry["LimitBounds"]
    checked = 0
    for name, path in slides.items():
        dz = DeepZoomGenerator(openslide.open_slide(path), ts, ov, lb)
        dzi = client.get(f"/storage/{name}.dzi")
        assert dzi.status_code == 200
        assert dzi.text == dz.get_dzi("jpeg")
        top = dz.level_count - 1
        for level in sorted({top, top - 1, top - 3, top // 2, 0}):
            for col, row in addresses(dz, level):
                r = client.get(f"/storage/{name}_files/{level}/{col}_{row}.jpeg")
                assert r.status_code == 200, r.text
                assert r.headers["content-type"] == "image/png"
                assert r.headers["x-tile-lossless"] == "true"
                expected = np.asarray(dz.get_tile(level, (col, row)).convert("RGB"))
                got = decode(r.content)
                assert got.shape == expected.shape
                assert np.array_equal(got, expected), (name, level, col, row)
                checked += 1
    assert checked > 25


def test_default_policy_headers_and_jpeg(client_for, generated_svs):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}])
    dz, _ = reference(generated_svs, 0, 0, 0)
    top = dz.level_count - 1
    png = client.get(f"/storage/g_files/{top}/1_1.jpeg")
    assert png.headers["content-type"] == "image/png"
    assert png.headers["x-tile-format"] == "png"
    assert png.headers["x-tile-lossless"] == "true"
    assert png.headers["x-tile-cache"] == "miss"
    assert png.headers["cache-control"] == "public, max-age=86400"
    assert png.headers["access-control-allow-origin"] == "*"
    assert png.headers["etag"].startswith('"') and len(png.headers["etag"]) == 34
    assert "vary" not in png.headers
    assert png.content.startswith(b"\x89PNG")

    jpeg = client.get(f"/storage/g_files/{top - 1}/1_1.jpeg")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert jpeg.headers["x-tile-lossless"] == "false"
    assert jpeg.content.startswith(b"\xff\xd8")
    _, expected = reference(generated_svs, top - 1, 1, 1)
    error = np.abs(decode(jpeg.content).astype(int) - expected.astype(int))
    assert 0 < error.mean() < 4  # a JPEG of the same tile, not of another one

    again = client.get(f"/storage/g_files/{top}/1_1.jpeg")
    assert again.headers["x-tile-cache"] == "hit"
    assert again.content == png.content and again.headers["etag"] == png.headers["etag"]
    not_modified = client.get(f"/storage/g_files/{top}/1_1.jpeg",
                              headers={"If-None-Match": png.headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == png.headers["etag"]
    head = client.head(f"/storage/g_files/{top}/1_1.jpeg")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(png.content))
    assert head.headers["x-tile-format"] == "png"


def test_overrides_and_side_by_side_cache(client_for, generated_svs, tmp_path):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileCachePath=str(tmp_path / "c"))
    dz, expected = reference(generated_svs, 10, 0, 0)
    url = "/storage/g_files/10/0_0"
    as_png = client.get(url + ".png")
    assert as_png.headers["content-type"] == "image/png"
    assert np.array_equal(decode(as_png.content), expected)
    as_webp = client.get(url + ".webp")
    assert as_webp.headers["content-type"] == "image/webp"
    assert as_webp.headers["x-tile-lossless"] == "false"
    assert client.get(url + ".jpeg?format=png").headers["content-type"] == "image/png"
    assert client.get(url + ".jpg").headers["content-type"] == "image/jpeg"
    top = dz.level_count - 1
    downgraded = client.get(f"/storage/g_files/{top}/0_0.jpeg?format=jpeg")
    assert downgraded.headers["x-tile-format"] == "jpeg"
    lossless_webp = client.get(f"/storage/g_files/{top}/0_0.webp")
    assert lossless_webp.headers["x-tile-lossless"] == "true"
    _, top_expected = reference(generated_svs, top, 0, 0)
    assert np.array_equal(decode(lossless_webp.content), top_expected)
    files = sorted(p.suffix for p in (tmp_path / "c" / "g").rglob("0_0.*"))
    assert files == [".jpeg", ".jpeg", ".png", ".webp", ".webp"]  # both formats side by side


def test_override_disabled(client_for, generated_svs):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileFormat={"AllowFormatOverride": False})
    r = client.get("/storage/g_files/10/0_0.png?format=webp")
    assert r.headers["content-type"] == "image/jpeg"


def test_webp_policy_varies_on_accept(client_for, generated_svs):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileFormat={"LosslessFormat": "webp"})
    dz, expected = reference(generated_svs, 0, 0, 0)
    top = dz.level_count - 1
    _, expected = reference(generated_svs, top, 2, 1)
    url = f"/storage/g_files/{top}/2_1.jpeg"
    webp = client.get(url, headers={"Accept": "image/webp,*/*"})
    assert webp.headers["content-type"] == "image/webp" and webp.headers["vary"] == "Accept"
    png = client.get(url, headers={"Accept": "*/*"})
    assert png.headers["content-type"] == "image/png" and png.headers["vary"] == "Accept"
    for r in (webp, png):
        assert np.array_equal(decode(r.content), expected)


def test_single_slide_routes(client_for, generated_svs):
    client = client_for(Image={"Path": str(generated_svs)})
    dz, expected = reference(generated_svs, 9, 0, 0)
    assert client.get("/image.dzi").text == dz.get_dzi("jpeg")
    r = client.get("/image_files/9/0_0.jpeg")
    assert r.status_code == 200
    assert client.get("/storage/nothing.dzi").status_code == 404


def test_replaced_slide_and_changed_quality_never_serve_stale(client_for, tmp_path, fixtures,
                                                              generated_svs):
    slide = tmp_path / "slides" / "slide.tiff"
    slide.parent.mkdir()
    shutil.copy(fixtures / "boxes.tiff", slide)
    cache = tmp_path / "cache"
    client = client_for(Images=[{"Name": "s", "Path": str(slide)}], TileCachePath=str(cache),
                        Server={"RevalidateSeconds": 0})
    first = client.get("/storage/s_files/8/0_0.png")
    shutil.copy(generated_svs, slide.with_suffix(".new"))
    slide.with_suffix(".new").replace(slide)  # the way a slide is replaced: atomic rename
    second = client.get("/storage/s_files/8/0_0.png")
    assert second.headers["x-tile-cache"] == "miss"
    _, expected = reference(slide, 8, 0, 0)
    assert np.array_equal(decode(second.content), expected)
    assert not np.array_equal(decode(first.content), expected)

    lower = client_for(Images=[{"Name": "s", "Path": str(slide)}], TileCachePath=str(cache),
                       TileFormat={"JpegQuality": 40})
    normal = client.get("/storage/s_files/8/0_0.jpeg")
    low = lower.get("/storage/s_files/8/0_0.jpeg")
    assert low.headers["x-tile-cache"] == "miss"
    assert len(low.content) < len(normal.content)


def test_concurrent_requests_render_once(client_for, generated_svs, monkeypatch):
    from app.core.pyramid import SlidePyramid

    calls = []
    lock = threading.Lock()
    original = SlidePyramid.render

    def counting(self, level, col, row):
        with lock:
            calls.append((level, col, row))
        return original(self, level, col, row)

    monkeypatch.setattr(SlidePyramid, "render", counting)
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}])
    client.get("/storage/g.dzi")
    results = []

    def fetch():
        results.append(client.get("/storage/g_files/12/3_2.jpeg"))

    threads = [threading.Thread(target=fetch) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.content for r in results}) == 1
    assert calls.count((12, 3, 2)) == 1


def test_disk_cache_disabled(client_for, generated_svs, tmp_path):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        EnableDiskCache=False, TileCachePath=str(tmp_path / "none"),
                        Server={"MemoryCacheBytes": 0})
    assert client.get("/storage/g_files/11/0_0.jpeg").headers["x-tile-cache"] == "miss"
    assert client.get("/storage/g_files/11/0_0.jpeg").headers["x-tile-cache"] == "miss"
    assert not (tmp_path / "none").exists()


def test_unwritable_cache_still_serves(client_for, generated_svs, tmp_path, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")  # a file where the cache folder should be: every write fails
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileCachePath=str(blocker / "cache"))
    r = client.get("/storage/g_files/11/1_1.jpeg")
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (256, 256)
    assert "not writable" in caplog.text


def test_plan_memo_is_exact_and_bounded(client_for, generated_svs, monkeypatch):
    """Tile plans are memoised per open slide: the same address of the slide and of an
    associated image, or with another Accept, is another plan (the pixels say so); the memo
    stays under TILE_PLAN_MEMO entries, and an overlong Accept is planned but not kept."""
    from app.cache import tiles as service_module

    monkeypatch.setattr(service_module, "TILE_PLAN_MEMO", 4)
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileFormat={"LosslessFormat": "webp"})
    slide_tile = client.get("/storage/g_files/0/0_0.png")
    label_tile = client.get("/storage/g/associated/label_files/0/0_0.png")
    assert not np.array_equal(decode(slide_tile.content), decode(label_tile.content))
    assert np.array_equal(decode(slide_tile.content), reference(generated_svs, 0, 0, 0)[1])
    handle = client.app.state.services.registry.peek("g")
    assert len(handle.tile_plans) == 2
    top = reference(generated_svs, 0, 0, 0)[0].level_count - 1
    url = f"/storage/g_files/{top}/1_1.jpeg"
    for accept, media in (("image/webp,*/*", "image/webp"), ("*/*", "image/png"),
                          ("image/webp,*/*", "image/webp")):
        assert client.get(url, headers={"Accept": accept}).headers["content-type"] == media
    assert len(handle.tile_plans) == 4
    client.get(f"/storage/g_files/{top}/0_1.jpeg")
    assert len(handle.tile_plans) == 1  # full: forgotten at once, then this one kept
    long_accept = "image/webp," + "x" * service_module.MEMO_ACCEPT_CHARS
    r = client.get(f"/storage/g_files/{top}/1_0.jpeg", headers={"Accept": long_accept})
    assert r.headers["content-type"] == "image/webp"
    assert len(handle.tile_plans) == 1


def test_memory_hits_count_as_accesses_for_eviction(client_for, generated_svs, monkeypatch):
    """A tile served from the memory cache is read from disk by nobody: its access is reported
    to the cache index at most every ACCESS_REPORT_SECONDS, so the least recently used order
    (what eviction deletes first) follows the requests, not the disk reads."""
    from app.cache import tiles as service_module

    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}])
    first, second = "/storage/g_files/9/0_0.jpeg", "/storage/g_files/9/1_0.jpeg"
    for url in (first, second):
        assert client.get(url).headers["x-tile-cache"] == "miss"
    index = client.app.state.services.tiles.disk.index

    def oldest_first() -> list[tuple[int, int]]:
        return [(key.col, key.row) for key, _ in index.oldest(10)]

    assert oldest_first() == [(0, 0), (1, 0)]
    assert client.get(first).headers["x-tile-cache"] == "hit"  # from memory, just reported
    assert oldest_first() == [(0, 0), (1, 0)]
    monkeypatch.setattr(service_module, "ACCESS_REPORT_SECONDS", 0.0)  # as if a minute later
    assert client.get(first).headers["x-tile-cache"] == "hit"
    assert oldest_first() == [(1, 0), (0, 0)]
