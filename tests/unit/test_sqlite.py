"""open_shared: SQLite files that several processes open at once (cache index, coordination)."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from app.core import sqlite as shared
from app.core.sqlite import open_shared


def _locked() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = sqlite3.SQLITE_BUSY
    return exc


class Stubborn(sqlite3.Connection):
    """Answers the switch to WAL "database is locked" a given number of times, as SQLite does
    while another process creates the database."""

    refusals = 0

    def execute(self, sql, *args):
        if sql == "PRAGMA journal_mode=WAL" and Stubborn.refusals > 0:
            Stubborn.refusals -= 1
            raise _locked()
        return super().execute(sql, *args)


def test_the_switch_to_wal_is_retried_until_the_busy_timeout(tmp_path, monkeypatch):
    connect = sqlite3.connect
    monkeypatch.setattr(shared.sqlite3, "connect",
                        lambda *a, **k: connect(*a, factory=Stubborn, **k))
    Stubborn.refusals = 3
    db = open_shared(tmp_path / "a.sqlite", 5.0)
    assert Stubborn.refusals == 0
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    db.close()
    Stubborn.refusals = 10**9  # locked for good: the error once the timeout has passed
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        open_shared(tmp_path / "b.sqlite", 0.2)


def _open_at_once(path: str, barrier, answers) -> None:
    barrier.wait()
    try:
        db = open_shared(path, 10.0)
        db.executescript("CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (1);")
        db.close()
        answers.put("ok")
    except Exception as exc:  # reported to the test
        answers.put(repr(exc))


def test_processes_that_create_one_database_at_once_all_open_it(tmp_path):
    """Six processes released together on a fresh file, ten times: every one opens it in WAL
    mode and writes (plain connect + PRAGMA failed about once in 200 such opens under load)."""
    context = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = str(tmp_path / f"{round_}.sqlite")
        barrier, answers = context.Barrier(6), context.Queue()
        racers = [context.Process(target=_open_at_once, args=(path, barrier, answers))
                  for _ in range(6)]
        for racer in racers:
            racer.start()
        results = [answers.get(timeout=30) for _ in racers]
        for racer in racers:
            racer.join(30)
        assert results == ["ok"] * 6, results
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM t").fetchone() == (6,)
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
