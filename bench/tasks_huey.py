"""The benchmark contract for Huey (bodies in bench/contract.py): Redis only, no results.

Huey removes a task from the queue when a worker takes it (there is no acks late).
Run its consumer through bench/huey_gevent.py, which monkeypatches first.
"""

from __future__ import annotations

import os

from huey import RedisHuey

from bench import contract

QUEUE = "bench"

huey = RedisHuey(
    QUEUE, url=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/1"), results=False
)

noop = huey.task(name="bench.noop")(contract.noop)
io = huey.task(name="bench.io")(contract.io)
latency = huey.task(name="bench.latency")(contract.latency)
