"""Shared fixtures: real OpenSlide fixtures, a generated Aperio SVS, apps and a live server."""

from __future__ import annotations

import ctypes
import io
import json
import mmap
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.server.app import create_app
from app.settings import settings_from
from app.tools.launch import ServerProcess, free_port, serve_argv, server_env

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "openslide"
FIXTURE_FILES = ("boxes.tiff", "boxes.png", "boxes-no-icc.png", "boxes_0.dcm", "boxes_1.dcm",
                 "small.svs", "unopenable.tiff", "unreadable.svs")
E2E = ROOT / "tests" / "e2e"


def pytest_collection_modifyitems(config, items) -> None:
    """Mark as ``e2e`` every test under ``tests/e2e/`` and every test that uses the
    ``live_server`` fixture; tests elsewhere that start processes carry the marker themselves.
    ``pytest -m "not e2e"`` is then the quick loop (markers: pyproject.toml)."""
    for item in items:
        if E2E in item.path.parents or "live_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """``tests/fixtures/openslide``: the OpenSlide test suite's real slides (README there).

    They live in the repository, so a missing folder is a broken checkout: fail, never skip.
    """
    missing = [name for name in FIXTURE_FILES if not (FIXTURES / name).is_file()]
    if missing:
        pytest.fail(f"{FIXTURES} lacks {', '.join(missing)}: the repository ships them",
                    pytrace=False)
    return FIXTURES


@pytest.fixture(scope="session")
def generated_svs(tmp_path_factory) -> Path:
    """A generated Aperio SVS: 3 levels, 240 px JPEG tiles sharing JPEGTables, YCbCr."""
    from app.tools.demo import write_aperio_svs

    path = tmp_path_factory.mktemp("slides") / "generated.svs"
    return write_aperio_svs(path, 5000, 3800, seed=3)


@pytest.fixture(scope="session")
def quick_svs(tmp_path_factory) -> Path:
    """A smaller generated Aperio SVS for tests that render or compare every tile of a pyramid:
    3000x2200, 2 stored levels (3000x2200, 750x550) like ``generated_svs``, 13 DZI levels
    (0..12) of 160 tiles at 254 px, the top one 12x9 tiles."""
    from app.tools.demo import write_aperio_svs

    path = tmp_path_factory.mktemp("slides") / "quick.svs"
    return write_aperio_svs(path, 3000, 2200, seed=3)


@pytest.fixture
def client_for(tmp_path) -> Iterator:
    """``client_for(**appsettings) -> TestClient`` of a fresh app (lifespan run)."""
    clients: list[TestClient] = []

    def build(**sections) -> TestClient:
        sections.setdefault("TileCachePath", str(tmp_path / "cache"))
        client = local_client(create_app(settings_from(sections)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def local_client(app, **kwargs) -> TestClient:
    """A TestClient that counts as local (app.server.auth): a loopback client address and
    Host, as a browser on the server's machine has; with ``Auth:Mode none`` it reaches the
    admin routes."""
    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000), **kwargs)


def decode(data: bytes) -> np.ndarray:
    """Tile bytes -> RGB pixel array (height, width, 3) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def cached_pages(path: Path, offset: int = 0, count: int | None = None) -> int:
    """How many pages of ``path``'s bytes ``[offset, offset + count)`` (default: all) are in
    the page cache, by ``mincore(2)`` on a mapping of them: unlike a ``RWF_NOWAIT`` read, it
    starts no readahead."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    start = offset // page * page
    with open(path, "rb") as file:
        end = os.fstat(file.fileno()).st_size if count is None else offset + count
        length = end - start
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), start)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            resident = ctypes.create_string_buffer((length + page - 1) // page)
            assert libc.mincore(address, length, resident) == 0, os.strerror(ctypes.get_errno())
            return sum(byte & 1 for byte in resident.raw)
        finally:
            libc.munmap(address, length)


def drop_page_cache(path: Path, offset: int = 0, count: int | None = None) -> None:
    """Drop ``path``'s bytes ``[offset, offset + count)`` (default: all) from the page cache,
    and return once :func:`cached_pages` finds none of them there.

    ``POSIX_FADV_DONTNEED`` is advice: a page the kernel holds elsewhere at that moment (under
    readahead, in a per-CPU batch of another core) stays cached, so it is repeated, for at
    most 2 seconds.

    Raises:
        AssertionError: some pages were still cached after 2 seconds.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages must be clean to be dropped
        deadline = time.monotonic() + 2
        while True:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not cached_pages(path, offset, count):
                return
            assert time.monotonic() < deadline, f"{path.name} stays in the page cache"
            time.sleep(0.01)
    finally:
        os.close(fd)


@dataclass
class LiveServer:
    """A ``tileserver serve`` process under uvicorn on a loopback port."""

    base_url: str
    slide_names: list[str]
    process: subprocess.Popen
    cache: Path
    log: Path
    launched: ServerProcess
    extra: dict = field(default_factory=dict)

    def get(self, path: str, **kwargs) -> httpx.Response:
        """GET a path of the server."""
        return httpx.get(self.base_url + path, timeout=30, **kwargs)


def start_server(tmp: Path, settings: dict, *args: str, env: dict | None = None,
                 prefix: tuple[str, ...] = ()) -> LiveServer:
    """Start ``tileserver serve`` with an appsettings file in its own process group; wait until
    /healthz answers (60 s, else :class:`~app.tools.launch.ServerStartError` with the log's
    tail). ``prefix`` goes in front of the command (e.g. ``unshare ...``)."""
    config = tmp / "appsettings.json"
    config.write_text(json.dumps(settings))
    port = free_port()
    log = tmp / "server.log"
    launched = ServerProcess(serve_argv(port, config, *args, prefix=prefix), port, log,
                             env=server_env(env), cwd=tmp, name="tileserver serve").start()
    names = [item["Name"] for item in settings.get("Images", [])]
    return LiveServer(launched.base_url, names, launched.process, Path(settings.get(
        "TileCachePath", "")), log, launched)


def stop_server(server: LiveServer) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL after 10 s)."""
    server.launched.stop()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, generated_svs, fixtures) -> Iterator[LiveServer]:
    """A real server (uvicorn, 2 workers) serving the generated SVS and real fixtures."""
    tmp = tmp_path_factory.mktemp("live")
    settings = {
        "TileCachePath": str(tmp / "cache"),
        "Images": [
            {"Name": "generated", "Path": str(generated_svs)},
            {"Name": "boxes", "Path": str(fixtures / "boxes.tiff")},
            {"Name": "small", "Path": str(fixtures / "small.svs")},
            {"Name": "unreadable", "Path": str(fixtures / "unreadable.svs")},
        ],
    }
    server = start_server(tmp, settings, "--workers", "2")
    yield server
    stop_server(server)
