"""The ``tileserver`` command.

``tileserver serve [--host] [--port] [--workers] [--config] [Section:Key=value ...]`` serves;
``tileserver verify [NAME ...] [--url URL] [--levels A-B] [--sample N] [--json FILE] ...`` proves
that served tiles are the slide's pixels (see :mod:`app.tools.verify`); ``tileserver pregenerate``
and ``tileserver export`` fill the cache and write static pyramids (see :mod:`app.batch.cli`).
``Section:Key=value`` settings items may stand anywhere on the command line of every command.
"""

from __future__ import annotations

import argparse
import copy
import logging
import logging.config
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from app import __version__
from app.core.errors import ConfigError
from app.logs import TEXT_FORMAT
from app.settings import (
    SETTINGS_ENV,
    Settings,
    changed_settings,
    load_settings,
    with_render_threads,
)

log = logging.getLogger("tileserver")

LOG_FORMAT = TEXT_FORMAT
"""The text format of the app's log lines, in the CLI process and in every uvicorn worker."""

SETTING_ITEM = re.compile(r"(?:--)?[A-Za-z_]\w*(?::\w+)*=")
"""A command-line settings item, ``Section:Key=value`` (ASP.NET's ``--Section:Key=value`` too);
any other positional argument is a slide name, a slide file or a folder."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tileserver", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve DZI tiles over HTTP (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    serve.add_argument("--workers", type=int, default=1,
                       help="uvicorn worker processes sharing the disk cache (default 1)")
    serve.add_argument("--config", metavar="FILE", help="JSON settings applied after "
                       "appsettings.json and config/appsettings.{Environment}.json")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("items", nargs="*", metavar="Section:Key=value",
                       help="settings overrides, e.g. Images:0:Path=/slides/a.svs")

    verify = commands.add_parser(
        "verify", help="compare served tiles with openslide's DeepZoomGenerator.get_tile",
        description="Fetch tiles (from --url, or from the app built in this process), decode "
        "them and compare them with DeepZoomGenerator.get_tile of the same slide file: "
        "lossless levels bit for bit, lossy levels by PSNR and max error. Exit status 0 when "
        "everything matches, 1 when a tile does not (the tiles are named), 2 when verify "
        "cannot run (among others: the slide file here is not the server's), 130 on Ctrl-C. "
        "Slide files come from the same settings as tileserver serve.")
    verify.add_argument("items", nargs="*", metavar="NAME | Section:Key=value",
                        help="slide names (default: every slide of the server) and settings "
                        "overrides as for serve")
    verify.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5000 "
                        "(default: build the app in this process)")
    verify.add_argument("--levels", metavar="A-B", help="DZI levels to check: A-B, A, A-top "
                        "(default: all; 0 = 1x1 px)")
    verify.add_argument("--sample", type=int, default=16, metavar="N",
                        help="tiles checked per level: corners, centre, then seeded random "
                        "(default 16; 0 = every tile)")
    verify.add_argument("--format", dest="query_format", metavar="FORMAT",
                        help="ask every tile with ?format= (e.g. png: every level lossless)")
    verify.add_argument("--iiif", action="store_true",
                        help="check the IIIF Image API too: info.json, declared tiles and "
                        "full-resolution regions in PNG, bit for bit")
    verify.add_argument("--min-psnr", type=float, default=0.0, metavar="DB",
                        help="fail lossy tiles below this PSNR (default 0: report only)")
    verify.add_argument("--json", metavar="FILE", help="write the JSON report (- for stdout)")
    verify.add_argument("--config", metavar="FILE", help="JSON settings, as for serve")

    audit = commands.add_parser("audit", help="check the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    chain = audit_commands.add_parser(
        "verify", help="check the audit log's SHA-256 hash chain",
        description="Check that every line's prev is the SHA-256 of the line before, over the "
        "files given (a log path stands for its rotated files too, oldest first). Exit status "
        "0 when the chain holds (the head hash is printed: keep it elsewhere to pin the last "
        "line), 1 at the first line that breaks it (a line changed, removed or inserted), 2 "
        "when a file cannot be read.")
    chain.add_argument("items", nargs="+", metavar="PATH", help="audit log files")

    from app.batch.cli import add_commands

    add_commands(commands)
    return parser


def prepare_settings(config: str | None, overrides: list[str], *,
                     announce_demo: bool = False) -> Settings:
    """Load and validate settings; with no slide configured, the demo slide.

    The demo slide is generated on first use (:func:`app.tools.demo.ensure_demo_slide`, with
    a progress bar); ``announce_demo`` logs that it is served.

    Raises:
        ConfigError: invalid configuration (the message names key and value).
    """
    settings = load_settings(config_file=config, overrides=overrides)
    if not settings.configured_slide_paths() and not settings.SlideDirectory:
        from app.tools.demo import ensure_demo_slide
        from app.tools.progress import ProgressBars

        with ProgressBars("tile rows") as bars:
            path = ensure_demo_slide(Path(settings.DemoDirectory), progress=lambda done, total:
                                     bars.report("writing the demo slide", done, total))
        if announce_demo:
            log.info("no slide configured: serving the generated demo slide %s", path)
        settings = settings.model_copy(
            update={"Image": settings.Image.model_copy(update={"Path": str(path)})})
    return settings


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """uvicorn's logging configuration plus the root logger at ``level`` on stderr, so that
    every worker process logs the app's lines with their level and logger name
    (``uvicorn.run(..., log_config=...)``; workers are new processes).

    Args:
        fmt: ``Logging.Format``: ``text`` (:data:`LOG_FORMAT`) or ``json``
            (:class:`app.logs.JsonFormatter`, uvicorn's own lines included), each line with
            the request id it was logged for.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "app.logs.RequestIdFilter"}}
    if fmt == "json":
        for name in list(config["formatters"]):
            config["formatters"][name] = {"()": "app.logs.JsonFormatter"}
        config["formatters"]["tileserver"] = {"()": "app.logs.JsonFormatter"}
    else:
        config["formatters"]["tileserver"] = {"format": LOG_FORMAT}
    config["handlers"]["tileserver"] = {"class": "logging.StreamHandler",
                                        "formatter": "tileserver", "stream": "ext://sys.stderr",
                                        "filters": ["request_id"]}
    for handler in config["handlers"].values():
        handler.setdefault("filters", ["request_id"])
    config["root"] = {"handlers": ["tileserver"], "level": level.upper()}
    return config


