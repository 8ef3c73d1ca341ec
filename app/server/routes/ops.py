"""Operations: readiness (``/readyz``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.server.dependencies import services
from app.server.errors import error_response
from app.server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/readyz", summary="Readiness")
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


async def metrics_access(request: Request) -> None:
    """Who may read ``/metrics``: the hook where access control requires the admin role
    (docs/deploy.md, "Metrics and logs"); open while the server has no access control."""


@router.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(metrics_access)],
            response_class=Response)
async def metrics(request: Request) -> Response:
    """Every worker process's counters added up, in Prometheus' text format; 404 when
    ``Metrics.Enabled`` is false."""
    built = services(request)
    if built.metrics is None:
        return error_response(404, "not_found", "Metrics.Enabled is false")
    return Response(await built.metrics.exposition(built), media_type=CONTENT_TYPE)
