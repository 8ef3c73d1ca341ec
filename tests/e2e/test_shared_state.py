"""Many processes, many replicas: shared jobs, cache invalidation, load shedding, metrics, logs.

docs/deploy.md's replica recipe, started once as it is written there: a real ``redis-server``,
two servers of two worker processes each on one cache folder, nginx round-robin in front (the
commands and the nginx configuration read from docs/deploy.md), with small render queues and
JSON logs. A job started through one replica is listed, followed (SSE) and cancelled through the
other; the one-job-per-slide 409 holds across them; a DELETE of a slide's cache through one drops
it from all four processes' memory caches within a second; the tile requests both replicas
count add up to those sent. Then one replica is flooded (503 + Retry-After, warm hits served,
/readyz 503) and clients hang up. The embedded store's rules across processes are held by
tests/unit/test_coordination.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.cache.tiles import RETRY_AFTER_MAX_SECONDS
from app.tools.launch import ServerProcess, free_port, server_env
from tests.conftest import ROOT, decode, start_server, stop_server

TIMEOUT = 30.0


def get(base: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection (so that requests spread over worker processes)."""
    return httpx.get(base + path, timeout=TIMEOUT, **kwargs)


def post(base: str, path: str) -> httpx.Response:
    return httpx.post(base + path, timeout=TIMEOUT)


def delete(base: str, path: str) -> httpx.Response:
    return httpx.delete(base + path, timeout=TIMEOUT)


def wait_state(base: str, job_id: str, states: set[str], seconds: float = 60.0) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        doc = get(base, f"/api/jobs/{job_id}").json()
        if doc["state"] in states:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {doc['state']}, not {states}")


def follow(base: str, job_id: str) -> list[dict]:
    """The documents of the job's SSE stream, to its end event."""
    docs = []
    with httpx.stream("GET", f"{base}/api/jobs/{job_id}/events", timeout=TIMEOUT) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                docs.append(json.loads(line[6:]))
                if kind == "end":
                    break
    assert kind == "end"
    return docs


def check_shared_jobs(one: str, other: str) -> None:
    """A job submitted through ``one`` is seen, followed and cancelled through ``other``;
    the 409 holds across them."""
    r = post(one, "/api/tiles/big/generate?overwrite=true")
    assert r.status_code == 202, r.text
    job = r.json()
    conflict = post(other, "/api/tiles/big/generate")
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"] == "job_conflict" and conflict.json()["job"] == job["id"]
    answers = [get(other, f"/api/jobs/{job['id']}").status_code for _ in range(6)]
    assert answers == [200] * 6  # every process knows it
    assert job["id"] in [j["id"] for j in get(other, "/api/jobs").json()]
    wait_state(other, job["id"], {"running"})
    cancelled = delete(other, f"/api/jobs/{job['id']}")
    assert cancelled.status_code == 202, cancelled.text
    events = follow(other, job["id"])
    assert {e["id"] for e in events} == {job["id"]} and len(events) >= 2
    assert events[0]["state"] == "running" and events[0]["cancel_requested"]
    final = events[-1]
    assert final["state"] == "cancelled" and final["tiles_done"] < final["tiles_total"], final
    assert get(one, f"/api/jobs/{job['id']}").json()["state"] == "cancelled"
    assert delete(one, f"/api/jobs/{job['id']}").status_code == 409  # already finished


TILES = [(11, col, 0) for col in range(4)]


def check_invalidation(one: str, other: str) -> None:
    """Tiles in every process's memory cache are gone from all of them within a second of
    a DELETE through one process: each tile asked once afterwards is rendered again."""
    for level, col, row in TILES:
        path = f"/storage/g_files/{level}/{col}_{row}.jpeg"
        for base in (one, other) * 4:  # the processes get it into their memory caches
            assert get(base, path).status_code == 200
    r = delete(one, "/api/tiles/g/cache")
    assert r.status_code == 200 and r.json()["deletedTiles"] >= len(TILES), r.text
    time.sleep(1.0)
    caches = [get(other, f"/storage/g_files/{level}/{col}_{row}.jpeg").headers["x-tile-cache"]
              for level, col, row in TILES]
    assert caches == ["miss"] * len(TILES)  # a process that kept one would answer "hit"


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


# --------------------------------------------------------------------- replicas behind nginx


