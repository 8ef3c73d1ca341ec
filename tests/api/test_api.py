"""The JSON API and the pages, through the app."""

import pytest


@pytest.fixture
def client(client_for, fixtures, generated_svs, tmp_path):
    return client_for(TileCachePath=str(tmp_path / "cache"),
                      Images=[{"Name": "generated", "Path": str(generated_svs)},
                              {"Name": "boxes", "Path": str(fixtures / "boxes.tiff")},
                              {"Name": "small", "Path": str(fixtures / "small.svs")}])


def test_slide_document(client, generated_svs):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    doc = client.get("/api/slides/generated").json()
    slide = openslide.OpenSlide(generated_svs)
    dz = DeepZoomGenerator(slide, 254, 1, True)
    assert doc["vendor"] == "aperio"
    assert doc["dimensions"] == list(slide.dimensions)
    assert doc["mpp"] == [pytest.approx(0.499), pytest.approx(0.499)]
    assert doc["level_count"] == dz.level_count and doc["tile_count"] == dz.tile_count
    assert doc["declared_format"] == "jpeg" and doc["dzi_url"] == "/storage/generated.dzi"
    assert set(doc["associated_images"]) >= {"thumbnail"}
    assert doc["quickhash"] == slide.properties["openslide.quickhash-1"]
    levels = doc["levels"]
    assert [(lv["width"], lv["height"]) for lv in levels] == list(dz.level_dimensions)
    assert [(lv["cols"], lv["rows"]) for lv in levels] == [tuple(t) for t in dz.level_tiles]
    assert [lv["format"] for lv in levels] == ["jpeg"] * (dz.level_count - 1) + ["png"]
    assert [lv["lossless"] for lv in levels] == [False] * (dz.level_count - 1) + [True]
    assert levels[-1]["quality"] is None and levels[0]["quality"] == 90
    assert levels[-1]["slide_level"] == 0 and levels[0]["slide_level"] == slide.level_count - 1
    for lv in levels:
        assert lv["slide_level"] == dz.get_tile_coordinates(lv["level"], (0, 0))[1]


def test_images_and_stats_and_clear(client, tmp_path):
    images = client.get("/api/images").json()
    assert [i["name"] for i in images] == ["generated", "boxes", "small"]
    assert images[1]["dimensions"] == [300, 250] and images[1]["level_count"] == 10
    assert all(i["cachedTiles"] == 0 for i in images)

    for col in range(3):
        assert client.get(f"/storage/boxes_files/9/{col % 2}_0.jpeg").status_code == 200
    client.get("/storage/generated_files/10/0_0.jpeg")
    stats = client.get("/api/tiles/boxes/stats").json()
    assert stats["imageName"] == "boxes" and stats["cachedTiles"] == 2
    levels = client.get("/api/slides/boxes").json()["levels"]
    total_tiles = sum(lv["cols"] * lv["rows"] for lv in levels)
    assert stats["totalTiles"] == total_tiles == 11
    assert stats["cachePercentage"] == round(100 * 2 / total_tiles, 2)
    assert stats["cacheSizeBytes"] == sum(  # level 9 is lossless: PNG files
        p.stat().st_size for p in (tmp_path / "cache" / "boxes").rglob("*.png"))
    assert stats["cacheSizeMiB"] == round(stats["cacheSizeBytes"] / 2**20, 2)
    # a format override is a current variant too, but not the level's own format
    assert client.get("/storage/boxes_files/9/0_0.jpeg?format=webp").status_code == 200
    stats = client.get("/api/tiles/boxes/stats").json()
    assert stats["cachedTiles"] == 3
    assert stats["cachePercentage"] == round(100 * 2 / total_tiles, 2)
    total = client.get("/api/tiles/stats").json()
    assert total["cachedTiles"] == 4 and set(total) == {
        "cachedTiles", "cacheSizeBytes", "cacheSizeMiB", "staleTiles", "staleSizeBytes",
        "staleSizeMiB", "otherTiles", "otherSizeBytes", "otherSizeMiB", "corruptTiles",
        "limitBytes", "highWatermarkBytes", "lowWatermarkBytes", "usedBytes", "evictedTiles"}
    assert total["usedBytes"] == sum(p.stat().st_size
                                     for p in (tmp_path / "cache").rglob("*_*.*"))
    assert total["staleTiles"] == total["otherTiles"] == total["corruptTiles"] == 0
    assert client.get("/api/images").json()[1]["cachedTiles"] == 3

    assert client.delete("/api/tiles/boxes/cache").json() == {
        "status": "cache cleared", "imageName": "boxes", "deletedTiles": 3}
    assert client.get("/api/tiles/boxes/stats").json()["cachedTiles"] == 0
    assert client.get("/api/tiles/stats").json()["cachedTiles"] == 1
    again = client.get("/storage/boxes_files/9/0_0.jpeg")
    assert again.headers["x-tile-cache"] == "miss"  # memory cache was cleared too
    assert client.delete("/api/tiles/cache").json() == {"status": "all cache cleared",
                                                        "deletedTiles": 2}
    assert client.get("/api/tiles/stats").json()["cachedTiles"] == 0
    assert client.delete("/api/tiles/nosuch/cache").status_code == 404


