"""Start a server process, wait until it answers, account its CPU time, stop it.

One helper for everything that runs a server as a separate process: the end-to-end tests
(``tests/conftest.py``) and the benchmarks (``bench/servers.py``: ``tileserver serve``, the
openslide deepzoom baseline under gunicorn, iipsrv behind nginx).

A :class:`ServerProcess` starts its command in a new session, so that the command and every
process it forks (uvicorn or gunicorn workers, FastCGI backends) share one process group: the
group's CPU time is measured, and stopping signals the whole group, so that no worker outlives
the test or benchmark that started it. Linux only (``/proc``, process groups).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 60.0
"""Seconds :meth:`ServerProcess.start` waits for the first 200 answer by default."""
STOP_GRACE = 10.0
"""Seconds :meth:`ServerProcess.stop` leaves the group between SIGTERM and SIGKILL by default."""

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """The server exited, or did not answer, before it was ready; the message ends with the tail
    of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus every variable the tile server would read as a setting
    (first ``__`` segment a top-level appsettings key, any case: ``TileCachePath``,
    ``Image__Path``), with ``PYTHONUNBUFFERED=1`` (the log file shows output as it happens) and
    ``extra`` on top."""
    from app.settings import Settings

    keys = {name.lower() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.split("__")[0].lower() not in keys}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def serve_argv(port: int, config: Path | str | None = None, *args: str,
               prefix: Sequence[str] = ()) -> list[str]:
    """The command of ``tileserver serve`` on ``127.0.0.1:port`` with this Python interpreter.

    Args:
        port: TCP port to listen on (e.g. from :func:`free_port`).
        config: an appsettings JSON file (``--config``), or None.
        args: further ``serve`` arguments (``--workers 2``, ``Section:Key=value``).
        prefix: a command put in front (e.g. ``unshare -rm sh -c ...``).
    """
    argv = [*prefix, sys.executable, "-m", "app.cli", "serve", "--host", LOOPBACK,
            "--port", str(port)]
    if config is not None:
        argv += ["--config", str(config)]
    return [*argv, *args]


def _group_members(pgid: int) -> Iterator[list[str]]:
    """The ``/proc/PID/stat`` fields from "state" (field 3) on of every process in group
    ``pgid`` (zombies included); processes that vanish while the folder is read are left out."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # pgrp is field 5
            yield fields


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (``/proc``);
    processes that have exited are not counted."""
    ticks = sum(int(fields[11]) + int(fields[12])  # utime, stime: fields 14, 15
                for fields in _group_members(pgid))
    return ticks / _CLK_TCK


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: they have exited
    and hold no port or file, and an orphan's zombie (e.g. multiprocessing's resource tracker,
    reparented when the server exits) waits for init to reap it, which may take seconds."""
    return any(fields[0] not in ("Z", "X") for fields in _group_members(pgid))


class ServerProcess:
    """A server command in its own process group, its output (stdout and stderr) in a log file.

    ``with ServerProcess(...) as server:`` starts it, waits until it is ready and stops the
    whole group on exit; :meth:`start` and :meth:`stop` do the same by hand.

    Args:
        argv: the command (e.g. :func:`serve_argv`).
        port: the TCP port it listens on at 127.0.0.1; readiness is polled there.
        log_path: file that receives stdout and stderr (truncated at start).
        env: the environment (default: this process's, unchanged; see :func:`server_env`).
        cwd: working directory (default: this process's).
        name: what error messages call it (default: ``argv[0]``).
        ready_path: path that must answer 200 before the server counts as ready.
        ready_timeout: seconds to wait for that answer.
    """

    def __init__(self, argv: Sequence[str], port: int, log_path: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                 name: str | None = None, ready_path: str = "/healthz",
                 ready_timeout: float = READY_TIMEOUT) -> None:
        self.argv = list(argv)
        self.port = port
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        """The process while it runs (the leader of its group); None before start and after
        stop."""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> ServerProcess:
        """Start the command in a new session and wait until ``ready_path`` answers 200.

        Returns:
            self, running.

        Raises:
            ServerStartError: it exited, or did not answer 200 within ``ready_timeout``
                seconds; the group is stopped first and the message ends with the log's tail.
            OSError: the command could not be started.
        """
        with self.log_path.open("wb") as log:
            self.process = process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(process)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while True:
                if process.poll() is not None:
                    raise ServerStartError(
                        f"{self.name} exited with {process.returncode} before it was "
                        f"ready:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.ready_path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{self.name} did not answer {self.ready_path} with 200 within "
                        f"{self.ready_timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.02)  # a refused connection costs next to nothing

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:{port}``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the command, which is also its process group id; None unless
        running."""
        return self.process.pid if self.process else None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the group's live processes (0.0 unless
        running)."""
        return group_cpu_seconds(self.process.pid) if self.process else 0.0

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log (``(no log)`` if it cannot be read)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the process group, SIGKILL what is left of it after ``grace`` seconds, and
        reap the command; does nothing unless running, so it may be called twice."""
        proc = self.process
        if proc is None:
            return
        self.process = None
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if proc.poll() is not None and not group_alive(proc.pid):
                    return
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)



def nginx_config(prefix: Path, port: int, upstreams: str, server: str) -> Path:
    """Write ``{prefix}/nginx.conf`` for nginx run in the foreground with everything (pid,
    error log, temporary files) in ``prefix``: ``upstreams`` (upstream blocks) and one server
    on 127.0.0.1:``port`` whose body is ``server`` (locations, includes). Returns the file, for
    ``nginx -p PREFIX -c FILE``."""
    path = prefix / "nginx.conf"
    path.write_text(f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}; fastcgi_temp_path {prefix}; proxy_temp_path {prefix};
  uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
  {upstreams}
  server {{
    listen 127.0.0.1:{port};
    {server}
  }}
}}
""")
    return path
