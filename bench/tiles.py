"""``make bench``: the tile server under uvicorn, loaded over loopback HTTP by ``wrk``.

Scenarios (``--scenarios``, comma-separated keys or groups; default ``all``):

=================  =========================================================================
``cold-jpeg``      ours: every tile of the deepest DZI level at most once, ``?format=jpeg``
``cold-lossless``  ours: the same tiles without override: the policy serves PNG (lossless)
``warm``           ours: 2000 pre-rendered tiles (JPEG) requested over and over: cache hits
``warm-audit``     the same with the audit log on (``Audit.Enabled``); afterwards the log must
                   hold one line per request (pre-warm + wrk + size sample; see
                   ``check_audit_log`` for the requests in flight when wrk stops)
``baseline-jpeg``  openslide's ``deepzoom_server.py`` (Flask, gunicorn 2x4), ``.jpeg`` q90
``baseline-png``   the same baseline, ``.png``
=================  =========================================================================

Groups: ``all``, ``ours``, ``baseline``, ``cold``, ``jpeg``, ``png``.

Every scenario gets a fresh server process group on a free port (and, for ours, a fresh
empty tile cache directory); ``wrk -t 2 -c 16`` runs ``bench/tiles.lua`` against it. Cold
scenarios hand every wrk thread a disjoint slice of the level's tiles in row-major order (the
order starts a quarter of the way down the level and wraps, so that both threads start in
tissue rather than on the glass margin), so that no tile is requested twice. The Lua script
counts image responses and their body bytes (the mean size per tile), non-2xx statuses and
``X-Tile-Cache`` hit/miss headers, and prints one JSON line that this module parses.

Every scenario runs ``--repeat`` times (default 3), in rounds, so that ours and the other
servers alternate; the table shows each scenario's median run and the range of all. Before
every scenario the page cache is written back (``sync``), and the tile caches of finished
scenarios are deleted only at the end of the run (:func:`retire` says why); each cold scenario
of ours first times the creation of a tile file (:func:`file_create_probe`).

Output: a rich table on stdout and ``bench/results/latest.json`` (machine facts, command,
per-scenario numbers, ratios ours/baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from app.cache.disk import write_atomic

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
DATA_DIR = BENCH_DIR / "data"
RESULTS = BENCH_DIR / "results" / "latest.json"
DELETED_AT = BENCH_DIR / "results" / ".caches-deleted-at"
"""When the last run deleted its tile caches (seconds since the epoch)."""
INODE_REUSE_SECONDS = 305
"""ext4 without a journal reuses no inode freed less than 60 s ago whose inode table block is
written back, 300 s while the block is dirty (``RECENTCY_MIN``, ``RECENTCY_DIRTY`` in Linux
fs/ext4/ialloc.c, ``recently_deleted``); new files land in the same blocks and dirty them
again, so in practice 300 s (measured: still 490 µs per file 70 s after a ``sync``); 5 s of
margin."""
LUA = BENCH_DIR / "tiles.lua"
BIN = Path(sys.executable).parent

SLIDE_SIZE = (32000, 24000)
"""Default level-0 size of the generated benchmark slide (at least 30000x20000 px)."""
SLIDE_SEED = 1
SLIDE_NAME = "bench"
CONNECTIONS = 16
WRK_THREADS = 2
COLD_SECONDS = 5
"""A cold run must end before a wrk thread runs out of its half of the deepest level (5985
tiles): 5 s lasts up to about 2,300 tiles/s; a run that ran out is rerun shorter."""
WARM_SECONDS = 10
REPEAT = 3
"""Rounds of every scenario (``--repeat``): single runs on this 2-core VM moved by 20-50% (cold)
and 10-15% (warm, passthrough) from one to the next."""
WARM_TILES = 2000
WARM_REGION = (50, 40)
"""Deepest-level region (cols, rows) pre-warmed for the warm scenario, centred on the slide."""
SIZE_SAMPLE = 100
"""Tiles fetched after each run to measure the size per tile on the same addresses for every
server (cold: spread evenly over the deepest level; warm: spread over the warm set)."""
WRK_TIMEOUT = "30s"  # wrk's default 2 s would turn slow renders into "timeouts"
READY_TIMEOUT = 90.0

CPU_BOUND_WRK = 50.0
BUSY_OTHER = 25.0
"""wrk CPU (percent of one core) above which the result notes that the load generator took a
large share of the machine."""

console = Console(width=None if sys.stdout.isatty() else 180)


@dataclass(frozen=True)
class Scenario:
    """One benchmark row: which server, which tiles, how."""

    key: str
    title: str
    server: str  # "ours" | "baseline" | "iipsrv"
    kind: str  # "cold" | "warm" | "uncached" (cycling over tiles with every cache off)
    fmt: str  # what the URL asks for: "jpeg" | "lossless" | "png"
    expect_type: str  # the Content-Type every tile response must have
    settings: dict[str, Any] | None = None  # appsettings of ours beside Images/TileCachePath
    source: str | None = None  # X-Tile-Source every sampled tile must have


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
    Scenario("baseline-jpeg", "cold JPEG", "baseline", "cold", "jpeg", "image/jpeg"),
    Scenario("baseline-png", "cold lossless (PNG)", "baseline", "cold", "png", "image/png"),
    Scenario("aligned-original", "uncached JPEG, aligned, passthrough", "ours", "uncached",
             "jpeg", "image/jpeg", UNCACHED, "original"),
    Scenario("aligned-rendered", "uncached JPEG, aligned, rendered", "ours", "uncached",
             "jpeg", "image/jpeg", {**UNCACHED, "TileFormat": {"Passthrough": False}},
             "rendered"),
    Scenario("iipsrv", "uncached JPEG, aligned", "iipsrv", "uncached", "jpeg", "image/jpeg"),
)}
GROUPS: dict[str, list[str]] = {
    "all": list(SCENARIOS),
    "ours": ["cold-jpeg", "cold-lossless", "warm", "warm-audit"],
    "audit": ["warm", "warm-audit"],
    "baseline": ["baseline-jpeg", "baseline-png"],
    "cold": ["cold-jpeg", "cold-lossless", "baseline-jpeg", "baseline-png"],
    "jpeg": ["cold-jpeg", "baseline-jpeg"],
    "png": ["cold-lossless", "baseline-png"],
    "lossless": ["cold-lossless", "baseline-png"],
    "passthrough": ["aligned-original", "aligned-rendered", "iipsrv"],
}
RATIOS = (("JPEG", "cold-jpeg", "baseline-jpeg"), ("lossless/PNG", "cold-lossless", "baseline-png"),
          ("passthrough / rendered", "aligned-original", "aligned-rendered"),
          ("passthrough / iipsrv", "aligned-original", "iipsrv"))
IIPSRV = Path("/usr/lib/iipimage-server/iipsrv.fcgi")
CACHE_PARENT: Path | None = None
"""Where each scenario's fresh TileCachePath is made (``--cache-parent``); None: the run's
temporary folder."""
SPENT_CACHES: list[Path] = []
"""Tile caches of finished scenarios, deleted only when the whole run is over (see
:func:`retire`)."""
PROBE_FILES = 200
SLOW_CREATE_US = 150.0
"""A file creation dearer than this (µs, :func:`file_create_probe`) gets a warning."""
# Two single-threaded FastCGI processes per core behind one nginx: 1707 tiles/s against 1302
# with one per core on 2 cores (make bench --scenarios iipsrv).
IIPSRV_PROCESSES = 4


class BenchError(RuntimeError):
    """The benchmark cannot go on (missing tool, server that does not start, wrk failure)."""


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (/proc)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields from "state" (field 3) on
        if int(fields[2]) == pgid:  # pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14, 15
    return total / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds (all cores, everything but idle and iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _CLK_TCK


_STARTED: list[Server] = []


@dataclass
class Server:
    """A server subprocess in its own process group, its output in a log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:{port}``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process (new session, so that stop() can kill the whole group)."""
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        _STARTED.append(self)

    def wait_ready(self, path: str, timeout: float = READY_TIMEOUT) -> None:
        """Poll ``GET path`` until it answers 200; raise with the log's tail if the server dies."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"{self.name} exited with {self.proc.returncode} before "
                                     f"it was ready:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not answer {path} within {timeout:.0f} "
                                     f"s:\n{self.log_tail()}")
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server's live processes."""
        return group_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after 10 s; idempotent."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if proc.poll() is not None and not _group_alive(proc.pid):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        if self in _STARTED:
            _STARTED.remove(self)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    for server in list(_STARTED):
        server.stop()


