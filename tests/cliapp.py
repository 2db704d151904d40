"""The app the CLI tests run: the embedded default unless -b says otherwise."""

from __future__ import annotations

import datetime
import decimal
import os
import uuid

from greenworker import App

app = App("cliapp")

#: New in every process image: a restart in place (same pid) gets a new one.
BOOT = uuid.uuid4().hex
_HOARD: list[bytes] = []


@app.task(name="cliapp.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="cliapp.fail")
def fail() -> None:
    raise RuntimeError("failed on purpose")


@app.task(name="cliapp.nap")
def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)  # cooperative: the worker monkeypatched the process
    return "rested"


@app.task(name="cliapp.typed")
def typed() -> list[object]:
    return [datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), decimal.Decimal("1.50")]


@app.task(name="cliapp.tally")
def tally(redis_url: str, key: str, n: int) -> None:
    """Count the runs of task ``n`` and note which process image ran it."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.hincrby(f"{key}:runs", str(n), 1)
        client.hset(f"{key}:boots", str(n), BOOT)
        client.sadd(f"{key}:pids", os.getpid())


@app.task(name="cliapp.hog")
def hog(redis_url: str, key: str, n: int, limit_kib: int) -> None:
    """Tally, then keep enough memory to leave the process 20 MiB above ``limit_kib``."""
    tally(redis_url, key, n)
    with open("/proc/self/statm") as statm:
        resident_kib = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    grow = limit_kib - resident_kib + 20 * 1024
    if grow > 0:
        _HOARD.append(b"x" * (grow * 1024))  # written, so resident
