"""The benchmark contract for greenworker (bodies in bench/contract.py); defaults: acks late.

``BENCH_BROKER`` is the broker URL; ``embedded`` gives the App no broker: greenworker's
embedded default, the LMDB broker in ``GREENWORKER_DATA_DIR`` (the harness makes a fresh
directory per run).
"""

from __future__ import annotations

import os

from bench import contract
from bench.contract import COUNTER_KEY as COUNTER_KEY  # re-exported, as before
from bench.contract import counter as counter
from greenworker import App

QUEUE = "bench"

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")

app = App(
    "bench",
    broker=None if BROKER == "embedded" else BROKER,
    config={"task_ignore_result": True},
)

noop = app.task(name="bench.noop")(contract.noop)
io = app.task(name="bench.io")(contract.io)
latency = app.task(name="bench.latency")(contract.latency)
empty = app.task(name="bench.empty")(contract.empty)
