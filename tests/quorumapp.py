"""A Celery project on quorum queues, as ``greenworker -A tests.quorumapp worker`` loads
it; configured from the environment (broker, backend, queue)."""

from __future__ import annotations

import os

from celery import Celery

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
