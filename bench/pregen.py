"""``make bench-pregen``: whole-pyramid pregeneration against deepzoom_tile.py and vips dzsave.

Scenarios, in one run on the generated 32000x24000 SVS (``bench/data``, shared with
``make bench``), full pyramid, tile 254, overlap 1, JPEG quality 90, each into a fresh folder:

==================  ===========================================================================
``ours-jpeg``       ``tileserver pregenerate --workers 2`` with every level JPEG
                    (``TileFormat:LosslessLevelCount=0``), at the baseline's priority
                    (``Pregeneration:Nice=0``: on a shared machine niceness would measure the
                    neighbours, not the tiler)
``ours-default``    the same with the default policy (highest level lossless PNG)
``deepzoom-tile``   ``bench/deepzoom_tile_baseline.py -j 2``: what openslide-python's
                    ``deepzoom_tile.py -j 2`` does (process pool, ``get_tile`` + ``save``)
``vips``            ``vips dzsave --tile-size 254 --overlap 1 --suffix .jpeg[Q=90]``
``interactive``     p50/p99 of interactive cold tile requests to ``tileserver serve``, idle and
                    while a server job pregenerates the same slide (under another name)
==================  ===========================================================================

Peak memory is the largest sum of RSS over the process tree (sampled every 50 ms). Results go to
``bench/results/pregen.json`` and, as a markdown table, into docs/benchmarks.md between the
``bench-pregen`` markers. Figures from a shared machine are provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.tools.launch import ServerProcess, free_port, serve_argv, server_env
from bench import RESULTS_DIR, ROOT
from bench.fsprobe import SpentCaches, wait_for_inode_reuse
from bench.report import git_state, machine_facts
from bench.slide import SLIDE_NAME, SLIDE_SIZE, ensure_slide

RESULTS = RESULTS_DIR / "pregen.json"
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench-pregen:start -->", "<!-- bench-pregen:end -->"
WORKERS = 2
INTERACTIVE_SECONDS = 6.0
INTERACTIVE_CLIENTS = 2


@dataclass
class Run:
    """One measured command: wall seconds, tiles written, peak RSS of its process tree."""

    key: str
    title: str
    seconds: float = 0.0
    tiles: int = 0
    peak_rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        """Tiles written per second of wall time."""
        return self.tiles / self.seconds if self.seconds else 0.0


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(key: str, title: str, argv: list[str], out: Path, env: dict | None = None) -> Run:
    """Run ``argv`` to completion, sampling the RSS of its tree; count the files in ``out``."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, _tree_rss(watched))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.monotonic() - started
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"{key} failed ({process.returncode}):\n{output[-2000:]}")
    tiles = sum(1 for p in out.rglob("*") if p.is_file() and p.suffix in (".jpeg", ".png"))
    return Run(key, title, seconds, tiles, peak)


def ours(key: str, title: str, slide: Path, work: Path, policy: list[str]) -> Run:
    """``tileserver pregenerate --workers 2`` of ``slide`` into ``work/key`` at nice 0, with
    the ``policy`` settings overrides (``Section:Key=value``)."""
    cache = work / key
    argv = [sys.executable, "-m", "app.cli", "pregenerate", f"Images:0:Name={SLIDE_NAME}",
            f"Images:0:Path={slide}", f"TileCachePath={cache}", "Pregeneration:Nice=0",
            *policy,
            "--workers", str(WORKERS)]
    return measure(key, title, argv, cache, server_env())


def deepzoom_tile(slide: Path, work: Path) -> Run:
    """``bench/deepzoom_tile_baseline.py -j 2 -Q 90`` of ``slide`` into
    ``work/deepzoom-tile``."""
    out = work / "deepzoom-tile"
    argv = [sys.executable, "-m", "bench.deepzoom_tile_baseline", str(slide), str(out),
            "-j", str(WORKERS), "-Q", "90"]
    return measure("deepzoom-tile", "deepzoom_tile.py -j 2 (get_tile + save)", argv, out,
                   server_env())


def vips(slide: Path, work: Path) -> Run:
    """``vips dzsave`` (tile 254, overlap 1, JPEG Q90, 2 threads) of ``slide`` into
    ``work/vips``."""
    out = work / "vips"
    out.mkdir()
    argv = ["vips", "dzsave", str(slide), str(out / "slide"), "--tile-size", "254",
            "--overlap", "1", "--suffix", ".jpeg[Q=90]"]
    return measure("vips", "vips dzsave (libvips-tools)", argv, out,
                   server_env({"VIPS_CONCURRENCY": str(WORKERS)}))


