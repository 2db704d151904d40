"""The autoscaler under a bursty load: grows while tasks wait, shrinks when idle."""

from __future__ import annotations

import time

import pytest

from greenworker import App, green
from greenworker.worker.autoscale import Autoscaler, LoadSample, PressurePolicy
from greenworker.worker.pool import GreenPool
from greenworker.worker.timer import Timer


def test_pressure_policy_decisions() -> None:
    policy = PressurePolicy(keepalive=10)
    now = time.monotonic()
    assert policy.target(LoadSample(5, 5, 30, now), 2, 20) == 20  # waiting: grow (capped)
    assert policy.target(LoadSample(20, 3, 0, now + 5), 2, 20) == 20  # keepalive not over
    assert policy.target(LoadSample(20, 3, 0, now + 11), 2, 20) == 3  # idle: to what is busy
    assert policy.target(LoadSample(3, 0, 0, now + 30), 2, 20) == 2  # never under min


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min <= max"):
        Autoscaler(GreenPool(1), Timer(), 2, 5)


@pytest.mark.timeout(60)
def test_bursty_load_grows_then_shrinks_without_killing(memory_app: App) -> None:
    memory_app.conf.worker_autoscale_interval = 0.05
    memory_app.conf.worker_autoscale_keepalive = 0.3
    finished: list[int] = []

    @memory_app.task
    def io(n: int) -> None:
        green.sleep(0.2)
        finished.append(n)

    worker = memory_app.Worker(autoscale=(40, 2))
    worker.start()
    try:
        assert worker.pool.size == 2
        sizes: list[tuple[float, int]] = []
        began = time.monotonic()
        for burst in range(2):
            for i in range(120):
                io.delay(burst * 1000 + i)
            while len(finished) < 120 * (burst + 1):
                sizes.append((round(time.monotonic() - began, 2), worker.pool.size))
                green.sleep(0.05)
            for _ in range(40):  # idle: keepalive passes, the pool shrinks
                sizes.append((round(time.monotonic() - began, 2), worker.pool.size))
                if worker.pool.size == 2:
                    break
                green.sleep(0.05)
        peak = max(size for _, size in sizes)
        assert peak == 40, sizes
        assert worker.pool.size == 2, sizes
        assert len(finished) == 240 and len(set(finished)) == 240  # none killed or lost
        info = worker.stats()["autoscaler"]
        assert info is not None and info["max"] == 40 and info["min"] == 2
        worker.autoscaler.update(maximum=10, minimum=3)  # type: ignore[union-attr]
        assert worker.pool.size == 3
        print("pool size over time:", sizes)
    finally:
        worker.stop(timeout=5)
