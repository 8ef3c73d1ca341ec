"""Associated images as DZIs through the app, and the PHI switch (``Privacy``)."""

import os

import numpy as np
import openslide
import pytest
from openslide import ImageSlide
from openslide.deepzoom import DeepZoomGenerator

from tests.conftest import decode

ASSOCIATED = ("label", "macro", "thumbnail")


@pytest.fixture
def images(generated_svs, fixtures):
    return [{"Name": "generated", "Path": str(generated_svs)},
            {"Name": "dicom", "Path": str(fixtures / "boxes_0.dcm")}]


def associated_generator(path, name, limit_bounds=True):
    slide = openslide.open_slide(path)
    return DeepZoomGenerator(ImageSlide(slide.associated_images[name]), 254, 1, limit_bounds)


def test_associated_images_are_dzis_with_the_slide_pipeline(client_for, images, generated_svs):
    client = client_for(Images=images, TileFormat={"LosslessLevelCount": 2})
    doc = client.get("/api/slides/generated").json()
    assert doc["associated_images"] == sorted(ASSOCIATED)
    for item in doc["associated"]:
        name = item["name"]
        dz = associated_generator(generated_svs, name)
        assert (item["width"], item["height"]) == dz.level_dimensions[-1]
        assert item["dzi_url"] == f"/storage/generated/associated/{name}.dzi"
        assert client.get(item["dzi_url"]).text == dz.get_dzi("jpeg")
        top = dz.level_count - 1
        for level in (top, top - 1):
            cols, rows = dz.level_tiles[level]
            for col, row in {(0, 0), (cols - 1, rows - 1)}:
                r = client.get(f"/storage/generated/associated/{name}_files/{level}/"
                               f"{col}_{row}.jpeg")
                assert r.status_code == 200
                assert r.headers["x-tile-format"] == "png"  # the policy: top 2 levels lossless
                assert r.headers["x-tile-lossless"] == "true"
                expected = np.asarray(dz.get_tile(level, (col, row)).convert("RGB"))
                assert np.array_equal(decode(r.content), expected)
        lossy = client.get(f"/storage/generated/associated/{name}_files/{top - 2}/0_0.jpeg")
        assert lossy.headers["content-type"] == "image/jpeg"
        assert lossy.headers["x-tile-lossless"] == "false"
        preview = client.get(item["preview_url"])
        assert preview.status_code == 200
        assert max(decode(preview.content).shape[:2]) <= 254
        assert client.get(item["preview_url"]).headers["x-tile-cache"] == "hit"
        assert client.get(item["viewer_url"]).status_code == 200
        api = client.get(f"/api/slides/generated/associated/{name}").json()
        assert api["level_count"] == dz.level_count and api["dzi_url"] == item["dzi_url"]


def test_associated_images_carry_their_own_icc_profile(client_for, images, fixtures):
    client = client_for(Images=images)
    slide = openslide.open_slide(fixtures / "boxes_0.dcm")
    profile = slide.associated_images["thumbnail"].info["icc_profile"]
    r = client.get("/storage/dicom/associated/thumbnail_files/4/0_0.png")
    from io import BytesIO

    from PIL import Image
    with Image.open(BytesIO(r.content)) as im:
        assert im.info["icc_profile"] == profile


def test_single_slide_associated_routes(client_for, generated_svs):
    client = client_for(Image={"Path": str(generated_svs)})
    dz = associated_generator(generated_svs, "label")
    assert client.get("/image/associated/label.dzi").text == dz.get_dzi("jpeg")
    r = client.get("/image/associated/label_files/8/0_0.png")
    assert np.array_equal(decode(r.content), np.asarray(dz.get_tile(8, (0, 0)).convert("RGB")))
    doc = client.get("/api/slides/image").json()
    assert {i["dzi_url"] for i in doc["associated"]} == {
        f"/image/associated/{n}.dzi" for n in ASSOCIATED}