@contextlib.contextmanager
def running(server: Server, ready_path: str) -> Iterator[Server]:
    """Start ``server``, wait until ``ready_path`` answers, stop it (whole group) on exit."""
    try:
        server.start()
        server.wait_ready(ready_path)
        yield server
    finally:
        server.stop()


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment minus anything that would override the tile server's settings."""
    from app.settings import ENVIRONMENT_VARIABLE, Settings

    keys = {name.lower() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.split("__")[0].lower() not in keys}
    env[ENVIRONMENT_VARIABLE] = "Production"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def ours(slide: Path, workdir: Path, workers: int, tag: str,
         settings: dict[str, Any] | None = None) -> tuple[Server, Path]:
    """``tileserver serve`` on a free port with a fresh, empty tile cache directory, and
    ``settings`` added to its appsettings."""
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{tag}-", dir=CACHE_PARENT or workdir))
    config = workdir / f"config-{tag}.json"
    config.write_text(json.dumps({
        "Images": [{"Name": SLIDE_NAME, "Path": str(slide)}],
        "TileCachePath": str(cache),
        **(settings or {}),
    }, indent=2))
    port = free_port()
    argv = [str(BIN / "tileserver"), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--config", str(config)]
    return Server(f"tileserver ({tag})", argv, port, workdir / f"server-{tag}.log",
                  _server_env()), cache


def baseline(slide: Path, workdir: Path, tag: str) -> Server:
    """openslide's deepzoom_server.py equivalent under gunicorn, 2 workers x 4 threads."""
    port = free_port()
    argv = [str(BIN / "gunicorn"), "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{port}",
            "bench.baseline_server:app"]
    return Server(f"baseline ({tag})", argv, port, workdir / f"server-{tag}.log",
                  _server_env({"BENCH_SLIDE": str(slide)}))


def iipsrv(slide: Path, workdir: Path, tag: str) -> Server:
    """iipsrv (Debian ``iipimage-server``), FastCGI behind nginx, as it is deployed: one
    two single-threaded ``iipsrv.fcgi --bind`` processes per core, nginx upstream over them,
    JPEG quality 90, its tile cache off (``MAX_IMAGE_CACHE_SIZE=0``). One process group.

    No FastCGI keep-alive: an iipsrv process serves one connection at a time, so a connection
    nginx keeps idle would hold a process hostage (measured: p99 of 8 s with it)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not (IIPSRV.exists() and Path(nginx).exists()):
        raise BenchError("iipsrv or nginx is not installed: "
                         "apt-get install iipimage-server nginx (Debian)")
    port = free_port()
    backends = [free_port() for _ in range(IIPSRV_PROCESSES)]
    prefix = Path(tempfile.mkdtemp(prefix=f"nginx-{tag}-", dir=workdir))  # one per run
    upstream = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}; fastcgi_temp_path {prefix}; proxy_temp_path {prefix};
  uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
  upstream iip {{ {upstream} }}
  server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ return 200 "ok"; }}
    location /fcgi-bin/iipsrv.fcgi {{
      fastcgi_pass iip; include /etc/nginx/fastcgi_params;
    }}
  }}
}}
""")
    script = " ".join(f"{IIPSRV} --bind 127.0.0.1:{p} &" for p in backends)
    script += f" exec {nginx} -p {prefix} -c {prefix}/nginx.conf"
    env = {**_server_env(), "FILESYSTEM_PREFIX": f"{slide.parent}/", "JPEG_QUALITY": "90",
           "MAX_IMAGE_CACHE_SIZE": "0", "VERBOSITY": "0"}
    return Server(f"iipsrv ({tag})", ["sh", "-c", script], port,
                  workdir / f"server-{tag}.log", env)


