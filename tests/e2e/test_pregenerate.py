"""End to end: `tileserver pregenerate` and `tileserver export` as processes, kill -9 and resume,
a full and a read-only disk (tmpfs mounts in a user namespace), the Dask path on a LocalCluster,
and an export served by Python's http.server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from app.cache.disk import DiskTileCache, unseal
from app.tools.launch import ServerProcess, free_port, group_alive
from tests.conftest import decode, start_server, stop_server

CLI = [sys.executable, "-m", "app.cli"]
DEADLINE = 300.0  # seconds a command may take on a loaded 2-core machine


def run_cli(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "__" not in k}
    return subprocess.run([*prefix, *CLI, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=DEADLINE)


def slide_args(cache: Path, slide: Path, *extra: str) -> list[str]:
    return ["Images:0:Name=g", f"Images:0:Path={slide}", f"TileCachePath={cache}", *extra]


def tiles_on_disk(root: Path) -> list[Path]:
    """The tile files of a cache (temporary files, the marker and the index left out)."""
    cache = DiskTileCache(root)
    return [cache.path_for(key) for key, _size, _mtime in cache.walk()]


def assert_cache_equals_on_demand(client_for, cache: Path, slide: Path, **sections) -> int:
    """Every tile of every level, rendered on demand by an app with an empty cache of its own,
    equals the file pregeneration wrote; returns the number of tiles compared."""
    app = client_for(Images=[{"Name": "g", "Path": str(slide)}],
                     TileCachePath=str(cache.parent / "on-demand"), **sections)
    reader = client_for(Images=[{"Name": "g", "Path": str(slide)}], TileCachePath=str(cache),
                        **sections)
    compared = 0
    for level in app.get("/api/slides/g").json()["levels"]:
        for row in range(level["rows"]):
            for col in range(level["cols"]):
                url = f"/storage/g_files/{level['level']}/{col}_{row}.jpeg"
                fresh, stored = app.get(url), reader.get(url)
                assert fresh.headers["x-tile-cache"] == "miss"
                assert stored.headers["x-tile-cache"] == "hit", url  # pregenerated file
                assert fresh.content == stored.content, url
                compared += 1
    return compared


def test_pregenerate_cli_writes_the_tiles_the_server_renders(tmp_path, quick_svs, client_for):
    cache = tmp_path / "cache"
    done = run_cli("pregenerate", *slide_args(cache, quick_svs), "--workers", "2",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tiles written, 0 skipped" in done.stdout and "tiles/s" in done.stderr  # rich bar
    compared = assert_cache_equals_on_demand(client_for, cache, quick_svs)
    assert len(tiles_on_disk(cache)) == compared
    again = run_cli("pregenerate", "g", *slide_args(cache, quick_svs), "--levels", "9-11",
                    cwd=tmp_path)
    assert again.returncode == 0 and " 0 tiles written" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--levels", "x"], "levels 'x'"),
    (["nope"], "no slide named 'nope'"),
    (["TileFormat:JpegQuality=0"], "TileFormat:JpegQuality"),
])
def test_pregenerate_cli_bad_input(tmp_path, generated_svs, args, message):
    result = run_cli("pregenerate", *slide_args(tmp_path / "c", generated_svs), *args,
                     cwd=tmp_path)
    assert result.returncode in (1, 2) and message in result.stderr


def test_unreadable_slide_fails_with_openslide_message(tmp_path, fixtures):
    cache = tmp_path / "cache"
    result = run_cli("pregenerate", *slide_args(cache, fixtures / "unreadable.svs"), cwd=tmp_path)
    assert result.returncode == 1 and "Bogus marker length" in result.stderr
    assert not tiles_on_disk(cache)


def test_kill_9_mid_pyramid_then_resume(tmp_path, quick_svs, client_for):
    """kill -9 the CLI and its worker processes mid-pyramid: every file in the cache is whole;
    the next run removes the killed writers' temporary files, skips the whole tiles and
    completes the pyramid, byte-identical to on-demand tiles.

    Every level is PNG at libdeflate level 9 (about 25 ms a tile, against 1 ms at level 1), so
    that the 120 tiles still to write after the first 40 keep the workers busy for a second or
    more: the kill lands while they write, never after they finished."""
    cache = tmp_path / "cache"
    slow = ["TileFormat:LosslessLevelCount=-1", "TileFormat:PngCompressLevel=9"]
    env = {k: v for k, v in os.environ.items() if "__" not in k}
    process = subprocess.Popen([*CLI, "pregenerate", *slide_args(cache, quick_svs, *slow)],
                               cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and len(tiles_on_disk(cache)) < 40:
        assert process.poll() is None, "finished before it could be killed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    while group_alive(process.pid):  # the killed workers are gone
        assert time.monotonic() < deadline, "killed workers still run"
        time.sleep(0.01)
    written = tiles_on_disk(cache)
    total = client_for(Images=[{"Name": "g", "Path": str(quick_svs)}]).get(
        "/api/slides/g").json()["tile_count"]
    assert 40 <= len(written) < total
    for path in written:  # whole files only: a truncated one fails its seal
        stored = unseal(path.read_bytes())
        assert stored is not None and decode(stored[0]).ndim == 3

    resumed = run_cli("pregenerate", *slide_args(cache, quick_svs, *slow), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stdout.split(" skipped")[0].rsplit(" ", 1)[1])
    assert skipped >= len(written)
    assert not list(cache.rglob(".tmp-*"))
    sections = {"TileFormat": {"LosslessLevelCount": -1, "PngCompressLevel": 9}}
    assert assert_cache_equals_on_demand(client_for, cache, quick_svs, **sections) == total


def in_namespace_with_tmpfs(mountpoint: Path, options: str) -> tuple[str, ...]:
    """A command prefix: a user + mount namespace (``unshare -rm``) where ``mountpoint`` is a
    fresh tmpfs mounted with ``options`` (``size=...``; ``ro``)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o {options} none "{mountpoint}" && exec "$@"'
    return ("unshare", "-rm", "sh", "-c", script, "sh")


