from __future__ import annotations

import itertools
import time

import pytest

from greenworker import green
from greenworker.worker.pool import GreenPool
from greenworker.worker.timer import Timer


def test_pool_runs_at_most_size_jobs_at_once() -> None:
    pool = GreenPool(3)
    gate = green.new_event()
    peak = 0

    def job() -> None:
        nonlocal peak
        peak = max(peak, pool.active)
        gate.wait(5)

    for _ in range(10):
        pool.submit(job)
    green.sleep(0.01)
    assert (pool.active, pool.waiting) == (3, 7)
    gate.set()
    assert pool.join(5)
    assert peak == 3 and pool.active == 0 and pool.waiting == 0


def test_pool_grows_and_shrinks_while_busy_without_killing() -> None:
    pool = GreenPool(2)
    release = green.new_event()
    finished: list[int] = []

    def job(n: int) -> None:
        release.wait(5)
        finished.append(n)

    for n in range(8):
        pool.submit(job, n)
    green.sleep(0.01)
    assert pool.active == 2
    pool.grow(3)
    green.sleep(0.01)
    assert (pool.size, pool.active, pool.waiting) == (5, 5, 3)
    pool.shrink(4)  # running jobs keep running; no new one starts until below 1
    assert pool.size == 1 and pool.active == 5
    release.set()
    assert pool.join(5)
    assert sorted(finished) == list(range(8))


def test_pool_resize_notifies() -> None:
    pool = GreenPool(1)
    seen: list[int] = []
    pool.on_resize(lambda: seen.append(pool.size))
    pool.resize(4)
    pool.shrink(2)
    assert seen == [4, 2]
    with pytest.raises(ValueError):
        pool.resize(0)


def test_pool_kill_one_job() -> None:
    pool = GreenPool(2)
    outcome: dict[str, str] = {}

    def sleeper(name: str) -> None:
        try:
            green.sleep(5)
            outcome[name] = "done"
        except green.GreenletExit:
            outcome[name] = "killed"
            raise

    a = pool.submit(sleeper, "a")
    pool.submit(sleeper, "b")
    waiting = pool.submit(sleeper, "c")
    green.sleep(0.01)
    assert pool.kill(waiting)  # never started
    assert pool.kill(a)
    green.sleep(0.01)
    assert outcome == {"a": "killed"}
    assert pool.active == 1 and pool.waiting == 0
    assert not pool.kill(12345)
    pool.kill_all()
    assert pool.join(2)


def test_pool_kill_before_greenlet_ran_keeps_bookkeeping() -> None:
    pool = GreenPool(1)
    ran: list[int] = []
    job = pool.submit(ran.append, 1)  # spawned, not yet run
    assert pool.kill(job)
    assert pool.join(2)
    assert ran == [] and pool.active == 0


def test_timer_call_after_and_order() -> None:
    timer = Timer()
    timer.start()
    try:
        fired: list[str] = []
        done = green.new_event()
        timer.call_after(0.06, fired.append, "late")
        timer.call_after(0.02, fired.append, "early")
        timer.call_after(0.08, done.set)
        assert done.wait(2)
        assert fired == ["early", "late"]
    finally:
        timer.stop()


def test_timer_call_at_wall_clock_and_cancel() -> None:
    timer = Timer()
    timer.start()
    try:
        fired: list[str] = []
        done = green.new_event()
        entry = timer.call_at(time.time() + 0.02, fired.append, "cancelled")
        timer.cancel(entry)
        timer.call_at(time.time() + 0.03, fired.append, "kept")
        timer.call_after(0.05, done.set)
        assert done.wait(2)
        assert fired == ["kept"]
    finally:
        timer.stop()


def test_timer_call_repeatedly_until_cancelled() -> None:
    timer = Timer()
    timer.start()
    try:
        ticks: list[float] = []
        enough = green.new_event()

        def tick() -> None:
            ticks.append(time.monotonic())
            if len(ticks) == 4:
                enough.set()

        entry = timer.call_repeatedly(0.02, tick)
        assert enough.wait(2)
        timer.cancel(entry)
        count = len(ticks)
        green.sleep(0.06)
        assert len(ticks) == count
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert all(g > 0.01 for g in gaps)
    finally:
        timer.stop()


def test_timer_callback_error_does_not_stop_timer() -> None:
    timer = Timer()
    timer.start()
    try:
        done = green.new_event()

        def broken() -> None:
            raise RuntimeError("boom")

        timer.call_after(0.0, broken)
        timer.call_after(0.01, done.set)
        assert done.wait(2)
    finally:
        timer.stop()