def iipsrv_path(slide: Path, level: int, col: int, row: int) -> str:
    """An iipsrv DeepZoom tile URL path of ``slide``."""
    return f"/fcgi-bin/iipsrv.fcgi?DeepZoom={slide.name}_files/{level}/{col}_{row}.jpg"


# ----------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Geometry:
    """The DZI pyramid: level count and (cols, rows) per level."""

    level_count: int
    tiles: list[tuple[int, int]]

    @property
    def top(self) -> int:
        """The deepest (highest-resolution) DZI level."""
        return self.level_count - 1


def geometry_from_api(doc: dict[str, Any]) -> Geometry:
    """The geometry in ``GET /api/slides/{name}``'s answer."""
    return Geometry(doc["level_count"], [(lv["cols"], lv["rows"]) for lv in doc["levels"]])


def geometry_from_openslide(slide: Path) -> Geometry:
    """The geometry ``DeepZoomGenerator(tile_size=254, overlap=1, limit_bounds=True)`` has."""
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    with OpenSlide(slide) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=True)
        return Geometry(dz.level_count, [tuple(t) for t in dz.level_tiles])


def cold_order(cols: int, rows: int) -> list[tuple[int, int]]:
    """Every ``(col, row)`` once, row-major, starting at row ``rows // 4`` and wrapping.

    wrk thread i of T walks the i-th contiguous slice of this list; with the rotation, both
    threads of the default T=2 start inside the tissue instead of on the top glass margin.
    """
    start = rows // 4
    return [(c, (start + r) % rows) for r in range(rows) for c in range(cols)]


def warm_tiles(geo: Geometry, count: int = WARM_TILES) -> list[tuple[int, int, int]]:
    """``(level, col, row)`` of the warm set: a centred 50x40 region of the deepest level,
    topped up (small slides) with whole shallower levels, row-major, up to ``count`` tiles."""
    cols, rows = geo.tiles[geo.top]
    w, h = min(WARM_REGION[0], cols), min(WARM_REGION[1], rows)
    c0, r0 = (cols - w) // 2, (rows - h) // 2
    out = [(geo.top, c, r) for r in range(r0, r0 + h) for c in range(c0, c0 + w)]
    level = geo.top - 1
    while len(out) < count and level >= 0:
        lc, lr = geo.tiles[level]
        out += [(level, c, r) for r in range(lr) for c in range(lc)]
        level -= 1
    return out[:count]


def ours_path(level: int, col: int, row: int, fmt: str) -> str:
    """A tile URL path of our server; ``jpeg`` forces JPEG, ``lossless`` leaves the policy."""
    path = f"/storage/{SLIDE_NAME}_files/{level}/{col}_{row}.jpeg"
    return path + "?format=jpeg" if fmt == "jpeg" else path


def baseline_path(level: int, col: int, row: int, fmt: str) -> str:
    """A tile URL path of the baseline: ``.jpeg`` or ``.png``."""
    return f"/slide_files/{level}/{col}_{row}.{fmt}"


# ----------------------------------------------------------------------------- wrk


