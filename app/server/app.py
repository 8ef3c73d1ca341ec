"""The application factory: ``create_app(settings)`` builds the FastAPI app and its services.

Services live on ``app.state.services`` (:class:`app.server.dependencies.Services`); nothing is
created at import time, so tests build apps from ``Settings`` objects. ``create_app_from_env`` is
the factory uvicorn workers call: the CLI passes them its validated settings as JSON in
``TILESERVER_SETTINGS_JSON``.

Middleware, outermost first: :class:`app.server.middleware.RequestId`,
:class:`app.server.proxy.ProxyLayer` (hosts, proxies, path base),
:class:`app.server.middleware.Cors`, :class:`app.server.auth.AuthLayer` (the principal),
``HeadAsGet``, then :class:`app.server.tiles.TileRoute`, the one entry path of every tile URL.
Every other request reaches the router: the FastAPI routes (DZI descriptors, JSON API, jobs,
pages, the OpenAPI document and its Swagger UI and ReDoc pages), each a
:class:`app.server.auth.GuardedRoute` with its permission, and the static mounts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio import CapacityLimiter
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import iter_route_contexts
from fastapi.staticfiles import StaticFiles
from starlette.routing import BaseRoute, Mount

from app import __version__
from app.assets import MIRADOR_PARTS, REDOC_PARTS, SWAGGER_UI_PARTS, npm_dir, openseadragon_dir
from app.batch.jobs import JobManager
from app.cache.content import ContentHasher
from app.cache.disk import open_disk_cache
from app.cache.eviction import cache_limit
from app.cache.tiles import TileService
from app.coordination import COORDINATION_NAME, Coordination, open_coordination
from app.coordination.embedded import EmbeddedCoordination
from app.core.errors import ConfigError
from app.core.lossless import check_round_trips
from app.core.planner import TilePlanner
from app.core.slides import SlideRegistry, build_catalogue
from app.server import tiles
from app.server.audit import AuditLog
from app.server.auth import AuthLayer, GuardedRoute, Permission, require
from app.server.credentials import ApiKeys, JwtVerifier, UrlSigner, read_secret
from app.server.dependencies import Services, path_base
from app.server.errors import install_handlers
from app.server.metrics import SAMPLE_SECONDS, Metrics
from app.server.middleware import Cors, HeadAsGet, RequestId
from app.server.proxy import ProxyLayer
from app.server.readiness import Readiness
from app.server.routes import api, dzi, iiif, jobs, ops, pages
from app.settings import SETTINGS_ENV, Settings, default_render_threads, settings_from

log = logging.getLogger(__name__)

IO_THREADS = 16


def create_app(settings: Settings, clock: Callable[[], float] | None = None) -> FastAPI:
    """Build the app for validated settings (``clock``: UNIX time for token and signed-URL
    expiry checks; tests freeze it).

    The slide catalogue is built at start-up (``SlideDirectory`` is listed once); slides are
    opened on first use, so one unopenable slide never stops the others. Start-up also proves
    every encoding the policy calls lossless bit-exact (:mod:`app.core.lossless`; a failure
    stops it with :class:`~app.core.errors.ConfigError`) and opens the audit log when
    ``Audit.Enabled``; shutdown flushes the audit log.

    Raises:
        ConfigError: an ``Auth`` key file or variable is missing or too short.
    """
    auth = settings.Auth
    timing: dict[str, Any] = {} if clock is None else {"clock": clock}
    secret = read_secret(auth.SignedUrls)
    signer = UrlSigner(secret, auth.SignedUrls, **timing) if secret else None
    api_keys = ApiKeys(auth.AdminApiKeys) if "apikey" in auth.modes else None
    jwt = JwtVerifier(auth.Jwt, **timing) if "jwt" in auth.modes else None

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
            audit, content, signer, store, metrics, Readiness(settings, tile_service))
        app.state.services = services
        await tile_service.start()
        services.jobs.start()
        assert services.readiness is not None
        await services.readiness.start()
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
                  openapi_url=None, docs_url=None, redoc_url=None,
                  redirect_slashes=False,  # one URL per resource: a trailing slash is a 404
                  # FastAPI's OpenTelemetry hooks look up the global providers on every
                  # request; this server's metrics are Prometheus (/metrics)
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    install_handlers(app)
    app.add_exception_handler(pages.SignInRequired, pages.sign_in_page)
    for router in (dzi.router, iiif.router, api.router, jobs.router, pages.router, ops.router,
                   _docs_router(app)):
        app.include_router(router)
    for url, parts, marker, what in (
            ("/static/openseadragon", None, "openseadragon.min.js", "the viewer pages"),
            ("/static/swagger-ui", SWAGGER_UI_PARTS, "swagger-ui-bundle.js", "/docs"),
            ("/static/redoc", REDOC_PARTS, "redoc.standalone.js", "/redoc"),
            ("/static/mirador", MIRADOR_PARTS, "mirador.min.js", "the Mirador pages")):
        folder = openseadragon_dir() if parts is None else npm_dir(parts, marker)
        if folder is not None:
            app.mount(url, StaticFiles(directory=folder), name=url.rsplit("/", 1)[1])
        else:
            log.warning("%s not found (run `npm ci`): %s will not load", marker, what)
    check_routes(app)
    app.add_middleware(tiles.TileRoute)  # innermost: every layer above applies to tiles
    app.add_middleware(HeadAsGet)
    app.add_middleware(AuthLayer, settings=settings, api_keys=api_keys, jwt=jwt, signer=signer)
    app.add_middleware(Cors, allow_origin=settings.Server.AccessControlAllowOrigin)
    if ProxyLayer.needed(settings):
        app.add_middleware(ProxyLayer, settings=settings)
    app.add_middleware(RequestId)  # outermost: every response and log line has the id

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema["paths"] = {**tiles.openapi_paths(), **schema["paths"]}
            declare_security(schema, app, settings)
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


def check_routes(app: FastAPI) -> None:
    """Refuse an app with a route no rule covers: every route is a static mount or a
    :class:`GuardedRoute` (which itself refuses a route without ``require``; tile URLs never
    reach the router).

    Raises:
        TypeError: a route of another kind (e.g. added with ``app.get`` by mistake).
    """
    for route in app_routes(app):
        if not isinstance(route, GuardedRoute | Mount):
            raise TypeError(f"route {getattr(route, 'path', route)!r} is not guarded: declare "
                            "it on a router with route_class=GuardedRoute and require(...)")


def app_routes(app: FastAPI) -> list[BaseRoute]:
    """Every route of the app, those of included routers listed one by one (FastAPI keeps an
    included router as one entry of ``app.routes``)."""
    return [context.original_route for context in iter_route_contexts(app.routes)]


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or API key",
               "description": "An OIDC access token (Auth:Jwt) or an admin API key"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key",
               "description": "An admin API key (Auth:AdminApiKeys)"},
    "signedUrl": {"type": "apiKey", "in": "query", "name": "sig",
                  "description": "A signed URL's query: grant, exp, sub and sig "
                                 "(GET /api/slides/{name}/token)"},
}


def declare_security(schema: dict[str, Any], app: FastAPI, settings: Settings) -> None:
    """Add the security schemes and, per operation, what it accepts and its 401/403 (tiles
    and every route that needs a slide grant also accept signed URLs; public routes need
    nothing; with ``Auth:Mode none`` every operation also accepts no credentials)."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    anonymous: list[dict[str, list[str]]] = [{}] if not settings.Auth.modes else []
    needs: dict[tuple[str, str], Permission] = {}
    for route in app_routes(app):
        if isinstance(route, GuardedRoute):
            for method in route.methods or ():
                needs[(route.path, method.lower())] = route.requirement.permission
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            permission = needs.get((path, method), Permission.VIEW)  # tiles: view
            if permission is Permission.PUBLIC:
                operation["security"] = []
                continue
            accepted: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
            if permission in (Permission.VIEW, Permission.LIST):
                accepted.append({"signedUrl": []})
            operation["security"] = accepted + anonymous
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", {"description": "credentials missing or invalid "
                                         "(JSON error, WWW-Authenticate)"})
            responses.setdefault("403", {"description": "credentials valid but not enough "
                                         "(JSON error)"})


DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
            "'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
            "connect-src 'self'; font-src 'self' data:")
"""The Content-Security-Policy of /docs and /redoc: nothing from another host (ReDoc's footer
would otherwise fetch its logo from the vendor's CDN on an air-gapped network)."""


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def _docs_router(app: FastAPI) -> APIRouter:
    """``/openapi.json`` (with ``servers`` naming the request's path base), ``/docs`` (Swagger
    UI) and ``/redoc``, their scripts served from ``/static`` (npm packages), never a CDN."""
    router = APIRouter(route_class=GuardedRoute, include_in_schema=False,
                       dependencies=[require(Permission.PUBLIC)])

    @router.get("/openapi.json")
    async def openapi_json(request: Request) -> JSONResponse:
        """The OpenAPI document, its ``servers`` the request's path base."""
        return JSONResponse({**app.openapi(), "servers": [{"url": path_base(request) or "/"}]})

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        """Swagger UI."""
        base = path_base(request)
        return _same_origin_only(get_swagger_ui_html(
            openapi_url=f"{base}/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{base}/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{base}/static/swagger-ui/favicon-32x32.png"))

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        """ReDoc."""
        base = path_base(request)
        return _same_origin_only(get_redoc_html(
            openapi_url=f"{base}/openapi.json", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}/static/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{base}/static/swagger-ui/favicon-32x32.png",
            with_google_fonts=False))

    return router


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings from ``TILESERVER_SETTINGS_JSON``.

    What exists once the app is built (modules, routes, models: about 90,000 objects) lives
    as long as the process, so it is moved out of the garbage collector's sight
    (:func:`gc.freeze`): a full collection with 2,000 connections open took 95-113 ms with it
    in sight and 15-40 ms without (docs/benchmarks.md, "Overload"), a pause every request in
    flight waits out.
    """
    settings = settings_from(os.environ[SETTINGS_ENV])
    app = create_app(settings)
    gc.collect()
    gc.freeze()
    return app
