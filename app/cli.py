"""The ``tileserver`` command.

``tileserver serve [--host] [--port] [--workers] [--config] [Section:Key=value ...]`` serves;
``tileserver verify [NAME ...] [--url URL] [--levels A-B] [--sample N] [--json FILE] ...`` proves
that served tiles are the slide's pixels (see :mod:`app.tools.verify`); ``tileserver pregenerate``
and ``tileserver export`` fill the cache and write static pyramids (see :mod:`app.batch.cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app.core.errors import ConfigError
from app.settings import Settings, load_settings

log = logging.getLogger("tileserver")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tileserver", description=__doc__)
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
    serve.add_argument("overrides", nargs="*", metavar="Section:Key=value",
                       help="settings overrides, e.g. Images:0:Path=/slides/a.svs")

    verify = commands.add_parser(
        "verify", help="compare served tiles with openslide's DeepZoomGenerator.get_tile",
        description="Fetch tiles (from --url, or from the app built in this process), decode "
        "them and compare them with DeepZoomGenerator.get_tile of the same slide file: "
        "lossless levels bit for bit, lossy levels by PSNR and max error. Exit status 0 when "
        "everything matches, 1 when a tile does not (the tiles are named), 2 when verify "
        "cannot run. Slide files come from the same settings as tileserver serve.")
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
    verify.add_argument("--min-psnr", type=float, default=0.0, metavar="DB",
                        help="fail lossy tiles below this PSNR (default 0: report only)")
    verify.add_argument("--json", metavar="FILE", help="write the JSON report (- for stdout)")
    verify.add_argument("--config", metavar="FILE", help="JSON settings, as for serve")

    from app.batch.cli import add_commands

    add_commands(commands)
    return parser


def prepare_settings(config: str | None, overrides: list[str]) -> Settings:
    """Load and validate settings; with no slide configured, generate and serve the demo slide.

    Raises:
        ConfigError: invalid configuration (the message names key and value).
    """
    settings = load_settings(config_file=config, overrides=overrides)
    if not settings.configured_slide_paths() and not settings.SlideDirectory:
        from app.tools.demo import ensure_demo_slide

        log.info("no slide configured: serving the generated demo slide")
        path = ensure_demo_slide(Path(settings.DemoDirectory))
        settings = settings.model_copy(
            update={"Image": settings.Image.model_copy(update={"Path": str(path)})})
    return settings


def serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the app factory with the validated settings."""
    import uvicorn

    from app.server.app import SETTINGS_ENV

    settings = prepare_settings(args.config, args.overrides)
    from app.core.formats import FormatPolicy
    from app.core.lossless import check_round_trips

    check_round_trips(FormatPolicy(settings.TileFormat).lossless_encodings())
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    from app.server.http import HTTP_PROTOCOL

    uvicorn.run("app.server.app:create_app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5, http=HTTP_PROTOCOL)
    return 0


def verify(args: argparse.Namespace) -> int:
    """Run :func:`app.tools.verify.run_verify`; print the summary, write the JSON report.

    Returns:
        0 all tiles verified, 1 a tile or slide failed, 2 verify could not run.
    """
    import anyio

    from app.tools.verify import VerifyError, print_summary, run_verify, write_json

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per tile otherwise
    names = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    settings = prepare_settings(args.config, overrides)
    try:
        report = anyio.run(lambda: run_verify(
            settings, names, args.url, args.levels, args.sample, args.min_psnr,
            args.query_format))
    except VerifyError as exc:
        print(f"tileserver verify: {exc}", file=sys.stderr)
        return 2
    print_summary(report, file=sys.stderr if args.json == "-" else None)
    if args.json:
        write_json(report, args.json)
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tileserver`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "verify":  # names and Key=value items may follow the options too
        args.items += [item for item in extra if not item.startswith("-")]
        extra = [item for item in extra if item.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "verify":
            return verify(args)
        if args.command in ("pregenerate", "export"):
            from app.batch.cli import run_command

            return run_command(args)
    except ConfigError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
