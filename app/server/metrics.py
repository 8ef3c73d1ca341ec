"""Prometheus metrics: what every process counts, and ``GET /metrics`` adding them up.

``tileserver serve`` runs prometheus-client in its multiprocess mode: it points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh, emptied folder before uvicorn starts its workers
(:func:`app.server.multiprocess.prepare_multiprocess_directory`), every worker writes its
counters, histograms and gauges to memory-mapped files there, and whichever worker answers
``/metrics`` adds up all of them
(``prometheus_client.multiprocess.MultiProcessCollector``). A worker that stops marks its live
gauges dead (``mark_process_dead``). Without the variable (an app built in-process, as the tests
do) each app counts in a registry of its own.

Figures that are facts of shared state are read when scraped, not counted: the disk cache's
bytes, tiles and evictions (the cache index), its limit, and the jobs by state (the coordination
store), so every process reports the same numbers.

Metrics (all prefixed ``tileserver_``): ``tile_requests_total`` (format, lossless, cache, source,
status), ``tile_response_seconds`` and ``render_seconds`` (histograms), ``renders_shed_total``
(503 with Retry-After), ``renders_abandoned_total`` (clients gone before their render),
``renders_unwanted_total`` (renders that ended after every client had gone),
``cache_corrupt_total``, ``render_queue`` (tile loads in flight, summed over live processes),
``audit_queue`` (audit lines waiting for the writer), ``cache_bytes``, ``cache_tiles``,
``cache_limit_bytes``, ``cache_evictions_total``, ``jobs`` (state).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from app.cache.tiles import TileEvents
from app.server.multiprocess import MULTIPROCESS_ENV

if TYPE_CHECKING:
    from app.server.dependencies import Services

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE_SECONDS = 0.25
"""How often each process writes its queue gauges."""
RESPONSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
RENDER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess() -> bool:
    """Whether this process counts in multiprocess mode (the variable is set)."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class Metrics(TileEvents):
    """This process's metrics (see the module docstring); also the tile service's
    :class:`~app.cache.tiles.TileEvents` observer."""

    def __init__(self) -> None:
        self.shared = multiprocess()
        # in multiprocess mode values live in the folder's files: no registry holds them
        self.registry = None if self.shared else CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "tileserver_tile_requests", "Tile requests answered.",
            ("format", "lossless", "cache", "source", "status"), registry=registry)
        self.response = Histogram(
            "tileserver_tile_response_seconds", "Time from a tile request to its response.",
            ("cache",), buckets=RESPONSE_BUCKETS, registry=registry)
        self.render = Histogram(
            "tileserver_render_seconds", "Time to render and encode one tile.",
            buckets=RENDER_BUCKETS, registry=registry)
        self.shed_count = Counter(
            "tileserver_renders_shed", "Tile requests refused with 503 (render queue full).",
            registry=registry)
        self.abandoned_count = Counter(
            "tileserver_renders_abandoned",
            "Tile loads dropped before their render: every client had gone.",
            registry=registry)
        self.unwanted_count = Counter(
            "tileserver_renders_unwanted",
            "Renders that ended after every client that asked for the tile had gone (each "
            "began while one was there; the tile is cached all the same).",
            registry=registry)
        self.corrupt_count = Counter(
            "tileserver_cache_corrupt", "Corrupt disk-cache files found (rendered again).",
            registry=registry)
        self.queue = Gauge("tileserver_render_queue", "Tile loads in flight.",
                           registry=registry, multiprocess_mode="livesum")
        self.queue_limit = Gauge(
            "tileserver_render_queue_limit",
            "Tile loads that may be in flight before cold tiles answer 503.",
            registry=registry, multiprocess_mode="livesum")
        self.render_threads = Gauge("tileserver_render_threads", "Render threads.",
                                    registry=registry, multiprocess_mode="livesum")
        self.audit_queue = Gauge("tileserver_audit_queue",
                                 "Audit lines waiting for the writer thread.",
                                 registry=registry, multiprocess_mode="livesum")
        self._children: dict[tuple[str, bool, str, str, int], Any] = {}
        self._responses: dict[str, Any] = {}

    # ---------------------------------------------------------------- TileEvents

    def rendered(self, seconds: float) -> None:
        """A render took ``seconds``."""
        self.render.observe(seconds)

    def shed(self) -> None:
        """A 503."""
        self.shed_count.inc()

    def abandoned(self) -> None:
        """A load dropped for clients that went."""
        self.abandoned_count.inc()

    def unwanted(self) -> None:
        """A render ended for nobody."""
        self.unwanted_count.inc()

    def corrupt(self) -> None:
        """A corrupt cache file."""
        self.corrupt_count.inc()

    # ---------------------------------------------------------------- requests

    def tile(self, fmt: str, lossless: bool, cache: str, source: str, status: int,
             seconds: float) -> None:
        """Count one tile response (``fmt`` etc. empty strings for errors)."""
        key = (fmt, lossless, cache, source, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(
                fmt, "true" if lossless else "false", cache, source, str(status))
        child.inc()
        response = self._responses.get(cache)
        if response is None:
            response = self._responses[cache] = self.response.labels(cache)
        response.observe(seconds)

    # ---------------------------------------------------------------- lifetime

    def sample(self, services: Services) -> None:
        """Write this process's gauges: its render queue, its bound, its render threads and
        its audit queue."""
        tiles = services.tiles
        self.queue.set(tiles.queued)
        self.queue_limit.set(tiles.max_queued)
        self.render_threads.set(tiles.render_threads)
        audit = services.audit
        self.audit_queue.set(audit.pending if audit is not None else 0)

    def close(self) -> None:
        """This process stops: its live gauges no longer count."""
        if self.shared:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    # ---------------------------------------------------------------- exposition

    async def exposition(self, services: Services) -> bytes:
        """The text exposition of every process's metrics plus the shared facts. Reads the
        cache index and the multiprocess files in a worker thread."""
        import anyio

        self.sample(services)
        jobs = await services.jobs.all()
        tiles = services.tiles
        index = tiles.disk.index
        usage = (await anyio.to_thread.run_sync(index.usage, limiter=tiles.io_limiter)
                 if index is not None else None)
        facts = _Facts(jobs, usage, tiles.evictor.limit if tiles.evictor else 0)
        return await anyio.to_thread.run_sync(self._generate, facts)

    def _generate(self, facts: _Facts) -> bytes:
        registry = CollectorRegistry(auto_describe=True)
        if self.shared:
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            assert self.registry is not None
            registry.register(_Forward(self.registry))
        registry.register(facts)
        return generate_latest(registry)


class _Forward:
    """A collector that yields another registry's metrics (this app's, in-process)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


class _Facts:
    """Shared facts read at scrape time: the disk cache and the jobs."""

    STATES = ("queued", "running", "succeeded", "failed", "cancelled")

    def __init__(self, jobs: list[dict[str, Any]], usage: Any, limit: int):
        self.jobs = jobs
        self.usage = usage
        self.limit = limit

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("tileserver_jobs", "Pregeneration jobs kept, by state.",
                                   labels=["state"])
        for state in self.STATES:
            states.add_metric([state], sum(1 for job in self.jobs if job["state"] == state))
        yield states
        if self.usage is not None:
            yield GaugeMetricFamily("tileserver_cache_bytes",
                                    "Bytes of the disk cache (tiles and seals).",
                                    value=self.usage.bytes)
            yield GaugeMetricFamily("tileserver_cache_tiles", "Tile files in the disk cache.",
                                    value=self.usage.tiles)
            yield CounterMetricFamily("tileserver_cache_evictions",
                                      "Tile files evicted from the disk cache.",
                                      value=self.usage.evicted)
        yield GaugeMetricFamily("tileserver_cache_limit_bytes",
                                "TileCacheMaxBytes in force (0: no limit).", value=self.limit)
        yield GaugeMetricFamily("tileserver_scrape_timestamp_seconds",
                                "When these figures were read.", value=time.time())
