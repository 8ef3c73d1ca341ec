"""Pregeneration: render whole pyramids into the tile cache (or an export folder) in workers.

The work of one slide is planned by :mod:`app.batch.walk` as batches (blocks of the pyramid, every
selected level) and rendered by :func:`render_batch` in worker processes, each with its own
OpenSlide handle and decoded-tile LRU. A tile is planned by :class:`app.core.planner.TilePlanner`
and made by :func:`app.core.render.render_tile`, exactly as an on-demand request plans and makes
it, so a
pregenerated tile is byte-identical to the one the server would render; it is written with
:func:`app.cache.disk.write_atomic`, so a worker killed at any moment (kill -9 included) leaves
whole tiles or none, and the next run skips the whole ones (unless ``overwrite``) and completes the
pyramid.

Two engines run the batches:

* :class:`LocalPool` (the default): ``Pregeneration.Workers`` processes at ``Pregeneration.Nice``
  lower priority. Each gets one contiguous band of blocks (neighbouring blocks share the stored
  slide tiles on their edges, which then stay in that process's decoded-tile LRU) and, when its
  band is done, steals blocks from the far end of the longest remaining band.
* :class:`DaskPool`: a Dask distributed cluster (``--scheduler tcp://host:8786`` or
  ``Pregeneration.Scheduler``); each batch is one task. Every worker must have this package
  installed, read the slide at the same path and write to the same ``TileCachePath`` (a shared
  file system).

:class:`Pregenerator` drives either engine for a list of :class:`SlideTarget`, reports
:class:`Progress` after every batch and stops early on cancellation or on the first error.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.batch.walk import Batch, plan_batches, select_levels, split_contiguous
from app.cache.disk import DiskTileCache, sweep_temporary_files, write_atomic
from app.cache.index import CacheIndex, VariantOrigin, geometry_fingerprint
from app.core.errors import (
    CacheWriteError,
    SlideNotFound,
    SlideOpenError,
    SlideReadError,
    TileServerError,
)
from app.core.keys import TileKey
from app.core.planner import TilePlanner
from app.core.render import original_tile, render_tile
from app.core.slides import SlideEntry, SlideRegistry
from app.settings import Settings, settings_from

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
"""Batches queued at each local worker process, so that it never waits for the next one."""
WRITER_THREADS = 2
"""Threads per worker that write finished tiles, so that rendering goes on while the file
system creates files (0.05-0.5 ms each on this project's ext4 disk, mostly waiting)."""
MAX_PENDING_WRITES = 64
"""Encoded tiles a worker may hold while they wait for a writer thread."""


def default_workers() -> int:
    """One worker process per CPU core."""
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Worker side: what runs in a worker process (local pool) or on a Dask worker.


@dataclass(frozen=True)
class BatchTask:
    """One batch of one slide, as sent to a worker (picklable).

    Attributes:
        settings_json: the job's settings (``Settings.model_dump_json()``).
        slide: the slide's name; path: its file (as the worker sees it).
        batch: the tiles to render.
        overwrite: render even where a whole tile exists.
        output: None to fill the tile cache, else a folder written as a static DZI
            ``{output}/{level}/{col}_{row}.{ext}`` (the ``{name}_files`` folder of an export).
    """

    settings_json: str
    slide: str
    path: str
    batch: Batch
    overwrite: bool = False
    output: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """What a batch did: tiles written, tiles skipped (already there), bytes written, and
    the error that stopped it (``error_code`` is a :class:`TileServerError` code)."""

    done: int = 0
    skipped: int = 0
    bytes: int = 0
    error_code: str | None = None
    error: str | None = None


class _WorkerState:
    """Per worker process: the job's settings, a slide registry (open handles and their
    decoded-tile LRU, kept across batches) and the tile planner. Thread-safe (Dask may run
    several tasks in threads of one worker)."""

    def __init__(self, settings_json: str):
        settings = settings_from(settings_json)
        cache_bytes = settings.Pregeneration.WorkerCacheBytes
        settings = settings.model_copy(update={"Server": settings.Server.model_copy(
            update={"OpenSlideCacheBytes": cache_bytes})})
        self.settings = settings
        self.planner = TilePlanner(settings)
        index = CacheIndex(settings.TileCachePath)
        opened: CacheIndex | None = index
        try:
            index.open(writer=False)  # flushed at the end of every batch
        except (sqlite3.Error, OSError) as exc:  # counts only; tile writes will report
            log.warning("cache index of %s: %s", settings.TileCachePath, exc)
            opened = None
        self.disk = DiskTileCache(settings.TileCachePath, True, opened)
        self.geometry = geometry_fingerprint(settings.DeepZoom.model_dump_json())
        self.registry = SlideRegistry({}, settings)
        self.lock = threading.Lock()
        self.writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="tile-writer")


