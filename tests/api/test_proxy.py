"""AllowedHosts, ForwardedHeaders (known proxies only) and the path base, through the app."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from app.server.app import create_app
from app.settings import settings_from


def app_for(tmp_path, fixtures, **sections):
    return create_app(settings_from({
        "Images": [{"Name": "small", "Path": str(fixtures / "small.svs")}],
        "TileCachePath": str(tmp_path / "cache"),
        "Audit": {"Enabled": True, "Path": str(tmp_path / "audit" / "tiles.jsonl")},
        **sections}))


def audit_lines(tmp_path):
    return [json.loads(x) for x in (tmp_path / "audit" / "tiles.jsonl").read_text().splitlines()]


def test_hosts_and_forwarded_headers_of_known_proxies_only(tmp_path, fixtures):
    app = app_for(tmp_path, fixtures, AllowedHosts="tiles.example.org;*.hospital.test",
                  ForwardedHeaders={"KnownProxies": ["10.1.1.1"]})
    tile = "/storage/small_files/0/0_0.jpeg"
    with TestClient(app, base_url="http://tiles.example.org", client=("10.1.1.1", 1)) as proxy, \
            TestClient(app, base_url="http://tiles.example.org", client=("10.9.9.9", 1)) as other:
        bad = proxy.get("/healthz", headers={"Host": "evil.test"})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_host"
        assert proxy.get("/healthz", headers={"Host": "a.hospital.test:8443"}).status_code == 200
        assert proxy.get("/healthz", headers={"Host": "hospital.test"}).status_code == 400
        # nginx's $proxy_add_x_forwarded_for: the client's forged entry, then what nginx saw
        forwarded = {"X-Forwarded-For": "6.6.6.6, 192.0.2.7", "X-Forwarded-Proto": "https"}
        assert proxy.get(tile, headers=forwarded).status_code == 200
        assert other.get(tile, headers=forwarded).status_code == 200  # not a known proxy
        # admin routes: with Auth:Mode none only local requests, never a forwarded one
        assert proxy.get("/api/jobs", headers={"X-Forwarded-For": "127.0.0.1"}
                         ).status_code == 403
    clients = [line["client"] for line in audit_lines(tmp_path) if line["kind"] == "tile"]
    assert clients == ["192.0.2.7", "10.9.9.9"]


def test_a_prefix_from_a_known_proxy_or_the_path_base_moves_every_url(tmp_path, fixtures):
    proxied = app_for(tmp_path, fixtures, ForwardedHeaders={"KnownProxies": ["127.0.0.1"]})
    based = app_for(tmp_path / "b", fixtures, PathBase="/wsi")
    prefix = {"X-Forwarded-Prefix": "/wsi/"}
    with TestClient(proxied, client=("127.0.0.1", 1)) as a, \
            TestClient(based, client=("127.0.0.1", 1)) as b:
        for client, root, headers in ((a, "", prefix), (b, "/wsi", {})):
            images = client.get(f"{root}/api/images", headers=headers).json()
            assert images[0]["dzi_url"] == "/wsi/storage/small.dzi"
            doc = client.get(f"{root}/api/slides/small", headers=headers).json()
            assert doc["associated"][0]["preview_url"].startswith("/wsi/storage/small/")
            page = client.get(f"{root}/slide/small.html", headers=headers).text
            for url in ('src="/wsi/static/viewer.js"', 'href="/wsi/static/viewer.css"',
                        'src="/wsi/static/openseadragon/openseadragon.min.js"',
                        'data-base="/wsi"', 'data-api-url="/wsi/api/slides/small"',
                        'href="/wsi/"'):
                assert url in page, url
            assert 'href="/wsi/slide/small.html"' in client.get(f"{root}/", headers=headers).text
            spec = client.get(f"{root}/openapi.json", headers=headers).json()
            assert spec["servers"] == [{"url": "/wsi"}]
            docs = client.get(f"{root}/docs", headers=headers).text
            assert "/wsi/static/swagger-ui/swagger-ui-bundle.js" in docs
            assert "/wsi/openapi.json" in docs and "cdn" not in docs
            redoc = client.get(f"{root}/redoc", headers=headers).text
            assert "/wsi/static/redoc/redoc.standalone.js" in redoc and "googleapis" not in redoc
            for asset in ("/static/swagger-ui/swagger-ui-bundle.js",
                          "/static/redoc/redoc.standalone.js",
                          "/static/openseadragon/openseadragon.min.js",
                          "/storage/small_files/0/0_0.jpeg", "/storage/small.dzi"):
                assert client.get(f"{root}{asset}", headers=headers).status_code == 200, asset
        # a prefix from anyone else, or an odd one, is ignored
        assert a.get("/api/images", headers={"X-Forwarded-Prefix": "/../x"}
                     ).json()[0]["dzi_url"] == "/storage/small.dzi"
    with TestClient(proxied, client=("10.0.0.9", 1)) as stranger:
        images = stranger.get("/api/images", headers=prefix).json()
        assert images[0]["dzi_url"] == "/storage/small.dzi"
