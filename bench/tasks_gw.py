"""The benchmark contract for greenworker (bodies in bench/contract.py); defaults: acks late."""

from __future__ import annotations

import os

from bench import contract
from bench.contract import COUNTER_KEY as COUNTER_KEY  # re-exported, as before
from bench.contract import counter as counter
from greenworker import App

QUEUE = "bench"

app = App(
    "bench",
    broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"),
    config={"task_ignore_result": True},
)

noop = app.task(name="bench.noop")(contract.noop)
io = app.task(name="bench.io")(contract.io)
latency = app.task(name="bench.latency")(contract.latency)
