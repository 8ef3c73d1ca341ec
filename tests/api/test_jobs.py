"""Pregeneration jobs through the app: 202 + job, progress, SSE, 409, cancel, errors, and tiles
byte-identical to the ones the server renders on demand, on every level."""

from __future__ import annotations

import json
import time

import pytest

from app.cache.disk import DiskTileCache
from tests.conftest import decode

JOB_DEADLINE = 300.0  # seconds a job may take on a loaded 2-core machine before the test gives up


def wait_job(client, job_id: str) -> dict:
    """Poll ``GET /api/jobs/{id}`` until the job has finished; return its document."""
    end = time.monotonic() + JOB_DEADLINE
    while time.monotonic() < end:
        doc = client.get(f"/api/jobs/{job_id}").json()
        if doc["state"] not in ("queued", "running"):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {doc['state']}")


def every_tile(client, name: str):
    info = client.get(f"/api/slides/{name}").json()
    for level in info["levels"]:
        for row in range(level["rows"]):
            for col in range(level["cols"]):
                yield level["level"], col, row


@pytest.fixture
def apps(client_for, tmp_path, quick_svs, fixtures):
    """Two apps on the same slides and settings: one whose cache a job fills, and one with an
    empty cache of its own that renders every tile on demand."""
    images = [{"Name": "g", "Path": str(quick_svs)},
              {"Name": "unreadable", "Path": str(fixtures / "unreadable.svs")},
              {"Name": "unopenable", "Path": str(fixtures / "unopenable.tiff")}]
    jobs = client_for(Images=images, TileCachePath=str(tmp_path / "jobs-cache"))
    on_demand = client_for(Images=images, TileCachePath=str(tmp_path / "on-demand-cache"))
    return jobs, on_demand


@pytest.mark.e2e  # the job runs in worker processes
def test_job_fills_the_cache_with_the_tiles_the_server_renders_on_every_level(apps, tmp_path):
    jobs, on_demand = apps
    r = jobs.post("/api/tiles/g/generate")
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/api/jobs/{job['id']}" and job["slides"] == ["g"]
    doc = wait_job(jobs, job["id"])
    total = jobs.get("/api/slides/g").json()["tile_count"]
    assert doc["state"] == "succeeded", doc
    assert (doc["tiles_done"], doc["tiles_skipped"], doc["tiles_total"]) == (total, 0, total)
    assert doc["tiles_per_second"] > 0 and doc["eta_seconds"] == 0 and doc["error"] is None
    assert jobs.get("/api/tiles/g/stats").json()["cachePercentage"] == 100
    formats = set()
    for level, col, row in every_tile(jobs, "g"):
        url = f"/storage/g_files/{level}/{col}_{row}.jpeg"
        cached, rendered = jobs.get(url), on_demand.get(url)
        assert cached.headers["x-tile-cache"] == "hit", url  # written by the job
        assert rendered.headers["x-tile-cache"] == "miss", url  # rendered for this request
        assert cached.content == rendered.content, url
        assert cached.headers["content-type"] == rendered.headers["content-type"]
        formats.add(cached.headers["content-type"])
    assert formats == {"image/jpeg", "image/png"}  # the policy's lossless top level included
    assert not list((tmp_path / "jobs-cache").rglob(".tmp-*"))

    again = wait_job(jobs, jobs.post("/api/tiles/g/generate?levels=10-12").json()["id"])
    assert again["state"] == "succeeded" and again["tiles_done"] == 0
    assert again["tiles_skipped"] == again["tiles_total"] > 0  # resumable: nothing redone
    rerun = wait_job(jobs, jobs.post("/api/tiles/g/generate?overwrite=true&levels=9&levels=11")
                     .json()["id"])
    assert rerun["levels"] == [9, 11] and rerun["tiles_done"] == rerun["tiles_total"] > 0


@pytest.mark.e2e  # the job runs in worker processes
def test_events_stream_progress_until_the_end(apps):
    jobs, _ = apps
    job_id = jobs.post("/api/tiles/g/generate?levels=0-12").json()["id"]
    events = []
    with jobs.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) <= {"progress"}
    final = events[-1][1]
    assert final["state"] == "succeeded" and final["tiles_done"] == final["tiles_total"] > 0
    processed = [doc["tiles_done"] + doc["tiles_skipped"] for _, doc in events]
    assert processed == sorted(processed)


@pytest.mark.e2e  # the job runs in worker processes
def test_one_job_per_slide_and_cancel(apps):
    jobs, _ = apps
    first = jobs.post("/api/tiles/generate-all").json()
    assert first["slides"] == ["g", "unreadable", "unopenable"]
    conflict = jobs.post("/api/tiles/g/generate")
    assert conflict.status_code == 409
    assert conflict.json()["error"] == "job_conflict" and conflict.json()["job"] == first["id"]
    cancelled = jobs.delete(f"/api/jobs/{first['id']}")
    assert cancelled.status_code == 202
    doc = wait_job(jobs, first["id"])
    assert doc["state"] == "cancelled" and doc["tiles_done"] < doc["tiles_total"]
    listed = jobs.get("/api/jobs").json()
    assert [j["id"] for j in listed] == [first["id"]]
    assert jobs.delete(f"/api/jobs/{first['id']}").status_code == 409  # already finished
    assert jobs.post("/api/tiles/g/generate?levels=5").status_code == 202  # free again