def test_head_answers_every_get(client):
    for url in ["/api/images", "/api/slides/boxes", "/storage/boxes.dzi", "/healthz", "/",
                "/slide/boxes.html", "/api/tiles/stats", "/static/viewer.js"]:
        get, head = client.get(url), client.head(url)
        assert get.status_code == head.status_code == 200, url
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]


def test_pages(client):
    index = client.get("/")
    assert index.headers["content-type"].startswith("text/html")
    for name in ["generated", "boxes", "small"]:
        assert f'href="/slide/{name}.html"' in index.text
    page = client.get("/slide/boxes.html").text
    assert "/storage/boxes.dzi" in page and "/api/slides/boxes" in page
    assert "{{" not in page
    assert "<title>boxes · boxes.tiff · WSI viewer</title>" in page
    assert 'data-iiif-url="/iiif/3/boxes/info.json"' in page
    assert 'href="/" hidden title="Slides">&larr; Slides</a>' in page
    osd = client.get("/static/openseadragon/openseadragon.min.js")
    assert osd.status_code == 200 and "OpenSeadragon" in osd.text[:5000]
    mirador = client.get("/slide/boxes/mirador.html")
    assert 'data-manifest-url="/iiif/3/boxes/manifest.json"' in mirador.text
    assert "{{" not in mirador.text
    bundle = client.get("/static/mirador/mirador.min.js")
    assert bundle.status_code == 200 and "Mirador" in bundle.text[:2000]
    # an unknown page: HTML for a browser, JSON for an API client
    html_404 = client.get("/slide/nope.html", headers={"Accept": "text/html,*/*;q=0.8"})
    assert html_404.status_code == 404 and html_404.headers["content-type"].startswith(
        "text/html")
    assert "404 Not Found" in html_404.text and "no slide named &#x27;nope&#x27;" in html_404.text
    json_404 = client.get("/slide/nope.html")
    assert json_404.json()["error"] == "slide_not_found"
    assert client.get("/slide/nope/mirador.html").status_code == 404
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/storage/{name}_files/{level}/{tile}" in spec["paths"]


def test_single_mode_index_is_the_viewer(client_for, generated_svs):
    client = client_for(Image={"Path": str(generated_svs)})
    page = client.get("/").text
    assert "/image.dzi" in page and "/api/slides/image" in page
    assert client.get("/api/slides/image").json()["dzi_url"] == "/image.dzi"
    # no way back to an index that does not exist; an associated image links to the slide
    assert 'id="index-link" class="back" href=""' in page
    assert 'id="index-link" class="back" href=""' in client.get("/slide/image.html").text
    label = client.get("/slide/image/associated/label.html").text
    assert 'href="/" hidden title="image">&larr; image</a>' in label


