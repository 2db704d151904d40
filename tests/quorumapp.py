"""A Celery project on quorum queues, as ``greenworker -A tests.quorumapp worker`` loads
it; configured from the environment (broker, backend, queue)."""

from __future__ import annotations

import os

from celery import Celery
from kombu.entity import Exchange, Queue

app = Celery(
    "quorumapp",
    broker=os.environ.get("QUORUM_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("QUORUM_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_default_queue=os.environ.get("QUORUM_QUEUE", "celery"),
    task_default_queue_type="quorum",
    worker_hostname=f"{os.environ.get('QUORUM_QUEUE', 'celery')}@test",
)


@app.task(name="quorumapp.add")  # type: ignore[untyped-decorator]
def add(x: int, y: int) -> int:
    return x + y


def dead_lettered(queue: str, dead_letters: str) -> list[Queue]:
    """``queue`` as a quorum queue with a delivery limit of 1 and a dead-letter exchange
    (and routing key) ``dead_letters``."""
    arguments = {
        "x-queue-type": "quorum",
        "x-delivery-limit": 1,
        "x-dead-letter-exchange": dead_letters,
        "x-dead-letter-routing-key": dead_letters,
    }
    return [Queue(queue, Exchange(queue), routing_key=queue, queue_arguments=arguments)]


if os.environ.get("QUORUM_DEAD_LETTERS"):  # the poison test
    app.conf.task_queues = dead_lettered(
        os.environ["QUORUM_QUEUE"], os.environ["QUORUM_DEAD_LETTERS"]
    )


@app.task(name="quorumapp.crash")  # type: ignore[untyped-decorator]
def crash() -> None:
    """Kills the worker process in the middle of the task, as a segfault or OOM would."""
    with open(os.environ["QUORUM_CRASHES"], "a") as record:
        record.write("crash\n")
    os._exit(3)
