"""The benchmark contract for Huey (bodies in bench/contract.py): Redis only, no results.

Huey removes a task from the queue when a worker takes it (there is no acks late).
Each greenlet worker blocks in BRPOP on a connection of its own, so the pool must hold
one per worker: redis-py 8's default pool stops at 100 ("Too many connections").
Run the consumer through bench/huey_gevent.py, which monkeypatches first.
"""

from __future__ import annotations

import os

import redis
from huey import RedisHuey

from bench import contract

QUEUE = "bench"

huey = RedisHuey(
    QUEUE,
    connection_pool=redis.ConnectionPool.from_url(
        os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"),
        max_connections=contract.broker_pool_size(),
    ),
    results=False,
)

noop = huey.task(name="bench.noop")(contract.noop)
io = huey.task(name="bench.io")(contract.io)
latency = huey.task(name="bench.latency")(contract.latency)
