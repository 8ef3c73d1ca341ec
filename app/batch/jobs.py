"""Pregeneration jobs inside the server, shared by every process and replica of a deployment.

A job renders the pyramids of one slide (``POST /api/tiles/{name}/generate``) or of every slide
(``POST /api/tiles/generate-all``) with :class:`app.batch.pregenerate.Pregenerator`, whose worker
processes run at lower priority (``Pregeneration.Nice``) so that interactive tile requests keep
their latency.

Job records live in the coordination store (:mod:`app.coordination`: SQLite in the cache folder,
or Redis across machines), so any process lists, follows and cancels any job, and a slide is in
at most one queued or running job across all of them (:class:`~app.core.errors.JobConflict`).
Each server process runs a :class:`JobManager` that claims queued jobs one at a time and runs
them: the driver in a worker thread, progress written to the store at most every
:data:`REPORT_SECONDS` (which renews the process's lease on the job and reads whether it was
cancelled). A job whose process dies is claimed again by another process (or the next one to
start) once its lease runs out, and resumes: tiles already whole are skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio import CapacityLimiter

from app.batch.pregenerate import Cancelled, Pregenerator, Progress, SlideTarget, target_for
from app.coordination import ConflictingJob, Coordination, new_job, owner_id
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

SHUTDOWN_SECONDS = 10.0
"""How long server shutdown waits for a running job's batches to stop."""
REPORT_SECONDS = 0.25
"""How often a running job's progress is written to the store (and its cancel flag read)."""
IDLE_SECONDS = 0.5
"""How often an idle process looks for a queued job (at once for jobs it accepted itself)."""
FINISHED = ("succeeded", "failed", "cancelled")