_STATES: dict[str, _WorkerState] = {}
_STATES_LOCK = threading.Lock()


def _state_for(settings_json: str) -> _WorkerState:
    with _STATES_LOCK:
        state = _STATES.get(settings_json)
        if state is None:
            _STATES.clear()  # one job's settings at a time per worker
            state = _STATES[settings_json] = _WorkerState(settings_json)
        return state


_STOP: Any = None
"""In a local worker process: the pool's stop event (a ``multiprocessing.Event``); set, the
running batch returns after its current tile."""


def _init_worker(nice: int, stop: Any = None) -> None:
    """Local pool initializer: keep the stop event, leave Ctrl-C to the parent (which stops
    the workers through that event), lower the process priority by ``nice``."""
    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:  # pragma: no cover - a platform without nice
            log.warning("cannot lower worker priority: %s", exc)


def render_batch(task: BatchTask) -> BatchResult:
    """Render and store every tile of a batch that is not stored yet (or every tile with
    ``overwrite``). Blocking; runs in a worker process.

    Each tile is planned by :meth:`app.core.planner.TilePlanner.plan` without a request (the
    level's policy encoding), made by :func:`app.core.render.render_tile` and written to
    ``DiskTileCache.path_for(plan.key)``, or to the export folder, through
    :func:`app.cache.disk.write_atomic`. A tile that exists with a non-empty file is whole
    (files appear only by atomic rename) and is skipped. A tile the plan marks ``original``
    (the server sends the slide's own JPEG bytes; aligned geometry) is skipped for the cache,
    which the server never reads for it, and exported as those bytes
    (:func:`app.core.render.original_tile`).

    Returns:
        Counts; on the first error (unopenable or unreadable slide, unwritable disk) the counts
        so far and the error, which the caller turns back into its domain exception.
    """
    state = _state_for(task.settings_json)
    done = skipped = written = 0
    pending: deque[Future[None]] = deque()
    try:
        with state.lock:
            entry = state.registry.catalogue.get(task.slide)
            if entry is None or str(entry.path) != task.path:
                state.registry.catalogue[task.slide] = SlideEntry(task.slide, Path(task.path))
                state.registry.discard(task.slide)
            handle = state.registry.open_blocking(task.slide)
        source, planner = handle.source, state.planner
        for run in task.batch.runs:
            for level, col, row in run.tiles():
                if _STOP is not None and _STOP.is_set():
                    break  # the job was cancelled: whole tiles so far, the rest left out
                plan = planner.plan(handle, source, level, col, row)
                if task.output is None:
                    if plan.original:  # served from the slide's own bytes, never from the cache
                        skipped += 1
                        continue
                    path = state.disk.path_for(plan.key)
                else:
                    ext = plan.encoding.format.value
                    path = Path(task.output, str(level), f"{col}_{row}.{ext}")
                if not task.overwrite and _whole_file(path):
                    skipped += 1
                    continue
                data = (plan.original and original_tile(source, plan)
                        or render_tile(handle, source, plan))
                if task.output is None:
                    origin = VariantOrigin(handle.identity, plan.encoding.key, state.geometry)
                    job = state.writers.submit(_store, state.disk, plan.key, data, origin)
                else:
                    job = state.writers.submit(_export, path, data)
                pending.append(job)
                while len(pending) > MAX_PENDING_WRITES or (pending and pending[0].done()):
                    pending.popleft().result()
                done += 1
                written += len(data)
        while pending:
            pending.popleft().result()
    except TileServerError as exc:
        wait(pending)
        done -= len(pending)  # not counted as written: their outcome is unknown to the job
        _flush_index(state)
        if isinstance(exc, SlideReadError | SlideOpenError):
            state.registry.discard(task.slide)  # OpenSlide errors latch: reopen next time
        return BatchResult(done, skipped, written, exc.code, exc.detail)
    _flush_index(state)
    return BatchResult(done, skipped, written)


