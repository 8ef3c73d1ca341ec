"""A real server (uvicorn, 2 workers, auth and audit on) under hostile connections: oversized
heads get 431, 1000 idle sockets leave others served fast, and the audit log of both workers is
one verified hash chain naming who asked."""

from __future__ import annotations

import json
import resource
import socket
import time

import httpx

from app.server.audit import audit_files, verify_chain
from tests.auth_helpers import ADMIN_KEY
from tests.conftest import start_server, stop_server

IDLE_SOCKETS = 1000


def timed_get(url: str, **kwargs) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.get(url, timeout=10, **kwargs)
    return r, time.perf_counter() - t0


def test_bounded_http_and_a_chained_audit_log(tmp_path, fixtures):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_SOCKETS + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_SOCKETS + 1024), hard))
    audit = tmp_path / "audit" / "tiles.jsonl"
    server = start_server(tmp_path, {
        "Images": [{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
        "TileCachePath": str(tmp_path / "cache"),
        "Auth": {"Mode": "apikey", "AdminApiKeys": [{"Id": "ops",
                                                     "Environment": "TEST_ADMIN_KEY"}]},
        "Audit": {"Enabled": True, "Path": str(audit)},
    }, "--workers", "2", env={"TEST_ADMIN_KEY": ADMIN_KEY})
    base, key = server.base_url, {"X-Api-Key": ADMIN_KEY}
    tile = f"{base}/storage/boxes_files/8/0_0.png"
    sockets: list[socket.socket] = []
    warm: list[httpx.Response] = []
    try:
        # tile requests on fresh connections until both workers have answered one (the second
        # may still be starting, and the kernel may hand every connection to the same one); an
        # X-Request-Id starts with its process's prefix (app.server.middleware.RequestId)
        prefixes: set[str] = set()
        deadline = time.monotonic() + 60
        while len(prefixes) < 2:
            assert time.monotonic() < deadline, "one worker answered every connection"
            warm.append(httpx.get(tile, headers=key))
            assert warm[-1].status_code == 200
            prefixes.add(warm[-1].headers["x-request-id"].rsplit("-", 1)[0])
        assert httpx.get(tile).status_code == 401
        # an 8 MB header: 431 at once, the worker unharmed
        with socket.create_connection(("127.0.0.1", server.launched.port)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            t0 = time.perf_counter()
            try:
                s.sendall(b"a" * (8 << 20) + b"\r\n\r\n")
            except OSError:
                pass  # the server may stop reading once it has answered
            s.settimeout(10)
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert time.perf_counter() - t0 < 5
        # a long request line too
        r = httpx.get(f"{base}/healthz?" + "q" * 40_000)
        assert r.status_code == 431 and r.json()["error"] == "request_header_fields_too_large"
        # 1000 idle sockets (and some slow ones mid-head): everyone else is served fast
        for i in range(IDLE_SOCKETS):
            s = socket.create_connection(("127.0.0.1", server.launched.port))
            if i % 10 == 0:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            sockets.append(s)
        time.sleep(0.5)
        with httpx.Client(headers=key) as client:
            for _ in range(10):
                for url in (f"{base}/healthz", tile):
                    t0 = time.perf_counter()
                    r = client.get(url, timeout=10)
                    elapsed = time.perf_counter() - t0
                    assert r.status_code == 200 and elapsed < 0.1, (url, elapsed)
                    client.cookies.clear()
            assert client.delete(f"{base}/api/tiles/boxes/cache").status_code == 200
    finally:
        for s in sockets:
            s.close()
        stop_server(server)
    report = verify_chain([audit])  # both workers' lines, one chain
    # the tile requests above (warm ones, one refused, 10 timed) and 1 action
    assert report.broken is None and report.lines == len(warm) + 1 + 10 + 1
    lines = [json.loads(x) for f in audit_files(audit) for x in f.read_text().splitlines()]
    assert len({line["pid"] for line in lines}) == 2
    assert {line["subject"] for line in lines if line["kind"] == "tile"} == {
        "apikey:ops", "anonymous"}
    actions = [line for line in lines if line["kind"] == "action"]
    assert [(a["route"], a["status"], a["subject"]) for a in actions] == [
        ("/api/tiles/{name}/cache", 200, "apikey:ops")]
    assert ADMIN_KEY not in audit.read_text() and ADMIN_KEY not in server.log.read_text()
