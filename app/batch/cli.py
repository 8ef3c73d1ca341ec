"""``tileserver pregenerate`` and ``tileserver export``: pregeneration from the command line.

::

    tileserver pregenerate [NAME ...|--all] [--overwrite] [--levels A-B] [--workers N]
                           [--scheduler tcp://host:8786] [--config FILE] [Section:Key=value ...]
    tileserver export SLIDE OUTDIR [--overwrite] [--levels A-B] [--workers N]
                      [--scheduler ...] [--config FILE] [Section:Key=value ...]

Both load settings exactly as ``serve`` does, so the tiles are the ones the server would render,
and show a rich progress bar (tiles, tiles/s, elapsed, ETA) on stderr. Exit status: 0 done,
1 a slide or the disk failed (the message says which), 2 bad configuration or arguments,
130 interrupted (Ctrl-C; the tiles written so far are whole: run again to resume).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar

from app.batch.pregenerate import Cancelled, Pregenerator, Progress, open_target
from app.batch.walk import parse_levels
from app.cache.disk import open_disk_cache
from app.core.errors import ConfigError, TileServerError
from app.core.slides import SlideEntry, SlideRegistry, build_catalogue
from app.settings import Settings, load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``pregenerate`` and ``export`` to the ``tileserver`` parser."""
    pre = commands.add_parser(
        "pregenerate", help="render whole pyramids into the tile cache (worker processes)",
        description="Render every tile of the slides' DZI pyramids into TileCachePath, with "
                    "the server's settings and format policy. Whole tiles already there are "
                    "skipped, so an interrupted run resumes.")
    pre.add_argument("items", nargs="*", metavar="NAME|Section:Key=value",
                     help="slide names (default: the only slide), then settings overrides")
    pre.add_argument("--all", action="store_true", help="every configured slide")
    _common(pre)
    export = commands.add_parser(
        "export", help="write a static DZI (.dzi + _files/ + viewer page) into a folder",
        description="Write OUTDIR/{name}.dzi, OUTDIR/{name}_files/, OUTDIR/{name}.html and "
                    "OUTDIR/openseadragon/: a pyramid any static web server serves as is.")
    export.add_argument("slide", metavar="SLIDE", help="a configured slide name or a slide file")
    export.add_argument("outdir", metavar="OUTDIR", type=Path)
    export.add_argument("items", nargs="*", metavar="Section:Key=value",
                        help="settings overrides")
    _common(export)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="render existing tiles again")
    parser.add_argument("--levels", metavar="A-B",
                        help="DZI levels only: a range 10-17 or a list 3,5,8-9 (default all)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker processes (default Pregeneration:Workers; 0 = one per core)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run on a Dask cluster, e.g. tcp://host:8786 (shared cache path)")
    parser.add_argument("--config", metavar="FILE", help="JSON settings, as for serve")


def run_command(args: argparse.Namespace) -> int:
    """Run ``pregenerate`` or ``export``; returns the exit status."""
    names = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    try:
        levels = parse_levels(args.levels)
        if args.workers is not None and args.workers < 0:
            raise ValueError("--workers must be >= 0")
    except ValueError as exc:
        print(f"tileserver: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    try:
        if args.command == "export":
            settings = load_settings(config_file=args.config, overrides=overrides)
            return _export(args, settings, levels, console)
        from app.cli import prepare_settings

        settings = prepare_settings(args.config, overrides)
        return _pregenerate(args, settings, names, levels, console)
    except ConfigError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 2
    except Cancelled:
        print("tileserver: interrupted; the tiles written so far are whole: run again to resume",
              file=sys.stderr)
        return 130
    except TileServerError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 1


def _pregenerate(args: argparse.Namespace, settings: Settings, names: list[str],
                 levels: tuple[int, ...] | None, console: Console) -> int:
    if not settings.EnableDiskCache:
        raise ConfigError("EnableDiskCache = false: pregeneration fills the disk cache")
    catalogue = build_catalogue(settings)
    open_disk_cache(settings, catalogue, index=False)  # the location checked, the cache marked
    registry = SlideRegistry(catalogue, settings)
    if args.all:
        names = registry.names
    elif not names:
        if len(registry.names) != 1:
            raise ConfigError(f"{len(registry.names)} slides are configured: name the ones to "
                              "pregenerate, or use --all")
        names = registry.names
    targets = [open_target(registry, name, levels) for name in names]
    started = time.monotonic()
    with Pregenerator(settings, args.workers, args.scheduler) as pregenerator:
        progress = _with_bar(console, lambda cancel, report: pregenerator.run(
            targets, args.overwrite, cancel, report))
    _summary(", ".join(names), progress, time.monotonic() - started)
    return 0


def _export(args: argparse.Namespace, settings: Settings, levels: tuple[int, ...] | None,
            console: Console) -> int:
    from app.batch.export import export_slide

    catalogue = build_catalogue(settings)
    name = args.slide
    if name not in catalogue:
        path = Path(args.slide)
        if not path.is_file():
            raise ConfigError(f"export: {args.slide!r} is neither a configured slide nor a file")
        name = path.stem
        catalogue[name] = SlideEntry(name, path)
    registry = SlideRegistry(catalogue, settings)
    started = time.monotonic()
    result = _with_bar(console, lambda cancel, report: export_slide(
        settings, registry, name, args.outdir, levels, args.overwrite, args.workers,
        args.scheduler, cancel, report))
    _summary(name, result.progress, time.monotonic() - started)
    print(f"wrote {result.dzi} and {result.page}")
    return 0


def _with_bar(console: Console, work):
    """Run ``work(cancel, report)`` under a rich progress bar; Ctrl-C cancels it."""
    cancel = threading.Event()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:>8,.0f} tiles/s"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Bar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=None, rate=0.0)
        started = time.monotonic()

        def report(progress: Progress) -> None:
            elapsed = time.monotonic() - started
            bar.update(task, description=progress.slide, total=progress.total,
                       completed=progress.processed,
                       rate=progress.done / elapsed if elapsed > 0 else 0.0)

        try:
            return work(cancel, report)
        except KeyboardInterrupt:
            cancel.set()
            raise Cancelled() from None


def _summary(names: str, progress: Progress, seconds: float) -> None:
    rate = progress.done / seconds if seconds > 0 else 0.0
    print(f"{names}: {progress.done} tiles written, {progress.skipped} skipped, "
          f"{progress.total} in the pyramid; {seconds:.1f} s, {rate:,.0f} tiles/s, "
          f"{progress.bytes / 1e6:.1f} MB")
