"""Both coordination stores (SQLite, a real redis-server) keep the same rules: one job per
slide, claims with leases that another process takes over when they run out, cancellation,
the invalidation log."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import redis

from app.coordination import ConflictingJob, new_job
from app.coordination.embedded import EmbeddedCoordination
from app.coordination.redisstore import RedisCoordination
from app.tools.launch import free_port
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server",
                               "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture(params=["embedded", "redis"])
def store(request, tmp_path, monkeypatch):
    lease = 0.15
    monkeypatch.setattr("app.coordination.embedded.LEASE_SECONDS", lease)
    monkeypatch.setattr("app.coordination.redisstore.LEASE_SECONDS", lease)
    if request.param == "embedded":
        return EmbeddedCoordination(tmp_path / "coordination.sqlite")
    return RedisCoordination(request.getfixturevalue("redis_url"),
                             f"test-{tmp_path.name}")


def test_the_rules_of_both_stores(store):
    async def scenario() -> None:
        await store.open()
        try:
            first = new_job(["a", "b"], None, False, "test")
            await store.submit(first)
            with pytest.raises(ConflictingJob) as conflict:
                await store.submit(new_job(["c", "b"], [3], False, "test"))
            assert (conflict.value.job, conflict.value.slide) == (first["id"], "b")
            claimed = await store.claim("p1")
            assert claimed["id"] == first["id"] and claimed["state"] == "running"
            assert claimed["attempts"] == 1 and await store.claim("p2") is None
            progress = {"slide": "a", "done": 5, "skipped": 1, "total": 9, "bytes": 99}
            updated = await store.update(first["id"], "p1", {"progress": progress})
            assert updated["progress"] == progress and updated["version"] > claimed["version"]
            assert await store.update(first["id"], "p2", {}) is None  # not p2's
            await asyncio.sleep(0.25)  # p1 "died": its lease ran out
            resumed = await store.claim("p2")
            assert resumed["id"] == first["id"] and resumed["attempts"] == 2
            assert resumed["progress"] == progress  # where it stopped
            assert await store.update(first["id"], "p1", {}) is None  # p1 lost it
            flagged = await store.cancel(first["id"])
            assert flagged["state"] == "running" and flagged["cancel"]
            await store.finish(first["id"], "p2", {"state": "cancelled"})
            await store.submit(new_job(["b"], None, True, "test"))  # "b" is free again
            assert [j["state"] for j in await store.jobs()] == ["queued", "cancelled"]
            queued = (await store.jobs())[0]
            assert (await store.cancel(queued["id"]))["state"] == "cancelled"  # at once
            abandoned = new_job(["z"], None, False, "test")
            await store.submit(abandoned)
            for attempt in range(1, 4):
                job = await store.claim(f"worker{attempt}")
                assert job["attempts"] == attempt
                await asyncio.sleep(0.25)
            assert await store.claim("worker4") is None
            failed = await store.get(abandoned["id"])
            assert failed["state"] == "failed" and failed["error_code"] == "job_abandoned"

            generation, slides = await store.invalidations(0)
            await store.invalidate("a")
            await store.invalidate(None)
            now, slides = await store.invalidations(generation)
            assert now == generation + 2 and slides == ["a", None]
            assert await store.invalidations(now) == (now, [])
        finally:
            await store.close()

    asyncio.run(scenario())


RACE = """
import asyncio, json, sys
from app.coordination import ConflictingJob, new_job
from app.coordination.embedded import EmbeddedCoordination

async def main():
    store = EmbeddedCoordination(sys.argv[1])
    await store.open()
    won, claimed = [], []
    for i in range(20):
        try:
            await store.submit(new_job([f"s{i}"], None, False, "race"))
            won.append(i)
        except ConflictingJob:
            pass
        job = await store.claim(sys.argv[2])
        if job is not None:
            claimed.append(job["id"])
    await store.close()
    print(json.dumps({"won": won, "claimed": claimed}))

asyncio.run(main())
"""


def test_the_embedded_store_holds_across_processes(tmp_path):
    """Two processes submit jobs for the same twenty slides and claim jobs at once: each slide
    gets one job, and no job is claimed twice."""
    path = tmp_path / "coordination.sqlite"
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(path), f"p{n}"],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
              for n in range(2)]
    results = [json.loads(racer.communicate(timeout=60)[0]) for racer in racers]
    won = sorted(i for r in results for i in r["won"])
    assert won == list(range(20))  # every slide once: the other process got a conflict
    claimed = [job for r in results for job in r["claimed"]]
    assert claimed and len(claimed) == len(set(claimed)) <= 20
