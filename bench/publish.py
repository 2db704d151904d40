"""Publish benchmark tasks with a system's own client.

    python -m bench.publish SYSTEM TASK COUNT [--ms 50] [--rate 200]

SYSTEM is greenworker, celery, dramatiq or huey; TASK is noop, empty (greenworker
only), io (argument: --ms) or latency (argument: the publish time, taken just before
each send).  Without --rate the tasks are sent back to back; with it they are paced at
RATE per second.  The broker comes from BENCH_BROKER.  Prints one JSON line:
{"published": N, "seconds": S}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

Sender = Callable[[str, tuple[Any, ...]], None]
#: Every system has these; ``empty`` only greenworker (scenario D's worker row).
TASKS = ("noop", "io", "latency")
ALL_TASKS = (*TASKS, "empty")


def greenworker_sender() -> tuple[Sender, Callable[[], None]]:
    from bench.tasks_gw import QUEUE, app

    def send(task: str, args: tuple[Any, ...]) -> None:
        app.send_task(f"bench.{task}", args, queue=QUEUE, ignore_result=True)

    return send, app.close


def celery_sender() -> tuple[Sender, Callable[[], None]]:
    from bench.tasks_celery import QUEUE, app

    producer = app.producer_pool.acquire(block=True)

    def send(task: str, args: tuple[Any, ...]) -> None:
        app.send_task(f"bench.{task}", args=args, queue=QUEUE, producer=producer)

    return send, producer.release


def dramatiq_sender() -> tuple[Sender, Callable[[], None]]:
    from bench import tasks_dramatiq

    actors = {name: getattr(tasks_dramatiq, name) for name in TASKS}

    def send(task: str, args: tuple[Any, ...]) -> None:
        actors[task].send(*args)

    return send, tasks_dramatiq.broker.close


def huey_sender() -> tuple[Sender, Callable[[], None]]:
    from bench import tasks_huey

    tasks = {name: getattr(tasks_huey, name) for name in TASKS}

    def send(task: str, args: tuple[Any, ...]) -> None:
        tasks[task](*args)

    return send, lambda: None


SENDERS: dict[str, Callable[[], tuple[Sender, Callable[[], None]]]] = {
    "greenworker": greenworker_sender,
    "greenworker-E": greenworker_sender,
    "greenworker-base": greenworker_sender,
    "celery": celery_sender,
    "greenworker-celery": celery_sender,  # the same Celery project, run by greenworker
    "dramatiq": dramatiq_sender,
    "huey": huey_sender,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=sorted(SENDERS))
    parser.add_argument("task", choices=ALL_TASKS)
    parser.add_argument("count", type=int)
    parser.add_argument("--ms", type=int, default=50, help="the io task's server delay")
    parser.add_argument("--rate", type=float, help="tasks per second (default: flat out)")
    args = parser.parse_args()
    send, close = SENDERS[args.system]()
    started = time.monotonic()
    try:
        for i in range(args.count):
            if args.rate:
                pause = started + i / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            if args.task == "io":
                send("io", (args.ms,))
            elif args.task == "latency":
                send("latency", (time.time(),))
            else:
                send(args.task, ())  # noop, empty
    finally:
        close()
    print(json.dumps({"published": args.count, "seconds": round(time.monotonic() - started, 3)}))


if __name__ == "__main__":
    main()