def wrk_binary() -> str:
    """The ``wrk`` executable, or a BenchError that says how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk (the HTTP load generator) is not installed: "
                         "apt-get install wrk (Debian/Ubuntu), brew install wrk (macOS)")
    return path


def run_wrk(base_url: str, paths: list[str], mode: str, seconds: int, workdir: Path,
            tag: str) -> dict[str, Any]:
    """Run ``wrk -t 2 -c 16 -d {seconds}s --latency -s bench/tiles.lua`` over ``paths``.

    Args:
        mode: ``once`` (each path at most once, disjoint slices per thread) or ``cycle``.

    Returns:
        The JSON line of the Lua ``done()`` plus ``wrk_cpu_s`` and the command line.
    """
    urls = workdir / f"urls-{tag}.txt"
    urls.write_text("\n".join(paths) + "\n")
    argv = [wrk_binary(), "-t", str(WRK_THREADS), "-c", str(CONNECTIONS), "-d", f"{seconds}s",
            "--timeout", WRK_TIMEOUT, "--latency", "-s", str(LUA), base_url,
            "--", str(urls), mode, str(WRK_THREADS)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (workdir / f"wrk-{tag}.txt").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {shlex.join(argv)}\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    result = json.loads(line.removeprefix("BENCH_JSON "))
    result["wrk_cpu_s"] = ((after.ru_utime - before.ru_utime)
                           + (after.ru_stime - before.ru_stime))
    result["wrk_command"] = shlex.join(argv)
    return result


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Result:
    """The numbers of one scenario, as printed and as written to JSON."""

    scenario: Scenario
    wrk: dict[str, Any]
    seconds: int
    tiles_available: int
    server_cpu_s: float
    machine_cpu_s: float
    loadavg_before: float
    example_url: str
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        """wrk's measured run time."""
        return self.wrk["duration_us"] / 1e6

    @property
    def tiles(self) -> int:
        """2xx image responses received."""
        return self.wrk["tiles"]

    @property
    def tiles_per_s(self) -> float:
        """2xx image responses per second."""
        return self.tiles / self.duration_s if self.duration_s else 0.0

    @property
    def mean_kb(self) -> float:
        """Mean body size of the image responses, KiB."""
        return self.wrk["bytes"] / self.tiles / 1024 if self.tiles else 0.0

    def latency_ms(self, key: str) -> float:
        """A latency statistic of wrk (``p50``, ``p99``, ...) in milliseconds."""
        return self.wrk["latency_us"][key] / 1000

    @property
    def errors(self) -> dict[str, int]:
        """wrk's socket errors and timeouts, and non-2xx responses (counted in Lua)."""
        e = self.wrk["errors"]
        return {"connect": e["connect"], "read": e["read"], "write": e["write"],
                "timeout": e["timeout"], "non2xx": self.wrk["non2xx"]}

    @property
    def error_total(self) -> int:
        """Sum of :attr:`errors`."""
        return sum(self.errors.values())

    @property
    def wrk_cpu_percent(self) -> float:
        """wrk's CPU time over the run, percent of one core."""
        return 100 * self.wrk["wrk_cpu_s"] / self.duration_s if self.duration_s else 0.0

    @property
    def server_cpu_percent(self) -> float:
        """The server processes' CPU time over the run, percent of one core."""
        return 100 * self.server_cpu_s / self.duration_s if self.duration_s else 0.0

    @property
    def other_cpu_percent(self) -> float:
        """CPU used over the run by neither wrk nor the server (this script, other work on
        the machine), percent of one core."""
        if not self.duration_s:
            return 0.0
        other = self.machine_cpu_s - self.server_cpu_s - self.wrk["wrk_cpu_s"]
        return max(0.0, 100 * other / self.duration_s)

    @property
    def sample_kb(self) -> float | None:
        """Mean size (KiB) of the :data:`SIZE_SAMPLE` tiles fetched after the run."""
        sample = self.extra.get("size_sample")
        return sample["mean_bytes"] / 1024 if sample else None

    def check(self) -> None:
        """Append notes for anything that makes the numbers suspect."""
        w, s = self.wrk, self.scenario
        if self.error_total:
            self.notes.append(f"ERRORS: {self.errors}")
        if w["exhausted"]:
            self.notes.append(f"RAN OUT OF TILES: {w['exhausted']} request(s) after a wrk "
                              f"thread had used its slice (tiles/s underestimated); "
                              f"use a shorter --duration")
        if s.kind in ("cold", "uncached") and w["hits"]:
            self.notes.append(f"{w['hits']} cache hit(s) in a {s.kind} run")
        if s.kind == "warm" and w["misses"]:
            self.notes.append(f"{w['misses']} cache miss(es) in the warm run")
        wrong = [t for t in w["content_types"] if t != s.expect_type]
        if wrong:
            self.notes.append(f"unexpected Content-Type {wrong} (expected {s.expect_type})")
        if self.wrk_cpu_percent > CPU_BOUND_WRK:
            self.notes.append(f"wrk used {self.wrk_cpu_percent:.0f}% of a core on a "
                              f"{os.cpu_count()}-core machine it shares with the server")
        if self.other_cpu_percent > BUSY_OTHER:
            self.notes.append(f"other processes used {self.other_cpu_percent:.0f}% of a core "
                              "during the run: the machine was not idle")

    def to_json(self) -> dict[str, Any]:
        """The JSON record of ``bench/results/latest.json``."""
        s = self.scenario
        return {
            "scenario": s.key, "title": s.title, "server": s.server, "kind": s.kind,
            "requested_format": s.fmt, "example_url": self.example_url,
            "duration_s": round(self.duration_s, 3), "requested_duration_s": self.seconds,
            "tiles": self.tiles, "tiles_available": self.tiles_available,
            "tiles_per_s": round(self.tiles_per_s, 1),
            "latency_ms": {k: round(v / 1000, 2) for k, v in self.wrk["latency_us"].items()},
            "mean_bytes_per_tile": round(self.wrk["bytes"] / self.tiles) if self.tiles else None,
            "mean_kb_per_tile": round(self.mean_kb, 2),
            "sample_mean_kb_per_tile": (round(self.sample_kb, 2)
                                        if self.sample_kb is not None else None),
            "errors": self.errors, "error_total": self.error_total,
            "exhausted_requests": self.wrk["exhausted"],
            "x_tile_cache": {"hit": self.wrk["hits"], "miss": self.wrk["misses"]},
            "content_types": self.wrk["content_types"],
            "wrk_cpu_percent": round(self.wrk_cpu_percent, 1),
            "server_cpu_percent": round(self.server_cpu_percent, 1),
            "other_cpu_percent": round(self.other_cpu_percent, 1),
            "loadavg_1m_before": self.loadavg_before,
            "wrk": {k: self.wrk[k] for k in ("requests", "bytes_total", "threads",
                                             "wrk_command")},
            **self.extra,
            "notes": self.notes,
        }


def retire(cache: Path) -> None:
    """Keep a finished scenario's tile cache until the run is over, then delete it.

    Deleting a scenario's ~10,000 tile files right away made the next scenario's file creation
    10x dearer on this VM (ext4 without a journal: inode allocation skips, one by one, every
    inode freed in the last 1-5 minutes; ``recently_deleted()`` in Linux's fs/ext4/ialloc.c,
    which ``perf`` showed at the top of the server's kernel time), a cost of the benchmark's
    own clean-up, not of the server under test.
    """
    SPENT_CACHES.append(cache)


def delete_spent_caches() -> None:
    """Delete every retired tile cache (end of the run), and note when, for the next run
    (:func:`wait_for_inode_reuse`)."""
    deleted = bool(SPENT_CACHES)
    while SPENT_CACHES:
        folder = SPENT_CACHES.pop()
        shutil.rmtree(folder, ignore_errors=True)
    if deleted:
        note_deletion()


def note_deletion() -> None:
    """Note that a benchmark deleted its tile files now (:func:`wait_for_inode_reuse`)."""
    DELETED_AT.parent.mkdir(parents=True, exist_ok=True)
    DELETED_AT.write_text(f"{time.time():.0f}\n")


