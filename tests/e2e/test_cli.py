"""The `tileserver` command as users type it: settings items anywhere, --version, slide files
for pregenerate, progress bars, Ctrl-C, a verify against another file, the demo slide's first
run, and `serve --workers 2` logging its settings and its workers' lines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import __version__
from app.settings import default_render_threads
from tests.conftest import ROOT, start_server, stop_server
from tests.e2e.test_shared_state import metric

CLI = [sys.executable, "-m", "app.cli"]
DEADLINE = 300.0  # seconds a command may take on a loaded 2-core machine


def environment() -> dict[str, str]:
    """This environment without settings variables (``Section__Key``), with this checkout
    first on the path."""
    env = {k: v for k, v in os.environ.items() if "__" not in k}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=environment(), capture_output=True,
                          text=True, timeout=DEADLINE)


def default_sigint() -> None:
    """In the child before exec: SIGINT to its default action. A pytest started with SIGINT
    ignored (a background job of a non-interactive shell) would hand SIG_IGN on, and Python
    then never raises KeyboardInterrupt: the Ctrl-C tests would see no interruption."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args: str, cwd: Path, stderr: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], cwd=cwd, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=open(stderr, "wb"),
                            preexec_fn=default_sigint)


def wait_for(condition, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert process is None or process.poll() is None, f"exited before {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 1000x800 px Aperio SVS: DZI levels 0-10, 20 tiles at the top."""
    from app.tools.demo import write_aperio_svs

    return write_aperio_svs(tmp_path_factory.mktemp("tiny") / "tiny.svs", 1000, 800, seed=5)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another small slide (another size and seed than ``tiny``)."""
    from app.tools.demo import write_aperio_svs

    return write_aperio_svs(tmp_path_factory.mktemp("other") / "other.svs", 1200, 900, seed=6)


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"tileserver {__version__}\n")


def test_settings_items_stand_anywhere_on_every_command(tmp_path, tiny):
    cache = tmp_path / "cache"
    slide = [f"Images:0:Path={tiny}", "Images:0:Name=t"]
    done = run_cli("pregenerate", slide[0], "--levels", "0-8", slide[1], "--workers", "1",
                   f"TileCachePath={cache}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "t: " in done.stdout and (cache / "t").is_dir()

    out = tmp_path / "export"
    done = run_cli("export", f"TileCachePath={cache}", "t", "--levels", "0-8", str(out),
                   *slide, "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "t.dzi").is_file()

    done = run_cli("verify", *slide, "--sample", "2", f"TileCachePath={cache}", "--levels",
                   "9-10", "--json", "-", "--TileFormat:JpegQuality=80", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passed"] is True

    refused = run_cli("serve", "Audit:Enabled=true", "--port", "9", "TileFormat:JpegQuality=0",
                      cwd=tmp_path)
    assert refused.returncode == 2
    assert "TileFormat:JpegQuality = '0'" in refused.stderr  # parsed, not "unrecognized"


def test_pregenerate_takes_a_slide_file(tmp_path, tiny):
    demo = tmp_path / "demo"
    demo.mkdir()
    shutil.copy(tiny, demo / "demo.svs")  # nothing configured: the demo slide would be used
    cache = tmp_path / "cache"
    done = run_cli("pregenerate", str(tiny), f"TileCachePath={cache}", f"DemoDirectory={demo}",
                   "--levels", "0-9", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tiny: ")
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == ["tiny"]
    missing = run_cli("pregenerate", str(tmp_path / "nope.svs"), f"TileCachePath={cache}",
                      cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == f"tileserver: no slide named '{tmp_path / 'nope.svs'}' and no " \
                             "such file\n"


def test_pregenerate_all_labels_its_bar_all_slides(tmp_path, tiny, other):
    done = run_cli("pregenerate", "--all", "Images:0:Name=a", f"Images:0:Path={tiny}",
                   "Images:1:Name=b", f"Images:1:Path={other}",
                   f"TileCachePath={tmp_path / 'cache'}",
                   "--levels", "0-9", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bars = [line for line in done.stderr.splitlines() if "tiles/s" in line]
    assert bars and all(line.startswith("all slides ") for line in bars), done.stderr
    assert done.stdout.startswith("a, b: ")


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_pregenerate_promises_a_resume_only_without_overwrite(tmp_path,
                                                                          generated_svs,
                                                                          overwrite):
    cache = tmp_path / "cache"
    log = tmp_path / "stderr.txt"
    process = start_cli(
        "pregenerate", "Images:0:Name=g", f"Images:0:Path={generated_svs}",
        f"TileCachePath={cache}", "TileFormat:LosslessLevelCount=-1",
        "TileFormat:PngCompressLevel=12", "--workers", "1",
        *(["--overwrite"] if overwrite else []), cwd=tmp_path, stderr=log)
    wait_for(lambda: len(list(cache.rglob("*.png"))) >= 5, "the first tiles", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(DEADLINE) == 130, log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    assert last == "tileserver: interrupted; the tiles written so far are whole" + (
        "" if overwrite else ": run again to resume")


def test_verify_shows_a_progress_bar(tmp_path, tiny):
    done = run_cli("verify", f"Image:Path={tiny}", f"TileCachePath={tmp_path / 'cache'}",
                   "--sample", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    bars = [line for line in done.stderr.splitlines() if "tiles/s" in line]
    assert len(bars) == 1 and bars[0].startswith("image ") and "ETA" in bars[0], done.stderr
    assert "PASSED" in done.stdout


def test_verify_exits_130_on_ctrl_c(tmp_path, generated_svs):
    log = tmp_path / "stderr.txt"
    cache = tmp_path / "cache"
    process = start_cli("verify", f"Image:Path={generated_svs}", f"TileCachePath={cache}",
                        "--sample", "0", "--format", "png", cwd=tmp_path, stderr=log)
    wait_for(lambda: "serving 1 slide(s)" in log.read_text(), "the in-process app", process)
    # tiles are being checked: the in-process app has cached the first ones it served
    wait_for(lambda: len(list(cache.rglob("*.png"))) >= 5, "the first tiles", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(DEADLINE) == 130, log.read_text()
    text = log.read_text()
    assert text.strip().splitlines()[-1] == "tileserver verify: interrupted"
    assert "Traceback" not in text


def test_verify_stops_when_the_file_here_is_not_the_servers_slide(tmp_path, tiny, other):
    (tmp_path / "server").mkdir()
    here = tmp_path / "here"
    (here / "demo").mkdir(parents=True)
    shutil.copy(other, here / "demo" / "demo.svs")
    server = start_server(tmp_path / "server", {"TileCachePath": str(tmp_path / "cache"),
                                                "Image": {"Path": str(tiny)}})
    try:
        for args, path in (([f"Image:Path={other}"], other),  # configured here
                           (["DemoDirectory=demo"], Path("demo/demo.svs"))):  # nothing here
            done = run_cli("verify", "--url", server.base_url, *args, cwd=here)
            assert done.returncode == 2, done.stdout + done.stderr
            assert done.stderr.startswith(f"tileserver verify: slide 'image': {path} here is "
                                          "not the slide the server serves (quickhash ")
            assert "1200x900 px in 12 DZI levels here, 1000x800 px in 11 on the server)" \
                in done.stderr
            assert done.stderr.count("\n") == 1, done.stderr  # no announcement, no traceback
    finally:
        stop_server(server)


def test_first_run_says_it_writes_the_demo_slide(tmp_path, monkeypatch, capsys, caplog):
    from app import cli
    from app.tools import demo

    monkeypatch.setattr(demo, "DEMO_SIZE", (1000, 800))  # the real one takes half a minute
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    settings = cli.prepare_settings(None, ["DemoDirectory=d"], announce_demo=True)
    assert settings.Image.Path == "d/demo.svs"
    err = capsys.readouterr().err
    bar = [line for line in err.splitlines() if "tile rows/s" in line]
    assert len(bar) == 1 and bar[0].startswith("writing the demo slide "), err
    assert "5/5" in bar[0]  # 4 rows of level-0 tiles, then the rest
    assert caplog.messages == [
        "writing the demo slide d/demo.svs (1000x800 px; once, about half a minute)",
        caplog.messages[1], "no slide configured: serving the generated demo slide d/demo.svs"]
    assert caplog.messages[1].startswith("wrote the demo slide d/demo.svs in ")
    caplog.clear()
    cli.prepare_settings(None, ["DemoDirectory=d"])  # there now; not serve: no announcement
    assert caplog.messages == [] and capsys.readouterr().err == ""


def test_serve_with_workers_logs_changed_settings_and_worker_lines(tmp_path, tiny):
    cache = tmp_path / "cache"
    server = start_server(tmp_path, {"TileCachePath": str(cache),
                                     "Images": [{"Name": "t", "Path": str(tiny)}],
                                     "TileFormat": {"JpegQuality": 80}}, "--workers", "2")
    try:
        serving = "INFO app.server.app: serving 1 slide(s): t\n"
        wait_for(lambda: server.log.read_text().count(serving) == 2, "both workers")
        text = server.log.read_text()
        assert [line for line in text.splitlines() if "tileserver.settings" in line] == [
            "INFO tileserver.settings: Images:0:Name = t",
            f"INFO tileserver.settings: Images:0:Path = {tiny}",
            f"INFO tileserver.settings: TileCachePath = {cache}",
            "INFO tileserver.settings: TileFormat:JpegQuality = 80"]
        assert f"INFO tileserver: open {server.base_url}/ in a browser\n" in text
        # two render threads per core in all, not per worker (app.settings)
        threads = default_render_threads(2)
        assert threads == max(1, os.cpu_count() or 1)
        assert f"INFO tileserver: {threads} render threads in each of 2 worker process(es)\n" \
            in text
        metrics = server.get("/metrics").text
        assert metric(metrics, "tileserver_render_threads") == 2 * threads
        assert metric(metrics, "tileserver_render_queue_limit") == 2 * 8 * os.cpu_count()
    finally:
        stop_server(server)
