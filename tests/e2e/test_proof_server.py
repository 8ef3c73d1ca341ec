"""End to end under uvicorn: verify over HTTP, a corrupted cache caught, the audit log of two
workers complete, a bad LosslessFormat refused at start."""

import asyncio
import hashlib
import io
import json
import subprocess
import sys
from collections import Counter

import httpx
import numpy as np
from PIL import Image

from app.cache.disk import seal, unseal
from app.cli import main
from app.server.audit import FIELDS, audit_files
from tests.conftest import ROOT, start_server, stop_server


def test_verify_over_http(live_server, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = live_server.cache.parent / "appsettings.json"
    report = tmp_path / "report.json"
    code = main(["verify", "generated", "boxes", "small", "--url", live_server.base_url,
                 "--config", str(config), "--sample", "5", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["server"] == {"url": live_server.base_url, "version": "0.1.0"}
    assert [s["name"] for s in doc["slides"]] == ["generated", "boxes", "small"]
    assert all(s["passed"] and s["levels"][-1]["exact"] > 0 for s in doc["slides"])

    # The same name pointing at another file here: the server's slide is not this one.
    code = main(["verify", "boxes", "--url", live_server.base_url, "--config", str(config),
                 f"Images:1:Path={config.parent.parent.parent}/nonexistent"])
    assert code == 2  # a missing file is a configuration error
    small = next(item["Path"] for item in json.loads(config.read_text())["Images"]
                 if item["Name"] == "small")
    capsys.readouterr()
    code = main(["verify", "boxes", "--url", live_server.base_url, "--config", str(config),
                 f"Images:1:Path={small}", "--levels", "0", "--json", str(report)])
    assert code == 2  # verify cannot run on another file: one line, before any tile
    err = capsys.readouterr().err
    assert f"slide 'boxes': {small} here is not the slide the server serves" in err
    assert err.count("\n") == 1


def test_verify_over_http_catches_a_corrupted_cache(tmp_path, quick_svs, capsys, monkeypatch):
    cache = tmp_path / "cache"
    settings = {"TileCachePath": str(cache), "Images": [{"Name": "g", "Path": str(quick_svs)}],
                "Server": {"MemoryCacheBytes": 0}}  # every hit is read from disk
    server = start_server(tmp_path, settings, "--workers", "2")
    monkeypatch.chdir(tmp_path)
    args = ["verify", "--url", server.base_url, "--config", str(tmp_path / "appsettings.json"),
            "--levels", "12-top", "--sample", "0"]
    try:
        assert main(args) == 0, capsys.readouterr().out
        top = max(int(p.name) for p in (cache / "g").glob("*/*") if p.name.isdigit())
        victim = next((cache / "g").rglob(f"{top}/3_2.png"))
        with Image.open(io.BytesIO(unseal(victim.read_bytes())[0])) as im:
            pixels = np.asarray(im.convert("RGB")).copy()
        pixels[100:140, 100:140] = pixels[100:140, 100:140] ^ 1  # a faint square of changed bits
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        # sealed again as the cache seals its files: the server's own check cannot see it
        victim.write_bytes(seal(buf.getvalue()))
        assert main(args) == 1
        out = capsys.readouterr().out.replace("\n", "")
        assert f"/storage/g_files/{top}/3_2.jpeg: lossless tile differs" in out
        assert "1600 pixel(s), max error 1" in out
    finally:
        stop_server(server)


async def _fetch(base: str, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    limit = asyncio.Semaphore(16)
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # new connections: both workers serve
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=no_reuse) as client:
        async def one(method, path, headers):
            async with limit:
                return await client.request(method, path, headers=headers)
        return await asyncio.gather(*(one(*r) for r in requests))


def test_audit_log_of_two_workers_is_complete(tmp_path, generated_svs):
    log_path = tmp_path / "audit" / "tiles.jsonl"
    settings = {"TileCachePath": str(tmp_path / "cache"),
                "Images": [{"Name": "g", "Path": str(generated_svs)}],
                "Audit": {"Enabled": True, "Path": str(log_path), "MaxBytes": 50_000,
                          "BackupCount": 1000}}
    server = start_server(tmp_path, settings, "--workers", "2")
    tiles = [f"/storage/g_files/{level}/{col}_0.jpeg" for level in range(10, 14)
             for col in range(3)]
    requests = [("GET", path, {}) for path in tiles * 20]
    requests += [("HEAD", path, {}) for path in tiles]
    requests += [("GET", "/storage/g_files/99/0_0.jpeg", {}), ("GET", "/storage/x_files/0/0_0.png",
                                                                 {})] * 10
    try:
        responses = asyncio.run(_fetch(server.base_url, requests))
        etag = responses[0].headers["etag"]
        responses += asyncio.run(_fetch(server.base_url,
                                        [("GET", tiles[0], {"If-None-Match": etag})] * 10))
    finally:
        stop_server(server)  # SIGTERM: each worker flushes its audit log at shutdown
    lines = []
    for file in audit_files(log_path):
        lines += [json.loads(line) for line in file.read_text().splitlines()]
    assert len(audit_files(log_path)) > 3  # rotated while both processes wrote
    assert len(lines) == len(responses) == len(requests) + 10
    assert all(list(line) == list(FIELDS) for line in lines)
    assert 1 <= len({line["pid"] for line in lines}) <= 2  # the kernel spreads connections
    seen = Counter((line["method"], line["path"], line["status"]) for line in lines)
    sent = Counter((r.request.method, r.request.url.raw_path.decode(), r.status_code)
                   for r in responses)
    assert seen == sent
    assert Counter(r.status_code for r in responses) == {200: 20 * 12 + 12, 404: 20, 304: 10}
    bodies = {r.request.url.raw_path.decode(): r.content for r in responses
              if r.request.method == "GET" and r.status_code == 200}
    for line in lines:
        if line["status"] == 200 and line["method"] == "GET":
            assert line["sha256"] == hashlib.sha256(bodies[line["path"]]).hexdigest()


def test_avif_as_lossless_format_stops_start(tmp_path):
    (tmp_path / "appsettings.json").write_text(json.dumps({"TileFormat": {
        "LosslessFormat": "avif"}}))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--config",
                           str(tmp_path / "appsettings.json")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                      "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.startswith("tileserver: invalid configuration: TileFormat:LosslessFormat")
    assert "max error 67" in proc.stderr
