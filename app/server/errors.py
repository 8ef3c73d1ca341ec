"""HTTP for domain errors: the one table of status codes and the one JSON error body.

Nothing below the server layer knows HTTP: services raise :mod:`app.core.errors` exceptions,
and this module maps them (and FastAPI's validation errors and Starlette's 404/405) to JSON
``{"error", "detail", "slide"}`` bodies with the status of :data:`STATUS`.
"""

from __future__ import annotations

import html
import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.assets import template
from app.core.errors import (
    AccessDenied,
    AssociatedImageNotFound,
    AuditUnavailable,
    BadJobRequest,
    BadTileRequest,
    CacheWriteError,
    ConfigError,
    DiskCacheDisabled,
    FeatureNotImplemented,
    HostNotAllowed,
    JobConflict,
    JobFinished,
    JobNotFound,
    NotAuthenticated,
    Overloaded,
    SignedUrlsDisabled,
    SlideNotFound,
    SlideOpenError,
    SlideReadError,
    TileNotFound,
    TileServerError,
)

log = logging.getLogger(__name__)

STATUS: dict[type[TileServerError], int] = {
    BadJobRequest: 400,
    JobNotFound: 404,
    JobConflict: 409,
    JobFinished: 409,
    DiskCacheDisabled: 409,
    CacheWriteError: 500,
    BadTileRequest: 400,
    FeatureNotImplemented: 501,
    SlideNotFound: 404,
    TileNotFound: 404,
    AssociatedImageNotFound: 404,
    SlideOpenError: 500,
    SlideReadError: 500,
    ConfigError: 500,
    NotAuthenticated: 401,
    AccessDenied: 403,
    HostNotAllowed: 400,
    SignedUrlsDisabled: 409,
    AuditUnavailable: 503,
    Overloaded: 503,
    TileServerError: 500,
}


def status_for(exc: TileServerError) -> int:
    """HTTP status for a domain error: the entry of its nearest class in :data:`STATUS`."""
    for klass in type(exc).__mro__:
        if klass in STATUS:
            return STATUS[klass]
    return 500


def headers_for(exc: TileServerError) -> dict[str, str] | None:
    """Response headers an error needs beyond its body: ``WWW-Authenticate`` on a 401,
    ``Retry-After`` on a 503 of the audit log or of a full render queue."""
    if isinstance(exc, NotAuthenticated):
        return {"WWW-Authenticate": exc.challenge}
    if isinstance(exc, AuditUnavailable):
        return {"Retry-After": "1"}
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after)}
    return None


def error_body(code: str, detail: str, slide: str | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The JSON body of every error response (``extra``: more fields, e.g. a 409's ``job``)."""
    body = {"error": code, "detail": detail}
    if slide is not None:
        body["slide"] = slide
    body.update(extra or {})
    return body


def error_json(status: int, code: str, detail: str, slide: str | None = None,
               extra: dict[str, str] | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of an error response: :func:`error_body` serialised as every JSON
    response of the app is (``JSONResponse``'s compact form)."""
    return status, json.dumps(error_body(code, detail, slide, extra), ensure_ascii=False,
                              separators=(",", ":")).encode()


def error_response(status: int, code: str, detail: str, slide: str | None = None,
                   extra: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """The :class:`Response` of an error, for FastAPI routes and handlers."""
    status, body = error_json(status, code, detail, slide, extra)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def wants_html(request: Request) -> bool:
    """True when the client is a browser navigating (its ``Accept`` names ``text/html``);
    API clients, ``fetch`` with ``Accept: application/json``, curl and viewers' tile loads
    get JSON."""
    return "text/html" in request.headers.get("accept", "")


def error_page(status: int, detail: str,
               headers: dict[str, str] | None = None) -> Response:
    """The HTML error page a browser gets: the status, its reason and the detail."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    page = template("error.html")
    for placeholder, value in (("{{STATUS}}", str(status)), ("{{TITLE}}", title),
                               ("{{DETAIL}}", detail)):
        page = page.replace(placeholder, html.escape(value, quote=True))
    return Response(page, status_code=status, media_type="text/html", headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors, Starlette's 404/405 and any other exception (a
    bug: 500 ``internal_error``, the traceback in the server's log) to JSON bodies; browsers
    get HTML pages for domain and HTTP errors (:func:`wants_html`)."""

    @app.exception_handler(TileServerError)
    async def _domain(request: Request, exc: TileServerError) -> Response:
        status = status_for(exc)
        if status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, status, exc.detail)
        if wants_html(request):
            return error_page(status, exc.detail, headers_for(exc))
        return error_response(status, exc.code, exc.detail, exc.slide, exc.extra,
                              headers_for(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(422, "bad_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if wants_html(request):
            return error_page(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
        return error_response(exc.status_code, code, str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware logs the traceback and calls this for the body.
        return error_response(500, TileServerError.code, "internal error")
