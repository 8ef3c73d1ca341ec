"""The report of ``make bench``: machine facts, the rich table on stdout, the ratios ours /
other, and the JSON document of ``bench/results/latest.json``."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

from bench import ROOT, BenchError, console
from bench.load import (
    CONNECTIONS,
    LOUD_NOTES,
    SIZE_SAMPLE,
    WRK_THREADS,
    WRK_TIMEOUT,
    Result,
    wrk_binary,
)
from bench.slide import SLIDE_SEED

RATIOS = (("JPEG", "cold-jpeg", "baseline-jpeg"), ("lossless/PNG", "cold-lossless", "baseline-png"),
          ("passthrough / rendered", "aligned-original", "aligned-rendered"),
          ("passthrough / iipsrv", "aligned-original", "iipsrv"),
          ("IIIF cold / iipsrv IIIF", "iiif-cold", "iipsrv-iiif"))
"""(label, our scenario, the other scenario) of every ratio reported where both ran."""


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
            loud = note.startswith(LOUD_NOTES)
            console.print(f"{'[bold red]' if loud else '[yellow]'}{r.scenario.key}: {note}[/]")


def results_document(results: dict[str, Result], rat: dict[str, dict[str, float]], *,
                     slide: Path, slide_size: tuple[int, int], workers: int,
                     facts: dict[str, Any], git_before: dict[str, Any],
                     elapsed_s: float) -> dict[str, Any]:
    """The JSON document of ``bench/results/latest.json``: command, machine facts (``facts``
    from :func:`machine_facts`, plus the load average now), the git state before the run and
    whether app/ changed during it, the setup, every scenario's record, the ratios and the
    audit comparison."""
    loadavg_end = [round(x, 2) for x in os.getloadavg()]
    return {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "cwd": str(ROOT), "elapsed_s": round(elapsed_s, 1),
        "machine": {**facts, "loadavg_end": loadavg_end},
        "git": {**git_before, "app_modified_after": git_state()["app_modified"]},
        "setup": {
            "slide": str(slide.relative_to(ROOT)), "slide_size": list(slide_size),
            "slide_seed": SLIDE_SEED, "wrk_threads": WRK_THREADS, "connections": CONNECTIONS,
            "wrk_timeout": WRK_TIMEOUT, "ours": f"tileserver serve --workers {workers} "
            "(default settings, fresh TileCachePath per scenario)",
            "baseline": "gunicorn -w 2 --threads 4 bench.baseline_server:app "
            "(DeepZoomGenerator 254/1/limit_bounds, PIL save quality=90)",
        },
        "scenarios": [r.to_json() for r in results.values()],
        "ratios_ours_over_baseline": rat,
        "audit_on_over_off": audit_comparison(results),
    }