@pytest.mark.parametrize("options, message", [
    ("size=96k", "No space left on device"),
    ("ro", "Read-only file system"),
])
def test_full_or_read_only_disk_fails_clearly(tmp_path, generated_svs, options, message):
    cache = tmp_path / "cache"
    result = run_cli("pregenerate", *slide_args(cache, generated_svs), cwd=tmp_path,
                     prefix=in_namespace_with_tmpfs(cache, options))
    assert result.returncode == 1, result.stderr
    assert "cannot write the tile cache" in result.stderr and message in result.stderr


def test_server_job_fails_on_a_full_disk_and_the_server_keeps_serving(tmp_path, generated_svs):
    cache = tmp_path / "cache"
    settings = {"TileCachePath": str(cache), "Images": [{"Name": "g", "Path": str(generated_svs)}]}
    server = start_server(tmp_path, settings,
                          prefix=in_namespace_with_tmpfs(cache, "size=96k"))
    try:
        job = httpx.post(server.base_url + "/api/tiles/g/generate", timeout=30).json()
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            doc = server.get(f"/api/jobs/{job['id']}").json()
            if doc["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert doc["state"] == "failed" and "No space left on device" in doc["error"]
        assert doc["error_code"] == "cache_not_writable"
        tile = server.get("/storage/g_files/12/1_1.jpeg")
        assert tile.status_code == 200 and decode(tile.content).shape == (256, 256, 3)
        assert server.get("/healthz").status_code == 200
    finally:
        stop_server(server)


def test_dask_local_cluster(tmp_path, quick_svs, client_for):
    from distributed import LocalCluster

    cache = tmp_path / "cache"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        result = run_cli("pregenerate", *slide_args(cache, quick_svs),
                         "--scheduler", cluster.scheduler_address, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    compared = assert_cache_equals_on_demand(client_for, cache, quick_svs)
    assert len(tiles_on_disk(cache)) == compared


def test_export_served_by_a_static_server(tmp_path, quick_svs, client_for):
    out = tmp_path / "export"
    result = run_cli("export", str(quick_svs), str(out),
                     f"TileCachePath={tmp_path / 'unused'}", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "quick.html").is_file()
    assert (out / "openseadragon" / "openseadragon.min.js").is_file()
    app = client_for(Images=[{"Name": "quick", "Path": str(quick_svs)}])
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(out),
            str(port)]
    with ServerProcess(argv, port, tmp_path / "static.log", ready_path="/quick.dzi",
                       ready_timeout=30) as static:
        base = static.base_url
        dzi = httpx.get(f"{base}/quick.dzi", timeout=5)
        assert dzi.text == app.get("/storage/quick.dzi").text
        image = ET.fromstring(dzi.text)
        assert image.get("Format") == "jpeg"
        description = httpx.get(f"{base}/quick.json", timeout=5).json()
        assert description["tile_size"] == int(image.get("TileSize"))
        with httpx.Client(base_url=base, timeout=10) as web:
            for level in description["levels"]:
                ext = level["format"]
                for row in range(level["rows"]):
                    for col in range(level["cols"]):
                        served = web.get(f"/quick_files/{level['level']}/{col}_{row}.{ext}")
                        assert served.status_code == 200
                        assert served.headers["content-type"] == f"image/{ext}"
                        on_demand = app.get(
                            f"/storage/quick_files/{level['level']}/{col}_{row}.jpeg")
                        assert served.content == on_demand.content
        assert description["levels"][-1]["format"] == "png"  # the lossless top level
        page = httpx.get(f"{base}/quick.html", timeout=5).text
        source = json.loads(page.split("const source = ")[1].split(";\n")[0])
        assert source["formats"] == [lvl["format"] for lvl in description["levels"]]
    shutil.rmtree(out)


def test_aligned_geometry_pregenerate_skips_and_export_writes_original_tiles(tmp_path,
                                                                               client_for):
    """With passthrough, original tiles come from the slide: pregeneration leaves them out of
    the cache (the server never reads it for them), export writes the same bytes the server
    sends, and every other tile is byte-identical to an on-demand render."""
    from app.tools.demo import write_aperio_svs

    (tmp_path / "slides").mkdir()
    slide = write_aperio_svs(tmp_path / "slides" / "a.svs", 1500, 1100, photometric="rgb",
                             app14=False, seed=9)
    aligned = ("DeepZoom:Geometry=aligned", "TileFormat:LosslessLevelCount=0")
    cache = tmp_path / "cache"
    done = run_cli("pregenerate", *slide_args(cache, slide, *aligned), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sections = {"DeepZoom": {"Geometry": "aligned"}, "TileFormat": {"LosslessLevelCount": 0}}
    reader = client_for(Images=[{"Name": "g", "Path": str(slide)}], TileCachePath=str(cache),
                        **sections)
    info = reader.get("/api/slides/g").json()
    originals = sum(level["original_tiles"] for level in info["levels"])
    assert originals == (1500 // 240) * (1100 // 240)
    assert len(tiles_on_disk(cache)) == info["tile_count"] - originals
    out = tmp_path / "export"
    result = run_cli("export", "g", str(out), *slide_args(tmp_path / "c2", slide, *aligned),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = set()
    for level in info["levels"]:
        for row in range(level["rows"]):
            for col in range(level["cols"]):
                served = reader.get(f"/storage/g_files/{level['level']}/{col}_{row}.jpeg")
                exported = (out / "g_files" / str(level["level"]) / f"{col}_{row}.jpeg")
                assert exported.read_bytes() == served.content
                seen.add(served.headers["x-tile-source"])
                if served.headers["x-tile-source"] == "rendered":
                    assert served.headers["x-tile-cache"] == "hit"  # pregenerated
    assert seen == {"original", "rendered"}
