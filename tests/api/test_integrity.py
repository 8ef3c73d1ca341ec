"""Integrity through the app: hostile slide folders and settings lose nothing, damaged cache
files are never served, bad files break only themselves, and no server path reaches a client.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import openslide
import pytest
import tifffile
from fastapi.testclient import TestClient
from openslide.deepzoom import DeepZoomGenerator

from app.cache.disk import MARKER, DiskTileCache, unseal
from app.core.errors import ConfigError
from app.server.app import create_app
from app.settings import settings_from
from tests.api.test_jobs import wait_job
from tests.conftest import decode, local_client


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """``{relative path: (size, mtime_ns, sha256)}`` of every file and link under ``root``
    (``skip``: a folder left out)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip:
            dirnames.clear()
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                      if path.is_file() and not path.is_symlink() else os.readlink(path))
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def reference_tile(path: Path, level: int, col: int, row: int) -> np.ndarray:
    dz = DeepZoomGenerator(openslide.open_slide(path), 254, 1, True)
    return np.asarray(dz.get_tile(level, (col, row)).convert("RGB"))


HOSTILE_STEMS = ["..", ".", ".hidden", "tab\there", "new\nline", "bidi\u202eevil"]
GOOD_STEMS = ["a b", "Präparat 12"]


@pytest.fixture
def hostile(tmp_path, fixtures):
    """A SlideDirectory of hostile and good names, a symlink out of it, and canaries."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for stem in HOSTILE_STEMS + GOOD_STEMS:
        shutil.copy(fixtures / "boxes.tiff", slides / f"{stem}.tiff")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(fixtures / "small.svs", outside / "secret.svs")
    (slides / "out.svs").symlink_to(outside / "secret.svs")
    (tmp_path / "canary.txt").write_text("beside the cache")
    (slides / "notes.txt").write_text("beside the slides")
    return tmp_path


def test_hostile_slide_folder_loses_nothing(hostile):
    cache = hostile / "cache"
    before = snapshot(hostile)
    client = local_client(create_app(settings_from({
        "SlideDirectory": str(hostile / "slides"), "TileCachePath": str(cache)})))
    with client:
        names = [item["name"] for item in client.get("/api/images").json()]
        assert sorted(names) == sorted(GOOD_STEMS)  # hostile stems and the link out: skipped
        for stem in GOOD_STEMS:  # spaces and non-ASCII letters work
            r = client.get(f"/storage/{quote(stem)}_files/9/0_0.png")
            assert r.status_code == 200
            expected = reference_tile(hostile / "slides" / f"{stem}.tiff", 9, 0, 0)
            assert np.array_equal(decode(r.content), expected)
        for name in [*HOSTILE_STEMS, "...", "out", "secret", "%2e%2e", "%2e", "..%2F..",
                     "%2Fetc", "a%00b"]:
            url = quote(name, safe="%").replace(".", "%2e")  # clients would resolve ./ and ../
            for method, path in [("GET", f"/storage/{url}.dzi"),
                                 ("GET", f"/storage/{url}_files/9/0_0.jpeg"),
                                 ("GET", f"/api/tiles/{url}/stats"),
                                 ("DELETE", f"/api/tiles/{url}/cache"),
                                 ("POST", f"/api/tiles/{url}/generate")]:
                r = client.request(method, path)
                assert r.status_code in (404, 405), (method, path, r.status_code)
                assert r.headers["content-type"] == "application/json"
                assert str(hostile) not in r.text
        assert client.delete("/api/tiles/cache").status_code == 200
    after = snapshot(hostile, skip=cache)
    assert after == before  # every slide, link and canary as it was; nothing written outside
    left = [n for n in os.listdir(cache)
            if not n.startswith((".index.sqlite", ".coordination.sqlite"))]
    assert left == [MARKER]  # the cache's own files only


@pytest.mark.parametrize("layout", ["cache is the slide folder", "cache inside the slide folder",
                                    "slide folder inside the cache", "cache is SlideDirectory",
                                    "cache is the audit folder", "cache holds other files"])
def test_hostile_cache_locations_are_refused_and_lose_nothing(tmp_path, fixtures, layout):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(fixtures / "boxes.tiff", slides / "b.tiff")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.txt").write_text("do not delete")
    cache, extra = {
        "cache is the slide folder": (slides, {}),
        "cache inside the slide folder": (slides / "cache", {}),
        "slide folder inside the cache": (tmp_path, {}),
        "cache is SlideDirectory": (slides, {"SlideDirectory": str(slides), "Images": []}),
        "cache is the audit folder": (tmp_path / "audit", {
            "Audit": {"Enabled": True, "Path": str(tmp_path / "audit" / "a.jsonl")}}),
        "cache holds other files": (tmp_path / "home", {}),
    }[layout]
    before = snapshot(tmp_path)
    settings = settings_from({"Images": [{"Name": "b", "Path": str(slides / "b.tiff")}],
                              "TileCachePath": str(cache), **extra})
    with pytest.raises(ConfigError, match="TileCachePath"), TestClient(create_app(settings)):
        pass
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip"])
def test_damaged_cache_files_are_rendered_again_never_served(client_for, fixtures, tmp_path,
                                                            damage):
    settings = dict(Images=[{"Name": "b", "Path": str(fixtures / "boxes.tiff")}],
                    TileCachePath=str(tmp_path / "cache"), Server={"MemoryCacheBytes": 0})
    client = client_for(**settings)
    expected = reference_tile(fixtures / "boxes.tiff", 9, 1, 0)
    first = client.get("/storage/b_files/9/1_0.png")
    path = next((tmp_path / "cache" / "b").rglob("9/1_0.png"))
    stored = path.read_bytes()
    assert unseal(stored)[0] == first.content
    path.write_bytes({"truncate": stored[: len(stored) // 3],
                      "zero": bytes(len(stored)),
                      "flip": stored[:60] + bytes([stored[60] ^ 0x10]) + stored[61:]}[damage])
    served = client.get("/storage/b_files/9/1_0.png")
    assert served.status_code == 200 and served.headers["x-tile-cache"] == "miss"
    assert np.array_equal(decode(served.content), expected)
    assert served.headers["content-digest"] == first.headers["content-digest"]
    assert path.read_bytes() == stored  # replaced whole
    assert client.get("/storage/b_files/9/1_0.png").headers["x-tile-cache"] == "hit"
    assert client.get("/api/tiles/stats").json()["corruptTiles"] == 1


def decompression_bomb(path: Path) -> Path:
    """A striped TIFF (OpenSlide refuses it; Pillow opens it) that claims 60000 x 60000 px."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(60000)
        tags["ImageLength"].overwrite(60000)
        tags["RowsPerStrip"].overwrite(60000)
    return path


