"""The benchmark contract for Celery (bodies in bench/contract.py): acks late, no results."""

from __future__ import annotations

import os

from celery import Celery

from bench import contract

QUEUE = "bench"

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1"))
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

noop = app.task(name="bench.noop")(contract.noop)
io = app.task(name="bench.io")(contract.io)
latency = app.task(name="bench.latency")(contract.latency)