def ext4_without_journal(path: Path) -> bool:
    """Whether ``path`` is on an ext4 file system mounted without a journal, where inode
    allocation skips, one by one, every inode freed in the last minutes (Linux
    fs/ext4/ialloc.c, ``find_inode_bit`` and ``recently_deleted``; with a journal it does
    not). Reads ``/proc/self/mountinfo`` and ``/sys/fs/ext4/<device>/journal_task``."""
    try:
        dev = os.stat(path).st_dev
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                rest = fields[fields.index("-") + 1:]
                if fields[2] == wanted and rest[0] == "ext4":
                    task = Path("/sys/fs/ext4", os.path.basename(rest[1]), "journal_task")
                    return task.read_text().strip() == "<none>"
    except (OSError, ValueError, IndexError):
        pass
    return False


def wait_for_inode_reuse(parent: Path) -> None:
    """Before a run: write the page cache back, and when the last run's clean-up deleted its
    tile caches less than :data:`INODE_REUSE_SECONDS` ago on an ext4 without a journal, wait
    for the rest of that window. Otherwise every file the cold scenarios create pays for
    scanning past the ~100,000 inodes that clean-up freed (perf: ``recently_deleted`` and
    ``find_get_block_common`` at the top of the server's kernel time; 1,360-1,575 cold JPEG
    tiles/s right after a run against 1,750-2,340 later)."""
    os.sync()
    try:
        deleted_at = float(DELETED_AT.read_text())
    except (OSError, ValueError):
        return
    left = deleted_at + INODE_REUSE_SECONDS - time.time()
    if left > 0 and ext4_without_journal(parent):
        console.print(f"[yellow]the last run deleted its tile caches "
                      f"{INODE_REUSE_SECONDS - left:.0f} s ago on an ext4 without a journal, "
                      f"which reuses no freed inode for {INODE_REUSE_SECONDS} s and makes "
                      f"every file creation scan past them: waiting {left:.0f} s[/]")
        time.sleep(left)


def file_create_probe(parent: Path, count: int = PROBE_FILES) -> float:
    """Microseconds (wall) to create one tile-sized file as the cache does
    (:func:`app.cache.disk.write_atomic`), over ``count`` files in a fresh folder of ``parent``.

    The cold scenarios create one file per tile; this says what that costs on the file system
    at the start of the scenario (6-60 µs on a quiet disk here, up to 700 µs on this VM's ext4
    in the minutes after many files were deleted: :func:`retire`). The files stay until the
    run is over.
    """
    folder = Path(tempfile.mkdtemp(prefix="create-probe-", dir=parent))
    data = os.urandom(8 * 1024)
    start = time.perf_counter()
    for i in range(count):
        write_atomic(folder / f"{i}.jpeg", data)
    elapsed = time.perf_counter() - start
    retire(folder)
    return 1e6 * elapsed / count


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _measure(server: Server, scenario: Scenario, paths: list[str], mode: str, seconds: int,
             workdir: Path) -> Result:
    """wrk against a ready server, with the server's CPU time over the run."""
    load = _loadavg()
    cpu0, busy0 = server.cpu_seconds(), machine_busy_seconds()
    out = run_wrk(server.base_url, paths, mode, seconds, workdir, scenario.key)
    cpu, busy = server.cpu_seconds() - cpu0, machine_busy_seconds() - busy0
    return Result(scenario, out, seconds, len(paths), cpu, busy, load,
                  server.base_url + paths[0])


def spread(items: list[Any], count: int = SIZE_SAMPLE) -> list[Any]:
    """``count`` items evenly spaced over ``items`` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def size_sample(server: Server, result: Result, paths: list[str]) -> list[httpx.Response]:
    """Fetch ``paths`` after the run; record their mean size; note failures and wrong types."""
    responses = asyncio.run(_fetch_all(server.base_url, paths))
    ok = [r for r in responses if r.status_code == 200]
    if len(ok) != len(responses):
        result.notes.append(f"size sample: {len(responses) - len(ok)} of {len(responses)} "
                            "tiles failed")
    types = sorted({r.headers.get("content-type", "") for r in ok})
    if types != [result.scenario.expect_type]:
        result.notes.append(f"size sample: Content-Type {types}, expected "
                            f"{result.scenario.expect_type}")
    if ok:
        result.extra["size_sample"] = {
            "tiles": len(ok), "mean_bytes": round(sum(len(r.content) for r in ok) / len(ok)),
            "how": "the same addresses for every server, fetched after the run",
        }
    return responses


def slide_doc(server: Server) -> dict[str, Any]:
    """``GET /api/slides/bench`` (opens the slide): level count and tiles per level."""
    response = httpx.get(f"{server.base_url}/api/slides/{SLIDE_NAME}", timeout=60)
    if response.status_code != 200:
        raise BenchError(f"{server.name}: /api/slides/{SLIDE_NAME} answered "
                         f"{response.status_code}: {response.text[:500]}\n{server.log_tail()}")
    return response.json()


def run_ours_cold(scenario: Scenario, slide: Path, workdir: Path, workers: int,
                  seconds: int) -> Result:
    """A fresh server and cache; each deepest-level tile at most once."""
    server, cache = ours(slide, workdir, workers, scenario.key)
    try:
        with running(server, "/healthz"):
            doc = slide_doc(server)
            geo = geometry_from_api(doc)
            cols, rows = geo.tiles[geo.top]
            paths = [ours_path(geo.top, c, r, scenario.fmt) for c, r in cold_order(cols, rows)]
            create_us = file_create_probe(cache.parent)
            result = _measure(server, scenario, paths, "once", seconds, workdir)
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
    finally:
        retire(cache)
    result.check()
    return result


async def _fetch_all(base_url: str, paths: list[str],
                     concurrency: int = 8) -> list[httpx.Response]:
    """GET every path (``concurrency`` at a time); the responses in order."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        async def one(path: str) -> httpx.Response:
            async with limit:
                response = await client.get(path)
                await response.aread()
                return response

        return await asyncio.gather(*(one(p) for p in paths))