def _flush_index(state: _WorkerState) -> None:
    """Write the batch's tiles into the cache index (a failure only delays the counts: the
    index is rebuilt from the files when it misses events)."""
    if state.disk.index is not None:
        try:
            state.disk.index.flush()
        except sqlite3.Error as exc:
            log.warning("cache index: %s", exc)


def _store(disk: DiskTileCache, key: TileKey, data: bytes, origin: VariantOrigin) -> None:
    """Write one tile into the tile cache, sealed (writer thread).

    Raises:
        CacheWriteError: the disk refused (read-only, full, ...).
    """
    try:
        disk.store(key, data, origin=origin)
    except OSError as exc:
        log.warning("cannot write %s: %s", disk.path_for(key), exc)
        raise CacheWriteError(f"cannot write the tile cache: {exc.strerror or exc}") from None


def _export(path: Path, data: bytes) -> None:
    """Write one tile into an export folder as plain image bytes (writer thread).

    Raises:
        CacheWriteError: the disk refused (read-only, full, ...).
    """
    try:
        write_atomic(path, data)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
        raise CacheWriteError(f"cannot write the export folder: {exc.strerror or exc}") from None


def _whole_file(path: Path) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


_ERRORS: dict[str, type[TileServerError]] = {
    cls.code: cls for cls in (SlideReadError, SlideOpenError, CacheWriteError, SlideNotFound)}


def raise_for(result: BatchResult, slide: str) -> None:
    """Raise the domain exception a failed batch reported (nothing if it succeeded)."""
    if result.error_code is not None:
        raise _ERRORS.get(result.error_code, TileServerError)(result.error or "", slide=slide)


# ---------------------------------------------------------------------------------------------
# Engines: where batches run.


class LocalPool:
    """Worker processes on this machine, each with an affinity for one band of blocks.

    One single-process ``ProcessPoolExecutor`` per worker ("spawn" start method: never fork a
    process that runs threads and an event loop), created on first use and kept for the life
    of the pool (the open slides and decoded tiles stay warm between slides and jobs).

    Args:
        workers: number of processes (>= 1).
        nice: niceness added to each process.
    """

    def __init__(self, workers: int, nice: int = 0):
        self.workers = max(1, workers)
        self.nice = nice
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._executors: list[ProcessPoolExecutor | None] = [None] * self.workers

    def _executor(self, index: int) -> ProcessPoolExecutor:
        executor = self._executors[index]
        if executor is None:
            executor = self._executors[index] = ProcessPoolExecutor(
                1, mp_context=self._context, initializer=_init_worker,
                initargs=(self.nice, self._stop))
        return executor

    def run(self, tasks: Sequence[BatchTask],
            cancel: threading.Event) -> Generator[BatchResult, None, None]:
        """Run the tasks; yield each result as it completes. On ``cancel`` (checked between
        results) queued tasks are dropped and the running ones stop after their current tile
        (a shared stop event), so an interrupted job ends within about a tile's time.

        Raises:
            TileServerError: a worker process died.
        """
        spans = split_contiguous([task.batch.count for task in tasks], self.workers)
        bands = [deque(range(start, end)) for start, end in spans]
        running: dict[Future[BatchResult], int] = {}
        queued = [0] * len(bands)

        def next_index(worker: int) -> int | None:
            if bands[worker]:
                return bands[worker].popleft()
            victim = max(bands, key=len)
            return victim.pop() if victim else None  # steal from the far end

        def feed(worker: int) -> None:
            while queued[worker] < IN_FLIGHT_PER_WORKER and not cancel.is_set():
                index = next_index(worker)
                if index is None:
                    return
                future = self._executor(worker).submit(render_batch, tasks[index])
                running[future] = worker
                queued[worker] += 1

        try:
            for worker in range(len(bands)):
                feed(worker)
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    worker = running.pop(future)
                    queued[worker] -= 1
                    yield future.result()
                    feed(worker)
        except BrokenProcessPool:
            raise TileServerError("a pregeneration worker process died") from None
        finally:
            for future in running:
                future.cancel()
            if running:
                self._stop.set()
            wait(running)
            self._stop.clear()

    def close(self) -> None:
        """Stop the worker processes (waits for running batches)."""
        for executor in self._executors:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        self._executors = [None] * self.workers


