"""The benchmark contract for Celery: the same ``bench.noop`` task."""

from __future__ import annotations

import os

import redis
from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)
counter = redis.Redis.from_url(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
COUNTER_KEY = os.environ.get("BENCH_COUNTER", "bench:done")


@app.task(name="bench.noop")
def noop() -> None:
    counter.incr(COUNTER_KEY)