def run_ours_warm(scenario: Scenario, slide: Path, workdir: Path, workers: int,
                  seconds: int) -> Result:
    """Pre-warm 2000 tiles (one pass), then wrk cycling over them; check X-Tile-Cache: hit.

    ``warm-audit`` runs with the audit log on and, once the server has stopped (and flushed),
    checks that the log has one line per request: pre-warm + wrk's + the size sample's.
    """
    # a fresh folder per run: rounds (--repeat) must not count each other's lines
    audit_path = Path(tempfile.mkdtemp(prefix=f"audit-{scenario.key}-", dir=workdir),
                      "tiles.jsonl")
    audited = scenario.key == "warm-audit"
    extra = {"Audit": {"Enabled": True, "Path": str(audit_path)}} if audited else None
    server, cache = ours(slide, workdir, workers, scenario.key, extra)
    try:
        with running(server, "/healthz"):
            doc = slide_doc(server)
            geo = geometry_from_api(doc)
            paths = [ours_path(lv, c, r, "jpeg") for lv, c, r in warm_tiles(geo)]
            console.print(f"  pre-warming {len(paths)} tiles ...")
            t0 = time.monotonic()
            responses = asyncio.run(_fetch_all(server.base_url, paths))
            warm_s = time.monotonic() - t0
            bad = [r for r in responses if r.status_code != 200]
            if bad:
                raise BenchError(f"pre-warm: {len(bad)} of {len(paths)} tiles failed, e.g. "
                                 f"{bad[0].status_code} {bad[0].url}")
            result = _measure(server, scenario, paths, "cycle", seconds, workdir)
            sample = size_sample(server, result, spread(paths))
            hits = sum(r.headers.get("x-tile-cache") == "hit" for r in sample)
    finally:
        retire(cache)
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


def run_baseline(scenario: Scenario, slide: Path, workdir: Path, seconds: int,
                 geo: Geometry) -> Result:
    """A fresh gunicorn baseline (no cache anywhere); each deepest-level tile at most once."""
    server = baseline(slide, workdir, scenario.key)
    with running(server, "/slide.dzi"):
        cols, rows = geo.tiles[geo.top]
        paths = [baseline_path(geo.top, c, r, scenario.fmt) for c, r in cold_order(cols, rows)]
        result = _measure(server, scenario, paths, "once", seconds, workdir)
        size_sample(server, result, spread(paths))
    result.extra["geometry"] = {"level": geo.top, "cols": cols, "rows": rows}
    result.check()
    return result


def run_ours_uncached(scenario: Scenario, slide: Path, workdir: Path, workers: int,
                      seconds: int) -> Result:
    """Every deepest-level tile, cycled, with every cache off (:data:`UNCACHED`)."""
    server, cache = ours(slide, workdir, workers, scenario.key, scenario.settings)
    try:
        with running(server, "/healthz"):
            doc = slide_doc(server)
            geo = geometry_from_api(doc)
            cols, rows = geo.tiles[geo.top]
            paths = [ours_path(geo.top, c, r, "jpeg") for c, r in cold_order(cols, rows)]
            result = _measure(server, scenario, paths, "cycle", seconds, workdir)
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
    finally:
        retire(cache)
    result.check()
    return result


def run_iipsrv(scenario: Scenario, slide: Path, workdir: Path, seconds: int) -> Result:
    """iipsrv over the same slide: its DeepZoom (240 px, overlap 0), deepest level, cycled."""
    server = iipsrv(slide, workdir, scenario.key)
    with running(server, "/healthz"):
        dzi = httpx.get(server.base_url + f"/fcgi-bin/iipsrv.fcgi?DeepZoom={slide.name}.dzi",
                        timeout=30).text
        tile_size = int(dzi.split('TileSize="')[1].split('"')[0])
        from openslide import OpenSlide
        from openslide.deepzoom import DeepZoomGenerator

        with OpenSlide(slide) as osr:
            dz = DeepZoomGenerator(osr, tile_size=tile_size, overlap=0, limit_bounds=False)
            top, (cols, rows) = dz.level_count - 1, dz.level_tiles[-1]
        paths = [iipsrv_path(slide, top, c, r) for c, r in cold_order(cols, rows)]
        result = _measure(server, scenario, paths, "cycle", seconds, workdir)
        size_sample(server, result, spread(paths))
    result.extra["aligned_geometry"] = {"level": top, "cols": cols, "rows": rows,
                                        "tile_size": tile_size, "overlap": 0}
    result.check()
    return result


def run_scenario(scenario: Scenario, slide: Path, workdir: Path, workers: int,
                 base_geo: Geometry | None, seconds: int) -> Result:
    """Run one scenario on a fresh server; ``base_geo`` is the baseline's DZI geometry."""
    if scenario.server == "iipsrv":
        return run_iipsrv(scenario, slide, workdir, seconds)
    if scenario.kind == "uncached":
        return run_ours_uncached(scenario, slide, workdir, workers, seconds)
    if scenario.server == "baseline":
        assert base_geo is not None
        return run_baseline(scenario, slide, workdir, seconds, base_geo)
    if scenario.kind == "warm":
        return run_ours_warm(scenario, slide, workdir, workers, seconds)
    return run_ours_cold(scenario, slide, workdir, workers, seconds)


# ----------------------------------------------------------------------------- report


def machine_facts() -> dict[str, Any]:
    """nproc, CPU model, memory, Python, kernel, tool versions, date."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {}
    for dist in ("uvicorn", "fastapi", "gunicorn", "flask", "openslide-python",
                 "openslide-bin", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
        out = subprocess.run([wrk_binary(), "--version"], capture_output=True, text=True,
                             timeout=10)
        versions["wrk"] = (out.stdout + out.stderr).splitlines()[0].strip()
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": model,
        "mem_total_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_state() -> dict[str, Any]:
    """HEAD commit and whether the server's sources (app/) differ from it."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "app_modified": bool(git("status", "--porcelain", "--", "app"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "app_modified": None}


