"""``tileserver pregenerate`` and ``tileserver export``: pregeneration from the command line.

::

    tileserver pregenerate [NAME|SLIDE ...|--all] [--overwrite] [--levels A-B] [--workers N]
                           [--scheduler tcp://host:8786] [--config FILE] [Section:Key=value ...]
    tileserver export SLIDE OUTDIR [--overwrite] [--levels A-B] [--workers N]
                      [--scheduler ...] [--config FILE] [Section:Key=value ...]

Both load settings exactly as ``serve`` does, so the tiles are the ones the server would render,
and show a rich progress bar (tiles, tiles/s, elapsed, ETA) on stderr. A slide is a configured
name or a slide file (served under its stem). ``Section:Key=value`` items may stand anywhere.
Exit status: 0 done, 1 a slide or the disk failed (the message says which), 2 bad configuration
or arguments, 130 interrupted (Ctrl-C; the tiles written so far are whole: run again to resume,
unless ``--overwrite`` was given).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from app.batch.pregenerate import Cancelled, Pregenerator, Progress, open_target
from app.batch.walk import parse_levels
from app.cache.disk import open_disk_cache
from app.core.errors import ConfigError, TileServerError
from app.core.slides import SlideEntry, SlideRegistry, build_catalogue, file_slide_name
from app.settings import Settings, load_settings
from app.tools.progress import ProgressBars

T = TypeVar("T")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pregenerate`` and ``export`` to the ``tileserver`` parser."""
    pre = commands.add_parser(
        "pregenerate", help="render whole pyramids into the tile cache (worker processes)",
        description="Render every tile of the slides' DZI pyramids into TileCachePath, with "
                    "the server's settings and format policy. Whole tiles already there are "
                    "skipped, so an interrupted run resumes.")
    pre.add_argument("items", nargs="*", metavar="NAME|SLIDE|Section:Key=value",
                     help="slide names or slide files (default: the only slide), and settings "
                          "overrides, in any order")
    pre.add_argument("--all", action="store_true", help="every configured slide")
    _common(pre)
    export = commands.add_parser(
        "export", help="write a static DZI (.dzi + _files/ + viewer page) into a folder",
        description="Write OUTDIR/{name}.dzi, OUTDIR/{name}_files/, OUTDIR/{name}.html and "
                    "OUTDIR/openseadragon/: a pyramid any static web server serves as is.")
    export.add_argument("items", nargs="*", metavar="SLIDE OUTDIR|Section:Key=value",
                        help="a configured slide name or a slide file, the output folder, and "
                             "settings overrides, in any order")
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
    """Run ``pregenerate`` or ``export``; returns the exit status.

    ``args.words`` are the plain positional arguments (slide names or files; for export then
    OUTDIR), ``args.settings`` the ``Section:Key=value`` items (see :mod:`app.cli`).
    """
    try:
        levels = parse_levels(args.levels)
        if args.workers is not None and args.workers < 0:
            raise ValueError("--workers must be >= 0")
        if args.command == "export" and len(args.words) != 2:
            raise ValueError(f"export needs SLIDE and OUTDIR, got {args.words or 'neither'}")
    except ValueError as exc:
        print(f"tileserver: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    try:
        if args.command == "export":
            settings = load_settings(config_file=args.config, overrides=args.settings)
            return _export(args, settings, levels, console)
        if args.words:  # named slides or files: no demo slide
            settings = load_settings(config_file=args.config, overrides=args.settings)
        else:
            from app.cli import prepare_settings

            settings = prepare_settings(args.config, args.settings)
        return _pregenerate(args, settings, levels, console)
    except ConfigError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 2
    except Cancelled:
        resume = "" if args.overwrite else ": run again to resume"
        print(f"tileserver: interrupted; the tiles written so far are whole{resume}",
              file=sys.stderr)
        return 130
    except TileServerError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 1


def slide_names(catalogue: dict[str, SlideEntry], words: list[str],
                settings: Settings) -> list[str]:
    """The slides ``words`` name: configured names as they are; a slide file joins
    ``catalogue`` under the name the server gives a ``SlideDirectory`` file
    (:func:`app.core.slides.file_slide_name`: its stem, or its hash name with
    ``Privacy.SlideNames: hash``), its name in the cache and the export.

    Raises:
        ConfigError: a word is neither a configured name nor a readable file, or a file's name
            is the name of another configured slide.
    """
    names = []
    for word in words:
        if word not in catalogue:
            path = Path(word)
            if not path.is_file():
                raise ConfigError(f"no slide named {word!r} and no such file")
            try:
                name = file_slide_name(path, settings.Privacy.SlideNames)
            except OSError as exc:
                raise ConfigError(f"{word}: {exc.strerror}") from None
            known = catalogue.setdefault(name, SlideEntry(name, path))
            if known.path.resolve() != path.resolve():
                raise ConfigError(f"{word}: its name {name!r} is a configured slide's "
                                  f"({known.path})")
            word = name
        names.append(word)
    return names


def _pregenerate(args: argparse.Namespace, settings: Settings,
                 levels: tuple[int, ...] | None, console: Console) -> int:
    if not settings.EnableDiskCache:
        raise ConfigError("EnableDiskCache = false: pregeneration fills the disk cache")
    catalogue = build_catalogue(settings)
    names = slide_names(catalogue, args.words, settings)
    open_disk_cache(settings, catalogue, index=False)  # the location checked, the cache marked
    registry = SlideRegistry(catalogue, settings)
    if args.all:
        names = registry.names
    elif not names:
        if len(registry.names) != 1:
            raise ConfigError(f"{len(registry.names)} slides are configured: name the ones to "
                              "pregenerate, or use --all")
        names = registry.names
    label = "all slides" if args.all else ", ".join(names)
    targets = [open_target(registry, name, levels) for name in names]
    started = time.monotonic()
    with Pregenerator(settings, args.workers, args.scheduler) as pregenerator:
        progress = _with_bar(console, label, lambda cancel, report: pregenerator.run(
            targets, args.overwrite, cancel, report))
    _summary(", ".join(names), progress, time.monotonic() - started)
    return 0


def _export(args: argparse.Namespace, settings: Settings, levels: tuple[int, ...] | None,
            console: Console) -> int:
    from app.batch.export import export_slide

    catalogue = build_catalogue(settings)
    [name] = slide_names(catalogue, args.words[:1], settings)
    registry = SlideRegistry(catalogue, settings)
    started = time.monotonic()
    result = _with_bar(console, name, lambda cancel, report: export_slide(
        settings, registry, name, Path(args.words[1]), levels, args.overwrite, args.workers,
        args.scheduler, cancel, report))
    _summary(name, result.progress, time.monotonic() - started)
    print(f"wrote {result.dzi} and {result.page}")
    return 0


def _with_bar(console: Console, label: str,
              work: Callable[[threading.Event, Callable[[Progress], None]], T]) -> T:
    """Run ``work(cancel, report)`` under a progress bar labelled ``label``; Ctrl-C cancels it.

    Raises:
        Cancelled: Ctrl-C (``cancel`` was set so that the workers stop).
    """
    cancel = threading.Event()
    with ProgressBars("tiles", console) as bars:

        def report(progress: Progress) -> None:
            bars.report(label, progress.processed, progress.total, progress.done)

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
