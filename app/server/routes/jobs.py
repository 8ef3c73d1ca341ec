"""Pregeneration over HTTP: start jobs (202 + the job), list them, follow them, cancel them.

The original servers' routes are kept: ``POST /api/tiles/generate`` (the single slide),
``POST /api/tiles/{name}/generate`` and ``POST /api/tiles/generate-all``; they answer
``202 Accepted`` with the job document and a ``Location`` header instead of blocking.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.batch.jobs import FINISHED
from app.batch.walk import parse_levels
from app.core.errors import BadJobRequest
from app.core.slides import SINGLE_SLIDE_NAME
from app.server.auth import GuardedRoute, Permission, require
from app.server.dependencies import Jobs, Registry, path_base

router = APIRouter(prefix="/api", tags=["pregeneration"], route_class=GuardedRoute)
ADMIN = require(Permission.ADMIN)
CHANGE = require(Permission.CHANGE)


Overwrite = Annotated[bool, Query(description="render tiles that are already cached")]
Levels = Annotated[list[str] | None, Query(
    description="DZI levels: a range 10-17, a list 3,5,8-9, or the parameter repeated")]


def _levels(values: list[str] | None) -> tuple[int, ...] | None:
    try:
        return parse_levels(",".join(values)) if values else None
    except ValueError as exc:
        raise BadJobRequest(str(exc)) from None


def _accepted(job: dict[str, Any], request: Request) -> JSONResponse:
    return JSONResponse(job, status_code=202,
                        headers={"Location": f"{path_base(request)}/api/jobs/{job['id']}"})


@router.post("/tiles/generate", status_code=202, summary="Pregenerate the single slide",
             dependencies=[CHANGE])
async def generate_single(jobs: Jobs, request: Request, overwrite: Overwrite = False,
                          levels: Levels = None) -> JSONResponse:
    """Queue a job for the ``Image.Path`` slide (SingleSlideServer's route); 409 if one runs;
    400 for ``levels`` the slide does not have."""
    return _accepted(await jobs.submit([SINGLE_SLIDE_NAME], _levels(levels), overwrite),
                     request)


@router.post("/tiles/generate-all", status_code=202, summary="Pregenerate every slide",
             dependencies=[CHANGE])
async def generate_all(jobs: Jobs, registry: Registry, request: Request,
                       overwrite: Overwrite = False,
                       levels: Levels = None) -> JSONResponse:
    """Queue one job covering every configured slide; 409 if any of them is in a job; 400 for
    ``levels`` that no slide has (others are clipped to each slide's pyramid)."""
    return _accepted(await jobs.submit(registry.names, _levels(levels), overwrite), request)


@router.post("/tiles/{name}/generate", status_code=202, summary="Pregenerate one slide",
             dependencies=[CHANGE])
async def generate(name: str, jobs: Jobs, request: Request, overwrite: Overwrite = False,
                   levels: Levels = None) -> JSONResponse:
    """Queue a job for slide ``name``; 404 for an unknown slide, 409 if one runs for it, 400
    for ``levels`` the slide does not have (the message names the levels there are)."""
    return _accepted(await jobs.submit([name], _levels(levels), overwrite), request)


@router.get("/jobs", summary="Pregeneration jobs of every server process",
            dependencies=[ADMIN])
async def list_jobs(jobs: Jobs) -> list[dict[str, Any]]:
    """Every job of the deployment (every process and replica sharing the coordination
    store), newest first (the last 100 finished ones are kept)."""
    return await jobs.all()


@router.get("/jobs/{job_id}", summary="One job: state, progress, rate, ETA, error",
            dependencies=[ADMIN])
async def get_job(job_id: str, jobs: Jobs) -> dict[str, Any]:
    """The job's document; 404 for an unknown id."""
    return await jobs.get(job_id)


@router.get("/jobs/{job_id}/events", summary="Server-sent events with the job's progress",
            dependencies=[ADMIN])
async def job_events(job_id: str, jobs: Jobs) -> StreamingResponse:
    """``text/event-stream``: an ``event: progress`` with the job document whenever it
    changes (at most 4 per second), then one ``event: end`` with the finished document; any
    process follows any job."""
    watch = jobs.watch(job_id)
    first = await anext(watch)  # JobNotFound here is a 404, before the stream starts

    async def stream() -> AsyncIterator[str]:
        doc = first
        while True:
            if doc is None:
                yield ": keepalive\n\n"
            else:
                kind = "end" if doc["state"] in FINISHED else "progress"
                yield f"event: {kind}\ndata: {json.dumps(doc)}\n\n"
            try:
                doc = await anext(watch)
            except StopAsyncIteration:
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete("/jobs/{job_id}", status_code=202, summary="Cancel a job", dependencies=[CHANGE])
async def cancel_job(job_id: str, jobs: Jobs) -> JSONResponse:
    """Cancel a queued or running job; 409 if it has already finished. The tiles it wrote
    stay (they are whole); a new job resumes where it stopped."""
    return JSONResponse(await jobs.cancel(job_id), status_code=202)