def _latencies(base: str, paths: list[str], seconds: float) -> list[float]:
    """Closed-loop clients fetching distinct cold tiles; latency of each in ms."""
    out: list[float] = []
    lock = threading.Lock()
    queue = iter(paths)
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    path = next(queue, None)
                if path is None:
                    return
                t0 = time.perf_counter()
                r = http.get(path)
                elapsed = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code}")
                with lock:
                    out.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(INTERACTIVE_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def interactive(slide: Path, work: Path) -> Run:
    """p50/p99 of interactive requests idle, then during a server job; the job's own rate."""
    cache = work / "server"
    config = work / "server.json"
    config.write_text(json.dumps({"TileCachePath": str(cache), "TileFormat": {
        "LosslessLevelCount": 0}, "Images": [{"Name": SLIDE_NAME, "Path": str(slide)},
                                             {"Name": "view", "Path": str(slide)}]}))
    port = free_port()
    argv = serve_argv(port, config, "--log-level", "warning")
    with ServerProcess(argv, port, work / "server.log", env=server_env(), cwd=work,
                       name="tileserver serve") as server:
        base = server.base_url
        levels = httpx.get(base + "/api/slides/view", timeout=30).json()["levels"]
        top = levels[-1]
        addresses = [(c, r) for r in range(top["rows"]) for c in range(top["cols"])]
        random.Random(1).shuffle(addresses)
        paths = [f"/storage/view_files/{top['level']}/{c}_{r}.jpeg" for c, r in addresses]
        idle = _latencies(base, paths[:3000], INTERACTIVE_SECONDS)
        watched = psutil.Process(server.pid)
        started = time.monotonic()
        job = httpx.post(f"{base}/api/tiles/{SLIDE_NAME}/generate", timeout=30).json()
        during = _latencies(base, paths[3000:], INTERACTIVE_SECONDS)
        peak = 0
        while True:
            peak = max(peak, _tree_rss(watched))
            doc = httpx.get(f"{base}/api/jobs/{job['id']}", timeout=30).json()
            if doc["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        if doc["state"] != "succeeded":
            raise RuntimeError(f"server job {doc['state']}: {doc['error']}")
        run = Run("interactive", "server job (2 workers, nice 10) + interactive requests",
                  time.monotonic() - started, doc["tiles_done"], peak)
        run.extra = {
            "idle_p50_ms": _pct(idle, 50), "idle_p99_ms": _pct(idle, 99), "idle_n": len(idle),
            "job_p50_ms": _pct(during, 50), "job_p99_ms": _pct(during, 99),
            "job_n": len(during), "job_tiles_per_second": doc["tiles_per_second"],
        }
        return run


def table(runs: dict[str, Run]) -> str:
    """The markdown table and ratio lines written into docs/benchmarks.md."""
    base = runs.get("deepzoom-tile")
    lines = ["| run | tiles | seconds | tiles/s | vs deepzoom_tile.py | peak RSS (all processes) |",
             "|---|---:|---:|---:|---:|---:|"]
    for run in runs.values():
        if run.key == "interactive":
            continue
        ratio = f"{run.tiles_per_s / base.tiles_per_s:.2f}x" if base else "-"
        lines.append(f"| {run.title} | {run.tiles:,} | {run.seconds:.1f} | "
                     f"{run.tiles_per_s:,.0f} | {ratio} | {run.peak_rss / 2**20:,.0f} MiB |")
    inter = runs.get("interactive")
    if inter is not None:
        x = inter.extra
        lines += ["", "| interactive cold tiles (2 clients) | requests | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|",
                  f"| idle server | {x['idle_n']} | {x['idle_p50_ms']:.1f} | "
                  f"{x['idle_p99_ms']:.1f} |",
                  f"| during a server job ({x['job_tiles_per_second']:,.0f} tiles/s, peak RSS "
                  f"{inter.peak_rss / 2**20:,.0f} MiB) | {x['job_n']} | {x['job_p50_ms']:.1f} | "
                  f"{x['job_p99_ms']:.1f} |"]
    return "\n".join(lines)


def write_docs(text: str, facts: dict[str, Any]) -> None:
    """Replace the table between the markers in docs/benchmarks.md (append them if absent)."""
    block = (f"{START}\nMeasured {facts['date']}, commit {facts.get('commit', '?')[:7]}, "
             f"{facts['nproc']} cores ({facts['cpu_model']}), load average at start "
             f"{facts['loadavg_start'][0]}:\n\n{text}\n{END}")
    doc = DOCS.read_text()
    if START in doc and END in doc:
        doc = doc[:doc.index(START)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(doc)


SCENARIOS = ("ours-jpeg", "ours-default", "deepzoom-tile", "vips", "interactive")


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the table, write the JSON and docs/benchmarks.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.pregen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--no-docs", action="store_true", help="do not edit docs/benchmarks.md")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    slide = ensure_slide(*SLIDE_SIZE)
    facts = {**machine_facts(), **git_state()}
    runs: dict[str, Run] = {}
    wait_for_inode_reuse(ROOT / "bench")
    with SpentCaches() as spent:
        work = spent.folder("bench-pregen-", ROOT / "bench")
        for key in wanted:
            print(f"running {key} ...", flush=True)
            os.sync()  # the last run's tiles are written back before this one starts
            if key == "ours-jpeg":
                run = ours(key, "tileserver pregenerate, all levels JPEG", slide, work,
                           ["TileFormat:LosslessLevelCount=0"])
            elif key == "ours-default":
                run = ours(key, "tileserver pregenerate, default policy (top level PNG)",
                           slide, work, [])
            elif key == "deepzoom-tile":
                run = deepzoom_tile(slide, work)
            elif key == "vips":
                run = vips(slide, work)
            elif key == "interactive":
                run = interactive(slide, work)
            else:
                parser.error(f"unknown scenario {key!r}")
            runs[key] = run
            print(f"  {run.tiles} tiles in {run.seconds:.1f} s = {run.tiles_per_s:,.0f} tiles/s, "
                  f"peak RSS {run.peak_rss / 2**20:,.0f} MiB {run.extra or ''}", flush=True)
            # every run's tiles stay until the end: deleting them here made the next tool's
            # file creation scan past them on ext4 without a journal (SpentCaches.retire)
    text = table(runs)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": facts, "runs": {
        k: {**vars(r), "tiles_per_s": r.tiles_per_s} for k, r in runs.items()}}, indent=1))
    if not args.no_docs:
        write_docs(text, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
