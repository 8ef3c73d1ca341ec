"""Pregeneration jobs inside the server: a FIFO of jobs, one running at a time, never on the loop.

A job renders the pyramids of one slide (``POST /api/tiles/{name}/generate``) or of every slide
(``POST /api/tiles/generate-all``) with :class:`app.batch.pregenerate.Pregenerator`, whose worker
processes run at lower priority (``Pregeneration.Nice``) so that interactive tile requests keep
their latency. The job's driver runs in a worker thread and reports progress to the event loop
with ``call_soon_threadsafe``; readers (``GET /api/jobs/{id}``, the SSE stream) see consistent
snapshots. A slide is in at most one queued or running job (:class:`~app.core.errors.JobConflict`).

Jobs live in the memory of the server process that accepted them: with ``serve --workers N``,
``/api/jobs`` lists the jobs of the process that answers. Run jobs from the CLI, or serve with one
worker process, where that matters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any

import anyio
from anyio import CapacityLimiter

from app.batch.pregenerate import Cancelled, Pregenerator, Progress, SlideTarget, target_for
from app.core.errors import (
    BadJobRequest,
    DiskCacheDisabled,
    JobConflict,
    JobFinished,
    JobNotFound,
    TileServerError,
)
from app.core.slides import SlideRegistry
from app.settings import Settings

log = logging.getLogger(__name__)

KEEP_FINISHED = 100
"""Finished jobs kept for ``GET /api/jobs`` (oldest dropped first)."""
SHUTDOWN_SECONDS = 10.0
"""How long server shutdown waits for a cancelled job's running batches."""


class JobState(StrEnum):
    """The life of a job: queued -> running -> succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True once the job will not change any more."""
        return self not in (JobState.QUEUED, JobState.RUNNING)


@dataclasses.dataclass(eq=False)
class Job:
    """One pregeneration job; owned by the event loop (mutate it only there).

    Attributes:
        slides: slide names, rendered in this order.
        levels: DZI levels requested (None: all); clipped to each slide's pyramid.
        progress: tiles done / skipped / total and bytes written, over all slides.
    """

    id: str
    slides: list[str]
    levels: tuple[int, ...] | None
    overwrite: bool
    engine: str
    state: JobState = JobState.QUEUED
    progress: Progress = dataclasses.field(default_factory=Progress)
    error: str | None = None
    error_code: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    _started_monotonic: float | None = None
    _finished_monotonic: float | None = None
    _changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self) -> None:
        """Mark the job running."""
        self.state = JobState.RUNNING
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._touch()

    def update(self, progress: Progress) -> None:
        """Take a progress snapshot from the driver thread (via ``call_soon_threadsafe``)."""
        if not self.state.finished:
            self.progress = progress
            self._touch()

    def finish(self, state: JobState, error: TileServerError | None = None) -> None:
        """Mark the job finished, with the error that failed it."""
        self.state = state
        if error is not None:
            self.error, self.error_code = error.detail, error.code
        self.finished_at = time.time()
        self._finished_monotonic = time.monotonic()
        self._touch()

    @property
    def elapsed(self) -> float:
        """Seconds spent running (0 while queued)."""
        if self._started_monotonic is None:
            return 0.0
        end = self._finished_monotonic or time.monotonic()
        return end - self._started_monotonic

    def document(self) -> dict[str, Any]:
        """The JSON document of ``GET /api/jobs/{id}``.

        ``tiles_per_second`` counts tiles rendered and written; ``eta_seconds`` extrapolates
        the pace of tiles processed (rendered or skipped) so far; both are null until known.
        """
        p = self.progress
        elapsed = self.elapsed
        rate = p.done / elapsed if elapsed > 0 else None
        eta = None
        if self.state is JobState.RUNNING and p.processed and elapsed > 0:
            eta = round((p.total - p.processed) * elapsed / p.processed, 1)
        elif self.state is JobState.SUCCEEDED:
            eta = 0.0
        return {
            "id": self.id, "state": self.state.value, "slides": self.slides,
            "levels": list(self.levels) if self.levels is not None else None,
            "overwrite": self.overwrite, "engine": self.engine, "current_slide": p.slide or None,
            "tiles_done": p.done, "tiles_skipped": p.skipped, "tiles_total": p.total,
            "bytes_written": p.bytes,
            "tiles_per_second": round(rate, 1) if rate is not None else None,
            "elapsed_seconds": round(elapsed, 2), "eta_seconds": eta,
            "error": self.error, "error_code": self.error_code,
            "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "links": {"self": f"/api/jobs/{self.id}", "events": f"/api/jobs/{self.id}/events"},
        }

    async def watch(self, interval: float = 0.25,
                    keepalive: float = 15.0) -> AsyncIterator[dict[str, Any] | None]:
        """Documents as the job changes (at most one per ``interval`` seconds), ending with
        the finished one; None every ``keepalive`` seconds without change."""
        while True:
            changed = self._changed
            yield self.document()
            if self.state.finished:
                return
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), keepalive)
                    break
                except TimeoutError:
                    yield None
            await asyncio.sleep(interval)