def test_bad_files_break_only_themselves(client_for, tmp_path, fixtures, generated_svs):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(fixtures / "boxes.tiff", slides / "good.tiff")
    shutil.copy(generated_svs, slides / "generated.svs")
    decompression_bomb(slides / "bomb.tif")
    (slides / "notes.svs").write_text("not a slide")
    (slides / "folder.svs").mkdir()
    (slides / "dangling.svs").symlink_to(tmp_path / "nowhere.svs")
    client = client_for(SlideDirectory=str(slides), TileCachePath=str(tmp_path / "cache"),
                        TileFormat={"LosslessLevelCount": 0})
    r = client.get("/api/images")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    images = {item["name"]: item for item in r.json()}
    assert set(images) == {"good", "generated", "bomb", "notes"}
    assert images["bomb"]["errorCode"] == images["notes"]["errorCode"] == "slide_unopenable"
    assert "decompression bomb" in images["bomb"]["error"]  # Pillow refused it, alone
    assert "dimensions" in images["good"]
    for name in ("bomb", "notes"):
        r = client.get(f"/storage/{name}_files/0/0_0.jpeg")
        assert r.status_code == 500 and r.json()["slide"] == name
    assert client.get("/storage/good_files/9/0_0.jpeg").status_code == 200
    job = client.post("/api/tiles/generate-all?levels=0-8").json()
    doc = wait_job(client, job["id"])
    assert doc["tiles_done"] > 0 and "bomb" in doc["error"] and "notes" in doc["error"]
    for name in ("good", "generated"):
        assert client.get(f"/api/tiles/{name}/stats").json()["cachedTiles"] > 0
    texts = [r.text, client.get("/api/images").text, client.get(f"/api/jobs/{job['id']}").text,
             client.get("/storage/bomb_files/0/0_0.jpeg").text]
    assert not [t for t in texts if str(tmp_path) in t]  # no server path reaches a client


def test_a_deleted_slide_answers_404_and_its_tiles_are_swept(client_for, tmp_path, fixtures):
    slides = tmp_path / "slides"
    slides.mkdir()
    slide = slides / "b.tiff"
    shutil.copy(fixtures / "boxes.tiff", slide)
    client = client_for(Images=[{"Name": "b", "Path": str(slide)}],
                        TileCachePath=str(tmp_path / "cache"), Server={"RevalidateSeconds": 0})
    assert client.get("/storage/b_files/9/0_0.png").status_code == 200
    assert list(DiskTileCache(tmp_path / "cache").walk("b"))
    slide.unlink()
    r = client.get("/storage/b_files/9/0_0.png")
    assert r.status_code == 404 and r.json()["error"] == "slide_not_found"
    assert client.get("/storage/b.dzi").status_code == 404
    deadline = time.monotonic() + 10
    while list(DiskTileCache(tmp_path / "cache").walk("b")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(DiskTileCache(tmp_path / "cache").walk("b"))
    assert client.get("/api/images").json() == []


def test_content_sha256_is_computed_once_and_reported(client_for, tmp_path, generated_svs):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileCachePath=str(tmp_path / "cache"),
                        Integrity={"ContentSha256": True})
    expected = hashlib.sha256(generated_svs.read_bytes()).hexdigest()
    deadline = time.monotonic() + 30
    while (doc := client.get("/api/slides/g").json())["sha256"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert doc["sha256"] == expected
    assert client.get("/api/slides/g/policy").json()["sha256"] == expected
    # stored beside the cache: a new app (a restart) knows it at once
    again = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                       TileCachePath=str(tmp_path / "cache"), Integrity={"ContentSha256": True})
    assert again.get("/api/slides/g").json()["sha256"] == expected
