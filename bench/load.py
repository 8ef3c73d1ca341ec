"""The load of ``make bench``: ``wrk`` runs of ``bench/tiles.lua``, the size sample fetched
after each run, and :class:`Result`, the numbers of one run.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from app.tools.launch import ServerProcess
from bench import ROOT, BenchError
from bench.servers import machine_busy_seconds

if TYPE_CHECKING:
    from bench.scenarios import Scenario

LUA = ROOT / "bench" / "tiles.lua"
CONNECTIONS = 16
WRK_THREADS = 2
WRK_TIMEOUT = "30s"  # wrk's default 2 s would turn slow renders into "timeouts"
SIZE_SAMPLE = 100
"""Tiles fetched after each run to measure the size per tile on the same addresses for every
server (cold: spread evenly over the deepest level; warm: spread over the warm set)."""
LOUD_NOTES = ("AUDIT", "ERRORS", "RAN OUT")
"""How the notes begin that make a result's numbers not count (:attr:`Result.failed`)."""
CPU_BOUND_WRK = 50.0
BUSY_OTHER = 25.0
"""wrk CPU (percent of one core) above which the result notes that the load generator took a
large share of the machine."""


def wrk_binary() -> str:
    """The ``wrk`` executable, or a BenchError that says how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk (the HTTP load generator) is not installed: "
                         "apt-get install wrk (Debian/Ubuntu), brew install wrk (macOS)")
    return path


def run_wrk(base_url: str, paths: list[str], mode: str, seconds: int, workdir: Path,
            tag: str, headers: dict[str, str] | None = None, connections: int = CONNECTIONS,
            threads: int = WRK_THREADS, script: Path = LUA) -> dict[str, Any]:
    """Run ``wrk -t 2 -c 16 -d {seconds}s --latency -s bench/tiles.lua`` over ``paths``.

    Args:
        mode: ``once`` (each path at most once, disjoint slices per thread), ``again`` (the
            same slices, each started again at its end) or ``cycle`` (bench/tiles.lua).
        headers: sent with every request (``wrk -H``), e.g. a bearer token.
        connections, threads, script: wrk's ``-c``, ``-t`` and Lua script (the overload
            scenario's flood).

    Returns:
        The JSON line of the Lua ``done()`` plus ``wrk_cpu_s`` and the command line.
    """
    urls = workdir / f"urls-{tag}.txt"
    urls.write_text("\n".join(paths) + "\n")
    argv = [wrk_binary(), "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", WRK_TIMEOUT, "--latency",
            *[arg for k, v in (headers or {}).items() for arg in ("-H", f"{k}: {v}")],
            "-s", str(script), base_url,
            "--", str(urls), mode, str(threads)]
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
        """wrk's socket errors and timeouts, and non-2xx responses (counted in Lua); an
        overload run expects 503s and clients that close with requests in flight."""
        e = self.wrk["errors"]
        if self.scenario.kind == "overload":
            return {"connect": e["connect"], "timeout": e["timeout"]}
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

    @property
    def failed(self) -> bool:
        """Errors, a run out of tiles, an incomplete audit log: the numbers do not count."""
        exhausted = self.wrk["exhausted"] and self.scenario.kind != "overload"
        return bool(self.error_total or exhausted
                    or any(n.startswith(LOUD_NOTES) for n in self.notes))

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


def measure(server: ServerProcess, scenario: Scenario, paths: list[str], mode: str,
            seconds: int, workdir: Path, headers: dict[str, str] | None = None) -> Result:
    """wrk against a ready server (:func:`run_wrk`), with the CPU seconds of the server's
    process group and of the whole machine over the run, and the 1-minute load average
    before it."""
    load = round(os.getloadavg()[0], 2)
    cpu0, busy0 = server.cpu_seconds(), machine_busy_seconds()
    out = run_wrk(server.base_url, paths, mode, seconds, workdir, scenario.key, headers)
    cpu, busy = server.cpu_seconds() - cpu0, machine_busy_seconds() - busy0
    return Result(scenario, out, seconds, len(paths), cpu, busy, load,
                  server.base_url + paths[0])


async def _fetch_all(base_url: str, paths: list[str], concurrency: int = 8,
                     headers: dict[str, str] | None = None) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=headers) as client:
        async def one(path: str) -> httpx.Response:
            async with limit:
                response = await client.get(path)
                await response.aread()
                return response

        return await asyncio.gather(*(one(p) for p in paths))


def fetch_all(base_url: str, paths: list[str], concurrency: int = 8,
              headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """GET every path (``concurrency`` at a time, 120 s timeout each, with ``headers``); the
    responses in order."""
    return asyncio.run(_fetch_all(base_url, paths, concurrency, headers))


def spread(items: list[Any], count: int = SIZE_SAMPLE) -> list[Any]:
    """``count`` items evenly spaced over ``items`` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def size_sample(server: ServerProcess, result: Result, paths: list[str],
                headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """Fetch ``paths`` after the run; record their mean size; note failures and wrong types."""
    responses = fetch_all(server.base_url, paths, headers=headers)
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
