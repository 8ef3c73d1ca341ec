"""Operations: readiness (``/readyz``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.server.auth import GuardedRoute, Permission, require
from app.server.dependencies import services
from app.server.errors import error_response
from app.server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"], route_class=GuardedRoute)


@router.get("/readyz", summary="Readiness", dependencies=[require(Permission.PUBLIC)])
async def readyz(request: Request) -> Response:
    """200 ``{"status": "ready"}`` when this process should get traffic; 503 with the
    reasons (``checks``) before its start-up checks finish, while its render queue is full,
    when the tile cache is not writable or the coordination store does not answer."""
    readiness = services(request).readiness
    problems = readiness.problems() if readiness is not None else {"startup": "starting"}
    if problems:
        return error_response(503, "not_ready", "; ".join(problems.values()),
                              extra={"checks": ", ".join(sorted(problems))},
                              headers={"Retry-After": "1"})
    return Response(b'{"status":"ready"}', media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics",
            dependencies=[require(Permission.ADMIN)], response_class=Response)
async def metrics(request: Request) -> Response:
    """Every worker process's counters added up, in Prometheus' text format; the admin role
    (``Auth``; with ``Auth:Mode none``, loopback clients); 404 when ``Metrics.Enabled`` is
    false."""
    built = services(request)
    if built.metrics is None:
        return error_response(404, "not_found", "Metrics.Enabled is false")
    return Response(await built.metrics.exposition(built), media_type=CONTENT_TYPE)
