"""Debian nginx on the sub-path /wsi/ (config/nginx/wsi-location.conf, the file docs/deploy.md
shows) in front of a server with OIDC tokens, API keys and signed URLs: the viewer works in
Chromium with a signed URL and with a bearer token, the API, the OpenAPI document, Swagger UI
and ReDoc work there without any other host, a forged X-Forwarded-For is not believed; and a
page of another origin cannot start a job or delete a cache."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Request

from app.tools.launch import ServerProcess, free_port, nginx_config
from tests.auth_helpers import ADMIN_KEY, JwksServer, Signer, auth_settings
from tests.conftest import ROOT, start_server, stop_server
from tests.e2e.test_browser import TIMEOUT_MS, browser  # noqa: F401 (the fixture)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LOCATION = ROOT / "config" / "nginx" / "wsi-location.conf"


def start_nginx(tmp: Path, upstream_port: int) -> ServerProcess:
    prefix = tmp / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = nginx_config(prefix, port, f"upstream tileserver {{ server 127.0.0.1:{upstream_port}; "
                        "keepalive 8; }", f"include {LOCATION};")
    return ServerProcess([NGINX, "-p", str(prefix), "-c", str(conf)], port,
                         prefix / "out.log", name="nginx", ready_path="/wsi/healthz").start()


def wait_for_viewer(page, console: list[str]) -> dict:
    state = "() => ({stats: window.tileStats, info: window.slideInfo, legend: " \
            "document.getElementById('legend').dataset.state, url: location.href})"
    try:
        page.wait_for_function("() => document.getElementById('legend').dataset.state === "
                               "'ready' && window.tileStats.loaded >= 1")
    except Exception as exc:
        raise AssertionError(f"{page.evaluate(state)} {console}") from exc
    return page.evaluate(state)


def test_viewer_api_and_docs_behind_nginx_on_a_sub_path(tmp_path, fixtures,
                                                        browser: Browser):  # noqa: F811
    key_file = tmp_path / "url.key"
    key_file.write_text("s" * 40)
    signer = Signer("k1")
    jwks = JwksServer(signer)
    (tmp_path / "srv").mkdir()
    server = start_server(tmp_path / "srv", {
        "Images": [{"Name": "small", "Path": str(fixtures / "small.svs")},
                   {"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
        "TileCachePath": str(tmp_path / "cache"),
        "Auth": auth_settings(jwks.url, str(key_file)),
        "ForwardedHeaders": {"KnownProxies": ["127.0.0.1"]},
        "Audit": {"Enabled": True, "Path": str(tmp_path / "audit" / "tiles.jsonl")},
    }, env={"TEST_ADMIN_KEY": ADMIN_KEY})
    nginx = None
    try:
        nginx = start_nginx(tmp_path, server.launched.port)
        origin = nginx.base_url
        base = f"{origin}/wsi"
        token = signer.token(__import__("time").time(), slides=["small"])
        bearer = {"Authorization": f"Bearer {token}"}
        forged = httpx.get(f"{base}/storage/small_files/0/0_0.jpeg",
                           headers={**bearer, "X-Forwarded-For": "6.6.6.6"})
        assert forged.status_code == 200
        assert httpx.get(f"{base}/api/images").status_code == 401
        images = httpx.get(f"{base}/api/images", headers=bearer).json()
        assert [i["dzi_url"] for i in images] == ["/wsi/storage/small.dzi"]
        issued = httpx.get(f"{base}/api/slides/small/token", headers=bearer).json()
        assert issued["viewer_url"].startswith("/wsi/slide/small.html?grant=")
        spec = httpx.get(f"{base}/openapi.json").json()
        assert spec["servers"] == [{"url": "/wsi"}]
        job = httpx.post(f"{base}/api/tiles/small/generate", params={"levels": "0-1"},
                         headers={"X-Api-Key": ADMIN_KEY})
        assert job.status_code == 202 and job.headers["location"].startswith("/wsi/api/jobs/")

        context = browser.new_context()
        outside: list[str] = []

        def only_here(route, request: Request):  # an air-gapped network: nothing else
            if request.url.startswith(origin):
                route.continue_()
            else:
                outside.append(request.url)
                route.abort()

        context.route("**/*", only_here)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text))
        page.on("response", lambda r: console.append(f"{r.status} {r.url}")
                if r.status >= 400 else None)
        tiles: list[Request] = []
        page.on("request", lambda r: tiles.append(r) if "_files/" in r.url else None)
        # 1. a signed URL: its query rides on every request the viewer makes
        page.goto(origin + issued["viewer_url"])
        seen = wait_for_viewer(page, console)
        assert seen["stats"]["failed"] == 0 and seen["info"]["name"] == "small"
        assert any("/wsi/storage/small_files/" in r.url for r in tiles)
        assert all("sig=" in r.url and r.url.startswith(f"{base}/storage/small")
                   for r in tiles)
        # 2. a bearer token handed over in the fragment: the 401 sign-in page loads with it
        tiles.clear()
        response = page.goto(f"{base}/slide/small.html#access_token={token}")
        assert response is not None and response.status == 401
        seen = wait_for_viewer(page, console)
        assert seen["stats"]["failed"] == 0
        assert all(r.headers.get("authorization") == f"Bearer {token}" for r in tiles)
        assert "access_token" not in page.url
        # 3. Swagger UI and ReDoc, from this server only
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock-summary-path")
        assert "/storage/{name}_files/{level}/{tile}" in page.content()
        page.goto(f"{base}/redoc")
        page.wait_for_selector("text=Tile of a slide", state="attached")
        assert not outside, outside
        context.close()
    finally:
        if nginx is not None:
            nginx.stop()
        stop_server(server)
        jwks.close()
    lines = [json.loads(x) for x in
             (tmp_path / "audit" / "tiles.jsonl").read_text().splitlines()]
    assert {line["client"] for line in lines} == {"127.0.0.1"}  # never the forged 6.6.6.6
    assert {line["auth"] for line in lines if line["kind"] == "tile"} >= {"jwt", "signed-url"}


class Attacker(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"<!doctype html><title>elsewhere</title><p>hello</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_page_of_another_origin_cannot_start_a_job_or_delete_a_cache(
        live_server, browser: Browser):  # noqa: F811
    """The default Auth:Mode none makes a browser on the server's machine an admin; a page of
    another origin it opens sends a no-cors POST (Origin: that page) and a DELETE (which needs
    a preflight): both refused, nothing happens."""
    target = live_server.base_url
    before_jobs = httpx.get(f"{target}/api/jobs").json()
    before_stats = httpx.get(f"{target}/api/tiles/stats").json()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        statuses: dict[str, int] = {}
        page.on("response", lambda r: statuses.__setitem__(f"{r.request.method} {r.url}",
                                                           r.status))
        page.goto(f"http://localhost:{httpd.server_address[1]}/")
        outcome = page.evaluate("""async (target) => {
            const out = {};
            try {
              await fetch(target + '/api/tiles/generate-all?overwrite=true',
                          {method: 'POST', mode: 'no-cors'});
              out.post = 'sent';
            } catch (e) { out.post = String(e); }
            try {
              await fetch(target + '/api/tiles/cache', {method: 'DELETE'});
              out.del = 'sent';
            } catch (e) { out.del = 'blocked'; }
            return out;
        }""", target)
        context.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert statuses.get(f"POST {target}/api/tiles/generate-all?overwrite=true") == 403
    assert outcome["del"] == "blocked"  # the preflight allows GET and HEAD only
    assert f"DELETE {target}/api/tiles/cache" not in statuses
    assert httpx.get(f"{target}/api/jobs").json() == before_jobs
    assert httpx.get(f"{target}/api/tiles/stats").json() == before_stats