class DaskPool:
    """A Dask distributed cluster: each batch is one task (``distributed.Client.map``).

    Args:
        address: the scheduler, e.g. ``tcp://host:8786``.

    Raises:
        TileServerError: the scheduler cannot be reached.
    """

    def __init__(self, address: str):
        from distributed import Client

        try:
            self.client = Client(address, timeout=30, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise TileServerError(f"cannot reach the Dask scheduler {address}: {exc}") from None
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))

    def run(self, tasks: Sequence[BatchTask],
            cancel: threading.Event) -> Generator[BatchResult, None, None]:
        """Submit every task; yield results as they complete; cancel the rest on ``cancel``."""
        from distributed import as_completed

        futures = self.client.map(render_batch, list(tasks), pure=False)
        try:
            for future in as_completed(futures, loop=self.client.loop):
                yield future.result()
                if cancel.is_set():
                    break
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        """Disconnect from the scheduler (the cluster keeps running)."""
        self.client.close()


# ---------------------------------------------------------------------------------------------
# The driver.


@dataclass(frozen=True)
class SlideTarget:
    """One slide of a job: the file, its pyramid's ``(cols, rows)`` per DZI level, the DZI
    levels to render, and where (None: the tile cache; else an export ``{name}_files`` folder)."""

    entry: SlideEntry
    level_tiles: tuple[tuple[int, int], ...]
    levels: tuple[int, ...]
    output: Path | None = None

    @property
    def total(self) -> int:
        """Tiles in the selected levels."""
        return sum(self.level_tiles[level][0] * self.level_tiles[level][1]
                   for level in self.levels)


@dataclass
class Progress:
    """Counts of a running job, over all its slides.

    Attributes:
        slide: the slide being rendered.
        done: tiles rendered and written; skipped: tiles already there; total: all tiles.
        bytes: bytes written.
    """

    slide: str = ""
    done: int = 0
    skipped: int = 0
    total: int = 0
    bytes: int = 0

    @property
    def processed(self) -> int:
        """Tiles done or skipped."""
        return self.done + self.skipped


class Cancelled(Exception):
    """The job was cancelled before it finished."""


