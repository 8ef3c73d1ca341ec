"""Refusals under load: Retry-After spread over the time the renders need (RetryPacer), and
render threads below the event loop (lower_thread_priority)."""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from app.cache.tiles import RETRY_AFTER_MAX_SECONDS, RetryPacer, lower_thread_priority


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_few_refusals_are_told_one_second():
    clock = Clock()
    pacer = RetryPacer(clock, random.Random(1))
    assert [pacer.refused() for _ in range(5)] == [1] * 5  # nothing known of the last second
    for _ in range(20):
        pacer.rendered()
    clock.now += 1
    assert {pacer.refused() for _ in range(50)} == {1}  # 5 refused, 20 rendered


def test_many_refusals_are_spread_over_the_seconds_the_renders_need():
    clock = Clock()
    pacer = RetryPacer(clock, random.Random(2))
    for _ in range(1000):
        pacer.refused()
    for _ in range(200):
        pacer.rendered()
    clock.now += 1.0
    waits = [pacer.refused() for _ in range(2000)]
    assert set(waits) == {1, 2, 3, 4, 5}  # 1000 refused / 200 rendered: spread over 5 s
    assert all(300 < waits.count(w) < 500 for w in range(1, 6))
    clock.now += 1.0  # the last second: 2000 refused, nothing rendered
    assert max(pacer.refused() for _ in range(2000)) == RETRY_AFTER_MAX_SECONDS
    clock.now += 5.0  # a quiet gap: what happened seconds ago no longer counts
    assert pacer.refused() == 1


def _nice(thread_id: int) -> int:
    """A thread's niceness from /proc (field 19 of stat, after the command name)."""
    stat = open(f"/proc/self/task/{thread_id}/stat").read()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_render_threads_run_below_the_event_loop():
    ids: list[int] = []
    with ThreadPoolExecutor(max_workers=2, initializer=lower_thread_priority,
                            initargs=(10,)) as pool:
        for future in [pool.submit(threading.get_native_id) for _ in range(4)]:
            ids.append(future.result())
        base = _nice(threading.get_native_id())
        assert {_nice(tid) for tid in ids} == {min(19, base + 10)}
    assert _nice(threading.get_native_id()) == base == os.getpriority(os.PRIO_PROCESS, 0)
