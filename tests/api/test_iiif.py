"""IIIF Image API 3.0 and Presentation 3.0 through the app: documents, pixels, caching, the
format policy, limits, headers, audit, errors."""

import json

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from app.core.render import RESAMPLING
from tests.conftest import decode

ASSOCIATED = ["label", "macro", "thumbnail"]


@pytest.fixture
def images(quick_svs, fixtures):
    return [{"Name": "quick", "Path": str(quick_svs)},
            {"Name": "unreadable", "Path": str(fixtures / "unreadable.svs")}]


def rgb(path, location, level, size):
    return np.asarray(openslide.open_slide(path).read_region(location, level, size)
                      .convert("RGB"))


def test_info_json_redirects_and_manifest(client_for, images, quick_svs):
    client = client_for(Images=images, Iiif={"MaxWidth": 2000, "MaxHeight": 2000,
                                             "MaxArea": 4_000_000})
    origin = str(client.base_url).rstrip("/")
    r = client.get("/iiif/3/quick/info.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["access-control-allow-origin"] == "*"
    info = r.json()
    assert info["id"] == f"{origin}/iiif/3/quick"
    assert (info["width"], info["height"], info["profile"]) == (3000, 2200, "level2")
    assert info["tiles"] == [{"width": 254, "height": 254, "scaleFactors": [1, 2, 4, 8, 16]}]
    assert (info["maxWidth"], info["maxHeight"], info["maxArea"]) == (2000, 2000, 4_000_000)
    assert info["sizes"][-1] == {"width": 1500, "height": 1100}  # 3000 px exceeds maxWidth
    assert info["preferredFormats"] == ["jpg", "png"]
    ld = client.get("/iiif/3/quick/info.json", headers={"Accept": "application/ld+json"})
    assert ld.headers["content-type"] == (
        'application/ld+json;profile="http://iiif.io/api/image/3/context.json"')
    assert ld.json() == info
    for base in ("/iiif/3/quick", "/iiif/3/quick/associated/label"):
        r = client.get(base, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == f"{origin}{base}/info.json"
    label = client.get("/iiif/3/quick/associated/label/info.json").json()
    assert label["id"] == f"{origin}/iiif/3/quick/associated/label"
    assert (label["width"], label["height"]) == openslide.open_slide(
        quick_svs).associated_images["label"].size
    assert client.get("/iiif/3/nope/info.json").status_code == 404
    assert client.get("/iiif/3/quick/associated/nope/info.json").status_code == 404

    manifest = client.get("/iiif/3/quick/manifest.json").json()
    assert manifest["type"] == "Manifest"
    assert manifest["id"] == f"{origin}/iiif/3/quick/manifest.json"
    canvases = manifest["items"]
    assert [c["label"]["none"][0] for c in canvases] == ["quick", *ASSOCIATED]
    slide_canvas = canvases[0]
    assert (slide_canvas["width"], slide_canvas["height"]) == (3000, 2200)
    [physdim] = slide_canvas["service"]
    assert physdim["physicalUnits"] == "mm" and physdim["physicalScale"] == pytest.approx(
        0.499e-3)
    body = slide_canvas["items"][0]["items"][0]["body"]
    assert body["service"][0] == {"id": f"{origin}/iiif/3/quick",
                                  "type": "ImageService3", "profile": "level2"}
    assert client.get(body["id"].removeprefix(origin)).status_code == 200
    metadata = {m["label"]["en"][0]: m["value"]["none"][0] for m in manifest["metadata"]}
    assert metadata["Vendor"] == "aperio" and metadata["Objective power"] == "20x"
    assert metadata["Microns per pixel"] == "0.499 x 0.499"


def test_privacy_hides_associated_images_and_properties_in_iiif(client_for, images):
    client = client_for(Images=images, Privacy={"HideAssociatedImages": True,
                                                "HideProperties": ["*AppMag", "*mpp*",
                                                                   "*objective-power"]})
    manifest = client.get("/iiif/3/quick/manifest.json").json()
    assert len(manifest["items"]) == 1 and "service" not in manifest["items"][0]
    metadata = {m["label"]["en"][0] for m in manifest["metadata"]}
    assert metadata == {"Vendor", "Dimensions"}
    for path in ("/iiif/3/quick/associated/label/info.json",
                 "/iiif/3/quick/associated/label/full/max/0/default.jpg"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"] == "associated_image_not_found"


def test_aligned_requests_are_dzi_tiles_and_share_their_cache(client_for, images, quick_svs,
                                                               tmp_path):
    cache = str(tmp_path / "cache")
    # Overlap 0: the IIIF tiles ARE the DZI tiles, the same cache entries.
    client = client_for(Images=images, TileCachePath=cache, DeepZoom={"Overlap": 0})
    dzi = client.get("/storage/quick_files/11/2_1.jpeg?format=png")
    iiif = client.get("/iiif/3/quick/1016,508,508,508/254,254/0/default.png")
    assert dzi.headers["x-tile-cache"] == "miss" and iiif.headers["x-tile-cache"] == "hit"
    assert iiif.content == dzi.content and iiif.headers["etag"] == dzi.headers["etag"]

    # Default overlap 1: the IIIF tiles are those of the same grid without overlap, rendered
    # as DeepZoomGenerator renders them, cached on disk.
    client = client_for(Images=images, TileCachePath=str(tmp_path / "cache1"))
    dz = DeepZoomGenerator(openslide.open_slide(quick_svs), 254, 0, True)
    for region, size, (level, col, row) in (
            ("2794,2032,206,168", "206,168", (12, 11, 8)),
            ("0,0,1016,1016", "254,254", (10, 0, 0)),
            ("full", "188,138", (8, 0, 0))):
        url = f"/iiif/3/quick/{region}/{size}/0/default.png"
        r = client.get(url)
        assert r.status_code == 200, r.text
        assert r.headers["x-tile-cache"] == "miss" and r.headers["x-tile-lossless"] == "true"
        assert np.array_equal(decode(r.content),
                              np.asarray(dz.get_tile(level, (col, row)).convert("RGB")))
    again = client_for(Images=images, TileCachePath=str(tmp_path / "cache1"))
    r = again.get("/iiif/3/quick/0,0,1016,1016/254,254/0/default.png")
    assert r.headers["x-tile-cache"] == "hit"  # from the disk cache of the first app


def test_regions_are_read_from_the_nearest_slide_level(client_for, images, quick_svs):
    client = client_for(Images=images)
    # full resolution, PNG: exactly read_region's pixels
    r = client.get("/iiif/3/quick/1001,703,333,222/max/0/default.png")
    assert r.status_code == 200
    assert r.headers["x-tile-lossless"] == "true" and r.headers["x-tile-format"] == "png"
    assert np.array_equal(decode(r.content), rgb(quick_svs, (1001, 703), 0, (333, 222)))
    # downsample 3: slide level 0 (downsample 1), never level 1 (downsample 4), one Lanczos
    r = client.get("/iiif/3/quick/300,300,900,600/300,200/0/default.png")
    level0 = Image.fromarray(rgb(quick_svs, (300, 300), 0, (900, 600)))
    assert np.array_equal(decode(r.content), np.asarray(level0.resize((300, 200), RESAMPLING)))
    # downsample 4 exactly: slide level 1
    r = client.get("/iiif/3/quick/400,400,800,400/200,100/0/default.png")
    assert np.array_equal(decode(r.content), rgb(quick_svs, (400, 400), 1, (200, 100)))
    # rotation, mirroring, gray and bitonal are exact transforms of the region
    base = decode(client.get("/iiif/3/quick/1001,703,333,222/max/0/default.png").content)
    turned = decode(client.get("/iiif/3/quick/1001,703,333,222/max/90/default.png").content)
    assert np.array_equal(turned, np.rot90(base, k=-1))
    mirrored = decode(client.get("/iiif/3/quick/1001,703,333,222/max/!180/color.png").content)
    assert np.array_equal(mirrored, np.flipud(base))
    gray = client.get("/iiif/3/quick/1001,703,333,222/max/0/gray.png")
    assert gray.headers["x-tile-lossless"] == "false"
    pixels = decode(gray.content)
    luma = np.asarray(Image.fromarray(base).convert("L"))
    assert np.array_equal(pixels[:, :, 0], luma) and np.array_equal(pixels[:, :, 2], luma)
    bitonal = decode(client.get("/iiif/3/quick/1001,703,333,222/max/0/bitonal.png").content)
    assert set(np.unique(bitonal)) <= {0, 255}


def test_format_policy_applies(client_for, images):
    client = client_for(Images=images, TileFormat={"EnforceLossless": True})
    top = client.get("/iiif/3/quick/1001,703,333,222/max/0/default.jpg")
    assert top.headers["content-type"] == "image/png"
    assert top.headers["x-tile-override"] == "refused"
    assert top.headers["x-tile-lossless"] == "true"
    aligned = client.get("/iiif/3/quick/0,0,254,254/254,254/0/default.jpg")
    assert aligned.headers["x-tile-format"] == "png"
    assert aligned.headers["x-tile-override"] == "refused"
    lower = client.get("/iiif/3/quick/0,0,1000,1000/500,500/0/default.jpg")
    assert lower.headers["content-type"] == "image/jpeg"
    assert "x-tile-override" not in lower.headers
    webp = client.get("/iiif/3/quick/0,0,1000,1000/500,500/0/default.webp")
    assert webp.headers["content-type"] == "image/webp"
    assert webp.content[8:12] == b"WEBP"


def test_limits_and_errors_before_any_pixel_is_read(client_for, images):
    client = client_for(Images=images, Iiif={"MaxWidth": 100, "MaxHeight": 100,
                                             "MaxArea": 5000})
    # unreadable.svs opens but its pixels cannot be read (500): a 400 proves nothing was read
    assert client.get("/iiif/3/unreadable/full/max/0/default.jpg").status_code == 500
    for path, status, code in (
            ("/iiif/3/unreadable/full/^100,100/0/default.jpg", 400, "bad_request"),
            ("/iiif/3/unreadable/full/16,16/45/default.jpg", 501, "not_implemented"),
            ("/iiif/3/unreadable/full/max/0/default.gif", 400, "bad_request"),
            ("/iiif/3/unreadable/full/max/0/grey.jpg", 400, "bad_request"),
            ("/iiif/3/unreadable/nonsense/max/0/default.jpg", 400, "bad_request"),
            ("/iiif/3/unreadable/20,0,5,5/max/0/default.jpg", 400, "bad_request"),
            ("/iiif/3/quick/full/80,80/0/default.jpg", 400, "bad_request"),
            ("/iiif/3/missing/full/max/0/default.jpg", 404, "slide_not_found"),
            ("/iiif/3/a/b/full/max/0/default.jpg", 404, "not_found")):
        r = client.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"] == code and r.json()["detail"]
    # max fits the limits: 3000x2200 -> 82x60 (maxArea 5000)
    r = client.get("/iiif/3/quick/full/max/0/default.png")
    assert decode(r.content).shape == (60, 82, 3)
    assert client.post("/iiif/3/quick/full/max/0/default.png").status_code == 405


def test_headers_etag_head_and_audit(client_for, images, tmp_path):
    audit = tmp_path / "audit" / "tiles.jsonl"
    client = client_for(Images=images, Audit={"Enabled": True, "Path": str(audit)})
    url = "/iiif/3/quick/0,0,254,254/254,254/0/default.jpg"
    first = client.get(url)
    assert first.headers["content-digest"].startswith("sha-256=:")
    assert first.headers["cache-control"] == "public, max-age=86400"
    assert first.headers["x-tile-source"] in ("original", "rendered")
    cached = client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert cached.status_code == 304 and not cached.content
    head = client.head(url)
    assert head.status_code == 200 and not head.content
    assert head.headers["etag"] == first.headers["etag"]
    client.get("/iiif/3/quick/full/max/45/default.jpg")
    client.__exit__(None, None, None)  # flush the audit log
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["method"], line["status"]) for line in lines] == [
        ("GET", 200), ("GET", 304), ("HEAD", 200), ("GET", 501)]
    assert lines[0]["path"] == url and lines[0]["slide"] == "quick"
    assert (lines[0]["level"], lines[0]["col"], lines[0]["row"]) == (12, 0, 0)
    assert lines[0]["sha256"] and lines[3]["error"] == "not_implemented"


def test_openapi_describes_the_iiif_routes(client_for, images):
    paths = client_for(Images=images).get("/openapi.json").json()["paths"]
    image = paths["/iiif/3/{name}/{region}/{size}/{rotation}/{quality}.{format}"]["get"]
    assert {p["name"] for p in image["parameters"]} == {
        "name", "region", "size", "rotation", "quality", "format"}
    assert "501" in image["responses"]
    for path in ("/iiif/3/{name}/info.json", "/iiif/3/{name}/manifest.json", "/iiif/3/{name}",
                 "/iiif/3/{name}/associated/{associated}/info.json"):
        assert path in paths
