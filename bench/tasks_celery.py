"""The benchmark contract for Celery (bodies in bench/contract.py): acks late, no results."""

from __future__ import annotations

import os

from celery import Celery

from bench import contract
from bench.contract import COUNTER_KEY as COUNTER_KEY  # re-exported, as before
from bench.contract import counter as counter

QUEUE = "bench"

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # kombu's Redis transport opens at most 10 connections by default; acks late from
    # many greenlets at once then fail ("Couldn't ack ... Too many connections").
    broker_transport_options={"max_connections": contract.broker_pool_size()},
)

noop = app.task(name="bench.noop")(contract.noop)
io = app.task(name="bench.io")(contract.io)
latency = app.task(name="bench.latency")(contract.latency)
