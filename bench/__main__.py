"""Run the noop throughput benchmark: greenworker vs Celery ``-P gevent``, side by side.

    python -m bench [--tasks 20000] [--concurrency 100] [--brokers redis,amqp]
                    [--systems greenworker,celery] [--repeat 1]

For each broker and system: purge the queue, pre-publish the tasks with the
system's own client, start the worker, and time from the first to the last
completion (a Redis counter the task INCRs).  Prints a markdown table and
appends JSON lines to bench/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
BROKERS = {
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672//",
}
QUEUE = "bench"
REDIS_URL = "redis://127.0.0.1:6379/0"
COUNTER = "bench:done"


def worker_command(system: str, concurrency: int) -> list[str]:
    if system in ("greenworker", "greenworker-E"):
        events = ["-E"] if system == "greenworker-E" else []  # -E: task events on
        return [
            sys.executable,
            "-m",
            "greenworker",
            "-A",
            "bench.tasks_gw",
            "-P",
            "gevent",
            "-c",
            str(concurrency),
            "-Q",
            QUEUE,
            "-l",
            "warning",
            *events,
        ]
    if system == "celery":
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.tasks_celery",
            "worker",
            "-P",
            "gevent",
            "-c",
            str(concurrency),
            "-Q",
            QUEUE,
            "-l",
            "warning",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ]
    raise SystemExit(f"unknown system {system}")


def publish(system: str, broker: str, count: int) -> float:
    """Pre-publish ``count`` tasks with the system's own client; return seconds taken."""
    code = {
        "greenworker": (
            "from bench.tasks_gw import app\n"
            "from greenworker import green\n"
            "q = app.queue('bench')\n"
            "from kombu.messaging import Producer\n"
            "from greenworker.protocol import build_task_message\n"
            "with app.connection() as conn:\n"
            "    p = Producer(conn)\n"
            "    for _ in range(N):\n"
            "        body, headers, props = build_task_message('bench.noop', ignore_result=True)\n"
            "        p.publish(body, exchange=q.exchange, routing_key=q.routing_key,\n"
            "                  serializer='json', headers=headers, declare=[q], delivery_mode=2,\n"
            "                  **props)\n"
        ),
        "celery": (
            "from bench.tasks_celery import app\n"
            "with app.producer_or_acquire() as producer:\n"
            "    for _ in range(N):\n"
            "        app.send_task('bench.noop', queue='bench', producer=producer)\n"
        ),
    }[system.removesuffix("-E")]
    env = {**os.environ, "BENCH_BROKER": broker, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", f"N = {count}\n" + code], check=True, env=env, cwd=ROOT)
    return time.monotonic() - started


def purge(broker: str) -> None:
    from kombu import Connection

    with Connection(broker) as conn:
        channel = conn.default_channel
        try:
            channel.queue_purge(QUEUE)
        except Exception:
            pass


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_once(system: str, broker_name: str, count: int, concurrency: int) -> dict[str, Any]:
    broker = BROKERS[broker_name]
    r = redis.Redis.from_url(REDIS_URL)
    purge(broker)
    r.delete(COUNTER)
    publish_s = publish(system, broker, count)
    env = {**os.environ, "BENCH_BROKER": broker, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.Popen(
        worker_command(system, concurrency),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = last = None
    peak_rss = 0
    deadline = started + 600
    try:
        while time.monotonic() < deadline:
            done = int(r.get(COUNTER) or 0)
            now = time.monotonic()
            if done and first is None:
                first = now
            peak_rss = max(peak_rss, rss_kb(proc.pid))
            if done >= count:
                last = now
                break
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{system} exited early: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.005)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if first is None or last is None:
        raise RuntimeError(f"{system} on {broker_name} did not finish")
    elapsed = last - first
    return {
        "system": system,
        "broker": broker_name,
        "tasks": count,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "tasks_per_s": round(count / elapsed, 1) if elapsed else None,
        "startup_to_first_s": round(first - started, 3),
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "publish_s": round(publish_s, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--systems", default="greenworker,celery")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    for _ in range(args.repeat):
        for broker in args.brokers.split(","):
            for system in args.systems.split(","):  # interleaved: each round runs every system
                row = run_once(system, broker, args.tasks, args.concurrency)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with (out / "results.jsonl").open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print()
    print("| broker | system | tasks | c | tasks/s median (range) | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for broker in args.brokers.split(","):
        for system in args.systems.split(","):
            mine = [r for r in rows if r["broker"] == broker and r["system"] == system]
            rates = [r["tasks_per_s"] for r in mine]
            rss = max(r["peak_rss_mb"] for r in mine)
            print(
                f"| {broker} | {system} | {args.tasks} | {args.concurrency} | "
                f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | {rss} |"
            )


if __name__ == "__main__":
    main()