def nginx_config(port: int, upstreams: list[int], prefix: Path) -> str:
    """docs/deploy.md's nginx configuration, its ports and paths made this test's."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    config = re.search(r"`/etc/nginx/tileserver.conf`:\n\n```nginx\n(.*?)```", doc, re.S)
    assert config, "docs/deploy.md lost its nginx configuration"
    text = config.group(1)
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    text = text.replace("127.0.0.1:5001", f"127.0.0.1:{upstreams[0]}")
    text = text.replace("127.0.0.1:5002", f"127.0.0.1:{upstreams[1]}")
    own = (f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\ndaemon off;\n")
    temps = (f"  access_log off;\n  client_body_temp_path {prefix}; proxy_temp_path {prefix};"
             f"\n  fastcgi_temp_path {prefix}; uwsgi_temp_path {prefix}; "
             f"scgi_temp_path {prefix};\n")
    return own + text.replace("http {\n", "http {\n" + temps, 1)


def replica_items(redis_port: int) -> list[str]:
    """The options and settings items of docs/deploy.md's ``tileserver serve`` commands (the
    Redis URL made this test's; the caller makes the cache folder its own)."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    commands = re.findall(r"^tileserver serve --port 500[12] (--workers \d+) "
                          r"--config appsettings.json \\\n\s+(.*)$", doc, re.M)
    assert len(commands) == 2 and commands[0] == commands[1], commands
    workers, items = commands[0]
    return [*workers.split(), *(
        item.replace("redis://127.0.0.1:6379/0", f"redis://127.0.0.1:{redis_port}/0")
        for item in items.split())]


