"""End to end: `tileserver serve` under uvicorn on a free port, fetched over real HTTP."""

import concurrent.futures
import io
import os
import shutil
import signal
import time

import httpx
import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from tests.conftest import decode, start_server, stop_server


def test_lossless_tiles_over_http_equal_deepzoom_generator(live_server, generated_svs):
    dz = DeepZoomGenerator(openslide.open_slide(generated_svs), 254, 1, True)
    assert live_server.get("/storage/generated.dzi").text == dz.get_dzi("jpeg")
    top = dz.level_count - 1
    cols, rows = dz.level_tiles[top]
    for col, row in [(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 3)]:
        r = live_server.get(f"/storage/generated_files/{top}/{col}_{row}.jpeg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert np.array_equal(decode(r.content), np.asarray(dz.get_tile(top, (col, row))))
    head = httpx.head(live_server.base_url + f"/storage/generated_files/{top}/0_0.jpeg")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-tile-lossless"] == "true"


def test_concurrent_clients_across_workers_get_identical_tiles(live_server):
    url = live_server.base_url + "/storage/generated_files/11/2_1.jpeg"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda _: httpx.get(url, timeout=30).content, range(48)))
    assert len(set(bodies)) == 1
    assert Image.open(io.BytesIO(bodies[0])).format == "JPEG"
    leftovers = list(live_server.cache.rglob(".tmp-*"))
    assert leftovers == []


def test_broken_slide_does_not_disturb_the_others(live_server):
    bad = live_server.get("/storage/unreadable_files/0/0_0.jpeg")
    assert bad.status_code == 500 and "Bogus marker length" in bad.json()["detail"]
    assert live_server.get("/storage/boxes_files/9/1_0.jpeg").status_code == 200
    assert live_server.get("/healthz").json()["status"] == "ok"
    assert live_server.process.poll() is None


def test_environment_configures_single_slide_mode(tmp_path, generated_svs):
    server = start_server(tmp_path, {"TileCachePath": str(tmp_path / "cache")},
                          env={"Image__Path": str(generated_svs),
                               "TileFormat__LosslessLevelCount": "0"})
    try:
        dzi = server.get("/image.dzi")
        assert dzi.status_code == 200 and 'Format="jpeg"' in dzi.text
        r = server.get("/image_files/13/0_0.jpeg")
        assert r.headers["content-type"] == "image/jpeg"  # LosslessLevelCount=0 from the env
        assert "/image.dzi" in server.get("/").text
    finally:
        stop_server(server)


def test_no_slide_configured_serves_the_demo_slide(tmp_path, generated_svs):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    shutil.copy(generated_svs, demo_dir / "demo.svs")  # ensure_demo_slide finds it: no wait
    server = start_server(tmp_path, {"TileCachePath": str(tmp_path / "cache"),
                                     "DemoDirectory": str(demo_dir)})
    try:
        info = server.get("/api/slides/image").json()
        assert info["vendor"] == "aperio" and info["dimensions"][0] >= 5000
        assert server.get("/image_files/12/0_0.jpeg").status_code == 200
    finally:
        stop_server(server)


def test_kill_9_never_leaves_a_truncated_tile(tmp_path, quick_svs):
    """Kill the server while it renders many tiles; every file then in the cache decodes fully,
    and a restarted server serves the whole level correctly.

    The top level's 108 tiles are PNG at libdeflate level 9 (about 25 ms a tile): after the
    first 10 land, the rest keep the server busy for a second or more, so the kill lands while
    it renders and writes."""
    cache = tmp_path / "cache"
    settings = {"TileCachePath": str(cache), "Images": [{"Name": "g", "Path": str(quick_svs)}],
                "TileFormat": {"LosslessLevelCount": -1, "PngCompressLevel": 9}}
    server = start_server(tmp_path, settings)
    dz = DeepZoomGenerator(openslide.open_slide(quick_svs), 254, 1, True)
    top = dz.level_count - 1
    cols, rows = dz.level_tiles[top]
    urls = [f"{server.base_url}/storage/g_files/{top}/{c}_{r}.png"
            for r in range(rows) for c in range(cols)]

    def fetch(url):
        try:
            httpx.get(url, timeout=30)
        except httpx.HTTPError:
            pass

    pool = concurrent.futures.ThreadPoolExecutor(8)
    for url in urls:
        pool.submit(fetch, url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(list(cache.rglob("*.png"))) < 10:
        time.sleep(0.01)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    pool.shutdown(wait=True, cancel_futures=True)
    written = list(cache.rglob("*.png"))
    assert 10 <= len(written) < len(urls)  # killed mid-pyramid
    for path in written:
        with Image.open(path) as im:
            im.load()  # raises on a truncated file

    server = start_server(tmp_path, settings)
    addresses = [(c, r) for r in range(rows) for c in range(cols)]
    try:  # requests in parallel keep both cores rendering; each reply is checked in order
        with concurrent.futures.ThreadPoolExecutor(4) as fetcher:
            replies = fetcher.map(lambda a: server.get(f"/storage/g_files/{top}/{a[0]}_{a[1]}.png"),
                                  addresses)
            for (c, r), resp in zip(addresses, replies, strict=True):
                expected = np.asarray(dz.get_tile(top, (c, r)))
                assert np.array_equal(decode(resp.content), expected), (c, r)
    finally:
        stop_server(server)


@pytest.mark.parametrize("workers", [2])
def test_workers_share_the_disk_cache(tmp_path, generated_svs, workers):
    settings = {"TileCachePath": str(tmp_path / "cache"),
                "Images": [{"Name": "g", "Path": str(generated_svs)}]}
    server = start_server(tmp_path, settings, "--workers", str(workers))
    try:
        first = server.get("/storage/g_files/12/1_1.jpeg")
        states = {server.get("/storage/g_files/12/1_1.jpeg").headers["x-tile-cache"]
                  for _ in range(20)}
        assert first.headers["x-tile-cache"] == "miss" and states == {"hit"}
    finally:
        stop_server(server)
