"""The bad-input table: every malformed or hostile request gets a JSON 4xx; broken slides a 500
for themselves only, with OpenSlide's message, and nothing cached for them."""

from urllib.parse import quote

import numpy as np
import pytest

from tests.conftest import FIXTURES, decode


@pytest.fixture
def client(client_for, fixtures, generated_svs, tmp_path):
    return client_for(
        TileCachePath=str(tmp_path / "cache"),
        Image={"Path": str(generated_svs)},
        Images=[{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")},
                {"Name": "unopenable", "Path": str(fixtures / "unopenable.tiff")},
                {"Name": "unreadable", "Path": str(fixtures / "unreadable.svs")}])


BAD_REQUESTS = [
    # (url, status, error code, words the detail must contain)
    ("/storage/nosuch.dzi", 404, "slide_not_found", "nosuch"),
    ("/storage/nosuch_files/0/0_0.jpeg", 404, "slide_not_found", "nosuch"),
    ("/storage/..%2Fboxes_files/0/0_0.jpeg", 404, None, ""),
    ("/storage/%2e%2e_files/0/0_0.jpeg", 404, "slide_not_found", ".."),
    ("/storage/..%2F..%2Fetc%2Fpasswd.dzi", 404, None, ""),
    ("/storage/%2Fetc%2Fpasswd.dzi", 404, None, ""),
    # an absolute path to a real slide on disk is not a slide name
    ("/storage/" + quote(str(FIXTURES / "boxes"), safe="") + ".dzi", 404, None, ""),
    # numbers are canonical (ASCII digits, no leading zeros): anything else names no tile
    ("/storage/boxes_files/-1/0_0.jpeg", 404, "tile_not_found", "level '-1' is not a tile"),
    ("/storage/boxes_files/0/-1_0.jpeg", 404, "tile_not_found", "col '-1' is not a tile"),
    ("/storage/boxes_files/0/0_-5.jpeg", 404, "tile_not_found", "row '-5' is not a tile"),
    ("/storage/boxes_files/x/0_0.jpeg", 404, "tile_not_found", "level 'x' is not a tile"),
    ("/storage/boxes_files/1.5/0_0.jpeg", 404, "tile_not_found", "not a tile address"),
    ("/storage/boxes_files/0/a_b.jpeg", 404, "tile_not_found", "col 'a' is not a tile"),
    ("/storage/boxes_files/0/00.jpeg", 404, "tile_not_found", "expected {col}_{row}"),
    ("/storage/boxes_files/01/0_0.jpeg", 404, "tile_not_found", "level '01'"),
    ("/storage/boxes_files/9/00_0.jpeg", 404, "tile_not_found", "col '00'"),
    ("/storage/boxes_files/9/0_00.jpeg", 404, "tile_not_found", "row '00'"),
    ("/storage/boxes_files/%EF%BC%91/0_0.jpeg", 404, "tile_not_found", "level '\uff11'"),
    ("/storage/boxes_files/%D9%A1/0_0.jpeg", 404, "tile_not_found", "level"),
    ("/storage/boxes_files/+1/0_0.jpeg", 404, "tile_not_found", "level '+1'"),
    ("/storage/boxes_files/%201/0_0.jpeg", 404, "tile_not_found", "level ' 1'"),
    ("/storage/boxes_files/99999999999999999999/0_0.jpeg", 404, "tile_not_found", "level"),
    ("/storage/boxes_files/0/0_99999999999999.jpeg", 404, "tile_not_found", "row"),
    ("/storage/boxes_files/10/0_0.jpeg", 404, "tile_not_found", "level 10 is outside 0..9"),
    ("/storage/boxes_files/9/2_0.jpeg", 404, "tile_not_found", "outside level 9"),
    ("/storage/boxes_files/9/0_1.jpeg", 404, "tile_not_found", "2x1 tiles"),
    ("/storage/boxes_files/9/0_0.gif", 400, "bad_request", "unknown tile format 'gif'"),
    ("/storage/boxes_files/9/0_0.", 400, "bad_request", "extension"),
    ("/storage/boxes_files/9/0_0.jpeg?format=tiff", 400, "bad_request", "format 'tiff'"),
    ("/storage/boxes_files/9/0_0.jpeg?format=", 400, "bad_request", "format ''"),
    ("/image_files/-3/0_0.jpeg", 404, "tile_not_found", "level '-3'"),
    ("/image_files/0/5_5.jpeg", 404, "tile_not_found", "outside level 0"),
    ("/slide/nosuch.html", 404, "slide_not_found", "nosuch"),
    ("/api/slides/nosuch", 404, "slide_not_found", "nosuch"),
    ("/api/tiles/nosuch/stats", 404, "slide_not_found", "nosuch"),
    ("/no/such/route", 404, "not_found", ""),
]


@pytest.mark.parametrize(("url", "status", "code", "words"), BAD_REQUESTS,
                         ids=[row[0] for row in BAD_REQUESTS])
def test_bad_request_table(client, url, status, code, words):
    r = client.get(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    if code is not None:
        assert body["error"] == code
    assert words in body["detail"]


def test_method_not_allowed_is_json(client):
    r = client.post("/storage/boxes.dzi")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(("name", "code", "message"), [
    ("unopenable", "slide_unopenable", "Unsupported TIFF compression: 52479"),
    ("unreadable", "slide_unreadable", "Bogus marker length"),
])
def test_broken_slides_fail_alone(client, name, code, message, tmp_path, fixtures):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    for _ in range(2):  # and again: the error is not latched into a wrong answer
        r = client.get(f"/storage/{name}_files/0/0_0.jpeg")
        assert r.status_code == 500
        assert r.json()["error"] == code
        assert message in r.json()["detail"] and r.json()["slide"] == name
    # every other slide keeps serving, with the right pixels
    good = client.get("/storage/boxes_files/9/0_0.png")
    assert good.status_code == 200
    dz = DeepZoomGenerator(openslide.open_slide(fixtures / "boxes.tiff"), 254, 1, True)
    assert np.array_equal(decode(good.content), np.asarray(dz.get_tile(9, (0, 0))))
    assert client.get("/image_files/0/0_0.jpeg").status_code == 200
    assert not (tmp_path / "cache" / name).exists()  # nothing cached for the broken slide
    images = {i["name"]: i for i in client.get("/api/images").json()}
    assert "Unsupported TIFF compression" in images["unopenable"]["error"]
    assert "error" not in images["unreadable"]  # it opens; only its pixels cannot be read
    assert client.get("/storage/unreadable.dzi").status_code == 200
    assert images["boxes"]["dimensions"] == [300, 250]


def _one_json_shape(r) -> dict:
    """The body of an error response, checked to be the app's one error body in its one
    formatting (compact, as ``app.server.errors.error_json`` writes it)."""
    import json

    assert r.headers["content-type"] == "application/json", (r.request.url, r.text)
    body = r.json()
    assert {"error", "detail"} <= set(body) <= {"error", "detail", "slide", "job"}, body
    assert r.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return body


def test_every_route_answers_errors_in_one_json_shape(client, monkeypatch):
    """Every route of the app, the tile route, the OpenSeadragon mount and the router itself:
    a method it lacks is a JSON 405 with ``Allow``, an unknown name a JSON 404, a bug a JSON
    500, each in the same compact formatting."""
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient
    from starlette.routing import Mount, Route

    from app.server.routes import api, dzi, jobs, pages

    fill = {"name": "nosuch", "associated": "nosuch", "job_id": "nosuch", "file": "nosuch.js"}
    routes = [*client.app.routes, *(r for m in (api, dzi, jobs, pages) for r in m.router.routes)]
    checked = 0
    for route in routes:
        if isinstance(route, Mount):
            path = route.path + "/nosuch.js"
            assert _one_json_shape(client.get(path))["error"] == "not_found"
        elif isinstance(route, APIRoute | Route):
            path = route.path.format(**fill)
            if route.param_convertors:  # names nothing that exists: a 404 for every method
                for method in route.methods - {"HEAD"}:
                    r = client.request(method, path)
                    assert r.status_code == 404, (method, path, r.status_code)
                    _one_json_shape(r)
        else:  # an included router: its routes are in the list
            continue
        r = client.put(path)
        assert r.status_code == 405 and r.headers["allow"], path
        assert _one_json_shape(r)["error"] == "method_not_allowed"
        checked += 1
    for path in ("/storage/boxes_files/0/0_0.jpeg", "/iiif/3/boxes/full/max/0/default.jpg"):
        r = client.put(path)  # the tile route, in front of the router
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", path
        assert _one_json_shape(r)["error"] == "method_not_allowed"
    assert checked >= 25
    assert _one_json_shape(client.get("/no/such/route"))["error"] == "not_found"

    def broken(name: str) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(pages, "template", broken)
    r = TestClient(client.app, raise_server_exceptions=False).get("/slide/boxes.html")
    assert r.status_code == 500
    assert _one_json_shape(r) == {"error": "internal_error", "detail": "internal error"}


@pytest.mark.parametrize("url", [
    "/storage/boxes_files/9/0_0.jpeg/", "/image_files/0/0_0.jpeg/", "/storage/boxes.dzi/",
    "/image.dzi/", "/storage/boxes/associated/label.dzi/", "/api/images/",
    "/api/slides/boxes/", "/slide/boxes.html/"])
def test_a_trailing_slash_is_a_json_404_not_a_redirect(client, url):
    r = client.get(url, follow_redirects=False)
    assert r.status_code == 404, r.headers.get("location")
    assert _one_json_shape(r)["error"] == "not_found"