def redis_argv(port: int, folder: Path) -> list[str]:
    """docs/deploy.md's redis-server command on ``port``, its files in ``folder``."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    line = re.search(r"^redis-server (.*?)\s+#", doc, re.M)
    assert line, "docs/deploy.md lost its redis-server command"
    args = line.group(1).replace("6379", str(port)).replace('""', "''").split()
    return [shutil.which("redis-server") or "/usr/bin/redis-server",
            *[a.strip("'") for a in args], "--dir", str(folder)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, quick_svs, generated_svs, fixtures):
    tmp = tmp_path_factory.mktemp("replicas")
    redis_port, nginx_port = free_port(), free_port()
    redis = subprocess.Popen(redis_argv(redis_port, tmp), stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)
    servers: list = []
    nginx = None
    try:
        settings = {
            "TileCachePath": str(tmp / "cache"),
            "Images": [{"Name": "g", "Path": str(quick_svs)},
                       {"Name": "big", "Path": str(generated_svs)},
                       {"Name": "small", "Path": str(fixtures / "small.svs")}],
            "Server": {"MaxQueuedRenders": 2, "RenderThreads": 1},
            "Pregeneration": {"Workers": 1},
            "Logging": {"Format": "json"},
        }
        items = [item.replace("/srv/tile_cache", str(tmp / "cache"))
                 for item in replica_items(redis_port)]
        for name in ("a", "b"):
            (tmp / name).mkdir()
        with ThreadPoolExecutor(2) as pool:  # both replicas start at once
            starting = [pool.submit(start_server, tmp / name, settings, *items)
                        for name in ("a", "b")]
            for future in starting:
                servers.append(future.result())
        prefix = tmp / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(nginx_config(
            nginx_port, [int(s.base_url.rsplit(":", 1)[1]) for s in servers], prefix))
        nginx = ServerProcess([shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(prefix),
                               "-c", str(prefix / "nginx.conf")], nginx_port,
                              prefix / "nginx.log", env=server_env(), name="nginx").start()
        yield servers, nginx.base_url
    finally:
        if nginx is not None:
            nginx.stop()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(stop_server, servers))
        redis.terminate()
        redis.wait(10)


def test_replicas_and_workers_share_jobs_invalidation_and_add_up_their_metrics(replicas):
    (a, b), front = replicas
    check_shared_jobs(a.base_url, b.base_url)
    check_invalidation(a.base_url, b.base_url)
    sent = len(TILES) * 9
    tile = "/storage/g_files/10/0_0.jpeg"
    for _ in range(10):
        r = get(front, tile)
        assert r.status_code == 200 and decode(r.content).shape[2] == 3
    sent += 10
    assert get(front, "/storage/g_files/99/0_0.jpeg").status_code == 404
    sent += 1
    texts = [get(s.base_url, "/metrics").text for s in (a, b)]
    counted = [metric(t, "tileserver_tile_requests_total") for t in texts]
    assert sum(counted) == sent and all(counted), counted
    assert sum(metric(t, "tileserver_tile_requests_total", status="404") for t in texts) == 1
    jobs = [metric(t, "tileserver_jobs", state="cancelled") for t in texts]
    assert jobs[0] == jobs[1] == 1  # read from Redis: the same figure from every replica


async def _flood(base: str, paths: list[str], warm: str) -> tuple[list, list, list]:
    """Every path at once; meanwhile a warm tile, again and again, and /readyz from a thread
    of its own (this client's event loop is busy with the flood), each time on a new
    connection: each worker answers /readyz for itself, and a kept-alive connection stays
    with the worker that accepted it."""
    limits = httpx.Limits(max_connections=len(paths) + 8)
    done = threading.Event()
    ready: list[int] = []

    def poll_ready() -> None:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as sync:
            while not done.is_set():
                ready.append(sync.get("/readyz", headers={"Connection": "close"}).status_code)

    poller = threading.Thread(target=poll_ready)
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, limits=limits) as client:
        async def timed(path: str) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = await client.get(path)
            return response, time.perf_counter() - started

        poller.start()
        try:
            flood = asyncio.gather(*(timed(p) for p in paths))
            warm_answers: list = []
            while not flood.done():
                warm_answers.append(await timed(warm))
            answers = await flood
        finally:
            done.set()
            poller.join()
    return answers, warm_answers, ready


def test_overload_sheds_cold_tiles_serves_warm_ones_and_renders_nothing_for_gone_clients(
        replicas):
    (workers, _), _front = replicas
    base = workers.base_url
    warm = "/storage/small_files/4/0_0.jpeg"
    for _ in range(6):
        assert get(base, warm).status_code == 200
    assert get(base, "/readyz").json() == {"status": "ready"}
    # first, whole-image renders of big as PNG (IIIF regions: about a second each, so each
    # worker's queue stays full for a while), then g's top level (12 x 9 tiles), deleted
    # from the cache by the test above: rows 1-8 here, row 0 for the clients that hang up
    paths = [f"/iiif/3/big/full/{w},/0/default.png" for w in range(2400, 2406)]
    paths += [f"/storage/g_files/12/{i % 12}_{1 + i // 12}.jpeg" for i in range(96)]
    answers, warm_answers, ready = asyncio.run(_flood(base, paths, warm))
    shed = [(r, t) for r, t in answers if r.status_code == 503]
    served = [r for r, _ in answers if r.status_code == 200]
    assert len(shed) + len(served) == len(paths)
    assert shed and served, [r.status_code for r, _ in answers]
    for response, seconds in shed:
        assert seconds < 2.0  # at once: no render waited for (bench: within 50 ms)
        # 1 while the last second refused no more than it rendered; a flood that runs into
        # the next second is spread wider (app.cache.tiles.RetryPacer; the exact rule:
        # tests/unit/test_pacing.py)
        assert 1 <= int(response.headers["retry-after"]) <= RETRY_AFTER_MAX_SECONDS
        assert response.json()["error"] == "overloaded"
        assert "x-request-id" in response.headers
    assert all(r.status_code == 200 and r.headers["x-tile-cache"] == "hit"
               for r, _ in warm_answers), [r.status_code for r, _ in warm_answers]
    assert 503 in ready  # overloaded: not ready
    assert get(base, "/readyz").status_code == 200  # and ready again after the flood
    health = get(base, "/healthz")
    assert health.status_code == 200  # liveness throughout

    # clients that hang up: each tile is rendered only if its render had started when the
    # server saw the client go, else abandoned (or refused); tests/api/test_load.py holds
    # the waiting case exactly
    text = get(base, "/metrics").text
    before = [metric(text, "tileserver_renders_abandoned_total"),
              metric(text, "tileserver_renders_shed_total")]
    gone = [(12, col, 0) for col in range(12)]
    for level, col, row in gone:
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as sock:
            sock.sendall(f"GET /storage/g_files/{level}/{col}_{row}.jpeg HTTP/1.1\r\n"
                         f"Host: x\r\n\r\n".encode())
        time.sleep(0.02)
    time.sleep(0.5)
    text = get(base, "/metrics").text
    abandoned = metric(text, "tileserver_renders_abandoned_total") - before[0]
    refused = metric(text, "tileserver_renders_shed_total") - before[1]
    files = [p for level, col, row in gone
             for p in workers.cache.glob(f"g/*/{level}/{col}_{row}.*")]
    assert abandoned + refused + len(files) == len(gone), (abandoned, refused, files)
    assert metric(text, "tileserver_tile_requests_total", status="499") >= abandoned
    assert before[1] == len(shed)


def test_json_logs_carry_the_request_id(replicas):
    (workers, _), _front = replicas
    r = httpx.post(workers.base_url + "/api/tiles/small/generate?levels=0",
                   headers={"X-Request-Id": "trace-42"}, timeout=TIMEOUT)
    assert r.status_code == 202 and r.headers["x-request-id"] == "trace-42"
    generated = get(workers.base_url, "/api/version").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{12}-\d+", generated)
    delete(workers.base_url, f"/api/jobs/{r.json()['id']}")
    wait_state(workers.base_url, r.json()["id"], {"succeeded", "cancelled"})
    lines = [json.loads(line) for line in workers.log.read_text().splitlines()
             if line.startswith("{")]
    assert {line["level"] for line in lines} >= {"INFO"}
    queued = [line for line in lines if line["message"].startswith(f"job {r.json()['id']} queued")]
    assert queued and queued[0]["request_id"] == "trace-42"
    assert queued[0]["logger"] == "app.batch.jobs"
    assert len({line["pid"] for line in lines}) >= 3  # the CLI and both workers
