"""The application factory: ``create_app(settings)`` builds the FastAPI app and its services.

Services live on ``app.state.services`` (:class:`app.server.dependencies.Services`); nothing is
created at import time, so tests build apps from ``Settings`` objects. ``create_app_from_env`` is
the factory uvicorn workers call: the CLI passes them its validated settings as JSON in
``TILESERVER_SETTINGS_JSON``.

The router's first route is :class:`app.server.tiles.TileRoute`, the one entry path of every
tile URL; the FastAPI routes (DZI descriptors, JSON API, jobs, pages) follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio import CapacityLimiter
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.assets import openseadragon_dir
from app.batch.jobs import JobManager
from app.cache.content import ContentHasher
from app.cache.disk import open_disk_cache
from app.cache.eviction import cache_limit
from app.cache.tiles import TileService, default_render_threads
from app.coordination import COORDINATION_NAME, Coordination, open_coordination
from app.coordination.embedded import EmbeddedCoordination
from app.core.errors import ConfigError
from app.core.lossless import check_round_trips
from app.core.planner import TilePlanner
from app.core.slides import SlideRegistry, build_catalogue
from app.server import tiles
from app.server.audit import AuditLog
from app.server.dependencies import Services
from app.server.errors import install_handlers
from app.server.metrics import SAMPLE_SECONDS, Metrics
from app.server.middleware import Cors, HeadAsGet, RequestId
from app.server.readiness import Readiness
from app.server.routes import api, dzi, jobs, ops, pages
from app.settings import Settings, settings_from

log = logging.getLogger(__name__)

SETTINGS_ENV = "TILESERVER_SETTINGS_JSON"
IO_THREADS = 16


def create_app(settings: Settings) -> FastAPI:
    """Build the app for validated settings.

    The slide catalogue is built at start-up (``SlideDirectory`` is listed once); slides are
    opened on first use, so one unopenable slide never stops the others. Start-up also proves
    every encoding the policy calls lossless bit-exact (:mod:`app.core.lossless`; a failure
    stops it with :class:`~app.core.errors.ConfigError`) and opens the audit log when
    ``Audit.Enabled``; shutdown flushes the audit log.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalogue = await anyio.to_thread.run_sync(build_catalogue, settings)
        disk = await anyio.to_thread.run_sync(open_disk_cache, settings, catalogue)
        render = CapacityLimiter(settings.Server.RenderThreads or default_render_threads())
        registry = SlideRegistry(catalogue, settings, limiter=render)
        planner = TilePlanner(settings)
        await anyio.to_thread.run_sync(check_round_trips, planner.policy.lossless_encodings())
        audit = None
        if settings.Audit.Enabled:
            audit = AuditLog(settings.Audit)
            await anyio.to_thread.run_sync(audit.open)
            log.info("audit log: %s", audit.path)
        content = (ContentHasher(disk.index, settings.TileCachePath)
                   if settings.Integrity.ContentSha256 else None)
        store = await open_store(settings)
        metrics = Metrics() if settings.Metrics.Enabled else None
        limit = await anyio.to_thread.run_sync(cache_limit, settings)
        tile_service = TileService(registry, planner, disk, settings, render,
                                   CapacityLimiter(IO_THREADS), store, metrics, limit)
        services = Services(
            settings, registry, planner, tile_service, JobManager(registry, settings, store),
            audit, content, store, metrics, Readiness(settings, tile_service))
        app.state.services = services
        await tile_service.start()
        services.jobs.start()
        assert services.readiness is not None
        services.readiness.start()
        sampler = asyncio.ensure_future(_sample(services)) if metrics is not None else None
        log.info("serving %d slide(s): %s", len(catalogue), ", ".join(catalogue))
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
            services.readiness.stop()
            await services.jobs.close()
            await services.tiles.close()
            await store.close()
            if metrics is not None:
                metrics.close()
            if audit is not None:
                await anyio.to_thread.run_sync(audit.close)

    app = FastAPI(title="WSI tile server", version=__version__, lifespan=lifespan,
                  description="DeepZoom tiles of whole-slide images read with OpenSlide.",
                  redirect_slashes=False)  # one URL per resource: a trailing slash is a 404
    install_handlers(app)
    app.router.routes.insert(0, tiles.TileRoute())  # first: tile requests match at once
    for module in (dzi, api, jobs, pages, ops):
        app.include_router(module.router)
    osd = openseadragon_dir()
    if osd is not None:
        app.mount("/static/openseadragon", StaticFiles(directory=osd), name="openseadragon")
    else:
        log.warning("OpenSeadragon not found (run `npm ci`); the viewer pages will not load")
    app.add_middleware(HeadAsGet)
    app.add_middleware(RequestId)
    app.add_middleware(Cors, allow_origin=settings.Server.AccessControlAllowOrigin)  # outermost

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema["paths"] = {**tiles.openapi_paths(), **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def open_store(settings: Settings) -> Coordination:
    """The coordination store of ``settings``, opened (:func:`app.coordination.open_coordination`).

    Redis must answer (else :class:`~app.core.errors.ConfigError`: start-up stops). The
    embedded store needs a disk cache; without one, or where its file cannot be opened (a
    read-only cache folder), jobs and invalidations are shared by this process alone (logged).

    Raises:
        ConfigError: ``Coordination.RedisUrl`` does not answer.
    """
    store = open_coordination(settings)
    if store.kind == "embedded" and not settings.EnableDiskCache:
        store = EmbeddedCoordination(":memory:")
    try:
        await store.open()
    except Exception as exc:
        if store.kind != "embedded":
            raise ConfigError(f"Coordination:RedisUrl = {store.where!r}: {exc}") from None
        log.warning("coordination store %s cannot be opened (%s): jobs and cache invalidations "
                    "are this process's alone", os.path.join(settings.TileCachePath,
                                                                COORDINATION_NAME), exc)
        store = EmbeddedCoordination(":memory:")
        await store.open()
    log.info("coordination: %s %s", store.kind, store.where)
    return store


async def _sample(services: Services) -> None:
    """Write this process's metrics gauges every :data:`~app.server.metrics.SAMPLE_SECONDS`."""
    assert services.metrics is not None
    while True:
        services.metrics.sample(services)
        await asyncio.sleep(SAMPLE_SECONDS)


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings from ``TILESERVER_SETTINGS_JSON``."""
    settings = settings_from(os.environ[SETTINGS_ENV])
    return create_app(settings)
