"""A plain Celery app (no greenworker) for the interop tests; configured from the environment."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

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


@celery_app.task(name="celery_side.mul")
def mul(x: int, y: int) -> int:
    return x * y


@celery_app.task(name="celery_side.again", bind=True, max_retries=1)
def again(self: Any) -> None:
    raise self.retry(exc=ValueError("nope"), countdown=0)


@celery_app.task(name="celery_side.parent")
def parent() -> str:
    return str(again.delay().id)
