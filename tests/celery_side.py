"""A plain Celery app (no greenworker) for the interop tests; configured from the environment."""

from __future__ import annotations

import os

from celery import Celery

celery_app = Celery(
    "celery_side",
    broker=os.environ.get("INTEROP_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("INTEROP_BACKEND", "redis://127.0.0.1:6379/0"),
)
celery_app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")


@celery_app.task(name="celery_side.mul")
def mul(x: int, y: int) -> int:
    return x * y
