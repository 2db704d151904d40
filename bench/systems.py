"""The systems under test: how each worker is started, how its queues are purged, and
how tasks are published with its own client (bench/publish.py in a subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent
BROKERS = {
    "redis": "redis://127.0.0.1:6379/1",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}
#: Redis for the counter and the latency list: the same database as the Redis broker
#: (db 1, away from the test suite's db 0).
REDIS_URL = BROKERS["redis"]
#: Keys of this harness run only: other workers importing bench.tasks_* (their defaults:
#: db 0, ``bench:done``) cannot touch them.
COUNTER_KEY = f"bench:{os.getpid()}:done"
LATENCY_KEY = f"bench:{os.getpid()}:latency"
SYSTEMS = ("greenworker", "celery", "dramatiq", "huey")
#: ``greenworker-celery``: Celery's own bench app (bench/tasks_celery.py) run unchanged by
#: ``greenworker -A bench.tasks_celery worker``, fed by Celery's client: the migration case.
CELERY_APP_SYSTEMS = ("celery", "greenworker-celery")
#: Brokers each system cannot use, and why (the table says so).
UNSUPPORTED = {("huey", "amqp"): "skipped: Huey has no RabbitMQ broker"}
#: ``greenworker-base``: the same worker run from another checkout (``BENCH_BASELINE``, the
#: path of a git worktree at an earlier commit), for before/after pairs in one run.
BASELINE = os.environ.get("BENCH_BASELINE", "")
KOMBU_QUEUE = "bench"  # greenworker and Celery: the same kombu queue
#: Dramatiq's queue and its dead-letter queues on RabbitMQ (see bench/tasks_dramatiq.py).
DRAMATIQ_QUEUES = ("bench_dq", "bench_dq.DQ", "bench_dq.XQ")


def unsupported(system: str, broker: str) -> str | None:
    return UNSUPPORTED.get((system, broker))


def script(name: str) -> str:
    """A console script of this virtualenv (falls back to PATH)."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def worker_command(system: str, concurrency: int) -> list[str]:
    if system in ("greenworker", "greenworker-E", "greenworker-base"):
        events = ["-E"] if system == "greenworker-E" else []  # -E: task events on
        return [
            PY,
            "-m",
            "greenworker",
            "-A",
            "bench.tasks_gw",
            "-P",
            "gevent",
            "-c",
            str(concurrency),
            "-Q",
            KOMBU_QUEUE,
            "-l",
            "warning",
            *events,
        ]
    if system in CELERY_APP_SYSTEMS:
        return [
            PY,
            "-m",
            "celery" if system == "celery" else "greenworker",
            "-A",
            "bench.tasks_celery",
            "worker",
            "-P",
            "gevent",
            "-c",
            str(concurrency),
            "-Q",
            KOMBU_QUEUE,
            "-l",
            "warning",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ]
    if system == "dramatiq":
        return [
            script("dramatiq-gevent"),
            "bench.tasks_dramatiq",
            "-p",
            "1",
            "-t",
            str(concurrency),
        ]
    if system == "huey":
        return [
            PY,
            "-m",
            "bench.huey_gevent",
            "bench.tasks_huey.huey",
            "-k",
            "greenlet",
            "-w",
            str(concurrency),
            "-g",  # SIGTERM is a graceful shutdown, as for the others
            "TERM",
            "-q",  # no INFO line per task
        ]
    raise ValueError(f"unknown system {system}")


def worker_cwd(system: str) -> Path:
    """Where a worker starts: ``python -m`` puts this directory first on ``sys.path``, so
    the baseline's worker starts in the baseline's checkout."""
    return Path(BASELINE) if system == "greenworker-base" and BASELINE else ROOT


def worker_env(
    broker: str, slow_port: int, concurrency: int = 100, system: str = ""
) -> dict[str, str]:
    path = str(ROOT)
    if system == "greenworker-base":
        if not BASELINE:
            raise SystemExit("greenworker-base needs BENCH_BASELINE=<checkout of the old commit>")
        path = f"{BASELINE}{os.pathsep}{ROOT}"  # its greenworker, this bench
    return {
        **os.environ,
        "BENCH_CONCURRENCY": str(concurrency),
        "BENCH_BROKER": broker,
        "BENCH_REDIS": REDIS_URL,
        "BENCH_COUNTER": COUNTER_KEY,
        "BENCH_LATENCY": LATENCY_KEY,
        "BENCH_SLOW_PORT": str(slow_port),
        "PYTHONPATH": path,
    }


def publish(
    system: str,
    broker: str,
    task: str,
    count: int,
    *,
    ms: int = 50,
    rate: float | None = None,
    timeout: float = 600,
) -> float:
    """Publish ``count`` tasks with the system's own client; return the seconds it took."""
    argv = [PY, "-m", "bench.publish", system, task, str(count), "--ms", str(ms)]
    if rate:
        argv += ["--rate", str(rate)]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        env=worker_env(broker, 0),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"publishing with {system} failed: {tail[0]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def purge(broker_name: str) -> None:
    """Empty every queue any system uses on this broker, and the counters."""
    r = redis.Redis.from_url(REDIS_URL)
    try:
        if broker_name == "redis":
            # kombu's queue and unacked bookkeeping, Dramatiq's and Huey's keys (db 1 only)
            keys = [KOMBU_QUEUE, "unacked", "unacked_index", "unacked_mutex"]
            for pattern in ("dramatiq:*", "huey.*"):
                keys += list(r.scan_iter(match=pattern, count=1000))
            r.delete(*keys)
        else:
            from kombu import Connection

            with Connection(BROKERS[broker_name]) as conn:
                for queue in (KOMBU_QUEUE, *DRAMATIQ_QUEUES):
                    channel = conn.channel()  # a missing queue closes the channel
                    with contextlib.suppress(Exception):
                        channel.queue_purge(queue)
                    with contextlib.suppress(Exception):
                        channel.close()
        r.delete(COUNTER_KEY, LATENCY_KEY)
    finally:
        r.close()
