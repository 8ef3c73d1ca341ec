"""The scenarios of ``make bench``: the table, how each one runs, and the rounds.

Every scenario gets a fresh server process group on a free port (and, for ours, a fresh empty
tile cache directory) and one wrk run (:mod:`bench.load`); :func:`run_rounds` runs every
scenario ``repeat`` times, alternating servers, and keeps each one's median run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.tools.launch import ServerProcess
from bench import BenchError, console
from bench.fsprobe import SLOW_CREATE_US, SpentCaches, file_create_probe
from bench.load import CONNECTIONS, Result, fetch_all, measure, size_sample, spread
from bench.servers import baseline, iipsrv, ours
from bench.slide import (
    SLIDE_NAME,
    WARM_REGION,
    Geometry,
    baseline_path,
    cold_order,
    geometry_from_api,
    geometry_from_openslide,
    iiif_tiles,
    iiif_warm_tiles,
    iipsrv_iiif_path,
    iipsrv_path,
    ours_iiif_path,
    ours_path,
    warm_tiles,
)

COLD_SECONDS = 5
"""A cold run must end before a wrk thread runs out of its half of the deepest level (5985
tiles): 5 s lasts up to about 2,300 tiles/s; a run that ran out is rerun shorter."""
WARM_SECONDS = 10
REPEAT = 3
"""Rounds of every scenario (``--repeat``): single runs on this 2-core VM moved by 20-50% (cold)
and 10-15% (warm, passthrough) from one to the next."""


@dataclass(frozen=True)
class Scenario:
    """One benchmark row: which server, which tiles, how."""

    key: str
    title: str
    server: str  # "ours" | "baseline" | "iipsrv"
    kind: str  # "cold" | "warm" | "uncached" (every cache off) | "overload" (bench/overload.py)
    fmt: str  # what the URL asks for: "jpeg" | "lossless" | "png" | "iiif" (IIIF default.jpg)
    expect_type: str  # the Content-Type every tile response must have
    settings: dict[str, Any] | None = None  # appsettings of ours beside Images/TileCachePath
    source: str | None = None  # X-Tile-Source every sampled tile must have
    auth: str | None = None  # "jwt" (a bearer token) or "signed" (signed URLs): Auth:Mode jwt


# Aligned geometry (DZI grid = the slide's 240 px stored tiles), every response read from the
# slide: no memory LRU, no disk cache, so a tile costs what a cold one does.
UNCACHED = {"EnableDiskCache": False, "Server": {"MemoryCacheBytes": 0},
            "DeepZoom": {"Geometry": "aligned"}}


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("cold-jpeg", "cold JPEG", "ours", "cold", "jpeg", "image/jpeg"),
    Scenario("cold-lossless", "cold lossless (PNG)", "ours", "cold", "lossless", "image/png"),
    Scenario("warm", "warm cache hits", "ours", "warm", "jpeg", "image/jpeg"),
    Scenario("warm-audit", "warm cache hits, audit log on", "ours", "warm", "jpeg",
             "image/jpeg"),
    Scenario("warm-jwt", "warm cache hits, OIDC bearer token (Auth:Mode jwt)", "ours", "warm",
             "jpeg", "image/jpeg", auth="jwt"),
    Scenario("warm-signed", "warm cache hits, signed URLs (Auth:Mode jwt)", "ours", "warm",
             "jpeg", "image/jpeg", auth="signed"),
    Scenario("baseline-jpeg", "cold JPEG", "baseline", "cold", "jpeg", "image/jpeg"),
    Scenario("baseline-png", "cold lossless (PNG)", "baseline", "cold", "png", "image/png"),
    Scenario("aligned-original", "uncached JPEG, aligned, passthrough", "ours", "uncached",
             "jpeg", "image/jpeg", UNCACHED, "original"),
    Scenario("aligned-rendered", "uncached JPEG, aligned, rendered", "ours", "uncached",
             "jpeg", "image/jpeg", {**UNCACHED, "TileFormat": {"Passthrough": False}},
             "rendered"),
    Scenario("iipsrv", "uncached JPEG, aligned", "iipsrv", "uncached", "jpeg", "image/jpeg"),
    # OpenSeadragon's IIIF tile requests of the deepest level, the slide's own 240 px tile
    # size for both servers (ours: DeepZoom.Geometry aligned, so IIIF tiles are stored tiles)
    Scenario("iiif-cold", "cold IIIF, aligned", "ours", "cold", "iiif", "image/jpeg",
             {"DeepZoom": {"Geometry": "aligned"}}),
    # warm: the default geometry, as ``warm``: IIIF tiles rendered once into the disk cache,
    # so that both workers hit (stored tiles sent as they are never enter the disk cache)
    Scenario("iiif-warm", "warm IIIF cache hits", "ours", "warm", "iiif", "image/jpeg"),
    Scenario("iipsrv-iiif", "cold IIIF", "iipsrv", "cold", "iiif", "image/jpeg"),
    Scenario("warm-no-metrics", "warm cache hits, metrics off", "ours", "warm", "jpeg",
             "image/jpeg", {"Metrics": {"Enabled": False}}),
    Scenario("overload", "2,000 connections of cold JPEG", "ours", "overload", "jpeg",
             "image/jpeg"),
)}
GROUPS: dict[str, list[str]] = {
    "all": list(SCENARIOS),
    "ours": ["cold-jpeg", "cold-lossless", "warm", "warm-audit"],
    "audit": ["warm", "warm-audit"],
    "auth": ["warm", "warm-jwt", "warm-signed"],
    "baseline": ["baseline-jpeg", "baseline-png"],
    "cold": ["cold-jpeg", "cold-lossless", "baseline-jpeg", "baseline-png"],
    "jpeg": ["cold-jpeg", "baseline-jpeg"],
    "png": ["cold-lossless", "baseline-png"],
    "lossless": ["cold-lossless", "baseline-png"],
    "passthrough": ["aligned-original", "aligned-rendered", "iipsrv"],
    "iiif": ["iiif-cold", "iiif-warm", "iipsrv-iiif"],
    "metrics": ["warm", "warm-no-metrics"],
    "overload": ["overload", "warm"],
}


@dataclass(frozen=True)
class Setup:
    """What every scenario of one run shares."""

    slide: Path
    workdir: Path
    """The run's temporary folder: configs, server logs, URL lists, wrk output."""
    workers: int
    """uvicorn workers of our server."""
    cache_parent: Path
    """Where each scenario's fresh TileCachePath is made (``--cache-parent``, else
    ``workdir``)."""
    spent: SpentCaches
    """Tile caches of finished scenarios, deleted when the whole run is over."""


