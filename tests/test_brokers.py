"""Integration: real Redis and real RabbitMQ (skipped when down locally, failing when CI=true)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from greenworker import App, Task, green

from .conftest import delete_queues_and_close


def _app(broker: str, backend: str, queue: str) -> App:
    return App(
        "brokers",
        broker=broker,
        backend=backend,
        config={"task_default_queue": queue, "result_expires": 600},
    )


@pytest.fixture(params=["redis", "amqp"])
def broker_app(request: pytest.FixtureRequest, queue_name: str, redis_url: str) -> Iterator[App]:
    broker = redis_url if request.param == "redis" else request.getfixturevalue("amqp_url")
    app = _app(broker, redis_url, queue_name)
    yield app
    delete_queues_and_close(app, queue_name)


def _define(app: App) -> tuple[Task, Task]:
    @app.task(name="brokers.square")
    def square(x: int) -> int:
        return x * x

    @app.task(name="brokers.fail")
    def fail(x: int) -> None:
        raise KeyError(x)

    return square, fail


@pytest.mark.timeout(120)
def test_thousand_tasks_each_result_correct_and_queue_empty(broker_app: App) -> None:
    square, _ = _define(broker_app)
    worker = broker_app.Worker(concurrency=100)
    worker.start()
    try:
        results = [square.delay(i) for i in range(1000)]
        values = [r.get(timeout=60) for r in results]
        worker.join(timeout=60)
        assert values == [i * i for i in range(1000)]
        assert worker.state.total["brokers.square"] == 1000
        assert worker.consumer.queue_sizes() == {broker_app.conf.task_default_queue: 0}
    finally:
        worker.stop(timeout=10)
    # nothing unacked left behind either: a fresh consumer finds the queue empty
    with broker_app.connection() as conn:
        queue = broker_app.queue()(conn.default_channel)
        assert queue.get(no_ack=True) is None


@pytest.mark.timeout(60)
def test_failure_stored_in_celery_layout(broker_app: App, redis_url: str) -> None:
    _, fail = _define(broker_app)
    worker = broker_app.Worker(concurrency=5)
    worker.start()
    try:
        result = fail.delay(5)
        with pytest.raises(KeyError):
            result.get(timeout=20)
    finally:
        worker.stop(timeout=10)
    raw = redis.Redis.from_url(redis_url).get(f"celery-task-meta-{result.id}")
    assert raw is not None
    import json

    meta = json.loads(raw)
    assert meta["status"] == "FAILURE"
    assert meta["result"] == {"exc_type": "KeyError", "exc_message": [5], "exc_module": "builtins"}
    assert meta["task_id"] == result.id and "KeyError" in meta["traceback"]
    assert set(meta) >= {"status", "result", "traceback", "children", "date_done", "task_id"}


def test_grown_pool_gets_messages_at_once_with_a_full_prefetch_window(broker_app: App) -> None:
    """With every prefetched message running, the broker sends no more until the prefetch
    count grows: the new count must reach it at once, not at the consumer's next wake-up
    (worker_drain_interval, 1 s)."""
    gate = green.new_event()
    started: list[int] = []
    five, ten = green.new_event(), green.new_event()

    @broker_app.task
    def hold(n: int) -> None:
        started.append(n)
        if len(started) == 5:
            five.set()
        if len(started) == 10:
            ten.set()
        gate.wait(10)

    worker = broker_app.Worker(concurrency=5, prefetch_multiplier=1)
    worker.start()
    try:
        for n in range(10):
            hold.delay(n)
        assert five.wait(10)
        worker.pool.grow(5)
        assert ten.wait(0.5), f"{len(started)} started 0.5 s after the pool grew"
        gate.set()
        worker.join(timeout=10)
    finally:
        gate.set()
        worker.stop(timeout=5)
