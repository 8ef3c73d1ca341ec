"""Integrity headers (RFC 9530), EnforceLossless, AVIF and the audit log, through the app."""

import base64
import hashlib
import json

import numpy as np
import openslide
import pytest
from fastapi.testclient import TestClient
from openslide.deepzoom import DeepZoomGenerator

from app.core.errors import ConfigError
from app.server.app import create_app
from app.server.audit import FIELDS, audit_files
from app.settings import settings_from
from tests.conftest import decode

EMPTY_SHA256 = "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"


def sha256_field(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


@pytest.fixture
def top(generated_svs) -> int:
    return DeepZoomGenerator(openslide.open_slide(generated_svs), 254, 1, True).level_count - 1


def test_digest_fields_on_get_head_and_304(client_for, generated_svs, top):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}])
    for url in (f"/storage/g_files/{top}/1_1.jpeg", f"/storage/g_files/{top - 2}/0_0.jpeg",
                f"/storage/g_files/{top}/1_1.webp"):
        miss = client.get(url)
        hit = client.get(url)
        assert (miss.headers["x-tile-cache"], hit.headers["x-tile-cache"]) == ("miss", "hit")
        for r in (miss, hit):
            assert r.headers["content-digest"] == sha256_field(r.content)
            assert r.headers["repr-digest"] == r.headers["content-digest"]
            assert r.headers["etag"] == '"' + hashlib.sha256(r.content).hexdigest()[:32] + '"'
        assert "Content-Digest" in miss.headers["access-control-expose-headers"]
        head = client.head(url)
        assert head.content == b""
        assert head.headers["repr-digest"] == sha256_field(miss.content)
        assert head.headers["content-digest"] == EMPTY_SHA256  # RFC 9530 B.2: no content
        assert head.headers["content-length"] == str(len(miss.content))
        not_modified = client.get(url, headers={"If-None-Match": miss.headers["etag"]})
        assert not_modified.status_code == 304
        assert not_modified.headers["etag"] == miss.headers["etag"]
        for name in ("content-digest", "repr-digest", "content-type"):
            assert name not in not_modified.headers


def test_enforce_lossless_refuses_lossy_overrides(client_for, generated_svs, top):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileFormat={"EnforceLossless": True})
    expected = np.asarray(DeepZoomGenerator(openslide.open_slide(generated_svs), 254, 1, True)
                          .get_tile(top, (2, 1)).convert("RGB"))
    for query in ("?format=jpeg", "?format=avif", "?format=webp"):
        r = client.get(f"/storage/g_files/{top}/2_1.jpeg{query}")
        assert r.status_code == 200
        if query == "?format=webp":  # lossless WebP on a lossless level: as asked
            assert r.headers["content-type"] == "image/webp" and "x-tile-override" not in r.headers
        else:
            assert r.headers["x-tile-override"] == "refused"
            assert r.headers["content-type"] == "image/png"
        assert r.headers["x-tile-lossless"] == "true"
        assert np.array_equal(decode(r.content), expected)
    lossy_level = client.get(f"/storage/g_files/{top - 1}/0_0.png?format=avif")
    assert lossy_level.headers["content-type"] == "image/avif"
    assert "x-tile-override" not in lossy_level.headers
    assert client.get(f"/storage/g_files/{top}/0_0.jpeg?format=jpeg").headers[
        "access-control-expose-headers"].endswith("X-Tile-Override")


