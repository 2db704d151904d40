"""The benchmark contract for greenworker: ``noop`` INCRs a Redis counter via one shared client."""

from __future__ import annotations

import os

import redis

from greenworker import App

app = App(
    "bench",
    broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"),
    config={"task_ignore_result": True},
)
counter = redis.Redis.from_url(os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
COUNTER_KEY = os.environ.get("BENCH_COUNTER", "bench:done")


@app.task(name="bench.noop")
def noop() -> None:
    counter.incr(COUNTER_KEY)
