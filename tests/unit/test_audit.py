"""The audit log writer: several processes appending to one file, rotating it, losing nothing."""

import json
import multiprocessing
import time

import pytest

from app.cli import main
from app.server.audit import (
    FIELDS,
    GENESIS,
    AuditLog,
    Caller,
    TileRequestRecord,
    audit_files,
    verify_chain,
)
from app.settings import AuditSettings

LINES_PER_PROCESS = 3000


def record(seq: int) -> TileRequestRecord:
    return TileRequestRecord(
        time.time(), Caller("10.0.0.1", "anonymous", "none", f"/storage/s_files/12/{seq}_0.jpeg",
                            ()), "GET", "s", "quickhash-1:ab", 12, seq, 0, "jpeg", None,
        "image/webp", None, "png", True, None, "hit", 200, 1234, "0" * 64, 0.0004, None)


def writer(path: str, max_bytes: int, start) -> None:
    log = AuditLog(AuditSettings(Enabled=True, Path=path, MaxBytes=max_bytes, BackupCount=10000))
    log.open()
    start.wait()
    for seq in range(LINES_PER_PROCESS):
        log.record(record(seq))
        if seq % 500 == 0:
            time.sleep(0.001)  # let the writer thread run between bursts
    log.close()


@pytest.mark.e2e  # three writer processes
def test_processes_share_one_rotating_file_without_losing_or_mixing_lines(tmp_path):
    path = tmp_path / "audit" / "tiles.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=writer, args=(str(path), 64_000, start)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = audit_files(path)
    assert len(files) > 10  # ~1.5 MB through 64 kB files: rotated many times, by 3 processes
    by_pid: dict[int, list[int]] = {}
    for file in files:
        for line in file.read_text().splitlines():
            entry = json.loads(line)  # a torn or interleaved line would not parse
            by_pid.setdefault(entry["pid"], []).append(entry["col"])
    assert len(by_pid) == 3
    for seqs in by_pid.values():  # every line of every process, in its order
        assert seqs == list(range(LINES_PER_PROCESS))
    report = verify_chain([path])  # one hash chain through 3 processes and every rotation
    assert report.broken is None and report.lines == 3 * LINES_PER_PROCESS
    assert report.start == GENESIS


def test_line_format(tmp_path):
    log = AuditLog(AuditSettings(Enabled=True, Path=str(tmp_path / "a.jsonl")))
    log.open()
    log.record(record(7))
    log.close()
    log.close()  # idempotent
    line = json.loads((tmp_path / "a.jsonl").read_text())
    assert line["time"].endswith("Z") and len(line["time"]) == 27
    assert line["quickhash"] == "ab" and line["identity"] == "quickhash-1:ab"
    assert line["served"] == {"format": "png", "lossless": True, "override": None}
    assert line["duration_ms"] == 0.4 and log.written == 1


def test_a_full_disk_is_reported_and_never_blocks(caplog):
    log = AuditLog(AuditSettings(Enabled=True, Path="/dev/full", MaxBytes=0))  # ENOSPC
    log.open()
    for seq in range(3):
        log.record(record(seq))
    log.close()
    assert log.written == 0
    assert "cannot write (No space left on device)" in caplog.text
    assert "3 line(s) could not be written" in caplog.text


def test_lines_are_json_whatever_the_request_holds():
    odd = TileRequestRecord(
        1700000000.000123, Caller(None, "anonymous", "none",
                                  '/storage/a"b\\c\u00e9\u2603\ud800_files/1/0_0.jpeg', ()),
        "HEAD", 'a"b\\c\u00e9\u2603\ud800', None, None, None, None, None, "",
        "text/\x01\n\t", 'W/"x"', None, None, None, None, 400, None, None, 1e-7, "bad_request")
    line = odd.to_line(7)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    parsed = json.loads(line)
    assert list(parsed) == list(FIELDS)
    assert parsed["time"] == "2023-11-14T22:13:20.000123Z"
    assert (parsed["path"], parsed["slide"]) == (odd.caller.path, odd.slide)
    assert parsed["requested"] == {"extension": None, "format": "", "accept": "text/\x01\n\t",
                                   "if_none_match": 'W/"x"'}
    assert parsed["served"] is None and parsed["level"] is None and parsed["client"] is None
    assert parsed["duration_ms"] == 0.0 and parsed["error"] == "bad_request"


def write_log(path, lines: int, max_bytes: int) -> None:
    log = AuditLog(AuditSettings(Enabled=True, Path=str(path), MaxBytes=max_bytes,
                                 BackupCount=100))
    log.open()
    for seq in range(lines):
        log.record(record(seq))
    log.close()


def test_the_chain_reports_a_removed_or_edited_line(tmp_path, capsys):
    path = tmp_path / "tiles.jsonl"
    write_log(path, 40, 4000)
    files = audit_files(path)
    assert len(files) >= 3
    assert main(["audit", "verify", str(path)]) == 0
    assert "40 line(s)" in capsys.readouterr().out
    middle = files[1]
    lines = middle.read_bytes().splitlines(keepends=True)
    middle.write_bytes(b"".join(lines[:2] + lines[3:]))  # one line removed
    assert main(["audit", "verify", str(path)]) == 1
    assert f"BROKEN at {middle}:3" in capsys.readouterr().out
    middle.write_bytes(b"".join(lines))
    assert main(["audit", "verify", str(path)]) == 0
    edited = lines[1].replace(b'"status":200', b'"status":404')
    assert edited != lines[1]
    middle.write_bytes(b"".join([lines[0], edited, *lines[2:]]))
    report = verify_chain([path])
    assert report.broken is not None and report.broken[:2] == (str(middle), 3)
    assert main(["audit", "verify", str(files[0]), str(middle)]) == 1
    # a rotated file given alone is its own anchor (the log's path stands for the whole set)
    assert main(["audit", "verify", str(files[-2])]) == 0


def test_the_queue_is_bounded(tmp_path):
    log = AuditLog(AuditSettings(Enabled=True, Path="/dev/full", MaxBytes=0, QueueLines=16))
    log._queue.put(record(0))  # the writer thread is not started: nothing drains the queue
    accepted = [log.record(record(seq)) for seq in range(40)]
    assert accepted == [True] * 15 + [False] * 25
    assert not log.accepting and log.dropped == 25