def document(job: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The JSON document of ``GET /api/jobs/{id}`` for a job record
    (:func:`app.coordination.new_job`).

    ``tiles_per_second`` counts tiles rendered and written; ``eta_seconds`` extrapolates the
    pace of tiles processed (rendered or skipped) so far; both are null until known.
    ``attempts`` counts the processes that ran it (more than one: a process died and another
    resumed the job).
    """
    p = job["progress"]
    state = job["state"]
    started, finished = job["started_at"], job["finished_at"]
    now = time.time() if now is None else now
    elapsed = 0.0 if started is None else max(0.0, (finished or now) - started)
    rate = p["done"] / elapsed if elapsed > 0 else None
    processed = p["done"] + p["skipped"]
    eta = None
    if state == "running" and processed and elapsed > 0:
        eta = round((p["total"] - processed) * elapsed / processed, 1)
    elif state == "succeeded":
        eta = 0.0
    return {
        "id": job["id"], "state": state, "slides": job["slides"], "levels": job["levels"],
        "overwrite": job["overwrite"], "engine": job["engine"],
        "current_slide": p["slide"] or None,
        "tiles_done": p["done"], "tiles_skipped": p["skipped"], "tiles_total": p["total"],
        "bytes_written": p["bytes"],
        "tiles_per_second": round(rate, 1) if rate is not None else None,
        "elapsed_seconds": round(elapsed, 2), "eta_seconds": eta,
        "error": job["error"], "error_code": job["error_code"],
        "cancel_requested": job["cancel"], "attempts": job["attempts"],
        "created_at": _iso(job["created_at"]), "started_at": _iso(started),
        "finished_at": _iso(finished),
        "links": {"self": f"/api/jobs/{job['id']}", "events": f"/api/jobs/{job['id']}/events"},
    }


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
    """This process's part in the shared jobs: submit, read and cancel any job of the store,
    and run the jobs this process claims (one at a time).

    Args:
        registry: the server's slides (their pyramids size the jobs).
        settings: the server's settings, which the workers render with, so that pregenerated
            tiles equal served ones.
        store: the coordination store (:func:`app.coordination.open_coordination`, opened).
    """

    def __init__(self, registry: SlideRegistry, settings: Settings, store: Coordination):
        self.registry = registry
        self.settings = settings
        self.store = store
        self.owner = owner_id()
        self._runner: asyncio.Task[None] | None = None  # set by start()
        self._wake = asyncio.Event()
        self._closing = False
        self._running: dict[str, Any] | None = None  # the record of the job running here
        self._limiter = CapacityLimiter(1)

    def start(self) -> None:
        """Start claiming and running jobs (call from the event loop, e.g. the lifespan)."""
        self._runner = asyncio.ensure_future(self._run_forever())

    async def close(self) -> None:
        """Stop claiming; stop the job running here (waiting up to ``SHUTDOWN_SECONDS`` for
        its batches) and give it back to the queue, so another process, or this server's next
        start, resumes it."""
        self._closing = True
        self._wake.set()
        if self._runner is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._runner), SHUTDOWN_SECONDS)
            except TimeoutError:
                log.warning("a pregeneration job did not stop within %.0f s",
                            SHUTDOWN_SECONDS)
                self._runner.cancel()

    def _engine(self) -> str:
        options = self.settings.Pregeneration
        if options.Scheduler:
            return f"dask {options.Scheduler}"
        workers = Pregenerator(self.settings).workers
        return f"local, {workers} worker process{'es' if workers > 1 else ''}"

    async def submit(self, slides: list[str], levels: tuple[int, ...] | None,
                     overwrite: bool) -> dict[str, Any]:
        """Queue a job; returns its document.

        Raises:
            SlideNotFound: an unknown slide name.
            BadJobRequest: no slide to render, or a requested level that no slide of the job
                has (the message names the DZI levels there are).
            DiskCacheDisabled: ``EnableDiskCache`` is false.
            JobConflict: a slide is already in a queued or running job of any process
                (``extra["job"]``).
        """
        if not self.settings.EnableDiskCache:
            raise DiskCacheDisabled("EnableDiskCache is false: there is no cache to fill")
        if not slides:
            raise BadJobRequest("no slide is configured")
        for name in slides:
            self.registry.entry(name)
        if levels is not None:
            await self._check_levels(slides, levels)
        job = new_job(slides, list(levels) if levels is not None else None, overwrite,
                      self._engine())
        try:
            await self.store.submit(job)
        except ConflictingJob as exc:
            other = await self.store.get(exc.job)
            state = other["state"] if other is not None else "queued"
            raise JobConflict(f"job {exc.job} is {state} for slide {exc.slide!r}",
                              slide=exc.slide, job=exc.job) from None
        log.info("job %s queued: %s", job["id"], ", ".join(slides))
        self._wake.set()
        return document(job)

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

    async def get(self, job_id: str) -> dict[str, Any]:
        """The document of the job of that id, whichever process runs it.

        Raises:
            JobNotFound: no such job.
        """
        return document(await self._record(job_id))

    async def _record(self, job_id: str) -> dict[str, Any]:
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    async def all(self) -> list[dict[str, Any]]:
        """Every kept job's document, newest first (the last 100 finished ones are kept)."""
        now = time.time()
        return [document(job, now) for job in await self.store.jobs()]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job at once, or ask a running one to stop, whichever process runs
        it (its running batches finish; it becomes ``cancelled`` within about a second).

        Raises:
            JobNotFound, JobFinished.
        """
        job = await self._record(job_id)
        if job["state"] in FINISHED:
            raise JobFinished(f"job {job_id} has already {job['state']}", job=job_id)
        return document(await self.store.cancel(job_id) or job)

    async def watch(self, job_id: str, interval: float = REPORT_SECONDS,
                    keepalive: float = 15.0) -> AsyncIterator[dict[str, Any] | None]:
        """Documents of a job as it changes (read from the store every ``interval`` seconds),
        ending with the finished one; None every ``keepalive`` seconds without change.

        Raises:
            JobNotFound: no such job (before the first document).
        """
        job = await self._record(job_id)
        version, quiet_since = None, time.monotonic()
        while True:
            if job["version"] != version:
                version, quiet_since = job["version"], time.monotonic()
                yield document(job)
                if job["state"] in FINISHED:
                    return
            elif time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield None
            await asyncio.sleep(interval)
            latest = await self.store.get(job_id)
            if latest is None:  # dropped as one of the oldest finished jobs
                return
            job = latest

    async def _run_forever(self) -> None:
        while not self._closing:
            try:
                job = await self.store.claim(self.owner)
            except Exception as exc:  # the store is unreachable: try again later
                log.warning("jobs: cannot read the coordination store (%s)", exc)
                job = None
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_SECONDS)
                except TimeoutError:
                    pass
                continue
            await self._run(job)

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        log.info("job %s running (attempt %d)", job_id, job["attempts"])
        cancel = threading.Event()
        progress = Progress()
        changed = asyncio.Event()
        several = len(job["slides"]) > 1
        errors: list[TileServerError] | None = [] if several else None
        reporter = asyncio.ensure_future(self._report(job_id, progress, cancel, changed))
        state, error = "succeeded", None
        try:
            levels = tuple(job["levels"]) if job["levels"] is not None else None
            targets = []
            for name in job["slides"]:
                try:
                    targets.append(await self._target(name, levels))
                except TileServerError as exc:  # unopenable, or its file is gone
                    if errors is None:
                        raise
                    errors.append(exc)
            if levels is not None and not any(t.levels for t in targets):
                raise BadJobRequest(f"levels {list(levels)} are outside every pyramid")
            progress.slide, progress.total = job["slides"][0], sum(t.total for t in targets)
            changed.set()
            loop = asyncio.get_running_loop()

            def report(update: Progress) -> None:
                def apply() -> None:
                    for f in dataclasses.fields(Progress):
                        setattr(progress, f.name, getattr(update, f.name))
                    changed.set()
                loop.call_soon_threadsafe(apply)

            await anyio.to_thread.run_sync(self._drive, targets, job, cancel, report, errors,
                                           limiter=self._limiter)
            if errors:
                detail = "; ".join(f"{e.slide}: {e.detail}" for e in errors)
                raise type(errors[0])(f"{len(errors)} of {len(job['slides'])} slides failed: "
                                      f"{detail}")
        except Cancelled:
            state = "cancelled"
        except TileServerError as exc:
            state, error = "failed", exc
        except Exception as exc:  # a bug: fail the job, keep the server and the runner alive
            log.exception("job %s crashed", job_id)
            state, error = "failed", TileServerError(f"{type(exc).__name__}: {exc}")
        finally:
            reporter.cancel()
        counts = dataclasses.asdict(progress)
        if state == "cancelled" and self._closing and not await self._cancel_requested(job_id):
            await self.store.update(job_id, self.owner, {"progress": counts})
            await self.store.release(job_id, self.owner)
            log.info("job %s stopped with the server; it resumes in another process", job_id)
            return
        await self.store.finish(job_id, self.owner, {
            "state": state, "progress": counts, "finished_at": time.time(),
            "error": error.detail if error is not None else None,
            "error_code": error.code if error is not None else None})
        log.info("job %s %s: %d tiles written, %d skipped of %d%s", job_id, state,
                 progress.done, progress.skipped, progress.total,
                 f" ({error.detail})" if error is not None else "")

    async def _cancel_requested(self, job_id: str) -> bool:
        job = await self.store.get(job_id)
        return job is None or bool(job["cancel"])

    async def _report(self, job_id: str, progress: Progress, cancel: threading.Event,
                      changed: asyncio.Event) -> None:
        """While the job runs: write its progress (and renew the lease) at most every
        :data:`REPORT_SECONDS`, at least every second; stop the driver when the job was
        cancelled, the server closes, or another process took the job over."""
        while True:
            try:
                await asyncio.wait_for(changed.wait(), 1.0)
            except TimeoutError:
                pass
            changed.clear()
            try:
                job = await self.store.update(job_id, self.owner,
                                              {"progress": dataclasses.asdict(progress)})
            except Exception as exc:  # unreachable store: the lease may run out
                log.warning("job %s: cannot write its progress (%s)", job_id, exc)
                job = {"cancel": False}
            if job is None or job["cancel"] or self._closing:
                cancel.set()
            await asyncio.sleep(REPORT_SECONDS)

    async def _target(self, name: str, levels: tuple[int, ...] | None) -> SlideTarget:
        handle = await self.registry.get(name)
        return target_for(handle.entry, handle.pyramid.level_tiles, levels)

    def _drive(self, targets: list[SlideTarget], job: dict[str, Any], cancel: threading.Event,
               report: Callable[[Progress], None],
               errors: list[TileServerError] | None) -> None:
        """The job's driver (worker thread): a fresh pool per job, closed at its end so that
        an idle server holds no worker processes. With ``errors``, a broken slide is recorded
        there and the next slide goes on."""
        with Pregenerator(self.settings) as pregenerator:
            pregenerator.run(targets, job["overwrite"], cancel, report, errors)
