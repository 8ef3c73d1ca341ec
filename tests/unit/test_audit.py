"""The audit log writer: several processes appending to one file, rotating it, losing nothing."""

import json
import multiprocessing
import time

import pytest

from app.server.audit import FIELDS, AuditLog, Caller, TileRequestRecord, audit_files
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
