"""Domain exceptions and the one table that maps them to HTTP status codes.

Nothing below the routes raises ``HTTPException``: services raise these, and the handlers
installed by :func:`install_handlers` turn them into JSON ``{"error", "detail"}`` bodies.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class TileServerError(Exception):
    """Base of every error the server reports to a client; ``code`` is a stable identifier."""

    code = "internal_error"

    def __init__(self, detail: str, *, slide: str | None = None, **extra: str):
        super().__init__(detail)
        self.detail = detail
        self.slide = slide
        self.extra = extra  # more fields of the JSON body, e.g. ``job`` of a 409


class ConfigError(TileServerError):
    """The configuration is invalid; the message names the key and the value."""

    code = "invalid_configuration"


class BadTileRequest(TileServerError):
    """A malformed request: non-integer level/col/row, unknown extension, bad ``?format=``."""

    code = "bad_request"


class SlideNotFound(TileServerError):
    """No slide of that name is configured (path-like names are never looked up on disk)."""

    code = "slide_not_found"


class TileNotFound(TileServerError):
    """The level or the col/row address lies outside the slide's DZI pyramid."""

    code = "tile_not_found"


class AssociatedImageNotFound(TileServerError):
    """The slide has no associated image of that name."""

    code = "associated_image_not_found"


class SlideOpenError(TileServerError):
    """OpenSlide could not open the slide; ``detail`` carries OpenSlide's message."""

    code = "slide_unopenable"


class SlideReadError(TileServerError):
    """OpenSlide opened the slide but failed to read pixels; ``detail`` is OpenSlide's message."""

    code = "slide_unreadable"


class BadJobRequest(TileServerError):
    """A malformed pregeneration request, e.g. ``?levels=`` that is not ``A-B`` or a list."""

    code = "bad_request"


class JobNotFound(TileServerError):
    """No pregeneration job of that id is known to the process that answers."""

    code = "job_not_found"


class JobConflict(TileServerError):
    """A job already runs (or waits) for that slide; ``extra["job"]`` is its id."""

    code = "job_conflict"


class JobFinished(TileServerError):
    """The job has already finished, so it cannot be cancelled."""

    code = "job_finished"


class DiskCacheDisabled(TileServerError):
    """Pregeneration fills the disk cache, and ``EnableDiskCache`` is false."""

    code = "disk_cache_disabled"


class CacheWriteError(TileServerError):
    """Pregeneration could not write a tile (read-only or full disk); ``detail`` says why."""

    code = "cache_not_writable"


STATUS: dict[type[TileServerError], int] = {
    BadJobRequest: 400,
    JobNotFound: 404,
    JobConflict: 409,
    JobFinished: 409,
    DiskCacheDisabled: 409,
    CacheWriteError: 500,
    BadTileRequest: 400,
    SlideNotFound: 404,
    TileNotFound: 404,
    AssociatedImageNotFound: 404,
    SlideOpenError: 500,
    SlideReadError: 500,
    ConfigError: 500,
    TileServerError: 500,
}


def status_for(exc: TileServerError) -> int:
    """HTTP status for a domain error: the entry of its nearest class in :data:`STATUS`."""
    for klass in type(exc).__mro__:
        if klass in STATUS:
            return STATUS[klass]
    return 500


def error_body(code: str, detail: str, slide: str | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The JSON body of every error response (``extra``: more fields, e.g. a 409's ``job``)."""
    body = {"error": code, "detail": detail}
    if slide is not None:
        body["slide"] = slide
    body.update(extra or {})
    return body


def install_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and Starlette's 404/405 to JSON bodies."""

    @app.exception_handler(TileServerError)
    async def _domain(request: Request, exc: TileServerError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, status, exc.detail)
        return JSONResponse(error_body(exc.code, exc.detail, exc.slide, exc.extra),
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse(error_body("bad_request", "; ".join(parts)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))
