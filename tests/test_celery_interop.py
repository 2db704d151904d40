"""Interop with a real, unmodified Celery 5: Celery producers -> greenworker, and back."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from celery import Celery

from greenworker import App, Worker

from .conftest import ROOT


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else str(request.getfixturevalue("amqp_url"))


@pytest.fixture
def gw_worker(broker_url: str, redis_url: str, queue_name: str) -> Iterator[Worker]:
    app = App(
        "interop", broker=broker_url, backend=redis_url, config={"task_default_queue": queue_name}
    )

    @app.task(name="interop.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.fail")
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="interop.echo_kwargs")
    def echo_kwargs(**kwargs: object) -> dict[str, object]:
        return dict(kwargs)

    worker = app.Worker(concurrency=20)
    worker.start()
    yield worker
    worker.stop(timeout=10)
    with app.connection() as conn:
        app.queue(queue_name)(conn.default_channel).delete()
    app.close()


@pytest.fixture
def celery_client(broker_url: str, redis_url: str) -> Iterator[Celery]:
    client = Celery("producer", broker=broker_url, backend=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    yield client
    client.close()


@pytest.mark.timeout(60)
def test_celery_send_task_and_async_result(
    gw_worker: Worker, celery_client: Celery, queue_name: str
) -> None:
    results = [celery_client.send_task("interop.add", (i, 1), queue=queue_name) for i in range(50)]
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(50)]
    assert results[0].state == "SUCCESS"


@pytest.mark.timeout(60)
def test_celery_apply_async_with_kwargs_countdown_and_failure(
    gw_worker: Worker, celery_client: Celery, queue_name: str
) -> None:
    @celery_client.task(name="interop.echo_kwargs")
    def echo_kwargs(**kwargs: object) -> None: ...

    @celery_client.task(name="interop.fail")
    def fail(message: str) -> None: ...

    ok = echo_kwargs.apply_async(kwargs={"a": 1, "b": [2, 3]}, queue=queue_name, countdown=0.2)
    assert ok.get(timeout=20) == {"a": 1, "b": [2, 3]}
    bad = fail.apply_async(("no good",), queue=queue_name)
    with pytest.raises(ValueError, match="no good"):
        bad.get(timeout=20)
    assert bad.state == "FAILURE"
    assert "ValueError: no good" in (bad.traceback or "")


@pytest.mark.timeout(90)
def test_greenworker_client_to_a_celery_worker(
    broker_url: str, redis_url: str, queue_name: str
) -> None:
    env = {**os.environ, "INTEROP_BROKER": broker_url, "INTEROP_BACKEND": redis_url}
    celery_worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_side",
            "worker",
            "-P",
            "solo",
            "-Q",
            queue_name,
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "-l",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = App(
        "gwclient", broker=broker_url, backend=redis_url, config={"task_default_queue": queue_name}
    )
    try:
        results = [client.send_task("celery_side.mul", (i, 3)) for i in range(10)]
        assert [r.get(timeout=60) for r in results] == [3 * i for i in range(10)]
    finally:
        celery_worker.terminate()
        try:
            celery_worker.wait(20)
        except subprocess.TimeoutExpired:
            celery_worker.kill()
        with client.connection() as conn:
            client.queue(queue_name)(conn.default_channel).delete()
        client.close()
