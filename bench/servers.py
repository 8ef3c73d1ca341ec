"""The servers ``make bench`` measures, each a :class:`~app.tools.launch.ServerProcess` on a
free loopback port with its log in the run's folder: ours (``tileserver serve``), openslide's
deepzoom_server under gunicorn, iipsrv behind nginx; and the machine's CPU time.

Every builder returns a server that is not started yet: ``with server:`` starts it in its own
process group, waits until it answers, and stops the whole group on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.settings import ENVIRONMENT_VARIABLE
from app.tools.launch import ServerProcess, free_port, nginx_config, serve_argv, server_env
from bench import ROOT, BenchError
from bench.slide import SLIDE_NAME

BIN = Path(sys.executable).parent
READY_TIMEOUT = 90.0
"""Seconds a server may take to answer its first request (the baseline opens the slide)."""
IIPSRV = Path("/usr/lib/iipimage-server/iipsrv.fcgi")
# Two single-threaded FastCGI processes per core behind one nginx served more tiles/s than one
# per core on 2 cores (make bench --scenarios iipsrv; figures in docs/benchmarks.md).
IIPSRV_PROCESSES = 4

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds (all cores, everything but idle and iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _CLK_TCK


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """:func:`~app.tools.launch.server_env` in the Production environment, plus ``extra``."""
    return server_env({ENVIRONMENT_VARIABLE: "Production", **(extra or {})})


def _server(name: str, argv: list[str], port: int, workdir: Path, tag: str,
            env: dict[str, str], ready_path: str = "/healthz") -> ServerProcess:
    return ServerProcess(argv, port, workdir / f"server-{tag}.log", env=env, cwd=ROOT,
                         name=f"{name} ({tag})", ready_path=ready_path,
                         ready_timeout=READY_TIMEOUT)


def ours(slide: Path, workdir: Path, cache: Path, workers: int, tag: str,
         settings: dict[str, Any] | None = None) -> ServerProcess:
    """``tileserver serve --workers {workers}`` on a free port (not started) with ``cache`` as
    its TileCachePath and ``settings`` added to its appsettings."""
    config = workdir / f"config-{tag}.json"
    config.write_text(json.dumps({
        "Images": [{"Name": SLIDE_NAME, "Path": str(slide)}],
        "TileCachePath": str(cache),
        **(settings or {}),
    }, indent=2))
    port = free_port()
    argv = serve_argv(port, config, "--workers", str(workers))
    return _server("tileserver", argv, port, workdir, tag, _env())


def baseline(slide: Path, workdir: Path, tag: str) -> ServerProcess:
    """openslide's deepzoom_server.py equivalent under gunicorn, 2 workers x 4 threads (not
    started; ready once ``/slide.dzi`` answers)."""
    port = free_port()
    argv = [str(BIN / "gunicorn"), "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{port}",
            "bench.baseline_server:app"]
    return _server("baseline", argv, port, workdir, tag, _env({"BENCH_SLIDE": str(slide)}),
                   ready_path="/slide.dzi")


def iipsrv(slide: Path, workdir: Path, tag: str) -> ServerProcess:
    """iipsrv (Debian ``iipimage-server``), FastCGI behind nginx, as it is deployed:
    two single-threaded ``iipsrv.fcgi --bind`` processes per core, nginx upstream over them,
    JPEG quality 90, its tile cache off (``MAX_IMAGE_CACHE_SIZE=0``). One process group.

    No FastCGI keep-alive: an iipsrv process serves one connection at a time, so a connection
    nginx keeps idle would hold a process hostage (measured: p99 of 8 s with it).

    Raises:
        BenchError: iipsrv or nginx is not installed.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not (IIPSRV.exists() and Path(nginx).exists()):
        raise BenchError("iipsrv or nginx is not installed: "
                         "apt-get install iipimage-server nginx (Debian)")
    port = free_port()
    backends = [free_port() for _ in range(IIPSRV_PROCESSES)]
    prefix = Path(tempfile.mkdtemp(prefix=f"nginx-{tag}-", dir=workdir))  # one per run
    upstream = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    conf = nginx_config(prefix, port, f"upstream iip {{ {upstream} }}", """
    location = /healthz { return 200 "ok"; }
    location /fcgi-bin/iipsrv.fcgi {
      fastcgi_pass iip; include /etc/nginx/fastcgi_params;
    }""")
    script = " ".join(f"{IIPSRV} --bind 127.0.0.1:{p} &" for p in backends)
    script += f" exec {nginx} -p {prefix} -c {conf}"
    env = _env({"FILESYSTEM_PREFIX": f"{slide.parent}/", "JPEG_QUALITY": "90",
                "MAX_IMAGE_CACHE_SIZE": "0", "VERBOSITY": "0"})
    return _server("iipsrv", ["sh", "-c", script], port, workdir, tag, env)