@pytest.mark.e2e  # the job runs in worker processes
def test_a_queued_job_is_cancelled_at_once(apps):
    jobs, _ = apps
    running = jobs.post("/api/tiles/g/generate?levels=0-11").json()
    queued = jobs.post("/api/tiles/unreadable/generate").json()
    assert queued["state"] == "queued"
    assert jobs.delete(f"/api/jobs/{queued['id']}").json()["state"] == "cancelled"
    assert wait_job(jobs, running["id"])["state"] == "succeeded"


@pytest.mark.e2e  # the job runs in worker processes
@pytest.mark.parametrize("name, message, code", [
    ("unreadable", "Bogus marker length", "slide_unreadable"),
    ("unopenable", "Unsupported TIFF compression: 52479", "slide_unopenable"),
])
def test_a_broken_slide_fails_its_job_and_the_server_keeps_serving(apps, tmp_path, name,
                                                                     message, code):
    jobs, _ = apps
    doc = wait_job(jobs, jobs.post(f"/api/tiles/{name}/generate").json()["id"])
    assert doc["state"] == "failed" and message in doc["error"] and doc["error_code"] == code
    assert doc["tiles_done"] == 0
    assert not list(DiskTileCache(tmp_path / "jobs-cache").walk())  # no tile file
    tile = jobs.get("/storage/g_files/9/0_0.jpeg")
    assert tile.status_code == 200 and decode(tile.content).shape[2] == 3


@pytest.mark.parametrize("method, url, status, error", [
    ("post", "/api/tiles/nope/generate", 404, "slide_not_found"),
    ("post", "/api/tiles/generate", 404, "slide_not_found"),  # no single slide configured
    ("post", "/api/tiles/g/generate?levels=abc", 400, "bad_request"),
    ("post", "/api/tiles/g/generate?levels=9-3", 400, "bad_request"),
    ("post", "/api/tiles/g/generate?overwrite=maybe", 422, "bad_request"),
    ("get", "/api/jobs/0123456789ab", 404, "job_not_found"),
    ("get", "/api/jobs/0123456789ab/events", 404, "job_not_found"),
    ("delete", "/api/jobs/0123456789ab", 404, "job_not_found"),
])
def test_bad_job_requests(apps, method, url, status, error):
    jobs, _ = apps
    r = getattr(jobs, method)(url)
    assert r.status_code == status and r.json()["error"] == error, r.text


def test_levels_outside_the_pyramid_are_a_bad_request(apps):
    jobs, _ = apps
    r = jobs.post("/api/tiles/g/generate?levels=40-41")
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert r.json()["detail"] == "levels 40-41 do not exist: slide 'g' has DZI levels 0-12"
    assert jobs.get("/api/jobs").json() == []


def test_levels_are_checked_against_the_pyramids(client_for, generated_svs, tmp_path):
    """One slide: every level must be in its pyramid. Every slide: every level must be in at
    least one pyramid (each slide's part is clipped to its own)."""
    from app.tools.demo import write_aperio_svs

    (tmp_path / "slides").mkdir()
    small = write_aperio_svs(tmp_path / "slides" / "small.svs", 1000, 800, seed=5)  # DZI 0-10
    jobs = client_for(Images=[{"Name": "g", "Path": str(generated_svs)},  # DZI levels 0-13
                              {"Name": "small", "Path": str(small)}])
    r = jobs.post("/api/tiles/small/generate?levels=10-17")
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "levels 11-17 do not exist: slide 'small' has DZI levels 0-10"
    r = jobs.post("/api/tiles/generate-all?levels=3,12-15")
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == ("levels 14-15 do not exist: the largest of the 2 slides has "
                                  "DZI levels 0-13")
    assert jobs.get("/api/jobs").json() == []
    doc = wait_job(jobs, jobs.post("/api/tiles/generate-all?levels=9-11").json()["id"])
    assert doc["state"] == "succeeded" and doc["levels"] == [9, 10, 11], doc
    tiles = {name: jobs.get(f"/api/slides/{name}").json()["levels"] for name in ("g", "small")}
    assert doc["tiles_total"] == sum(lv["cols"] * lv["rows"] for levels in tiles.values()
                                     for lv in levels if 9 <= lv["level"] <= 11)


@pytest.mark.e2e  # the job runs in worker processes
def test_single_slide_route_and_disabled_cache(client_for, generated_svs, tmp_path):
    single = client_for(Image={"Path": str(generated_svs)})
    doc = wait_job(single, single.post("/api/tiles/generate?levels=0-9").json()["id"])
    assert doc["slides"] == ["image"] and doc["state"] == "succeeded"
    disabled = client_for(Image={"Path": str(generated_svs)}, EnableDiskCache=False,
                          TileCachePath=str(tmp_path / "unused"))
    r = disabled.post("/api/tiles/generate")
    assert r.status_code == 409 and r.json()["error"] == "disk_cache_disabled"
