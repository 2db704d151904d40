"""The app of the Sentinel tests: broker and result backend ``sentinel://`` from
``SENTINEL_URL``; each run of ``sentinel.work`` appends its task id to ``SENTINEL_RUNS``."""

from __future__ import annotations

import os
import time

from greenworker import App, Task

from .sentinel import MASTER_NAME

URL = os.environ.get("SENTINEL_URL", "sentinel://127.0.0.1:26379/0")

app = App(
    "sentinelapp",
    broker=URL,
    backend=URL,
    config={
        "broker_transport_options": {"master_name": MASTER_NAME},
        "result_backend_transport_options": {"master_name": MASTER_NAME},
        "task_default_queue": os.environ.get("SENTINEL_QUEUE", "sentinel"),
    },
)


@app.task(name="sentinel.work", bind=True)
def work(self: Task, seconds: float) -> None:
    time.sleep(seconds)
    fd = os.open(os.environ["SENTINEL_RUNS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{self.request.id}\n".encode())
    finally:
        os.close(fd)


@app.task(name="sentinel.add")
def add(x: int, y: int) -> int:
    return x + y
