"""Apps for the broker retry and bad URL tests, configured from the environment:
``RETRYAPP_BROKER`` (the broker URL), ``RETRYAPP_BACKEND`` (the result backend's; a
memory one by default) and ``RETRYAPP_CONF`` (a JSON object of settings, given to each
app as its own configuration).  ``gw_app`` is a greenworker App, ``celery_app`` a
Celery app."""

from __future__ import annotations

import json
import os

from celery import Celery

from greenworker import App

BROKER = os.environ.get("RETRYAPP_BROKER", "redis://127.0.0.1:6379/0")
BACKEND = os.environ.get("RETRYAPP_BACKEND")
CONF = json.loads(os.environ.get("RETRYAPP_CONF", "{}"))

gw_app = App("retryapp", broker=BROKER, backend=BACKEND or "memory://", config=CONF)

celery_app = Celery("retryapp_celery", broker=BROKER, backend=BACKEND or "cache+memory://")
celery_app.conf.update(CONF)


@gw_app.task(name="retryapp.add")
def add(x: int, y: int) -> int:
    return x + y


@celery_app.task(name="retryapp.mul")  # type: ignore[untyped-decorator]
def mul(x: int, y: int) -> int:
    return x * y
