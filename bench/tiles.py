"""``make bench``: the tile server under uvicorn, loaded over loopback HTTP by ``wrk``.

Scenarios (``--scenarios``, comma-separated keys or groups; default ``all``):

=================  =========================================================================
``cold-jpeg``      ours: every tile of the deepest DZI level at most once, ``?format=jpeg``
``cold-lossless``  ours: the same tiles without override: the policy serves PNG (lossless)
``warm``           ours: 2000 pre-rendered tiles (JPEG) requested over and over: cache hits
``warm-audit``     the same with the audit log on (``Audit.Enabled``); afterwards the log must
                   hold one line per request (pre-warm + wrk + size sample; see
                   ``bench.scenarios.check_audit_log`` for the requests in flight when wrk
                   stops)
``warm-jwt``       the warm set with ``Auth:Mode jwt``: every request carries an OIDC bearer
                   token (RS256, JWKS file), verified once and then cached
``warm-signed``    the same with signed URLs (the token's query on every tile URL)
``baseline-jpeg``  openslide's ``deepzoom_server.py`` (Flask, gunicorn 2x4), ``.jpeg`` q90
``baseline-png``   the same baseline, ``.png``
``iiif-cold``      ours, ``DeepZoom.Geometry`` aligned: OpenSeadragon's IIIF requests of every
                   deepest-level tile (the slide's 240 px tiles) at most once
``iiif-warm``      the same server: 2000 pre-warmed IIIF tiles requested over and over
``iipsrv-iiif``    iipsrv's IIIF (nginx + FastCGI), the same tiles at its tile size, once each
``aligned-original`` ours, ``DeepZoom.Geometry`` aligned: the slide's stored JPEG tiles sent
                   as they are (``TileFormat.Passthrough``), uncached
``aligned-rendered`` the same tiles decoded and encoded again (passthrough off)
``iipsrv``         iipsrv's DeepZoom (nginx + FastCGI), the same aligned tiles, uncached
``warm-no-metrics`` the warm set with ``Metrics.Enabled`` off (what metrics cost)
``overload``       2,000 connections of cold tiles honouring ``Retry-After`` while a probe
                   times 503s, accepted cold tiles and warm hits (:mod:`bench.overload`)
=================  =========================================================================

Groups: ``all``, ``ours``, ``baseline``, ``cold``, ``jpeg``, ``png``, ``audit``, ``auth``,
``lossless``, ``iiif``, ``passthrough``, ``metrics``, ``overload``.

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
scenarios are deleted only at the end of the run (:meth:`bench.fsprobe.SpentCaches.retire`
says why); each cold scenario of ours first times the creation of a tile file
(:func:`bench.fsprobe.file_create_probe`).

Output: a rich table on stdout and ``bench/results/latest.json`` (machine facts, command,
per-scenario numbers, ratios ours/baseline).

Code: this module is the command line; bench/scenarios.py (the table, the rounds),
bench/servers.py, bench/load.py (wrk), bench/fsprobe.py, bench/report.py, bench/slide.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from app.tools.launch import ServerStartError
from bench import RESULTS_DIR, ROOT, BenchError, console
from bench.fsprobe import SpentCaches, wait_for_inode_reuse
from bench.load import CONNECTIONS, WRK_THREADS, wrk_binary
from bench.report import git_state, machine_facts, print_report, ratios, results_document
from bench.scenarios import (
    COLD_SECONDS,
    GROUPS,
    REPEAT,
    SCENARIOS,
    WARM_SECONDS,
    Setup,
    parse_scenarios,
    run_rounds,
)
from bench.slide import SLIDE_SIZE, ensure_slide

RESULTS = RESULTS_DIR / "latest.json"


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
    started = time.monotonic()
    try:
        wrk_binary()
        if args.repeat < 1:
            raise BenchError("--repeat must be at least 1")
        if args.duration is not None and args.duration < 1:
            raise BenchError("--duration must be at least 1 (wrk takes whole seconds)")
        slide = ensure_slide(args.width, args.height)
        wait_for_inode_reuse(args.cache_parent or Path(tempfile.gettempdir()))
        facts = machine_facts()
        git_before = git_state()
        with SpentCaches() as spent, \
                tempfile.TemporaryDirectory(prefix="tileserver-bench-") as tmp:
            workdir = Path(tmp)
            setup = Setup(slide, workdir, args.workers, args.cache_parent or workdir, spent)
            results = run_rounds(args.scenarios, setup, args.repeat, args.duration)
    except (BenchError, ServerStartError) as exc:
        console.print(f"[bold red]bench: {exc}[/]")
        return 2
    elapsed = time.monotonic() - started
    rat = ratios(results)
    print_report(results, rat, f"make bench: {slide.name}, wrk -t {WRK_THREADS} -c "
                 f"{CONNECTIONS}, {facts['nproc']} x {facts['cpu_model']}")
    doc = results_document(results, rat, slide=slide, slide_size=(args.width, args.height),
                           workers=args.workers, facts=facts, git_before=git_before,
                           elapsed_s=elapsed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    console.print(f"results: {shown}  ({elapsed:.0f} s)")
    return 1 if any(r.failed for r in results.values()) else 0


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)  # servers and spent caches are cleaned up
    sys.exit(main())