def parse_scenarios(text: str) -> list[str]:
    """Scenario keys from ``--scenarios`` (keys and groups, comma-separated), in run order."""
    wanted: list[str] = []
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        keys = GROUPS.get(item) or ([item] if item in SCENARIOS else None)
        if keys is None:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {item!r}; choose from {', '.join([*SCENARIOS, *GROUPS])}")
        wanted += [k for k in keys if k not in wanted]
    return [k for k in SCENARIOS if k in wanted]


def slide_doc(server: ServerProcess, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``GET /api/slides/bench`` (opens the slide): level count and tiles per level."""
    response = httpx.get(f"{server.base_url}/api/slides/{SLIDE_NAME}", timeout=60,
                         headers=headers)
    if response.status_code != 200:
        raise BenchError(f"{server.name}: /api/slides/{SLIDE_NAME} answered "
                         f"{response.status_code}: {response.text[:500]}\n{server.log_tail()}")
    return response.json()


def ours_server(scenario: Scenario, setup: Setup,
                settings: dict[str, Any] | None = None) -> ServerProcess:
    """Our server for ``scenario`` (not started) with a fresh, empty tile cache directory in
    ``setup.cache_parent``, deleted when the whole run is over, and ``settings`` added to its
    appsettings."""
    cache = setup.spent.folder(f"cache-{scenario.key}-", setup.cache_parent)
    return ours(setup.slide, setup.workdir, cache, setup.workers, scenario.key, settings)


def run_ours_cold(scenario: Scenario, setup: Setup, seconds: int) -> Result:
    """A fresh server and cache; each deepest-level tile at most once."""
    with ours_server(scenario, setup) as server:
        doc = slide_doc(server)
        geo = geometry_from_api(doc)
        cols, rows = geo.tiles[geo.top]
        paths = [ours_path(geo.top, c, r, scenario.fmt) for c, r in cold_order(cols, rows)]
        create_us = file_create_probe(setup.cache_parent, setup.spent)
        result = measure(server, scenario, paths, "once", seconds, setup.workdir)
        result.extra["file_create_us"] = round(create_us, 1)
        if create_us > SLOW_CREATE_US:
            result.notes.append(
                f"creating a file cost {create_us:.0f} µs at the start (a quiet disk here: "
                f"6-60 µs); on ext4 without a journal this follows deleting many files in "
                f"the last 1-5 minutes (make test, an earlier run): rerun later")
        sample = size_sample(server, result, spread(paths))
        lossless = sorted({str(r.headers.get("x-tile-lossless")) for r in sample})
        result.extra["x_tile_lossless"] = lossless
        want = "true" if scenario.fmt == "lossless" else "false"
        if lossless != [want]:
            result.notes.append(f"size sample: X-Tile-Lossless {lossless}, expected {want}")
        result.extra["geometry"] = {"level": geo.top, "cols": cols, "rows": rows,
                                    "policy": doc["levels"][geo.top]["format"]}
    result.check()
    return result


def run_ours_warm(scenario: Scenario, setup: Setup, seconds: int) -> Result:
    """Pre-warm 2000 tiles (one pass), then wrk cycling over them; check X-Tile-Cache: hit.

    ``warm-audit`` runs with the audit log on and, once the server has stopped (and flushed),
    checks that the log has one line per request: pre-warm + wrk's + the size sample's.
    """
    # a fresh folder per run: rounds (--repeat) must not count each other's lines
    audit_path = Path(tempfile.mkdtemp(prefix=f"audit-{scenario.key}-", dir=setup.workdir),
                      "tiles.jsonl")
    audited = scenario.key == "warm-audit"
    extra: dict[str, Any] | None = dict(scenario.settings or {})
    if audited:
        extra = {**(extra or {}), "Audit": {"Enabled": True, "Path": str(audit_path)}}
    headers = None
    if scenario.auth:
        extra, headers = auth_credentials(setup.workdir)
    with ours_server(scenario, setup, extra) as server:
        doc = slide_doc(server, headers)
        geo = geometry_from_api(doc)
        paths = [ours_path(lv, c, r, "jpeg") for lv, c, r in warm_tiles(geo)]
        if scenario.auth == "signed":
            signed = httpx.get(f"{server.base_url}/api/slides/{SLIDE_NAME}/token",
                               headers=headers, timeout=30).json()
            paths = [f"{p}{'&' if '?' in p else '?'}{signed['query']}" for p in paths]
            headers = None  # the URL alone carries the grant
        if scenario.auth:
            denied = httpx.get(server.base_url + paths[0].split("?")[0], timeout=30)
            if denied.status_code != 401:
                raise BenchError(f"{scenario.key}: a tile without credentials answered "
                                 f"{denied.status_code}, not 401")
        console.print(f"  pre-warming {len(paths)} tiles ...")
        t0 = time.monotonic()
        responses = fetch_all(server.base_url, paths, headers=headers)
        warm_s = time.monotonic() - t0
        bad = [r for r in responses if r.status_code != 200]
        if bad:
            raise BenchError(f"pre-warm: {len(bad)} of {len(paths)} tiles failed, e.g. "
                             f"{bad[0].status_code} {bad[0].url}")
        result = measure(server, scenario, paths, "cycle", seconds, setup.workdir, headers)
        sample = size_sample(server, result, spread(paths), headers)
        hits = sum(r.headers.get("x-tile-cache") == "hit" for r in sample)
    levels = sorted({lv for lv, _, _ in warm_tiles(geo)}, reverse=True)
    result.extra.update({
        "warm_set": {"tiles": len(paths), "levels": levels, "region": list(WARM_REGION),
                     "prewarm_s": round(warm_s, 2),
                     "prewarm_mean_kb": round(sum(len(r.content) for r in responses)
                                              / len(responses) / 1024, 2)},
        "hit_check": {"sampled": len(sample), "x_tile_cache_hit": hits},
    })
    if hits != len(sample):
        result.notes.append(f"after the run only {hits}/{len(sample)} sampled tiles said "
                            "X-Tile-Cache: hit")
    if audited:
        check_audit_log(result, audit_path, prewarm=len(paths), sample=len(sample))
    result.check()
    return result


def auth_credentials(workdir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings of ``Auth:Mode jwt`` (a JWKS file of a fresh RSA key, a signed-URL key file)
    and the headers of a viewer's bearer token, valid for an hour, granting every slide."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    folder = Path(tempfile.mkdtemp(prefix="auth-", dir=workdir))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (folder / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "bench"}]}))
    (folder / "url.key").write_text(os.urandom(32).hex())
    now = int(time.time())
    token = jwt.encode({"iss": "bench", "aud": "tileserver", "sub": "bench", "iat": now,
                        "exp": now + 3600, "roles": ["viewer"], "slides": ["*"]},
                       key, algorithm="RS256", headers={"kid": "bench"})
    settings = {"Auth": {"Mode": "jwt", "Jwt": {
        "JwksFile": str(folder / "jwks.json"), "Issuer": "bench", "Audience": "tileserver"},
        "SignedUrls": {"KeyFile": str(folder / "url.key")}}}
    return settings, {"Authorization": f"Bearer {token}"}


def check_audit_log(result: Result, path: Path, prewarm: int, sample: int) -> None:
    """Count the audit lines (every rotated file) against the requests made; note a mismatch.

    The pre-warm and the size sample are counted exactly. wrk's ``requests`` counts the
    responses it read, its ``issued`` (the Lua ``request()`` calls) the requests it wrote; when
    the run ends wrk closes its 16 connections with up to one request each in flight, which the
    server may or may not have read. So every answered request must have its line and no line
    may lack a request: ``answered <= wrk lines <= issued``, and the gap is at most the number
    of connections.
    """
    from app.server.audit import audit_files

    lines = 0
    statuses: dict[int, int] = {}
    for file in audit_files(path):
        with file.open("rb") as fh:
            for raw in fh:
                lines += 1
                status = json.loads(raw)["status"]
                statuses[status] = statuses.get(status, 0) + 1
    issued, answered = result.wrk["issued"], result.wrk["requests"]
    wrk_lines = lines - prewarm - sample
    result.extra["audit"] = {
        "lines": lines, "prewarm": prewarm, "size_sample": sample, "wrk_lines": wrk_lines,
        "wrk_answered": answered, "wrk_issued": issued, "statuses": statuses,
        "complete": answered <= wrk_lines <= issued,
        "files": len(audit_files(path)),
        "bytes": sum(f.stat().st_size for f in audit_files(path)),
    }
    if not answered <= wrk_lines <= issued:
        result.notes.append(
            f"AUDIT LOG INCOMPLETE: {lines} lines = {prewarm} pre-warm + {sample} sample + "
            f"{wrk_lines} for wrk, which read {answered} responses and wrote {issued} requests")


def run_baseline(scenario: Scenario, setup: Setup, seconds: int, geo: Geometry) -> Result:
    """A fresh gunicorn baseline (no cache anywhere); each deepest-level tile at most once."""
    with baseline(setup.slide, setup.workdir, scenario.key) as server:
        cols, rows = geo.tiles[geo.top]
        paths = [baseline_path(geo.top, c, r, scenario.fmt) for c, r in cold_order(cols, rows)]
        result = measure(server, scenario, paths, "once", seconds, setup.workdir)
        size_sample(server, result, spread(paths))
    result.extra["geometry"] = {"level": geo.top, "cols": cols, "rows": rows}
    result.check()
    return result


def run_ours_uncached(scenario: Scenario, setup: Setup, seconds: int) -> Result:
    """Every deepest-level tile, cycled, with every cache off (:data:`UNCACHED`)."""
    with ours_server(scenario, setup, scenario.settings) as server:
        doc = slide_doc(server)
        geo = geometry_from_api(doc)
        cols, rows = geo.tiles[geo.top]
        paths = [ours_path(geo.top, c, r, "jpeg") for c, r in cold_order(cols, rows)]
        result = measure(server, scenario, paths, "cycle", seconds, setup.workdir)
        sample = size_sample(server, result, spread(paths))
        sources = [r.headers.get("x-tile-source") for r in sample]
        result.extra["x_tile_source"] = {s: sources.count(s) for s in set(sources)}
        if sources.count(scenario.source) < 0.9 * len(sample):
            result.notes.append(f"size sample: X-Tile-Source {result.extra['x_tile_source']}"
                                f", expected mostly {scenario.source}")
        result.extra["aligned_geometry"] = {
            "level": geo.top, "cols": cols, "rows": rows, "tile_size": doc["tile_size"],
            "overlap": doc["overlap"],
            "original_tiles": doc["levels"][geo.top]["original_tiles"]}
    result.check()
    return result


def run_iipsrv(scenario: Scenario, setup: Setup, seconds: int) -> Result:
    """iipsrv over the same slide: its DeepZoom (240 px, overlap 0), deepest level, cycled."""
    slide = setup.slide
    with iipsrv(slide, setup.workdir, scenario.key) as server:
        dzi = httpx.get(server.base_url + f"/fcgi-bin/iipsrv.fcgi?DeepZoom={slide.name}.dzi",
                        timeout=30).text
        tile_size = int(dzi.split('TileSize="')[1].split('"')[0])
        geo = geometry_from_openslide(slide, tile_size, overlap=0, limit_bounds=False)
        cols, rows = geo.tiles[geo.top]
        paths = [iipsrv_path(slide, geo.top, c, r) for c, r in cold_order(cols, rows)]
        result = measure(server, scenario, paths, "cycle", seconds, setup.workdir)
        size_sample(server, result, spread(paths))
    result.extra["aligned_geometry"] = {"level": geo.top, "cols": cols, "rows": rows,
                                        "tile_size": tile_size, "overlap": 0}
    result.check()
    return result


def iiif_info(server: ServerProcess, path: str) -> dict[str, Any]:
    """An info.json of the server (ours or iipsrv)."""
    response = httpx.get(server.base_url + path, timeout=60)
    if response.status_code != 200:
        raise BenchError(f"{server.name}: {path} answered {response.status_code}: "
                         f"{response.text[:500]}\n{server.log_tail()}")
    return response.json()


def run_ours_iiif(scenario: Scenario, setup: Setup, seconds: int) -> Result:
    """IIIF on a fresh server and cache: cold, each deepest-level tile once as OpenSeadragon
    asks it; warm, the 2000 centred tiles pre-warmed, then cycled."""
    with ours_server(scenario, setup, scenario.settings) as server:
        info = iiif_info(server, f"/iiif/3/{SLIDE_NAME}/info.json")
        width, height, size = info["width"], info["height"], info["tiles"][0]["width"]
        if scenario.kind == "warm":
            tiles = iiif_warm_tiles(width, height, size)
            paths = [ours_iiif_path(region, s) for region, s in tiles]
            responses = fetch_all(server.base_url, paths)
            bad = [r for r in responses if r.status_code != 200]
            if bad:
                raise BenchError(f"pre-warm: {len(bad)} of {len(paths)} IIIF tiles failed, "
                                 f"e.g. {bad[0].status_code} {bad[0].url}")
            result = measure(server, scenario, paths, "cycle", seconds, setup.workdir)
        else:
            paths = [ours_iiif_path(region, s) for region, s in iiif_tiles(width, height, size)]
            result = measure(server, scenario, paths, "once", seconds, setup.workdir)
        sample = size_sample(server, result, spread(paths))
        for header in ("x-tile-source", "x-tile-cache"):
            values = [r.headers.get(header) for r in sample]
            result.extra[header.replace("-", "_")] = {v: values.count(v) for v in set(values)}
    # only the cold runs compare with iipsrv (the warm one runs the default geometry)
    key = "iiif_geometry" if scenario.kind == "cold" else "iiif_warm_geometry"
    result.extra[key] = {"width": width, "height": height, "tile_size": size,
                         "tiles": len(paths)}
    result.check()
    return result


def run_iipsrv_iiif(scenario: Scenario, setup: Setup, seconds: int) -> Result:
    """iipsrv's IIIF over the same slide, each deepest-level tile once, at its tile size."""
    slide = setup.slide
    with iipsrv(slide, setup.workdir, scenario.key) as server:
        info = iiif_info(server, f"/fcgi-bin/iipsrv.fcgi?IIIF={slide.name}/info.json")
        width, height, size = info["width"], info["height"], info["tiles"][0]["width"]
        paths = [iipsrv_iiif_path(slide, region, s)
                 for region, s in iiif_tiles(width, height, size)]
        result = measure(server, scenario, paths, "once", seconds, setup.workdir)
        size_sample(server, result, spread(paths))
    result.extra["iiif_geometry"] = {"width": width, "height": height, "tile_size": size,
                                     "tiles": len(paths)}
    result.check()
    return result


def run_scenario(scenario: Scenario, setup: Setup, seconds: int,
                 base_geo: Geometry | None) -> Result:
    """Run one scenario on a fresh server; ``base_geo`` is the baseline's DZI geometry."""
    if scenario.fmt == "iiif":
        return (run_iipsrv_iiif if scenario.server == "iipsrv" else run_ours_iiif)(
            scenario, setup, seconds)
    if scenario.server == "iipsrv":
        return run_iipsrv(scenario, setup, seconds)
    if scenario.kind == "uncached":
        return run_ours_uncached(scenario, setup, seconds)
    if scenario.server == "baseline":
        assert base_geo is not None
        return run_baseline(scenario, setup, seconds, base_geo)
    if scenario.kind == "warm":
        return run_ours_warm(scenario, setup, seconds)
    if scenario.kind == "overload":
        from bench.overload import run_ours_overload

        return run_ours_overload(scenario, setup, seconds)
    return run_ours_cold(scenario, setup, seconds)


def schedule(keys: list[str], repeat: int) -> list[tuple[int, str]]:
    """``(round, scenario)`` in the order they run: every round runs every scenario in the same
    order, so that ours and the other servers alternate and a slow spell of the machine does
    not fall on one side only."""
    return [(round_, key) for round_ in range(repeat) for key in keys]


def median_run(results: list[Result]) -> Result:
    """The run with the median tiles/s (the lower middle of an even count), with every run's
    tiles/s, p50 and p99 in ``extra["runs"]``."""
    ordered = sorted(results, key=lambda r: r.tiles_per_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    if len(results) > 1:
        chosen.extra["runs"] = [
            {"tiles_per_s": round(r.tiles_per_s, 1), "p50_ms": r.latency_ms("p50"),
             "p99_ms": r.latency_ms("p99"), "file_create_us": r.extra.get("file_create_us")}
            for r in results]
        chosen.notes.extend(note for r in results if r is not chosen for note in r.notes
                            if note.startswith(("ERRORS", "RAN OUT")))
    return chosen


def rerun_seconds(result: Result) -> int:
    """A shorter duration in which a cold run that ran out would use about half of the tiles.

    Tiles/s of a run whose threads stopped early understates the rate; Little's law
    (connections / mean latency) estimates the rate while the threads were running.
    """
    mean_s = result.wrk["latency_us"]["mean"] / 1e6
    rate = max(result.tiles_per_s, CONNECTIONS / mean_s if mean_s else 0.0, 1.0)
    return max(1, min(result.seconds - 1, int(0.5 * result.tiles_available / rate)))


def run_rounds(keys: list[str], setup: Setup, repeat: int,
               duration: int | None) -> dict[str, Result]:
    """Run every scenario of ``keys`` ``repeat`` times (:func:`schedule`) and keep each one's
    :func:`median_run`.

    Args:
        duration: seconds of wrk per run; None: :data:`COLD_SECONDS` for cold runs,
            :data:`WARM_SECONDS` otherwise, and a cold run that ran out of tiles is rerun
            shorter (:func:`rerun_seconds`), as are that scenario's later rounds.

    Returns:
        Scenario key -> its median run, in the order of ``keys``.
    """
    base_geo = None
    runs: dict[str, list[Result]] = {}
    durations: dict[str, int] = {}
    for round_, key in schedule(keys, repeat):
        scenario = SCENARIOS[key]
        seconds = durations.get(key) or duration or (
            COLD_SECONDS if scenario.kind == "cold" else WARM_SECONDS)
        label = f" (round {round_ + 1}/{repeat})" if repeat > 1 else ""
        console.print(f"[bold]{key}[/]: {scenario.title}, {scenario.server}, "
                      f"{seconds} s{label} ...")
        if scenario.server == "baseline":
            base_geo = base_geo or geometry_from_openslide(setup.slide)
        os.sync()  # the last scenario's tile files are written back before this one
        result = run_scenario(scenario, setup, seconds, base_geo)
        while (result.wrk["exhausted"] and duration is None and seconds > 1
               and scenario.kind != "overload"):
            # a faster machine than the defaults were chosen for: shorter runs
            first, seconds = result, rerun_seconds(result)
            durations[key] = seconds
            console.print(f"  [yellow]ran out of tiles at {result.tiles_per_s:,.0f} "
                          f"tiles/s; rerunning with {seconds} s[/]")
            os.sync()
            result = run_scenario(scenario, setup, seconds, base_geo)
            result.notes.append(
                f"the first {first.seconds} s run ran out of tiles "
                f"({first.tiles}/{first.tiles_available} at "
                f"{first.tiles_per_s:,.0f} tiles/s); this is a rerun with {seconds} s")
        runs.setdefault(key, []).append(result)
        if "file_create_us" in result.extra:
            console.print(f"  file creation before the run: "
                          f"{result.extra['file_create_us']:.0f} µs per tile file")
        console.print(f"  {result.tiles_per_s:,.0f} tiles/s, p50 "
                      f"{result.latency_ms('p50'):.1f} ms, p99 "
                      f"{result.latency_ms('p99'):.1f} ms, "
                      f"{result.mean_kb:.1f} KB/tile, {result.error_total} errors")
    results = {key: median_run(runs[key]) for key in keys}
    check_geometry(results)
    return results


def check_geometry(results: dict[str, Result]) -> None:
    """Ours and the baseline (and ours aligned and iipsrv, and both IIIF servers) must have
    walked the same deepest level; a note on every result where they did not."""
    for key, who, fields in (("geometry", "the baseline", ("level", "cols", "rows")),
                             ("aligned_geometry", "iipsrv", ("level", "cols", "rows")),
                             ("iiif_geometry", "iipsrv (IIIF)",
                              ("width", "height", "tile_size"))):
        geos = {tuple(r.extra[key][f] for f in fields)
                for r in results.values() if key in r.extra}
        if len(geos) > 1:
            for r in results.values():
                r.notes.append(f"ours and {who} disagree on the deepest level: {geos}")
