"""The project's tasks: plain Celery, nothing greenworker-specific."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded

#: Runs per key, for the tasks that behave differently on a second run (same process).
RUNS: Counter[str] = Counter()
#: What the Audited task class saw: (handler, task id, detail).
AUDIT: list[tuple[str, str, Any]] = []


@shared_task
def add(x: int, y: int) -> int:
    return x + y


@shared_task
def tsum(numbers: list[int]) -> int:
    return sum(numbers)


@shared_task
def noop() -> None:
    return None


@shared_task
def fail(message: str) -> None:
    raise ValueError(message)


@shared_task
def typed() -> dict[str, Any]:
    return {"when": datetime(2026, 12, 1, 9, 30, tzinfo=UTC), "price": Decimal("9.99")}


@shared_task(bind=True)
def whoami(self: Task) -> dict[str, Any]:
    request = self.request
    return {
        "id": request.id,
        "task": request.task,
        "retries": request.retries,
        "hostname": request.hostname,
        "routing_key": request.delivery_info.get("routing_key"),
        "is_eager": request.is_eager,
        "state": self.AsyncResult(request.id).state,  # STARTED: task_track_started
    }


@shared_task(bind=True, max_retries=3)
def flaky(self: Task, fail_times: int) -> int:
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError("not yet"), countdown=0.05)
    return self.request.retries


@shared_task(autoretry_for=(ConnectionError,), retry_kwargs={"countdown": 0.05}, max_retries=2)
def always_down() -> None:
    raise ConnectionError("the service is down")


@shared_task(bind=True)
def progress(self: Task) -> str:
    self.update_state(state="PROGRESS", meta={"done": 1, "of": 2})
    return str(self.AsyncResult(self.request.id).state)


@shared_task
def ignored() -> None:
    raise Ignore()


@shared_task(bind=True)
def reject_once(self: Task, key: str, requeue: bool) -> str:
    RUNS[key] += 1
    if RUNS[key] == 1:
        raise Reject("not now", requeue=requeue)
    return f"run {RUNS[key]}"


class Audited(Task):  # type: ignore[misc]
    """A base class with every handler Celery calls."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        AUDIT.append(("on_success", task_id, retval))

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        AUDIT.append(("on_failure", task_id, type(exc).__name__))

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        AUDIT.append(("on_retry", task_id, type(exc).__name__))

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        AUDIT.append(("after_return", task_id, status))


@shared_task(base=Audited, bind=True, max_retries=1)
def audited(self: Task, outcome: str) -> str:
    if outcome == "fail":
        raise KeyError("missing")
    if outcome == "retry" and self.request.retries == 0:
        raise self.retry(countdown=0.05)
    return outcome


@shared_task(soft_time_limit=0.3)
def slow_but_polite() -> str:
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@shared_task(time_limit=0.3)
def stuck() -> None:
    time.sleep(10)


@shared_task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
