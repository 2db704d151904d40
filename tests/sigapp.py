"""A worker app for the signal tests: tasks record their runs in Redis."""

from __future__ import annotations

import os
import time

import redis

from greenworker import App

BROKER = os.environ.get("SIGAPP_BROKER", "redis://127.0.0.1:6379/0")
app = App(
    "sigapp",
    broker=BROKER,
    backend=os.environ.get("SIGAPP_REDIS", BROKER),
    config={"task_default_queue": os.environ.get("SIGAPP_QUEUE", "sigapp")},
)
runs = redis.Redis.from_url(os.environ.get("SIGAPP_REDIS", "redis://127.0.0.1:6379/0"))
KEY = os.environ.get("SIGAPP_KEY", "sigapp")


@app.task(name="sig.work")
def work(n: int, seconds: float) -> int:
    time.sleep(seconds)  # cooperative: the worker patched the process
    runs.hincrby(KEY, str(n), 1)  # how many times task n ran to the end
    return n
