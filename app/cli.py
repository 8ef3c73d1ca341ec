"""The ``tileserver`` command: ``tileserver serve [--host] [--port] [--workers] [--config]
[Section:Key=value ...]``; ``tileserver pregenerate`` and ``tileserver export`` (see
:mod:`app.pregenerate_cli`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app.errors import ConfigError
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
    from app.pregenerate_cli import add_commands

    add_commands(commands)
    return parser


def prepare_settings(config: str | None, overrides: list[str]) -> Settings:
    """Load and validate settings; with no slide configured, generate and serve the demo slide.

    Raises:
        ConfigError: invalid configuration (the message names key and value).
    """
    settings = load_settings(config_file=config, overrides=overrides)
    if not settings.configured_slide_paths() and not settings.SlideDirectory:
        from app.demo import ensure_demo_slide

        log.info("no slide configured: serving the generated demo slide")
        path = ensure_demo_slide(Path(settings.DemoDirectory))
        settings.Image.Path = str(path)
    return settings


def serve(args: argparse.Namespace) -> int:
    """Run uvicorn on the app factory with the validated settings."""
    import uvicorn

    from app.main import SETTINGS_ENV

    settings = prepare_settings(args.config, args.overrides)
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    uvicorn.run("app.main:create_app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tileserver`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command in ("pregenerate", "export"):
            from app.pregenerate_cli import run_command

            return run_command(args)
    except ConfigError as exc:
        print(f"tileserver: {exc.detail}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
