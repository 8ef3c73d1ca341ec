"""Bounded resources in one process: the render queue (503 + Retry-After, cache hits still
served, nothing rendered for clients that went) and the disk cache's size (eviction under the
watermarks, stale variants first, running jobs' slides kept, the override quota)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.cache.flight import ClientGone
from app.coordination import new_job
from app.core.planner import TileRequest
from tests.e2e.test_shared_state import metric
from tests.unit.test_nowait import file_system


class Gone:
    """A client that has hung up."""

    async def disconnected(self) -> None:
        return

    def gone(self) -> bool:
        return True


class Staying:
    """A client that waits as long as it takes."""

    async def disconnected(self) -> None:
        await asyncio.Event().wait()

    def gone(self) -> bool:
        return False


class HungUp(Staying):
    """A client whose connection the kernel reports closed while the event loop has not yet
    read its end (:meth:`GuardedProtocol.hung_up`)."""

    def gone(self) -> bool:
        return True


@pytest.fixture
def busy(client_for, quick_svs):
    """An app with one render thread and room for two tile loads, and ``hold()``, which keeps
    that thread busy until the event it returns is set."""
    client = client_for(Images=[{"Name": "g", "Path": str(quick_svs)}],
                        Server={"RenderThreads": 1, "MaxQueuedRenders": 2})
    tiles = client.app.state.services.tiles
    gates: list[threading.Event] = []

    def hold() -> threading.Event:
        gate = threading.Event()
        gates.append(gate)
        tiles._render_threads.submit(gate.wait)
        return gate

    yield client, tiles, hold
    for gate in gates:
        gate.set()


def fill_queue(client, tiles, hold) -> tuple[threading.Event, list]:
    """Hold the render thread and queue two cold tiles behind it: the queue is full.

    Returns:
        The gate that frees the thread, and the two waiting loads (futures of Tiles).
    """
    gate = hold()
    waiting = [client.portal.start_task_soon(
        lambda col=col: tiles.get_tile("g", 11, col, 0, TileRequest("jpeg"), client=Staying()))
        for col in range(2)]
    deadline = time.monotonic() + 5
    while tiles.queued < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return gate, waiting


def cached_files(cache, level: int, cols: range) -> list:
    return [p for col in cols for p in cache.glob(f"g/*/{level}/{col}_0.*")]


def test_clients_that_go_while_their_tiles_wait_get_nothing_rendered(busy, tmp_path):
    client, tiles, hold = busy
    gate = hold()

    async def gone(col: int) -> None:
        with pytest.raises(ClientGone):
            await tiles.get_tile("g", 11, col, 0, TileRequest("jpeg"), client=Gone())

    async def shared() -> bytes:
        # one tile, two clients: one goes, the other stays and gets it, rendered once
        stays = asyncio.ensure_future(tiles.get_tile("g", 11, 5, 0, TileRequest("jpeg"),
                                                     client=Staying()))
        with pytest.raises(ClientGone):
            await tiles.get_tile("g", 11, 5, 0, TileRequest("jpeg"), client=Gone())
        await asyncio.sleep(0)
        gate.set()
        return (await stays).data

    async def hung_up() -> None:
        # the loop has not seen this client go: the render thread sees it and renders nothing
        waiting = asyncio.ensure_future(tiles.get_tile("g", 11, 4, 1, TileRequest("jpeg"),
                                                       client=HungUp()))
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(ClientGone):
            await waiting

    client.portal.call(lambda: asyncio.gather(*(gone(col) for col in range(2))))
    assert tiles.queued == 0 and cached_files(tmp_path / "cache", 11, range(2)) == []
    data = client.portal.call(shared)
    assert data == client.get("/storage/g_files/11/5_0.jpeg").content
    gate = hold()
    client.portal.call(hung_up)
    assert list((tmp_path / "cache").glob("g/*/11/4_1.*")) == []
    text = client.get("/metrics").text
    assert metric(text, "tileserver_renders_abandoned_total") == 3
    assert metric(text, "tileserver_render_seconds_count") == 1


def test_an_iiif_region_is_not_rendered_for_a_client_that_hung_up(busy):
    client, tiles, _ = busy
    segments = ("7,9,301,203", "150,", "0", "default.png")

    async def region(who):
        return await tiles.get_region("g", segments, client=who)

    with pytest.raises(ClientGone):
        client.portal.call(region, HungUp())
    assert metric(client.get("/metrics").text, "tileserver_renders_abandoned_total") == 1
    assert client.portal.call(region, Staying()).data[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_render_that_ends_after_its_client_went_is_counted(busy):
    """The client is there when the render begins and gone when it ends: the tile is cached
    all the same, and tileserver_renders_unwanted_total says so."""
    client, tiles, _ = busy

    class Leaving(Staying):
        asked = 0

        def gone(self) -> bool:
            self.asked += 1
            return self.asked > 1  # there at the check before the render, gone after it

    leaving = Leaving()
    tile = client.portal.call(lambda: tiles.get_tile("g", 11, 3, 2, TileRequest("jpeg"),
                                                     client=leaving))
    assert tile.cache == "miss" and leaving.asked == 2
    text = client.get("/metrics").text
    assert metric(text, "tileserver_renders_unwanted_total") == 1
    assert metric(text, "tileserver_renders_abandoned_total") == 0
    again = client.get("/storage/g_files/11/3_2.jpeg")
    assert again.headers["x-tile-cache"] == "hit" and again.content == tile.data


def test_a_full_render_queue_refuses_cold_tiles_at_once_and_serves_cached_ones(busy):
    client, tiles, hold = busy
    assert client.get("/readyz").status_code == 200
    on_disk = client.get("/storage/g_files/9/0_0.jpeg")
    assert on_disk.status_code == 200
    tiles.memory.discard()  # only the disk cache has it now
    gate, waiting = fill_queue(client, tiles, hold)
    started = time.perf_counter()
    cold = client.get("/storage/g_files/11/3_0.jpeg")
    assert time.perf_counter() - started < 1.0
    assert cold.status_code == 503 and cold.headers["retry-after"] == "1"
    assert cold.json()["error"] == "overloaded" and cold.json()["slide"] == "g"
    # an IIIF region that is no tile is rendered by the same threads: refused the same way
    region = client.get("/iiif/3/g/7,9,301,203/150,/0/default.png")
    assert region.status_code == 503 and region.json()["error"] == "overloaded"
    hit = client.get("/storage/g_files/9/0_0.jpeg")
    assert hit.status_code == 200 and hit.headers["x-tile-cache"] == "hit"
    assert hit.content == on_disk.content
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"] == "load"
    assert client.get("/healthz").status_code == 200
    gate.set()
    assert [w.result(10).cache for w in waiting] == ["miss", "miss"]
    assert client.get("/readyz").status_code == 200
    assert metric(client.get("/metrics").text, "tileserver_renders_shed_total") == 2
    assert client.get("/iiif/3/g/7,9,301,203/150,/0/default.png").status_code == 200


def test_a_full_render_queue_serves_disk_cached_tiles_with_every_io_thread_busy(
        busy, tmp_path, monkeypatch):
    """Under load the I/O threads are taken too: a tile in the disk cache is read on the event
    loop (its file is in the page cache), by no thread at all, instead of being refused."""
    client, tiles, hold = busy
    on_disk = client.get("/storage/g_files/9/0_0.jpeg")
    assert on_disk.status_code == 200
    tiles.memory.discard()
    if file_system(tmp_path) != "tmpfs":  # tmpfs has no RWF_NOWAIT: a thread reads there
        def no_thread(key):
            raise AssertionError(f"{key} was read by a thread, not on the event loop")

        monkeypatch.setattr(tiles.disk, "read", no_thread)
    gate, waiting = fill_queue(client, tiles, hold)
    holders = [object() for _ in range(int(tiles.io_limiter.total_tokens))]
    for holder in holders:
        client.portal.call(tiles.io_limiter.acquire_on_behalf_of, holder)
    try:
        assert tiles.io_limiter.available_tokens == 0
        hit = client.get("/storage/g_files/9/0_0.jpeg")
        assert hit.status_code == 200 and hit.headers["x-tile-cache"] == "hit"
        assert hit.content == on_disk.content
        monkeypatch.undo()  # a cold tile's name is in no kernel cache: a thread looks it up
        assert client.get("/storage/g_files/11/3_0.jpeg").status_code == 503
    finally:
        for holder in holders:
            tiles.io_limiter.release_on_behalf_of(holder)
        gate.set()
    assert [w.result(10).cache for w in waiting] == ["miss", "miss"]


def test_the_disk_cache_settles_under_its_low_watermark(client_for, quick_svs, fixtures,
                                                        tmp_path):
    """Fill past the high watermark with a real slide while tiles are read back: the cache
    settles under the low watermark, stale variants go first, every read gets its whole tile,
    and the tiles of a slide whose job runs stay."""
    images = [{"Name": "g", "Path": str(quick_svs)},
              {"Name": "h", "Path": str(fixtures / "small.svs")}]
    limits = {"TileCacheMaxBytes": 300_000, "TileCacheHighWatermark": 0.8,
              "TileCacheLowWatermark": 0.5}
    client = client_for(Images=images, **limits)
    services = client.app.state.services
    tiles, store = services.tiles, services.store
    h_tiles = [f"/storage/h_files/{level}/0_0.jpeg" for level in range(5)]
    for url in h_tiles:
        assert client.get(url).status_code == 200
    job = new_job(["h"], None, False, "test")  # a job that runs (claimed by another owner)
    client.portal.call(store.submit, job)
    assert client.portal.call(store.claim, "elsewhere")["id"] == job["id"]
    # stale tiles: those of an older quality, written last (the most recently used)
    older = client_for(Images=images, TileFormat={"JpegQuality": 50}, **limits)
    for col in range(6):
        assert older.get(f"/storage/g_files/11/{col}_0.jpeg").status_code == 200
    first: dict[str, bytes] = {}
    urls = [f"/storage/g_files/{level}/{col}_{row}.jpeg" for level in (10, 11)
            for col in range(6) for row in range(5)
            if level == 11 or (col < 3 and row < 3)]
    for url in urls:
        first[url] = client.get(url).content
    stats = client.get("/api/tiles/stats").json()
    assert stats["usedBytes"] > stats["highWatermarkBytes"] == 240_000, stats
    assert stats["staleTiles"] == 6

    def read_back() -> list[bool]:
        return [client.get(url).content == data for url, data in first.items()]

    with ThreadPoolExecutor(1) as pool:  # tiles read while they are evicted
        reads = pool.submit(read_back)
        removed = client.portal.call(tiles.evictor.run_once)
        assert all(reads.result())
    stats = client.get("/api/tiles/stats").json()
    assert removed > 0 and stats["evictedTiles"] >= removed - stats["staleTiles"] - 6
    assert stats["usedBytes"] <= stats["lowWatermarkBytes"] == 150_000, stats
    assert stats["staleTiles"] == 0  # the stale variant went first, although used last
    assert all(client.get(url).headers["x-tile-cache"] == "hit" for url in h_tiles)
    h_files = list((tmp_path / "cache" / "h").rglob("*_0.*"))
    assert len(h_files) == len(h_tiles)  # the running job's slide kept every tile
    text = client.get("/metrics").text
    assert metric(text, "tileserver_cache_evictions_total") == stats["evictedTiles"]
    assert metric(text, "tileserver_cache_limit_bytes") == 300_000


def test_format_overrides_have_a_quota_per_slide(client_for, quick_svs, tmp_path):
    client = client_for(Images=[{"Name": "g", "Path": str(quick_svs)}],
                        TileFormat={"OverrideCacheBytes": 40_000}, TileCacheMaxBytes=0)
    tiles = client.app.state.services.tiles
    policy = [f"/storage/g_files/11/{col}_0.jpeg" for col in range(6)]
    for url in policy:
        assert client.get(url).status_code == 200
    for col in range(6):
        for row in range(3):
            r = client.get(f"/storage/g_files/11/{col}_{row}.jpeg?format=png")
            assert r.headers["content-type"] == "image/png"
    assert client.portal.call(tiles.evictor.run_once) > 0
    png = sum(p.stat().st_size for p in (tmp_path / "cache" / "g").rglob("11/*.png"))
    assert 0 < png <= 40_000 * 0.85
    assert len(list((tmp_path / "cache" / "g").rglob("11/*.jpeg"))) == len(policy)
    assert client.get("/api/tiles/stats").json()["limitBytes"] == 0
