"""The greenworker side: run with ``greenworker -A examples.celery_interop.worker_app``."""

from __future__ import annotations

import os

from greenworker import App

REDIS = os.environ.get("INTEROP_REDIS", "redis://127.0.0.1:6379/0")

app = App("interop", broker=REDIS, backend=REDIS)


@app.task(name="interop.add")
def add(x: int, y: int) -> int:
    return x + y