def level_ranges(levels: list[int]) -> str:
    """Sorted distinct levels as text: ``[3, 5, 6, 7]`` -> ``"3,5-7"``."""
    runs: list[list[int]] = []
    for level in levels:
        if runs and level == runs[-1][1] + 1:
            runs[-1][1] = level
        else:
            runs.append([level, level])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


class JobManager:
    """The jobs of this server process.

    Args:
        registry: the server's slides (their pyramids size the jobs).
        settings: the server's settings, which the workers render with, so that pregenerated
            tiles equal served ones.
    """

    def __init__(self, registry: SlideRegistry, settings: Settings):
        self.registry = registry
        self.settings = settings
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None  # set by start()
        self._current: asyncio.Task[None] | None = None  # the running job's task
        self._limiter = CapacityLimiter(1)

    def start(self) -> None:
        """Start running queued jobs (call from the event loop, e.g. the app's lifespan)."""
        self._runner = asyncio.ensure_future(self._run_forever())

    async def close(self) -> None:
        """Cancel every job and wait (up to ``SHUTDOWN_SECONDS``) for the running one."""
        for job in self._jobs.values():
            if not job.state.finished:
                job.cancel.set()
                if job.state is JobState.QUEUED:
                    job.finish(JobState.CANCELLED)
        if self._current is not None and not self._current.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._current), SHUTDOWN_SECONDS)
            except TimeoutError:
                log.warning("a pregeneration job did not stop within %.0f s", SHUTDOWN_SECONDS)
        if self._runner is not None:
            self._runner.cancel()

    def _engine(self) -> str:
        options = self.settings.Pregeneration
        if options.Scheduler:
            return f"dask {options.Scheduler}"
        workers = Pregenerator(self.settings).workers
        return f"local, {workers} worker process{'es' if workers > 1 else ''}"

    async def submit(self, slides: list[str], levels: tuple[int, ...] | None,
                     overwrite: bool) -> Job:
        """Queue a job.

        Raises:
            SlideNotFound: an unknown slide name.
            BadJobRequest: no slide to render, or a requested level that no slide of the job
                has (the message names the DZI levels there are).
            DiskCacheDisabled: ``EnableDiskCache`` is false.
            JobConflict: a slide is already in a queued or running job (``extra["job"]``).
        """
        if not self.settings.EnableDiskCache:
            raise DiskCacheDisabled("EnableDiskCache is false: there is no cache to fill")
        if not slides:
            raise BadJobRequest("no slide is configured")
        for name in slides:
            self.registry.entry(name)
        if levels is not None:
            await self._check_levels(slides, levels)
        for job in self._jobs.values():
            busy = sorted(set(job.slides) & set(slides))
            if busy and not job.state.finished:
                raise JobConflict(f"job {job.id} is {job.state.value} for slide {busy[0]!r}",
                                  slide=busy[0], job=job.id)
        job = Job(uuid.uuid4().hex[:12], list(slides), levels, overwrite, self._engine())
        self._jobs[job.id] = job
        self._forget_old()
        self._queue.put_nowait(job)
        log.info("job %s queued: %s", job.id, ", ".join(slides))
        return job

    async def _check_levels(self, slides: list[str], levels: tuple[int, ...]) -> None:
        """Every requested level must exist in the pyramid of at least one of ``slides``
        (levels are clipped to each slide's pyramid when the job runs). Slides that cannot be
        opened are left to the job, which reports them.

        Raises:
            BadJobRequest: a level above the highest pyramid's top level.
        """
        counts = []
        for name in slides:
            try:
                counts.append((await self.registry.get(name)).pyramid.level_count)
            except TileServerError:  # unopenable or gone: the job reports it
                continue
        if not counts:
            return
        top = max(counts) - 1
        outside = [level for level in levels if level > top]
        if outside:
            which = (f"slide {slides[0]!r} has" if len(slides) == 1
                     else f"the largest of the {len(slides)} slides has")
            raise BadJobRequest(f"levels {level_ranges(outside)} do not exist: {which} DZI "
                                f"levels 0-{top}")

    def get(self, job_id: str) -> Job:
        """The job of that id.

        Raises:
            JobNotFound: no such job in this process.
        """
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in this server process")
        return job

    def all(self) -> list[Job]:
        """Every known job, newest first."""
        return list(reversed(self._jobs.values()))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop (its running batches
        finish; it becomes ``cancelled`` within about a second).

        Raises:
            JobNotFound, JobFinished.
        """
        job = self.get(job_id)
        if job.state.finished:
            raise JobFinished(f"job {job_id} has already {job.state.value}", job=job.id)
        job.cancel.set()
        if job.state is JobState.QUEUED:
            job.finish(JobState.CANCELLED)
        return job

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state.finished]
        for job_id in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]

    async def _run_forever(self) -> None:
        while True:
            job = await self._queue.get()
            if job.state is JobState.QUEUED:
                self._current = asyncio.ensure_future(self._run(job))
                await self._current

    async def _run(self, job: Job) -> None:
        job.start()
        log.info("job %s running", job.id)
        several = len(job.slides) > 1
        errors: list[TileServerError] | None = [] if several else None
        try:
            targets = []
            for name in job.slides:
                try:
                    targets.append(await self._target(name, job.levels))
                except TileServerError as exc:  # unopenable, or its file is gone
                    if errors is None:
                        raise
                    errors.append(exc)
            if job.levels is not None and not any(t.levels for t in targets):
                raise BadJobRequest(f"levels {list(job.levels)} are outside every pyramid")
            job.update(Progress(slide=job.slides[0], total=sum(t.total for t in targets)))
            loop = asyncio.get_running_loop()

            def report(progress: Progress) -> None:
                loop.call_soon_threadsafe(job.update, progress)

            await anyio.to_thread.run_sync(self._drive, targets, job, report, errors,
                                           limiter=self._limiter)
            if errors:
                detail = "; ".join(f"{e.slide}: {e.detail}" for e in errors)
                raise type(errors[0])(f"{len(errors)} of {len(job.slides)} slides failed: "
                                      f"{detail}")
        except Cancelled:
            job.finish(JobState.CANCELLED)
        except TileServerError as exc:
            job.finish(JobState.FAILED, exc)
        except Exception as exc:  # a bug: fail the job, keep the server and the runner alive
            log.exception("job %s crashed", job.id)
            job.finish(JobState.FAILED, TileServerError(f"{type(exc).__name__}: {exc}"))
        else:
            job.finish(JobState.SUCCEEDED)
        p = job.progress
        log.info("job %s %s: %d tiles written, %d skipped of %d in %.1f s%s", job.id,
                 job.state.value, p.done, p.skipped, p.total, job.elapsed,
                 f" ({job.error})" if job.error else "")

    async def _target(self, name: str, levels: tuple[int, ...] | None) -> SlideTarget:
        handle = await self.registry.get(name)
        return target_for(handle.entry, handle.pyramid.level_tiles, levels)

    def _drive(self, targets: list[SlideTarget], job: Job, report: Callable[[Progress], None],
               errors: list[TileServerError] | None) -> None:
        """The job's driver (worker thread): a fresh pool per job, closed at its end so that
        an idle server holds no worker processes. With ``errors``, a broken slide is recorded
        there and the next slide goes on."""
        with Pregenerator(self.settings) as pregenerator:
            pregenerator.run(targets, job.overwrite, job.cancel, report, errors)