def browser_url(host: str, port: int) -> str:
    """The address to open for a server bound to ``host`` (a wildcard address: loopback)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the app factory with the validated settings.

    Logs each setting that differs from its default (``Section:Key = value``) and the address
    to open, then starts uvicorn with :func:`log_config`. With ``Metrics.Enabled``, every
    worker counts into prometheus-client's multiprocess folder: ``PROMETHEUS_MULTIPROC_DIR``
    when set (emptied first), else a new temporary folder (removed at exit).
    """
    import uvicorn

    logging.getLogger().setLevel(args.log_level.upper())
    settings = prepare_settings(args.config, args.settings, announce_demo=True)
    if settings.Logging.Format == "json":
        logging.config.dictConfig(log_config(args.log_level, "json"))
    from app.core.formats import FormatPolicy
    from app.core.lossless import check_round_trips

    check_round_trips(FormatPolicy(settings.TileFormat).lossless_encodings())
    from app.cache.disk import open_disk_cache
    from app.core.slides import build_catalogue

    # refused here, with one line and exit status 2, rather than in every worker's start-up
    open_disk_cache(settings, build_catalogue(settings), index=False)
    for line in changed_settings(settings):
        logging.getLogger("tileserver.settings").info("%s", line)
    # two per core in all, not per worker: each worker's render threads compete with its
    # event loop for the GIL (app.settings.default_render_threads)
    settings = with_render_threads(settings, args.workers)
    log.info("%d render threads in each of %d worker process(es)",
             settings.Server.RenderThreads, args.workers)
    metrics_dir = None  # the folder this command made, removed at exit
    if settings.Metrics.Enabled:
        # before uvicorn imports the app (and prometheus_client) in any process
        from app.server.multiprocess import MULTIPROCESS_ENV, prepare_multiprocess_directory

        given = os.environ.get(MULTIPROCESS_ENV)
        if not given:
            metrics_dir = tempfile.mkdtemp(prefix="tileserver-metrics-")
        prepare_multiprocess_directory(given or metrics_dir or "")
    # not imported from app.server.app: with --workers N this process only supervises, and the
    # whole app would be imported here for nothing before the workers start
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from app.server.guard import Limits, guarded

    server = settings.Server
    raise_open_files_limit(server.MaxConnections)
    log.info("open %s in a browser", browser_url(args.host, args.port))
    try:
        # proxy_headers off: only ForwardedHeaders (app.server.proxy) decides whom to believe
        uvicorn.run("app.server.app:create_app_from_env", factory=True, host=args.host,
                    port=args.port, workers=args.workers, log_level=args.log_level,
                    access_log=False, timeout_graceful_shutdown=5,
                    log_config=log_config(args.log_level, settings.Logging.Format),
                    http=guarded(HttpToolsProtocol, Limits(
                        server.MaxRequestHeadBytes, server.HeaderTimeoutSeconds,
                        server.MaxConnections)),
                    proxy_headers=False, timeout_keep_alive=server.KeepAliveTimeoutSeconds)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def raise_open_files_limit(connections: int) -> None:
    """Raise this process's (and its workers') open-file limit to what ``connections`` sockets
    and the slides and cache files need, within the hard limit (a soft limit of 1024 would
    otherwise refuse connections long before ``Server:MaxConnections``)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 1024
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < connections + 64:
        log.warning("open-file limit %d: fewer than Server:MaxConnections (%d) connections "
                    "will be served", want, connections)


def verify(args: argparse.Namespace) -> int:
    """Run :func:`app.tools.verify.run_verify` under a progress bar; print the summary, write
    the JSON report.

    Returns:
        0 all tiles verified, 1 a tile or slide failed, 2 verify could not run, 130 Ctrl-C.
    """
    import anyio

    from app.tools.progress import ProgressBars
    from app.tools.verify import VerifyError, print_summary, run_verify, write_json

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per tile otherwise
    settings = prepare_settings(args.config, args.settings)
    try:
        with ProgressBars("tiles") as bars:
            report = anyio.run(lambda: run_verify(
                settings, args.words, args.url, args.levels, args.sample, args.min_psnr,
                args.query_format, bars.report, args.iiif))
    except VerifyError as exc:
        print(f"tileserver verify: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tileserver verify: interrupted", file=sys.stderr)
        return 130
    print_summary(report, file=sys.stderr if args.json == "-" else None)
    if args.json:
        write_json(report, args.json)
    return 0 if report["passed"] else 1


def audit_verify(paths: list[str]) -> int:
    """``tileserver audit verify PATH...``: check the hash chain (:func:`verify_chain`).

    Returns:
        0 the chain holds, 1 a line breaks it, 2 a file cannot be read.
    """
    from app.server.audit import verify_chain

    try:
        report = verify_chain(paths)
    except OSError as exc:
        print(f"tileserver audit verify: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    if report.broken is not None:
        file, number, why = report.broken
        print(f"audit chain BROKEN at {file}:{number}: {why}")
        return 1
    print(f"audit chain intact: {report.lines} line(s) in {len(report.files)} file(s); "
          f"first prev {report.start}; head {report.head}")
    return 0


def _split_items(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Set ``args.settings`` (the ``Section:Key=value`` items) and ``args.words`` (the other
    positional arguments), wherever they stood; return what is left unrecognised."""
    items = [*args.items, *extra]
    args.settings = [item for item in items if SETTING_ITEM.match(item)]
    args.words = [item for item in items
                  if not SETTING_ITEM.match(item) and not item.startswith("-")]
    return [item for item in extra if item.startswith("-") and not SETTING_ITEM.match(item)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tileserver`` console script."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives one positional run to ``items``; the runs after options come as extras
    extra = _split_items(args, extra)
    if args.command == "serve" and args.words:
        extra += args.words
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "verify":
            return verify(args)
        if args.command == "audit":
            return audit_verify(args.words)
        if args.command in ("pregenerate", "export"):
            from app.batch.cli import run_command

            return run_command(args)
    except ConfigError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
