"""The request lifecycle on the memory harness: retries, time limits, revoke, rate limits,
states and hooks (the real-broker variants live in test_lifecycle_brokers.py)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from greenworker import App, Task, Worker, green
from greenworker.config import parse_rate
from greenworker.exceptions import (
    MaxRetriesExceededError,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
)
from greenworker.worker.executor import backoff_countdown
from greenworker.worker.hooks import Middleware
from greenworker.worker.request import Request

# ------------------------------------------------------------------ retries


def test_retry_sends_same_id_with_retries_plus_one_and_shows_retry_state(
    any_app: App, any_worker: Worker
) -> None:
    seen: list[tuple[str | None, int]] = []
    states: list[str] = []
    parents: set[str | None] = set()

    @any_app.task(bind=True, max_retries=3)
    def flaky(self: Task, n: int) -> str:
        seen.append((self.request.id, self.request.retries))
        parents.add(self.request.parent_id)
        if self.request.retries < 2:
            if self.request.retries == 1:
                states.append(self.AsyncResult(str(self.request.id)).state)
            raise self.retry(exc=ConnectionError("down"), countdown=0.05)
        return f"ok {n}"

    result = flaky.delay(1)
    any_worker.join()
    assert result.get(timeout=5) == "ok 1"
    assert [r for _, r in seen] == [0, 1, 2]
    assert {i for i, _ in seen} == {result.id}
    assert states == ["RETRY"]
    # as Celery: the first run has no parent, each retry names the task as its parent
    assert parents == {None, result.id}
    assert any_worker.state.retried == 2


def test_max_retries_reraises_the_exception_or_max_retries_exceeded(
    any_app: App, any_worker: Worker
) -> None:
    @any_app.task(bind=True, max_retries=1)
    def always(self: Task) -> None:
        raise self.retry(exc=KeyError("gone"), countdown=0)

    @any_app.task(bind=True, max_retries=0)
    def bare(self: Task) -> None:
        raise self.retry(countdown=0)

    first, second = always.delay(), bare.delay()
    with pytest.raises((KeyError, MaxRetriesExceededError)):
        any_worker.join()
    with pytest.raises((KeyError, MaxRetriesExceededError)):
        any_worker.join()
    any_worker.join()
    with pytest.raises(KeyError):
        first.get(timeout=5)
    with pytest.raises(MaxRetriesExceededError):
        second.get(timeout=5)


def test_autoretry_for_with_backoff(any_app: App, any_worker: Worker) -> None:
    attempts: list[float] = []

    @any_app.task(
        autoretry_for=(TimeoutError,),
        retry_backoff=0.05,
        retry_jitter=False,
        max_retries=3,
    )
    def fetch() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise TimeoutError("slow upstream")
        return "done"

    @any_app.task(autoretry_for=(TimeoutError,), max_retries=2, retry_kwargs={"countdown": 0})
    def never() -> None:
        raise ValueError("not retried: not in autoretry_for")

    result = fetch.delay()
    other = never.delay()
    with pytest.raises(ValueError):
        any_worker.join()
    any_worker.join()
    assert result.get(timeout=5) == "done"
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095  # 0.05 * 2**0, 0.05 * 2**1
    assert other.state == "FAILURE"


def test_backoff_formula_matches_celery() -> None:
    assert backoff_countdown(True, 0, 600, False) == 1
    assert backoff_countdown(True, 3, 600, False) == 8
    assert backoff_countdown(2, 10, 600, False) == 600
    assert 0 <= backoff_countdown(True, 5, 600, True) <= 32


# ------------------------------------------------------------------ time limits


def test_soft_time_limit_raises_inside_the_task_which_may_clean_up(
    any_app: App, any_worker: Worker
) -> None:
    @any_app.task(soft_time_limit=0.1)
    def slow() -> str:
        try:
            green.sleep(2)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"

    @any_app.task(soft_time_limit=0.1)
    def ignores() -> None:
        green.sleep(2)

    ok, failed = slow.delay(), ignores.delay()
    with pytest.raises(SoftTimeLimitExceeded):
        any_worker.join()
    assert ok.get(timeout=5) == "cleaned up"
    assert isinstance(failed.result, SoftTimeLimitExceeded)


def test_hard_time_limit_kills_and_frees_the_slot_at_once(any_app: App) -> None:
    any_app.conf.task_time_limit = 0.2  # per worker
    cleanup: list[str] = []

    @any_app.task
    def stuck() -> None:
        try:
            green.sleep(30)
        except Exception:  # a hard kill is not an Exception: cannot be swallowed
            cleanup.append("swallowed")

    @any_app.task
    def quick() -> int:
        return 1

    any_worker = any_app.Worker(concurrency=1)
    any_worker.start()
    try:
        started = time.monotonic()
        stuck_result = stuck.delay()
        quick_result = quick.delay()
        assert quick_result.get(timeout=5) == 1
        stuck_result.get(timeout=5, propagate=False)
        assert time.monotonic() - started < 2.0  # the only slot came back
        assert stuck_result.state == "FAILURE"
        assert type(stuck_result.result).__name__ == "TimeLimitExceeded"
        assert cleanup == []
        assert any_worker.pool.active == 0
    finally:
        any_worker.stop(timeout=5)


def test_message_time_limit_and_runtime_change(any_app: App, any_worker: Worker) -> None:
    @any_app.task
    def sleepy(seconds: float) -> str:
        green.sleep(seconds)
        return "woke"

    limited = sleepy.apply_async((1.0,), time_limit=0.1)
    with pytest.raises(TimeLimitExceeded):
        any_worker.join()
    assert limited.state == "FAILURE"
    any_worker.set_time_limit(sleepy.name, soft=None, hard=0.1)
    later = sleepy.delay(1.0)
    with pytest.raises(TimeLimitExceeded):
        any_worker.join()
    assert later.state == "FAILURE"
    any_worker.set_time_limit(sleepy.name, soft=None, hard=None)
    assert sleepy.delay(0.01).get(timeout=5) == "woke"


def test_request_timelimit_is_hard_then_soft_and_kept_by_a_retry(
    memory_app: App, worker: Worker
) -> None:
    seen: list[tuple[float | None, float | None]] = []

    @memory_app.task(bind=True)
    def limited(self: Task) -> str:
        seen.append(self.request.timelimit)  # Celery's order: (time_limit, soft_time_limit)
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "done"

    assert limited.apply_async(time_limit=30, soft_time_limit=20).get(timeout=5) == "done"
    assert seen == [(30.0, 20.0), (30.0, 20.0)]


# ------------------------------------------------------------------ revoke


def test_revoke_before_start_and_terminate_running(any_app: App) -> None:
    started = green.new_event()

    @any_app.task
    def long() -> None:
        started.set()
        green.sleep(30)

    @any_app.task
    def later() -> str:
        return "ran"

    any_worker = any_app.Worker(concurrency=1)
    any_worker.start()
    try:
        running = long.delay()
        assert started.wait(5)
        queued = later.delay()  # waits: the only slot is busy
        green.sleep(0.1)
        assert any_worker.revoke(queued.id) == [queued.id]
        assert any_worker.revoke(running.id, terminate=True) == [running.id]
        with pytest.raises(TaskRevokedError, match="terminated"):
            running.get(timeout=5)
        with pytest.raises(TaskRevokedError, match="revoked"):
            queued.get(timeout=5)
        # revoked before it even arrives: never runs
        future_id = "revoked-in-advance"
        any_worker.revoke(future_id)
        late = later.apply_async(task_id=future_id)
        assert isinstance(late.get(timeout=5, propagate=False), TaskRevokedError)
        assert late.state == "REVOKED"
        assert later.delay().get(timeout=5) == "ran"
        # the result is stored before its job leaves the pool: wait for the pool to idle
        assert any_worker.pool.join(5)
        assert any_worker.pool.active == 0
    finally:
        any_worker.stop(timeout=5)


# ------------------------------------------------------------------ rate limits


def test_parse_rate() -> None:
    assert parse_rate("10/s") == 10
    assert parse_rate("120/m") == 2
    assert parse_rate("3600/h") == 1
    assert parse_rate(5) == 5
    assert parse_rate(None) == 0
    for bad in ("ten/s", "10/d", "-1/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_rate_limit_paces_one_task_without_holding_others(any_app: App, any_worker: Worker) -> None:
    # The limiter paces the releases into the pool; a body may start a little after its
    # release (its greenlet waits for the hub), so the releases are what is measured.
    stamps: list[float] = []
    limiter = any_worker.rate_limiter
    release = limiter._release

    def recording_release(request: Request) -> None:
        if request.name == limited.name:
            stamps.append(time.monotonic())
        release(request)

    limiter._release = recording_release

    @any_app.task(rate_limit="20/s")
    def limited() -> None: ...

    @any_app.task
    def free() -> float:
        return time.monotonic()

    begin = time.monotonic()
    limited_results = [limited.delay() for _ in range(6)]
    free_result = free.delay()
    assert free_result.get(timeout=5) - begin < 0.2  # not stuck behind the limited ones
    for r in limited_results:
        r.get(timeout=5)
    assert len(stamps) == 6
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 0.04  # 20/s -> 50 ms apart
    any_worker.set_rate_limit(limited.name, None)
    begin = time.monotonic()
    for r in [limited.delay() for _ in range(10)]:
        r.get(timeout=5)
    assert time.monotonic() - begin < 0.4


def test_bad_rate_limit_fails_at_definition(memory_app: App) -> None:
    with pytest.raises(ValueError, match="bad rate limit"):

        @memory_app.task(rate_limit="fast")
        def nope() -> None: ...


# ------------------------------------------------------------------ states, hooks


def test_track_started_state(any_app: App, any_worker: Worker) -> None:
    any_app.conf.task_track_started = True
    gate = green.new_event()

    @any_app.task
    def wait() -> None:
        gate.wait(5)

    result = wait.delay()
    for _ in range(100):
        if result.state == "STARTED":
            break
        green.sleep(0.01)
    assert result.state == "STARTED"
    gate.set()
    result.get(timeout=5)
    assert result.state == "SUCCESS"


def test_middleware_hooks_are_called_and_cannot_break_the_worker(any_app: App) -> None:
    calls: list[tuple[str, Any]] = []

    class Recorder(Middleware):
        def worker_start(self, worker: Worker) -> None:
            calls.append(("start", worker.hostname))

        def before_task(self, request: Request) -> None:
            calls.append(("before", request.name))

        def task_succeeded(self, request: Request, result: Any, runtime: float) -> None:
            calls.append(("succeeded", result))

        def task_failed(self, request: Request, exc: BaseException, tb: str | None) -> None:
            calls.append(("failed", type(exc).__name__))

        def after_task(self, request: Request, state: str, result: Any) -> None:
            calls.append(("after", state))
            raise RuntimeError("a broken extension")

        def worker_stop(self, worker: Worker) -> None:
            calls.append(("stop", None))

    @any_app.task(name="hooks.ok")
    def ok() -> int:
        return 7

    @any_app.task(name="hooks.bad")
    def bad() -> None:
        raise KeyError("x")

    any_app.middleware.append(Recorder())
    any_worker = any_app.Worker(concurrency=1)
    any_worker.start()
    try:
        assert ok.delay().get(timeout=5) == 7
        with pytest.raises(KeyError):
            bad.delay().get(timeout=5)
    finally:
        any_worker.stop(timeout=5)
    assert calls[0][0] == "start" and calls[-1] == ("stop", None)
    assert ("before", "hooks.ok") in calls and ("succeeded", 7) in calls
    assert ("failed", "KeyError") in calls
    assert [c for c in calls if c[0] == "after"] == [("after", "SUCCESS"), ("after", "FAILURE")]


def test_revoked_set_expiry_and_maximum_size() -> None:
    from greenworker.worker.state import RevokedSet

    revoked = RevokedSet(maxlen=3, expires=60)
    now = time.time()
    revoked.add("old", when=now - 120)  # already past its expiry
    assert "old" not in revoked
    for i in range(5):
        revoked.add(f"id{i}", when=now + i)
    assert len(revoked) == 3 and "id0" not in revoked and "id4" in revoked  # oldest went first
    revoked.update({"x": now - 30, "y": now - 90})
    assert "x" in revoked and "y" not in revoked
    assert set(revoked.as_dict()) == {"id4", "x"}  # y was stored, and expired: purged