def test_policy_document(client_for, generated_svs, fixtures):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)},
                                {"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
                        TileFormat={"LosslessLevelCount": 3, "LosslessFormat": "webp",
                                    "EnforceLossless": True},
                        DeepZoom={"TileSize": 510, "Overlap": 2})
    for name, path in (("g", generated_svs), ("boxes", fixtures / "boxes.tiff")):
        doc = client.get(f"/api/slides/{name}/policy").json()
        slide = openslide.OpenSlide(path)
        dz = DeepZoomGenerator(slide, 510, 2, True)
        assert (doc["name"], doc["tile_size"], doc["overlap"], doc["limit_bounds"]) == (
            name, 510, 2, True)
        assert doc["quickhash"] == slide.properties["openslide.quickhash-1"]
        assert doc["identity"].startswith("quickhash-1:" + doc["quickhash"] + ";size=")
        assert (doc["lossless_format"], doc["lossless_level_count"], doc["enforce_lossless"],
                doc["declared_format"]) == ("webp", 3, True, "jpeg")
        assert doc["level_count"] == dz.level_count and doc["tile_count"] == dz.tile_count
        levels = doc["levels"]
        assert [lv["level"] for lv in levels] == list(range(dz.level_count))
        for lv in levels:
            level = lv["level"]
            assert (lv["width"], lv["height"]) == dz.level_dimensions[level]
            assert (lv["cols"], lv["rows"]) == dz.level_tiles[level]
            assert lv["tiles"] == lv["cols"] * lv["rows"]
            slide_level = dz.get_tile_coordinates(level, (0, 0))[1]
            assert lv["slide_level"] == slide_level
            assert lv["slide_downsample"] == pytest.approx(slide.level_downsamples[slide_level])
            lossless = level >= dz.level_count - 3
            assert (lv["format"], lv["lossless"]) == (("webp", True) if lossless
                                                      else ("jpeg", False))
            assert lv["quality"] == (None if lossless else 90)
        assert sum(lv["tiles"] for lv in levels) == doc["tile_count"]
        summary = client.get(f"/api/slides/{name}").json()["levels"]
        assert summary == levels  # the slide document carries the same records
    assert client.get("/api/slides/nosuch/policy").status_code == 404


def test_single_slide_policy(client_for, fixtures):
    client = client_for(Image={"Path": str(fixtures / "small.svs")})
    doc = client.get("/api/slides/image/policy").json()
    assert doc["name"] == "image" and doc["levels"][-1]["lossless"] is True


EXPOSED = ("Location, ETag, Content-Digest, Repr-Digest, X-Tile-Format, X-Tile-Lossless, "
           "X-Tile-Color-Transform, X-Tile-Cache, X-Tile-Source, X-Tile-Override")
CROSS_ORIGIN_URLS = ["/storage/boxes_files/9/0_0.jpeg", "/storage/boxes.dzi", "/api/images",
                     "/api/slides/boxes", "/api/slides/boxes/policy", "/api/tiles/stats",
                     "/api/jobs", "/storage/boxes_files/99/0_0.jpeg", "/api/slides/nosuch",
                     "/no/such/route"]


@pytest.mark.parametrize("origin", ["*", "https://viewer.example.org"])
def test_cors_on_every_response_and_preflights_answered(client_for, fixtures, origin):
    """One rule for tiles, DZIs, the JSON API and errors alike: the setting's origin, whatever
    the request's Origin (so a shared cache may keep one copy); preflights get a 204."""
    client = client_for(Images=[{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
                        Server={"AccessControlAllowOrigin": origin})
    for url in CROSS_ORIGIN_URLS:
        for headers in ({}, {"Origin": "https://elsewhere.example"}):
            r = client.get(url, headers=headers)
            assert r.headers["access-control-allow-origin"] == origin, url
            assert r.headers["access-control-expose-headers"] == EXPOSED, url
            assert "origin" not in r.headers.get("vary", "").lower(), url
        preflight = client.options(url, headers={
            "Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "if-none-match"})
        assert preflight.status_code == 204 and preflight.content == b"", url
        assert preflight.headers["access-control-allow-origin"] == origin
        assert preflight.headers["access-control-allow-methods"] == "GET, HEAD"
        assert (preflight.headers["access-control-allow-headers"]
                == "Accept, If-None-Match, Authorization, X-Api-Key")
        assert preflight.headers["access-control-max-age"] == "600"
    job = client.post("/api/tiles/boxes/generate?levels=0")
    assert job.status_code == 202 and job.headers["access-control-allow-origin"] == origin
    assert client.options("/api/images").status_code == 405  # not a preflight: no OPTIONS route


def test_empty_allow_origin_sends_no_cors_headers(client_for, fixtures):
    client = client_for(Images=[{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
                        Server={"AccessControlAllowOrigin": ""})
    for url in CROSS_ORIGIN_URLS:
        r = client.get(url, headers={"Origin": "https://elsewhere.example"})
        assert not any(k.startswith("access-control-") for k in r.headers), url
    preflight = client.options("/api/images", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 405 and preflight.json()["error"] == "method_not_allowed"
