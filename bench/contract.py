"""The task contract every system runs: the same bodies, one shared module-level Redis client.

``noop``     INCR the counter.
``io``       HTTP GET ``http://127.0.0.1:PORT/?ms=MS`` from bench/slow_server.py on a new
             connection (closed after), then INCR the counter.
``latency``  LPUSH ``now - published_at`` (seconds) onto a list: publish-to-start latency.
``empty``    nothing, and no I/O but at the first task (INCR) and at the
             ``BENCH_EMPTY_TOTAL``-th (INCRBY the rest): the worker's own cost per task, to
             set beside the bare kombu consumer of scenario D.  Counted in the process, so
             for one worker process only.

Each ``tasks_*.py`` registers these very functions with its system.  The module imports
nothing green: each worker has patched the process (gevent) before it imports this.
"""

from __future__ import annotations

import http.client
import os
import time

import redis

REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
COUNTER_KEY = os.environ.get("BENCH_COUNTER", "bench:done")
LATENCY_KEY = os.environ.get("BENCH_LATENCY", "bench:latency")
SLOW_HOST = "127.0.0.1"
SLOW_PORT = int(os.environ.get("BENCH_SLOW_PORT", "8765"))
#: Connections of the shared client.  Bounded (tasks wait for a free one) so that 10,000
#: tasks finishing at once do not open 10,000 Redis connections (Redis' maxclients).
REDIS_POOL_SIZE = int(os.environ.get("BENCH_REDIS_POOL", "100"))
HTTP_TIMEOUT = 60.0


def broker_pool_size() -> int:
    """Redis connections a system's broker client may open: one per task running at once
    (the harness passes the worker's concurrency), plus a margin for its own loops.  Acks
    late from many greenlets at once fail with "Too many connections" on a smaller pool."""
    return int(os.environ.get("BENCH_CONCURRENCY", "100")) + 20


counter = redis.Redis(
    connection_pool=redis.BlockingConnectionPool.from_url(
        REDIS_URL, max_connections=REDIS_POOL_SIZE, timeout=None
    )
)


def noop() -> None:
    counter.incr(COUNTER_KEY)


#: Tasks of ``empty`` the harness waits for; this process's count of them so far.
EMPTY_TOTAL = int(os.environ.get("BENCH_EMPTY_TOTAL", "0"))
_empty_done = 0


def empty() -> None:
    global _empty_done
    _empty_done += 1
    if _empty_done == 1:
        counter.incr(COUNTER_KEY)  # the first completion, for the harness's clock
    elif _empty_done == EMPTY_TOTAL:
        counter.incrby(COUNTER_KEY, EMPTY_TOTAL - 1)


def io(ms: int) -> None:
    conn = http.client.HTTPConnection(SLOW_HOST, SLOW_PORT, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", f"/?ms={ms}")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"slow server answered {response.status}")
    finally:
        conn.close()
    counter.incr(COUNTER_KEY)


def latency(published_at: float) -> None:
    counter.lpush(LATENCY_KEY, time.time() - published_at)
