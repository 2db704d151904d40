"""How long a dead consumer's unacked messages stay unacked on Redis, under a backlog.

    python -m bench.orphans [--orphans 256,694] [--visibility 10] [--hub gevent]

For each count: N task messages are put in kombu's ``unacked`` hash and
``unacked_index`` set as a consumer that took them and died would leave them,
a minute of slow tasks is queued behind, and a greenworker worker (native
consumer, concurrency 10) starts.  It reports when the last orphan left
``unacked`` (restored to its queue), measured from its visibility deadline
(the time it was taken + the visibility timeout), and whether the backlog was
still there then.  A private redis-server on a spare port keeps the short
timeout away from any other consumer's messages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from greenworker import green

if __name__ == "__main__":
    _hub = "eventlet" if "eventlet" in sys.argv else "gevent"
    green.patch(_hub)

import redis

from greenworker import App
from greenworker.transport.redis_layout import UNACKED_INDEX_KEY, UNACKED_KEY

QUEUE = "orphans"
CONCURRENCY = 10
SLOW_TASK = 0.05  # seconds: the backlog drains at 200 tasks/s
BACKLOG = 60  # seconds of slow tasks queued behind the orphans


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--dir", directory, "--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def orphan_queue(client: redis.Redis, taken_at: float) -> list[bytes]:
    """Move the queue's messages to ``unacked`` as a consumer dead since ``taken_at``."""
    tags = []
    route = json.dumps(QUEUE).encode()
    pipe = client.pipeline()
    for raw in client.lrange(QUEUE, 0, -1):
        tag = json.loads(raw)["properties"]["delivery_tag"].encode()
        pipe.hset(UNACKED_KEY, tag, b"[" + raw + b"," + route + b"," + route + b"]")
        pipe.zadd(UNACKED_INDEX_KEY, {tag: taken_at})
        tags.append(tag)
    pipe.delete(QUEUE)
    pipe.execute()
    return tags


def still_unacked(client: redis.Redis, tags: list[bytes], taken_at: float) -> int:
    """Orphans still in ``unacked_index`` with their old score (not restored yet; a
    restored one the worker took again has a new score)."""
    pipe = client.pipeline(transaction=False)
    for tag in tags:
        pipe.zscore(UNACKED_INDEX_KEY, tag)
    return sum(1 for score in pipe.execute() if score is not None and score <= taken_at)


def measure(url: str, orphans: int, visibility: float, limit: float) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = App(
        "orphans",
        broker=url,
        config={
            "task_default_queue": QUEUE,
            "worker_enable_mingle": False,
            "broker_transport_options": {"visibility_timeout": visibility},
        },
    )

    @app.task(name="orphans.mark", ignore_result=True)
    def mark(n: int) -> None:
        pass

    @app.task(name="orphans.slow", ignore_result=True)
    def slow() -> None:
        time.sleep(SLOW_TASK)

    for n in range(orphans):
        mark.delay(n)
    taken_at = time.time()
    tags = orphan_queue(client, taken_at)
    for _ in range(int(BACKLOG * CONCURRENCY / SLOW_TASK)):
        slow.delay()
    worker = app.Worker(concurrency=CONCURRENCY)
    worker.start()
    deadline = taken_at + visibility + limit
    try:
        left = orphans
        while left and time.time() < deadline:
            time.sleep(0.05)
            left = still_unacked(client, tags, taken_at)
        restored_at = time.time()
        backlog = client.llen(QUEUE)
    finally:
        worker.stop(timeout=5)
        app.close()
    return {
        "orphans": orphans,
        "left": left,
        "past_timeout_s": round(restored_at - taken_at - visibility, 2),
        "backlog_left": backlog,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orphans", default="256,694")
    parser.add_argument("--visibility", type=float, default=10.0)
    parser.add_argument("--limit", type=float, default=90.0, help="give up this long past it")
    parser.add_argument("--hub", choices=("gevent", "eventlet"), default="gevent")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("needs redis-server on PATH", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as directory:
        proc, url = start_redis(directory)
        try:
            for count in (int(n) for n in args.orphans.split(",")):
                row = measure(url, count, args.visibility, args.limit)
                state = "all restored" if not row["left"] else f"{row['left']:.0f} still unacked"
                print(
                    f"{count} orphans, visibility_timeout {args.visibility:g}s: {state} "
                    f"{row['past_timeout_s']:.2f}s past the timeout; "
                    f"{row['backlog_left']:.0f} tasks still queued then",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