def ratios(results: dict[str, Result]) -> dict[str, dict[str, float]]:
    """ours / baseline for tiles/s, p50, p99 and mean size, where both scenarios ran."""
    out = {}
    for label, ours_key, base_key in RATIOS:
        a, b = results.get(ours_key), results.get(base_key)
        if a is None or b is None:
            continue
        out[label] = {
            "tiles_per_s": _ratio(a.tiles_per_s, b.tiles_per_s),
            "p50": _ratio(a.latency_ms("p50"), b.latency_ms("p50")),
            "p99": _ratio(a.latency_ms("p99"), b.latency_ms("p99")),
            "mean_kb_per_tile": _ratio(a.sample_kb or 0.0, b.sample_kb or 0.0),
        }
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def audit_comparison(results: dict[str, Result]) -> dict[str, Any] | None:
    """The warm scenario with the audit log on against it off (None unless both ran)."""
    on, off = results.get("warm-audit"), results.get("warm")
    if on is None or off is None or "audit" not in on.extra:
        return None
    return {
        "tiles_per_s_on": round(on.tiles_per_s, 1), "tiles_per_s_off": round(off.tiles_per_s, 1),
        "tiles_per_s_ratio": _ratio(on.tiles_per_s, off.tiles_per_s),
        "p99_ms_on": on.latency_ms("p99"), "p99_ms_off": off.latency_ms("p99"),
        **{k: on.extra["audit"][k] for k in ("wrk_lines", "wrk_answered", "wrk_issued",
                                              "complete")},
    }


def _run_range(result: Result) -> str:
    runs = result.extra.get("runs")
    if not runs:
        return "1 run"
    rates = sorted(run["tiles_per_s"] for run in runs)
    return f"{rates[0]:,.0f}-{rates[-1]:,.0f} ({len(rates)})"


