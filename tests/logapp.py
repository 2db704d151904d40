"""A greenworker App whose tasks have the names of the example Celery project's, for the log
tests: the same calls give the same log lines as under Celery.  Set from the environment:
``LOGAPP_BROKER`` (Redis URL, also the result backend), ``LOGAPP_QUEUE``, and
``LOGAPP_OWN_LOGGING=1`` (the module configures logging on import, as an app can) with
``LOGAPP_HIJACK=0`` (``worker_hijack_root_logger`` False)."""

from __future__ import annotations

import logging
import os
from typing import Any

from greenworker import App

#: The format of the app's own logging (``LOGAPP_OWN_LOGGING``).
OWN_FORMAT = "APP|%(levelname)s|%(name)s|%(message)s"

if os.environ.get("LOGAPP_OWN_LOGGING") == "1":
    logging.basicConfig(level=logging.INFO, format=OWN_FORMAT)

BROKER = os.environ.get("LOGAPP_BROKER", "redis://127.0.0.1:6379/0")
app = App(
    "logapp",
    broker=BROKER,
    backend=BROKER,
    config={
        "task_default_queue": os.environ.get("LOGAPP_QUEUE", "celery"),
        "worker_hijack_root_logger": os.environ.get("LOGAPP_HIJACK", "1") == "1",
    },
)


@app.task(name="proj.shop.tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="proj.shop.tasks.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="proj.shop.tasks.flaky", bind=True, max_retries=3)
def flaky(self: Any, fail_times: int) -> int:
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError("not yet"), countdown=0.05)
    retries: int = self.request.retries
    return retries
