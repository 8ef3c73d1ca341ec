"""The application factory: ``create_app(settings)`` builds the FastAPI app and its services.

Resources live on ``app.state`` (``settings``, ``registry``, ``tiles``, ``jobs``); nothing is
created at import time, so tests build apps from ``Settings`` objects. ``create_app_from_env`` is
the factory uvicorn workers call: the CLI passes them its validated settings as JSON in
``TILESERVER_SETTINGS_JSON``.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

import anyio
from anyio import CapacityLimiter
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.audit import AuditLog
from app.errors import install_handlers
from app.jobs import JobManager
from app.lossless import check_round_trips
from app.middleware import HeadAsGet, TileFastPath
from app.routes import api, associated, deepzoom, jobs, web
from app.settings import Settings, settings_from
from app.slides import SlideRegistry, build_catalogue
from app.tiles import TileService, default_render_threads

log = logging.getLogger(__name__)

SETTINGS_ENV = "TILESERVER_SETTINGS_JSON"
IO_THREADS = 16


def create_app(settings: Settings) -> FastAPI:
    """Build the app for validated settings.

    The slide catalogue is built at start-up (``SlideDirectory`` is listed once); slides are
    opened on first use, so one unopenable slide never stops the others. Start-up also proves
    every encoding the policy calls lossless bit-exact (:mod:`app.lossless`; a failure stops
    it with :class:`~app.errors.ConfigError`) and opens the audit log when ``Audit.Enabled``;
    shutdown flushes the audit log.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        catalogue = await anyio.to_thread.run_sync(build_catalogue, settings)
        render = CapacityLimiter(settings.Server.RenderThreads or default_render_threads())
        registry = SlideRegistry(catalogue, settings, limiter=render)
        app.state.settings = settings
        app.state.registry = registry
        app.state.tiles = TileService(registry, settings, render, CapacityLimiter(IO_THREADS))
        await anyio.to_thread.run_sync(check_round_trips,
                                       app.state.tiles.policy.lossless_encodings())
        app.state.audit = None
        if settings.Audit.Enabled:
            audit = AuditLog(settings.Audit)
            await anyio.to_thread.run_sync(audit.open)
            app.state.audit = audit
            log.info("audit log: %s", audit.path)
        app.state.jobs = JobManager(app.state.tiles)
        app.state.jobs.start()
        log.info("serving %d slide(s): %s", len(catalogue), ", ".join(catalogue))
        try:
            yield
        finally:
            await app.state.jobs.close()
            await app.state.tiles.close()
            if app.state.audit is not None:
                await anyio.to_thread.run_sync(app.state.audit.close)

    app = FastAPI(title="WSI tile server", version=__version__, lifespan=lifespan,
                  description="DeepZoom tiles of whole-slide images read with OpenSlide.")
    install_handlers(app)
    app.include_router(deepzoom.router)
    app.include_router(associated.router)
    app.include_router(api.router)
    app.include_router(jobs.router)
    app.include_router(web.router)
    osd = web.openseadragon_dir()
    if osd is not None:
        app.mount("/static/openseadragon", StaticFiles(directory=osd), name="openseadragon")
    else:
        log.warning("OpenSeadragon not found (run `npm ci`); the viewer pages will not load")
    app.add_middleware(TileFastPath)
    app.add_middleware(HeadAsGet)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings from ``TILESERVER_SETTINGS_JSON``."""
    settings = settings_from(os.environ[SETTINGS_ENV])
    return create_app(settings)