def print_report(results: dict[str, Result], rat: dict[str, dict[str, float]],
                 header: str) -> None:
    """The results table, the ratios and every note, on stdout."""
    table = Table(title=header, title_justify="left")
    for name, justify in (("scenario", "left"), ("server", "left"), ("tiles/s", "right"),
                          ("p50 ms", "right"), ("p99 ms", "right"), ("mean KB/tile", "right"),
                          ("KB/tile served", "right"), ("errors", "right"), ("tiles", "right"),
                          ("runs: tiles/s", "right"),
                          ("wrk CPU", "right"), ("server CPU", "right"),
                          ("other CPU", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in results.values():
        server = {"ours": "tileserver", "baseline": "deepzoom_server"}.get(
            r.scenario.server, r.scenario.server)
        errors = f"[bold red]{r.error_total}[/]" if r.error_total else "0"
        tiles = f"{r.tiles}/{r.tiles_available}" if r.scenario.kind == "cold" else str(r.tiles)
        if r.wrk["exhausted"]:
            tiles = f"[bold red]{tiles} (ran out)[/]"
        table.add_row(r.scenario.title, server, f"{r.tiles_per_s:,.0f}",
                      f"{r.latency_ms('p50'):.1f}", f"{r.latency_ms('p99'):.1f}",
                      "-" if r.sample_kb is None else f"{r.sample_kb:.1f}",
                      f"{r.mean_kb:.1f}", errors, tiles, _run_range(r),
                      f"{r.wrk_cpu_percent:.0f}%",
                      f"{r.server_cpu_percent:.0f}%", f"{r.other_cpu_percent:.0f}%")
    console.print(table)
    if rat:
        ratio_table = Table(title="ours / other", title_justify="left",
                            caption="tiles/s: > 1 is better; p50, p99, size: < 1 is better",
                            caption_justify="left")
        for name in ("format", "tiles/s", "p50", "p99", "mean KB/tile"):
            ratio_table.add_column(name, justify="left" if name == "format" else "right")
        for label, v in rat.items():
            ratio_table.add_row(label, f"{v['tiles_per_s']:.2f}x", f"{v['p50']:.2f}x",
                                f"{v['p99']:.2f}x", f"{v['mean_kb_per_tile']:.2f}x")
        console.print(ratio_table)
    audit = audit_comparison(results)
    if audit:
        console.print(
            f"audit log on / off (warm hits): {audit['tiles_per_s_on']:,.0f} / "
            f"{audit['tiles_per_s_off']:,.0f} tiles/s ({audit['tiles_per_s_ratio']:.2f}x), "
            f"p99 {audit['p99_ms_on']:.1f} / {audit['p99_ms_off']:.1f} ms; audit lines of the "
            f"wrk run {audit['wrk_lines']}: wrk read {audit['wrk_answered']} responses, wrote "
            f"{audit['wrk_issued']} requests ({'complete' if audit['complete'] else 'LOST'})")
    console.print(
        "[dim]tiles/s: 2xx image responses / wrk run time; each scenario shows its median run "
        "and the range of all its runs (--repeat). mean KB/tile: the same "
        f"{SIZE_SAMPLE} addresses for every server (cold: spread over the deepest level), "
        "fetched after the run; KB/tile served: mean over every tile of the run (depends on "
        "which tiles a run reached). KB = 1024 bytes of body. CPU: percent of one core over "
        f"the run; wrk, the server and everything else share {os.cpu_count()} cores.[/]")
    for r in results.values():
        for note in r.notes:
            loud = note.startswith(("ERRORS", "RAN OUT", "AUDIT"))
            console.print(f"{'[bold red]' if loud else '[yellow]'}{r.scenario.key}: {note}[/]")


# ----------------------------------------------------------------------------- main


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


def ensure_slide(width: int, height: int) -> Path:
    """``bench/data/bench-{W}x{H}.svs``, generated once (Aperio-style SVS, seed 1)."""
    path = DATA_DIR / f"bench-{width}x{height}.svs"
    if not path.exists():
        from app.tools.demo import write_aperio_svs

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        console.print(f"generating {path.relative_to(ROOT)} (once) ...")
        t0 = time.monotonic()
        write_aperio_svs(path, width, height, seed=SLIDE_SEED)
        console.print(f"  done in {time.monotonic() - t0:.1f} s, "
                      f"{path.stat().st_size / 1e6:.0f} MB")
    return path


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=SLIDE_SIZE[0],
                        help=f"slide width in px (default {SLIDE_SIZE[0]})")
    parser.add_argument("--height", type=int, default=SLIDE_SIZE[1],
                        help=f"slide height in px (default {SLIDE_SIZE[1]})")
    parser.add_argument("--workers", type=int, default=2,
                        help="uvicorn workers of our server (default 2)")
    parser.add_argument("--scenarios", type=parse_scenarios, default=list(SCENARIOS),
                        help="comma-separated scenarios or groups (default all): "
                        f"{', '.join([*SCENARIOS, *GROUPS])}")
    parser.add_argument("--duration", type=int, metavar="SECONDS",
                        help=f"seconds of wrk per scenario (default {COLD_SECONDS} cold, "
                        f"{WARM_SECONDS} warm)")
    parser.add_argument("--cache-parent", type=Path, metavar="DIR",
                        help="make each scenario's fresh TileCachePath in DIR (default: the "
                        "run's temporary folder), e.g. to measure the cache's file system")
    parser.add_argument("--repeat", type=int, default=REPEAT, metavar="N",
                        help=f"rounds of every scenario, ours and the other servers "
                        f"alternating; the table shows each one's median run and the range "
                        f"(default {REPEAT})")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="JSON results file (default bench/results/latest.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the table, write the JSON; 1 if any had errors."""
    args = _parser().parse_args(argv)
    global CACHE_PARENT
    CACHE_PARENT = args.cache_parent
    started = time.monotonic()
    try:
        wrk_binary()
        if args.repeat < 1:
            raise BenchError("--repeat must be at least 1")
        if args.duration is not None and args.duration < 1:
            raise BenchError("--duration must be at least 1 (wrk takes whole seconds)")
        slide = ensure_slide(args.width, args.height)
        wait_for_inode_reuse(CACHE_PARENT or Path(tempfile.gettempdir()))
        facts = machine_facts()
        git_before = git_state()
        results: dict[str, Result] = {}
        with tempfile.TemporaryDirectory(prefix="tileserver-bench-") as tmp:
            workdir = Path(tmp)
            base_geo = None
            runs: dict[str, list[Result]] = {}
            durations: dict[str, int] = {}
            for round_, key in schedule(args.scenarios, args.repeat):
                scenario = SCENARIOS[key]
                seconds = durations.get(key) or args.duration or (
                    COLD_SECONDS if scenario.kind == "cold" else WARM_SECONDS)
                label = f" (round {round_ + 1}/{args.repeat})" if args.repeat > 1 else ""
                console.print(f"[bold]{key}[/]: {scenario.title}, {scenario.server}, "
                              f"{seconds} s{label} ...")
                if scenario.server == "baseline":
                    base_geo = base_geo or geometry_from_openslide(slide)
                run = (scenario, slide, workdir, args.workers, base_geo)
                os.sync()  # the last scenario's tile files are written back before this one
                result = run_scenario(*run, seconds)
                while result.wrk["exhausted"] and args.duration is None and seconds > 1:
                    # a faster machine than the defaults were chosen for: shorter runs
                    first, seconds = result, rerun_seconds(result)
                    durations[key] = seconds
                    console.print(f"  [yellow]ran out of tiles at {result.tiles_per_s:,.0f} "
                                  f"tiles/s; rerunning with {seconds} s[/]")
                    os.sync()
                    result = run_scenario(*run, seconds)
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
            results = {key: median_run(runs[key]) for key in args.scenarios}
        _check_geometry(results)
    except BenchError as exc:
        console.print(f"[bold red]bench: {exc}[/]")
        return 2
    finally:
        stop_all()
        delete_spent_caches()
    elapsed = time.monotonic() - started
    rat = ratios(results)
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    header = (f"make bench: {slide.name}, wrk -t {WRK_THREADS} -c {CONNECTIONS}, "
              f"{facts['nproc']} x {facts['cpu_model']}")
    print_report(results, rat, header)
    facts["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "command": command, "cwd": str(ROOT), "elapsed_s": round(elapsed, 1),
        "machine": facts,
        "git": {**git_before, "app_modified_after": git_state()["app_modified"]},
        "setup": {
            "slide": str(slide.relative_to(ROOT)), "slide_size": [args.width, args.height],
            "slide_seed": SLIDE_SEED, "wrk_threads": WRK_THREADS, "connections": CONNECTIONS,
            "wrk_timeout": WRK_TIMEOUT, "ours": f"tileserver serve --workers {args.workers} "
            "(default settings, fresh TileCachePath per scenario)",
            "baseline": "gunicorn -w 2 --threads 4 bench.baseline_server:app "
            "(DeepZoomGenerator 254/1/limit_bounds, PIL save quality=90)",
        },
        "scenarios": [r.to_json() for r in results.values()],
        "ratios_ours_over_baseline": rat,
        "audit_on_over_off": audit_comparison(results),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    console.print(f"results: {shown}  ({elapsed:.0f} s)")
    return 1 if any(r.error_total or r.wrk["exhausted"]
                    or any(n.startswith(("AUDIT", "ERRORS", "RAN OUT")) for n in r.notes)
                    for r in results.values()) else 0


def _check_geometry(results: dict[str, Result]) -> None:
    """Ours and the baseline (and ours aligned and iipsrv) must have walked the same deepest
    level."""
    for key, who in (("geometry", "the baseline"), ("aligned_geometry", "iipsrv")):
        geos = {(r.extra[key]["level"], r.extra[key]["cols"], r.extra[key]["rows"])
                for r in results.values() if key in r.extra}
        if len(geos) > 1:
            for r in results.values():
                r.notes.append(f"ours and {who} disagree on the deepest level: {geos}")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
