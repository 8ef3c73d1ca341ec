"""Benchmarks of the tile server (never part of the installed package).

``make bench`` (:mod:`bench.tiles`): HTTP load by ``wrk`` against our server, openslide's
deepzoom_server and iipsrv. Its parts: :mod:`bench.scenarios` (the scenario table and how each
one runs), :mod:`bench.servers` (starting each server), :mod:`bench.load` (wrk runs and their
numbers), :mod:`bench.fsprobe` (file-system effects between scenarios), :mod:`bench.report`
(table and JSON), :mod:`bench.slide` (the generated slide and its tile addresses).

``make bench-pregen`` (:mod:`bench.pregen`): whole-pyramid pregeneration against
deepzoom_tile.py and vips. ``python -m bench.passthrough_read``: slide read against cache read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root folder (the servers' working directory)."""
RESULTS_DIR = ROOT / "bench" / "results"

console = Console(width=None if sys.stdout.isatty() else 180)
"""Where the benchmarks print progress and tables (stdout; 180 columns when not a terminal)."""


class BenchError(RuntimeError):
    """The benchmark cannot go on (missing tool, server that does not start, wrk failure)."""