@pytest.mark.parametrize("url, code", [
    ("/storage/generated/associated/nope.dzi", "associated_image_not_found"),
    ("/storage/generated/associated/nope_files/0/0_0.jpeg", "associated_image_not_found"),
    ("/api/slides/generated/associated/nope", "associated_image_not_found"),
    ("/slide/generated/associated/nope.html", "associated_image_not_found"),
    ("/storage/missing/associated/label.dzi", "slide_not_found"),
    ("/storage/generated/associated/label_files/99/0_0.jpeg", "tile_not_found"),
    ("/storage/generated/associated/label_files/8/5_5.jpeg", "tile_not_found"),
])
def test_associated_bad_input_is_404(client_for, images, url, code):
    r = client_for(Images=images).get(url)
    assert r.status_code == 404 and r.json()["error"] == code


def test_hidden_associated_images_404_everywhere_even_when_cached(client_for, images,
                                                                  tmp_path):
    cache = str(tmp_path / "cache")
    url = "/storage/generated/associated/label_files/8/0_0.jpeg"
    open_client = client_for(Images=images, TileCachePath=cache)
    assert open_client.get(url).status_code == 200  # now on disk
    client = client_for(Images=images, TileCachePath=cache,
                        Privacy={"HideAssociatedImages": True})
    for name in ASSOCIATED:
        for path in (f"/storage/generated/associated/{name}.dzi",
                     f"/storage/generated/associated/{name}_files/8/0_0.jpeg",
                     f"/api/slides/generated/associated/{name}",
                     f"/slide/generated/associated/{name}.html"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"] == "associated_image_not_found"  # as for a missing one
    doc = client.get("/api/slides/generated").json()
    assert doc["associated_images"] == [] and doc["associated"] == []
    assert not any(k.startswith("openslide.associated.") for k in doc["properties"])
    assert "/associated/" not in client.get("/api/slides/generated").text
    assert client.get("/storage/generated_files/10/0_0.jpeg").status_code == 200


def test_hidden_properties_are_absent_from_every_document(client_for, images, generated_svs,
                                                          tmp_path):
    hide = ["aperio.User", "*.filename", "tiff.ImageDescription", "aperio.Date",
            "openslide.mpp-*", "aperio.MPP", "openslide.quickhash-1"]
    client = client_for(Images=images, Privacy={"HideProperties": hide})
    slide = openslide.open_slide(generated_svs)
    secrets = {slide.properties[k] for k in ("aperio.User", "aperio.Filename", "aperio.Date")}
    doc = client.get("/api/slides/generated").json()
    for key in ("aperio.User", "aperio.Filename", "aperio.Date", "tiff.ImageDescription",
                "openslide.mpp-x", "openslide.quickhash-1"):
        assert key not in doc["properties"]
    assert doc["properties"]["aperio.AppMag"] == "20"
    assert doc["mpp"] is None and doc["quickhash"] is None
    for url in ("/api/slides/generated", "/api/images", "/storage/generated.dzi",
                "/slide/generated.html", "/api/slides/generated/associated/label",
                "/storage/generated/associated/label.dzi", "/"):
        text = client.get(url).text
        assert not any(secret in text for secret in secrets), url
    client.get("/storage/generated/associated/label_files/8/0_0.jpeg")
    client.get("/storage/generated_files/10/0_0.jpeg")
    cached = [p for _, dirs, files in os.walk(tmp_path / "cache") for p in dirs + files]
    assert cached and not any(name in p for p in cached for name in ASSOCIATED)


def test_withheld_quickhash_leaves_no_fingerprint_in_any_document(client_for, generated_svs,
                                                                    tmp_path):
    """With ``openslide.quickhash-1`` (and a date) withheld, neither the quickhash, nor the
    file's size and modification time (the identity), nor the whole-file SHA-256 reach a
    client: slide and policy documents, listings, DZI, tiles, jobs, the export's sidecar."""
    import hashlib
    import json

    from app.batch.export import export_slide
    from app.core.slides import SlideRegistry, build_catalogue
    from app.settings import settings_from

    sections = {"Images": [{"Name": "g", "Path": str(generated_svs)}],
                "Privacy": {"HideProperties": ["openslide.quickhash-1", "aperio.Date"]},
                "Integrity": {"ContentSha256": True}}
    client = client_for(**sections)
    quickhash = openslide.open_slide(generated_svs).properties["openslide.quickhash-1"]
    stat = generated_svs.stat()
    secrets = (quickhash, str(stat.st_mtime_ns), f"size={stat.st_size}")
    policy = client.get("/api/slides/g/policy").json()
    assert policy["quickhash"] is None and policy["sha256"] is None
    assert policy["identity"].startswith("opaque:") and len(policy["identity"]) == 39
    assert client.get("/api/slides/g").json()["sha256"] is None
    tile = client.get("/storage/g_files/12/0_0.jpeg")
    assert tile.headers["etag"] == '"' + hashlib.sha256(tile.content).hexdigest()[:32] + '"'
    job = client.post("/api/tiles/g/generate?levels=0")
    client.delete(f"/api/jobs/{job.json()['id']}")
    texts = {url: client.get(url).text for url in (
        "/api/slides/g", "/api/slides/g/policy", "/api/images", "/storage/g.dzi", "/api/jobs",
        "/api/tiles/g/stats", "/slide/g.html")}
    texts["tile headers"] = str(tile.headers)
    texts["job"] = job.text
    settings = settings_from({**sections, "TileCachePath": str(tmp_path / "cache")})
    out = tmp_path / "export"
    export_slide(settings, SlideRegistry(build_catalogue(settings), settings), "g", out,
                 levels=(0,), workers=1)
    sidecar = json.loads((out / "g.json").read_text())
    assert sidecar["quickhash"] is None and sidecar["identity"] == policy["identity"]
    texts.update({path.name: path.read_text() for path in out.glob("g.*")})
    for where, text in texts.items():
        assert not any(secret in text for secret in secrets), where


def test_hash_slide_names_keep_file_names_from_every_client_document(client_for, fixtures,
                                                                     tmp_path):
    """``Privacy.SlideNames: hash``: URLs, listings, pages, error details and job documents
    name slides by hash; ``Images`` keep their names; properties that repeat the file's name
    (``aperio.Filename`` of CMU-1.svs) are withheld."""
    import shutil
    import time

    from app.core.slides import opaque_slide_name

    folder = tmp_path / "slides"
    folder.mkdir()
    cmu = shutil.copy(fixtures / "small.svs", folder / "CMU-1.svs")
    broken = shutil.copy(fixtures / "unopenable.tiff", folder / "jones-mrn-55501.tiff")
    client = client_for(SlideDirectory=str(folder), Privacy={"SlideNames": "hash"},
                        Images=[{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}])
    good, bad = opaque_slide_name(cmu), opaque_slide_name(broken)
    listing = client.get("/api/images").json()
    names = [item["name"] for item in listing]
    assert names == ["boxes", good, bad]  # SlideDirectory in file order, after Images
    assert all(item["file"] is None for item in listing)
    doc = client.get(f"/api/slides/{good}").json()
    assert "aperio.Filename" not in doc["properties"] and doc["properties"]["aperio.AppMag"]
    error = client.get(f"/storage/{bad}_files/0/0_0.jpeg").json()
    assert error["detail"].startswith(f"OpenSlide cannot open the file of slide {bad}: ")
    job_id = client.post("/api/tiles/generate-all?levels=0").json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/api/jobs/{job_id}").json()["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    texts = {url: client.get(url).text for url in (
        "/", "/api/images", "/api/jobs", f"/api/jobs/{job_id}", "/api/tiles/stats",
        *(f"{prefix}{n}{suffix}" for n in names for prefix, suffix in (
            ("/api/slides/", ""), ("/api/slides/", "/policy"), ("/storage/", ".dzi"),
            ("/slide/", ".html"), ("/storage/", "_files/0/0_0.jpeg"),
            ("/api/tiles/", "/stats"))))}
    assert "of slide " + bad in texts[f"/api/jobs/{job_id}"]  # the failure, by name
    words = ("CMU-1", "jones", "55501", "boxes.tiff", str(tmp_path))
    for url, text in texts.items():
        assert not [word for word in words if word in text], (url, text[:300])
