"""End to end: a slide replaced by one with the same quickhash but other full-resolution tiles
never gets its predecessor's tiles, from memory or disk, with two workers and after a restart;
a hostile cache location stops `tileserver serve` with one line and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openslide
import tifffile
from openslide.deepzoom import DeepZoomGenerator

from app.tools.demo import write_aperio_svs
from tests.conftest import decode, start_server, stop_server


def copy_level0_tile(path: Path, source: int, target: int) -> None:
    """Write the stored JPEG data of full-resolution tile ``source`` over tile ``target``, in
    place, padded to the target's length with JPEG fill bytes (0xFF before the EOI marker):
    the file keeps its size and every TIFF tag, so its quickhash (which hashes the properties
    and the lowest-resolution level) stays, while tile ``target`` shows other pixels."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    with open(path, "r+b") as f:
        f.seek(offsets[source])
        data = f.read(counts[source])
        assert data.endswith(b"\xff\xd9") and len(data) <= counts[target]
        f.seek(offsets[target])
        f.write(data[:-2] + b"\xff" * (counts[target] - len(data)) + b"\xff\xd9")


def expected_tiles(path: Path, levels: list[int]) -> dict[str, np.ndarray]:
    dz = DeepZoomGenerator(openslide.open_slide(path), 254, 1, True)
    return {f"/storage/s_files/{level}/{col}_{row}.png": np.asarray(dz.get_tile(level, (col, row)))
            for level in levels
            for col in range(dz.level_tiles[level][0])
            for row in range(dz.level_tiles[level][1])}


def fetch_all(base: str, urls: list[str], rounds: int) -> dict[str, list[np.ndarray]]:
    """Every URL ``rounds`` times on fresh connections (so both workers answer)."""
    out: dict[str, list[np.ndarray]] = {url: [] for url in urls}
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=60, limits=no_reuse) as client:
        for _ in range(rounds):
            for url in urls:
                r = client.get(url)
                assert r.status_code == 200, (url, r.text)
                out[url].append(decode(r.content))
    return out


def test_replaced_slide_with_the_same_quickhash_never_serves_old_tiles(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    slide = write_aperio_svs(slides / "s.svs", 2400, 1800, seed=11)  # two slide levels
    replacement = slides / "replacement.tmp"
    shutil.copy(slide, replacement)
    with tifffile.TiffFile(replacement) as tif:
        counts = tif.pages[0].databytecounts
    smaller, larger = sorted(range(len(counts)), key=lambda i: counts[i])[-2:]  # tissue tiles
    copy_level0_tile(replacement, smaller, larger)
    old_qh = openslide.open_slide(slide).properties["openslide.quickhash-1"]
    assert openslide.open_slide(replacement).properties["openslide.quickhash-1"] == old_qh

    top = DeepZoomGenerator(openslide.open_slide(slide), 254, 1, True).level_count - 1
    levels = [top]
    old = expected_tiles(slide, levels)
    settings = {"TileCachePath": str(tmp_path / "cache"),
                "Images": [{"Name": "s", "Path": str(slide)}],
                "TileFormat": {"LosslessLevelCount": -1},  # every tile PNG: exact comparisons
                "Server": {"RevalidateSeconds": 0.2}}
    server = start_server(tmp_path, settings, "--workers", "2")
    try:
        served = fetch_all(server.base_url, list(old), rounds=2)  # memory and disk caches warm
        assert all(np.array_equal(t, old[url]) for url, ts in served.items() for t in ts)
        os.utime(replacement, ns=(time.time_ns(), time.time_ns()))
        os.replace(replacement, slide)  # the way a slide is replaced: atomic rename
        time.sleep(0.5)  # past RevalidateSeconds
        new = expected_tiles(slide, levels)
        changed = [url for url in new if not np.array_equal(new[url], old[url])]
        assert changed  # the swap changed pixels in the levels compared
        served = fetch_all(server.base_url, list(new), rounds=2)
        wrong = [url for url, ts in served.items() for t in ts if not np.array_equal(t, new[url])]
        assert wrong == []
    finally:
        stop_server(server)
    server = start_server(tmp_path, settings, "--workers", "2")  # a restart: disk cache only
    try:
        served = fetch_all(server.base_url, list(new), rounds=2)
        wrong = [url for url, ts in served.items() for t in ts if not np.array_equal(t, new[url])]
        assert wrong == []
        stale = httpx.get(server.base_url + "/api/tiles/s/stats").json()
        assert stale["staleTiles"] > 0 and stale["cachedTiles"] > 0
        r = httpx.delete(server.base_url + "/api/tiles/s/cache?stale=true")
        assert r.json()["deletedTiles"] == stale["staleTiles"]
        assert httpx.get(server.base_url + "/api/tiles/s/stats").json()["staleTiles"] == 0
    finally:
        stop_server(server)


def test_serve_refuses_a_cache_inside_the_slide_folder(tmp_path, fixtures):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(fixtures / "boxes.tiff", slides / "b.tiff")
    config = tmp_path / "appsettings.json"
    config.write_text(json.dumps({"Images": [{"Name": "b", "Path": str(slides / "b.tiff")}],
                                  "TileCachePath": str(slides / "cache")}))
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--config", str(config),
                             "--port", "1"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lies inside the folder of slide 'b'" in lines[0]
    assert sorted(os.listdir(slides)) == ["b.tiff"]