class Pregenerator:
    """Renders the pyramids of slides with an engine, reporting progress. Blocking: run it in
    the CLI's main thread or in a job thread of the server.

    Args:
        settings: the settings tiles are rendered with (the server's, for identical bytes).
        workers: local worker processes (default ``Pregeneration.Workers``, 0 = one per core).
        scheduler: a Dask scheduler address (default ``Pregeneration.Scheduler``); when set,
            batches run on that cluster instead of local processes.
    """

    def __init__(self, settings: Settings, workers: int | None = None,
                 scheduler: str | None = None):
        self.settings = settings
        self.settings_json = settings.model_dump_json()
        options = settings.Pregeneration
        self.scheduler = scheduler if scheduler is not None else options.Scheduler
        chosen = workers if workers is not None else options.Workers
        self.workers = chosen or default_workers()
        self._engine: LocalPool | DaskPool | None = None

    @property
    def engine(self) -> LocalPool | DaskPool:
        """The engine, created on first use."""
        if self._engine is None:
            if self.scheduler:
                self._engine = DaskPool(self.scheduler)
            else:
                self._engine = LocalPool(self.workers, self.settings.Pregeneration.Nice)
        return self._engine

    def tasks(self, target: SlideTarget, overwrite: bool) -> list[BatchTask]:
        """The batches of one slide as worker tasks, in walk order."""
        output = str(target.output) if target.output is not None else None
        return [BatchTask(self.settings_json, target.entry.name, str(target.entry.path), batch,
                          overwrite, output)
                for batch in plan_batches(target.level_tiles, target.levels)]

    def run(self, targets: Sequence[SlideTarget], overwrite: bool = False,
            cancel: threading.Event | None = None,
            on_progress: Callable[[Progress], None] | None = None,
            slide_errors: list[TileServerError] | None = None) -> Progress:
        """Render every target, one slide after the other.

        Before a slide, temporary files that killed writers left in its folder are deleted.

        Args:
            slide_errors: when given, a slide that cannot be opened or read is recorded here
                (its remaining batches dropped) and the next slide goes on; else it raises.

        Returns:
            The final counts.

        Raises:
            Cancelled: ``cancel`` was set (tiles written so far stay: they are whole).
            SlideOpenError, SlideReadError, CacheWriteError, TileServerError: the first error
                a batch met; the other batches are dropped.
        """
        cancel = cancel or threading.Event()
        progress = Progress(total=sum(target.total for target in targets))
        for target in targets:
            try:
                self._run_slide(target, overwrite, cancel, on_progress, progress)
            except (SlideOpenError, SlideReadError) as exc:
                if slide_errors is None:
                    raise
                slide_errors.append(exc)
        return progress

    def _run_slide(self, target: SlideTarget, overwrite: bool, cancel: threading.Event,
                   on_progress: Callable[[Progress], None] | None, progress: Progress) -> None:
        """One slide's batches; counts go into ``progress``."""
        if cancel.is_set():
            raise Cancelled()
        progress.slide = target.entry.name
        if on_progress is not None:
            on_progress(dataclasses.replace(progress))
        folder = (target.output if target.output is not None
                  else Path(self.settings.TileCachePath) / target.entry.name)
        if folder.is_dir():
            swept = sweep_temporary_files(folder)
            if swept:
                log.info("removed %d temporary file(s) of killed writers in %s", swept, folder)
        with closing(self.engine.run(self.tasks(target, overwrite), cancel)) as results:
            for result in results:
                progress.done += result.done
                progress.skipped += result.skipped
                progress.bytes += result.bytes
                raise_for(result, target.entry.name)
                if on_progress is not None:
                    on_progress(dataclasses.replace(progress))
        if cancel.is_set():
            raise Cancelled()

    def close(self) -> None:
        """Stop the engine's processes or disconnect from the cluster."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Pregenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_target(registry: SlideRegistry, name: str, levels: Sequence[int] | None,
                output: Path | None = None) -> SlideTarget:
    """Open a slide in this thread (no event loop) and describe its job.

    Raises:
        SlideNotFound, SlideOpenError: unknown or unopenable slide.
    """
    handle = registry.open_blocking(name)
    return target_for(handle.entry, handle.pyramid.level_tiles, levels, output)


def target_for(entry: SlideEntry, level_tiles: tuple[tuple[int, int], ...],
               levels: Sequence[int] | None, output: Path | None = None) -> SlideTarget:
    """The job of one slide: ``levels`` clipped to its pyramid (None: every level)."""
    return SlideTarget(entry, level_tiles, select_levels(levels, len(level_tiles)), output)