def test_avif_tiles(client_for, generated_svs, top):
    client = client_for(Images=[{"Name": "g", "Path": str(generated_svs)}],
                        TileFormat={"Default": "avif", "AvifQuality": 60})
    dzi = client.get("/storage/g.dzi").text
    assert 'Format="avif"' in dzi
    url = f"/storage/g_files/{top - 1}/1_1.avif"
    avif = client.get(url, headers={"Accept": "image/avif,image/webp,*/*"})
    assert avif.headers["content-type"] == "image/avif" and avif.headers["vary"] == "Accept"
    assert avif.headers["x-tile-lossless"] == "false"
    jpeg = client.get(url, headers={"Accept": "*/*"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    expected = np.asarray(DeepZoomGenerator(openslide.open_slide(generated_svs), 254, 1, True)
                          .get_tile(top - 1, (1, 1)).convert("RGB"), dtype=int)
    for r in (avif, jpeg):
        error = np.abs(decode(r.content).astype(int) - expected)
        assert 0 < error.mean() < 4


def test_start_fails_when_a_lossless_encoder_is_not_exact(generated_svs, tmp_path, monkeypatch):
    """A broken lossless encoder (simulated: libwebp that drops the low bit) stops start-up."""
    from app.core.formats import Encoding, TileFormat

    real = Encoding.encode

    def lossy_webp(self, image):
        if self.format is TileFormat.WEBP and self.lossless:
            image = np.asarray(image) & 0xFE
        return real(self, image)

    monkeypatch.setattr(Encoding, "encode", lossy_webp)
    app = create_app(settings_from({"Images": [{"Name": "g", "Path": str(generated_svs)}],
                                    "TileCachePath": str(tmp_path / "c")}))
    with pytest.raises(ConfigError, match="webp-lossless is not bit-exact"):
        with TestClient(app):
            pass


def read_audit(path) -> list[dict]:
    lines = []
    for file in audit_files(path):
        lines += [json.loads(line) for line in file.read_text().splitlines()]
    return lines


def test_audit_log_records_every_tile_request(generated_svs, fixtures, tmp_path, top):
    log_path = tmp_path / "audit" / "tiles.jsonl"
    settings = settings_from({
        "Images": [{"Name": "g", "Path": str(generated_svs)},
                   {"Name": "unreadable", "Path": str(fixtures / "unreadable.svs")}],
        "TileCachePath": str(tmp_path / "cache"),
        "TileFormat": {"EnforceLossless": True},
        "Audit": {"Enabled": True, "Path": str(log_path)},
    })
    quickhash = openslide.open_slide(generated_svs).properties["openslide.quickhash-1"]
    base = f"/storage/g_files/{top}/1_1"
    with TestClient(create_app(settings)) as client:
        miss = client.get(base + ".jpeg", headers={"Accept": "image/webp"})
        hit = client.get(base + ".jpeg")
        head = client.head(base + ".jpeg")
        not_modified = client.get(base + ".jpeg", headers={"If-None-Match": miss.headers["etag"]})
        refused = client.get(base + ".jpeg?format=jpeg")
        lossy = client.get(f"/storage/g_files/{top - 1}/0_0.webp")
        errors = [client.get(u) for u in ("/storage/nosuch_files/0/0_0.jpeg",
                                          "/storage/g_files/x/0_0.jpeg",
                                          f"/storage/g_files/{top + 1}/0_0.jpeg",
                                          "/storage/unreadable_files/0/0_0.jpeg")]
        client.get("/api/slides/g")  # not a tile: not audited
    responses = [miss, hit, head, not_modified, refused, lossy, *errors]
    lines = read_audit(log_path)
    assert len(lines) == len(responses)
    assert all(list(line) == list(FIELDS) for line in lines)
    assert [line["status"] for line in lines] == [r.status_code for r in responses] == [
        200, 200, 200, 304, 200, 200, 404, 404, 404, 500]
    first = lines[0]
    assert first["time"].endswith("Z") and first["client"] == "testclient"
    assert first["path"] == base + ".jpeg" and first["method"] == "GET"
    size, mtime = generated_svs.stat().st_size, generated_svs.stat().st_mtime_ns
    assert (first["slide"], first["quickhash"], first["identity"]) == (
        "g", quickhash, f"quickhash-1:{quickhash};size={size};mtime_ns={mtime}")
    assert (first["level"], first["col"], first["row"]) == (top, 1, 1)
    assert first["requested"] == {"extension": "jpeg", "format": None, "accept": "image/webp",
                                  "if_none_match": None}
    assert first["served"] == {"format": "png", "lossless": True, "override": None}
    assert first["sha256"] == hashlib.sha256(miss.content).hexdigest()
    assert first["bytes"] == len(miss.content) and first["duration_ms"] > 0
    assert [line["cache"] for line in lines[:6]] == ["miss", "hit", "hit", "hit", "hit", "miss"]
    assert lines[2]["method"] == "HEAD" and lines[2]["bytes"] == 0
    assert lines[2]["sha256"] == first["sha256"]
    assert lines[3]["bytes"] == 0 and lines[3]["requested"]["if_none_match"] == miss.headers[
        "etag"]
    assert lines[4]["path"] == base + ".jpeg?format=jpeg"
    assert lines[4]["served"] == {"format": "png", "lossless": True, "override": "refused"}
    assert lines[5]["served"] == {"format": "webp", "lossless": False, "override": None}
    assert lines[5]["sha256"] == hashlib.sha256(lossy.content).hexdigest()
    for line, code in zip(lines[6:], ["slide_not_found", "tile_not_found", "tile_not_found",
                                      "slide_unreadable"], strict=True):
        assert line["error"] == code
        assert line["served"] is None and line["sha256"] is None and line["bytes"] is None
    assert lines[6]["identity"] is None and lines[7]["level"] is None
    assert lines[8]["identity"] == first["identity"] and lines[8]["level"] == top + 1
    assert lines[9]["slide"] == "unreadable"


def test_audit_log_rotates_without_losing_lines(generated_svs, tmp_path):
    log_path = tmp_path / "audit" / "tiles.jsonl"
    settings = settings_from({
        "Images": [{"Name": "g", "Path": str(generated_svs)}],
        "TileCachePath": str(tmp_path / "cache"),
        "Audit": {"Enabled": True, "Path": str(log_path), "MaxBytes": 4000, "BackupCount": 500},
    })
    urls = [f"/storage/g_files/{level}/0_0.jpeg" for level in range(12)] * 8
    with TestClient(create_app(settings)) as client:
        for url in urls:
            assert client.get(url).status_code == 200
    files = audit_files(log_path)
    assert len(files) > 5
    lines = read_audit(log_path)
    assert [line["path"] for line in lines] == urls  # oldest file first, none lost
    assert not list(log_path.parent.glob("tiles.jsonl.lock.*"))


def test_one_route_answers_every_tile_family_and_audits_it(generated_svs, tmp_path, top):
    """Slide tiles, associated-image tiles, HEAD, 304s and errors are all answered by the one
    tile route, the innermost layer in front of the router (no route of the router matches a
    tile URL), and each becomes one audit line."""
    from starlette.routing import Match

    from app.server.middleware import HeadAsGet
    from app.server.tiles import TileRoute

    tile = f"/storage/g_files/{top}/0_1.jpeg"
    urls = [("GET", tile), ("HEAD", tile),
            ("GET", f"/storage/g_files/{top - 1}/0_0.png?format=jpeg"),
            ("GET", "/storage/g_files/0/9_9.jpeg"), ("GET", "/storage/nosuch_files/0/0_0.jpeg"),
            ("GET", "/storage/g/associated/label_files/0/0_0.jpeg")]
    log_path = tmp_path / "audit" / "audit.jsonl"
    app = create_app(settings_from({
        "Images": [{"Name": "g", "Path": str(generated_svs)}],
        "TileCachePath": str(tmp_path / "cache"),
        "Audit": {"Enabled": True, "Path": str(log_path)}}))
    assert [m.cls for m in app.user_middleware[-2:]] == [HeadAsGet, TileRoute]
    for _method, url in urls:
        scope = {"type": "http", "method": "GET", "path": url.split("?")[0]}
        assert not [r for r in app.router.routes if r.matches(scope)[0] is not Match.NONE], url
    with TestClient(app) as client:
        answers = [client.request(method, url) for method, url in urls]
        etag = answers[0].headers["etag"]
        again = client.get(tile, headers={"If-None-Match": etag})
        paths = client.get("/openapi.json").json()["paths"]
    assert [a.status_code for a in answers] == [200, 200, 200, 404, 404, 200]
    assert again.status_code == 304 and again.content == b""
    assert answers[1].content == b"" and answers[1].headers["etag"] == etag
    assert decode(answers[5].content).shape[2] == 3
    assert answers[3].json()["error"] == "tile_not_found"
    lines = read_audit(log_path)
    assert [line["status"] for line in lines] == [200, 200, 200, 404, 404, 200, 304]
    assert lines[1]["method"] == "HEAD"
    for path in ("/storage/{name}_files/{level}/{tile}", "/image_files/{level}/{tile}",
                 "/storage/{name}/associated/{associated}_files/{level}/{tile}",
                 "/image/associated/{associated}_files/{level}/{tile}"):
        assert "get" in paths[path], path
