"""A dropped broker connection: the worker reconnects and keeps consuming."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
import redis

from greenworker import App, green

from .conftest import delete_queues_and_close


def _drop_redis_clients(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).client_kill_filter(_type="normal", skipme=True)


def _drop_rabbitmq_connections() -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "greenworker reconnect test"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _run_batch(app: App, start: int, count: int) -> list[int]:
    task = app.tasks["reconnect.double"]
    results = [task.delay(i) for i in range(start, start + count)]
    return [r.get(timeout=30) for r in results]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_worker_survives_a_dropped_connection(
    broker: str, redis_url: str, queue_name: str, request: pytest.FixtureRequest
) -> None:
    drop: Callable[[], None]
    if broker == "redis":
        url = redis_url
        drop = lambda: _drop_redis_clients(redis_url)  # noqa: E731
    else:
        url = request.getfixturevalue("amqp_url")
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl is not installed")
        drop = _drop_rabbitmq_connections
    app = App("reconnect", broker=url, backend=redis_url, config={"task_default_queue": queue_name})

    @app.task(name="reconnect.double")
    def double(x: int) -> int:
        return 2 * x

    worker = app.Worker(concurrency=20)
    worker.start()
    try:
        assert _run_batch(app, 0, 50) == [2 * i for i in range(50)]
        drop()
        # wait (on the consumer's own signal) until it noticed and came back
        for _ in range(200):
            if worker.consumer.reconnects >= 1 and worker.consumer.ready:
                break
            green.sleep(0.05)
        assert worker.consumer.reconnects >= 1
        assert _run_batch(app, 50, 50) == [2 * i for i in range(50, 100)]
    finally:
        worker.stop(timeout=10)
        delete_queues_and_close(app, queue_name)
