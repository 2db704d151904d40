"""The systems under test: how each worker is started, how its queues are purged, and
how tasks are published with its own client (bench/publish.py in a subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent
#: ``BENCH_BROKER`` for greenworker's embedded default: bench/tasks_gw.py then gives the
#: App no broker (the LMDB broker in ``GREENWORKER_DATA_DIR``, a fresh directory per run).
EMBEDDED = "embedded"
BROKERS = {
    "redis": "redis://127.0.0.1:6379/1",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
    EMBEDDED: EMBEDDED,
}
#: The kombu URL of the embedded broker (its directory comes as a transport option).
EMBEDDED_KOMBU_URL = "lmdb://localhost/"
#: Redis for the counter and the latency list: the same database as the Redis broker
#: (db 1, away from the test suite's db 0).
REDIS_URL = BROKERS["redis"]
#: Keys of this harness run only: other workers importing bench.tasks_* (their defaults:
#: db 0, ``bench:done``) cannot touch them.
COUNTER_KEY = f"bench:{os.getpid()}:done"
LATENCY_KEY = f"bench:{os.getpid()}:latency"
SYSTEMS = ("greenworker", "celery", "dramatiq", "huey")
#: The systems that run greenworker's own bench app (bench/tasks_gw.py): ``-E`` adds task
#: events; ``-base`` is another checkout (below).
GREENWORKER_SYSTEMS = ("greenworker", "greenworker-E", "greenworker-base")
#: ``greenworker-celery``: Celery's own bench app (bench/tasks_celery.py) run unchanged by
#: ``greenworker -A bench.tasks_celery worker``, fed by Celery's client: the migration case.
CELERY_APP_SYSTEMS = ("celery", "greenworker-celery")
#: Brokers each system cannot use, and why (the table says so).
_OWN = "skipped: the embedded broker is greenworker's own"
UNSUPPORTED = {
    ("huey", "amqp"): "skipped: Huey has no RabbitMQ broker",
    ("celery", EMBEDDED): f"{_OWN}; Celery has no client for it",
    ("greenworker-celery", EMBEDDED): f"{_OWN}; this case publishes with Celery's client",
    ("dramatiq", EMBEDDED): f"{_OWN}; Dramatiq has no broker for it",
    ("huey", EMBEDDED): f"{_OWN}; Huey has no storage for it",
}
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


def new_data_dir() -> str:
    """A fresh, empty data directory for one run on the embedded broker (on the disk of
    the system's temporary directory); the caller removes it."""
    return tempfile.mkdtemp(prefix="bench-embedded-")


def worker_command(system: str, concurrency: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The worker's argv; ``extra`` (greenworker's options, e.g. ``-n``, ``-S``) goes at
    the end of a greenworker worker's and is not used by the others."""
    if system in GREENWORKER_SYSTEMS:
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
            *extra,
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
    broker: str,
    slow_port: int,
    concurrency: int = 100,
    system: str = "",
    data_dir: str | None = None,
) -> dict[str, str]:
    """The environment of a worker or a publisher; ``broker`` is a URL of ``BROKERS``
    (``embedded``: no broker, the data directory ``data_dir``)."""
    path = str(ROOT)
    if system == "greenworker-base":
        if not BASELINE:
            raise SystemExit("greenworker-base needs BENCH_BASELINE=<checkout of the old commit>")
        path = f"{BASELINE}{os.pathsep}{ROOT}"  # its greenworker, this bench
    env = dict(os.environ)
    if broker == EMBEDDED:
        if not data_dir:
            raise ValueError("the embedded broker needs a data directory")
        # a broker URL in the harness's environment would turn the embedded default off
        for name in ("GREENWORKER_BROKER_URL", "CELERY_BROKER_URL"):
            env.pop(name, None)
        env["GREENWORKER_DATA_DIR"] = data_dir
    return {
        **env,
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
    data_dir: str | None = None,
) -> float:
    """Publish ``count`` tasks with the system's own client; return the seconds it took."""
    argv = [PY, "-m", "bench.publish", system, task, str(count), "--ms", str(ms)]
    if rate:
        argv += ["--rate", str(rate)]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        env=worker_env(broker, 0, data_dir=data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"publishing with {system} failed: {tail[0]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def purge(broker_name: str) -> None:
    """Empty every queue any system uses on this broker, and the counters.  (The embedded
    broker is emptied by giving each run a new data directory: only the counters here.)"""
    r = redis.Redis.from_url(REDIS_URL)
    try:
        if broker_name == "redis":
            # kombu's queue and unacked bookkeeping, Dramatiq's and Huey's keys (db 1 only)
            keys = [KOMBU_QUEUE, "unacked", "unacked_index", "unacked_mutex"]
            for pattern in ("dramatiq:*", "huey.*"):
                keys += list(r.scan_iter(match=pattern, count=1000))
            r.delete(*keys)
        elif broker_name == "amqp":
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
