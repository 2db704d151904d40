"""The autoscaler under a bursty load: grows while tasks wait, shrinks when idle."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from greenworker import App, green
from greenworker.worker.autoscale import Autoscaler, LoadSample, PressurePolicy
from greenworker.worker.pool import GreenPool
from greenworker.worker.timer import Timer

from .conftest import start_cli, wait_for_output


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


AUTOSCALE_SETS = "autoscale sets the pool size: it starts at MIN 3 greenlet(s)"


def test_an_autoscaled_pool_starts_at_min_and_a_concurrency_given_too_is_said_unused(
    memory_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="greenworker.autoscale")
    plain = memory_app.Worker(autoscale=(10, 3))
    assert (plain.pool.size, plain.concurrency, plain.describe_concurrency()) == (
        3,
        3,
        "3 {min=3, max=10}",
    )
    assert AUTOSCALE_SETS not in caplog.text  # no -c: nothing to say
    for concurrency in (1, 5, 50):  # under MIN, between, over MAX: MIN all the same
        assert memory_app.Worker(concurrency=concurrency, autoscale=(10, 3)).pool.size == 3
    lines = [r.getMessage() for r in caplog.records if AUTOSCALE_SETS in r.getMessage()]
    assert [line.rsplit("; ", 1)[1] for line in lines] == [
        f"concurrency {c} (-c) is not used" for c in (1, 5, 50)
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if AUTOSCALE_SETS in r.message)


@pytest.mark.timeout(60)
def test_the_command_line_starts_at_min_and_says_c_is_not_used(hub: str) -> None:
    proc = start_cli(
        *("-A", "tests.cliapp", "-b", "memory://", "worker", "-P", hub),
        *("--autoscale", "10,3", "-c", "50", "--without-mingle"),
    )
    try:
        out = wait_for_output(proc, " ready: ")
        proc.send_signal(signal.SIGTERM)
        out += proc.communicate(timeout=15)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "concurrency 3 {min=3, max=10}" in out, out  # banner and ready line
    lines = [line for line in out.splitlines() if AUTOSCALE_SETS in line]
    assert len(lines) == 1 and "INFO/greenworker.autoscale" in lines[0], out
    assert lines[0].endswith("up to MAX 10; concurrency 50 (-c) is not used"), lines[0]


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
