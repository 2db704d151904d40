"""A plain Celery app (no greenworker) for the interop tests; configured from the environment."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

# Celery ships no annotations, so its task decorator is untyped (the ignores below).
celery_app = Celery(
    "celery_side",
    broker=os.environ.get("INTEROP_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("INTEROP_BACKEND", "redis://127.0.0.1:6379/0"),
)
celery_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_default_queue=os.environ.get("INTEROP_QUEUE", "celery"),  # where tasks send children
)


@celery_app.task(name="celery_side.mul")  # type: ignore[untyped-decorator]
def mul(x: int, y: int) -> int:
    return x * y


@celery_app.task(name="celery_side.nap")  # type: ignore[untyped-decorator]
def nap(seconds: float) -> str:
    time.sleep(seconds)  # cooperative under ``-P gevent`` (Celery patches)
    return "woke up"


@celery_app.task(name="celery_side.nap_until_soft_limit")  # type: ignore[untyped-decorator]
def nap_until_soft_limit(seconds: float) -> float:
    """Seconds until the soft limit interrupted the nap (raises if it never did)."""
    started = time.monotonic()
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return time.monotonic() - started
    raise AssertionError("no soft time limit")


@celery_app.task(name="celery_side.own_limits", bind=True)  # type: ignore[untyped-decorator]
def own_limits(self: Any) -> dict[str, Any]:
    """The limits Celery read from this task's message."""
    return {"time_limit": self.request.time_limit, "soft_time_limit": self.request.soft_time_limit}


@celery_app.task(name="celery_side.again", bind=True, max_retries=1)  # type: ignore[untyped-decorator]
def again(self: Any) -> None:
    raise self.retry(exc=ValueError("nope"), countdown=0)


@celery_app.task(name="celery_side.parent")  # type: ignore[untyped-decorator]
def parent() -> str:
    return str(again.delay().id)
