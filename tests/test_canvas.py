"""Canvas: chains, link/link_error, groups and chords, from greenworker and Celery producers."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from greenworker import App, Worker
from greenworker.client.canvas import Signature, chain, chord, group
from greenworker.client.task import Context

from .conftest import delete_queues_and_close

errors_seen: list[tuple[str | None, str]] = []


def _tasks(app: App) -> None:
    @app.task(name="canvas.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="canvas.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="canvas.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="canvas.to_decimal")
    def to_decimal(text: str) -> Decimal:
        return Decimal(text)

    @app.task(name="canvas.fail")
    def fail(*args: Any) -> None:
        raise ValueError("chain broke")

    @app.task(name="canvas.on_error")
    def on_error(request: Context, exc: BaseException, traceback: str | None) -> None:
        errors_seen.append((request.id, repr(exc)))

    @app.task(name="canvas.record_id")
    def record_id(task_id: str) -> str:
        errors_seen.append((task_id, "old-style"))
        return task_id


@pytest.fixture
def app_worker(any_app: App) -> Iterator[tuple[App, Worker]]:
    """Each canvas test on memory://, Redis, RabbitMQ (Redis results) and the embedded default."""
    _tasks(any_app)
    errors_seen.clear()
    worker = any_app.Worker(concurrency=10)
    worker.start()
    yield any_app, worker
    worker.stop(timeout=5)


def test_chain_passes_results_along(app_worker: tuple[App, Worker]) -> None:
    app, _worker = app_worker
    add, mul = app.tasks["canvas.add"], app.tasks["canvas.mul"]
    result = (add.s(2, 2) | mul.s(10) | add.s(1)).apply_async()
    assert result.get(timeout=10) == 41  # ((2+2)*10)+1
    assert chain(add.s(1, 1), add.si(5, 5)).apply_async().get(timeout=10) == 10  # immutable


def test_chain_failure_fails_the_rest(app_worker: tuple[App, Worker]) -> None:
    app, _worker = app_worker
    add, fail = app.tasks["canvas.add"], app.tasks["canvas.fail"]
    steps = [add.s(1, 1), fail.s(), add.s(3)]
    result = chain(*steps).apply_async()
    with pytest.raises(ValueError, match="chain broke"):
        result.get(timeout=10)
    assert app.AsyncResult(str(steps[2].id)).state == "FAILURE"


def test_link_and_link_error(app_worker: tuple[App, Worker]) -> None:
    app, worker = app_worker
    add, fail = app.tasks["canvas.add"], app.tasks["canvas.fail"]
    on_error, record = app.tasks["canvas.on_error"], app.tasks["canvas.record_id"]
    follow = add.s(100)
    follow.freeze()
    first = add.s(1, 2)
    first.link(follow)
    first.apply_async()
    assert app.AsyncResult(str(follow.id)).get(timeout=10) == 103
    broken = fail.s()
    broken.link_error(on_error.s())
    broken.link_error(record.s())
    failed = broken.apply_async()
    with pytest.raises(ValueError):
        worker.join()
    worker.join()
    assert (failed.id, "ValueError('chain broke')") in errors_seen  # called with (req, exc, tb)
    assert (failed.id, "old-style") in errors_seen  # sent with (task_id,)


def test_group_and_chord(app_worker: tuple[App, Worker]) -> None:
    app, _worker = app_worker
    add, tsum = app.tasks["canvas.add"], app.tasks["canvas.tsum"]
    results = group(add.s(i, i) for i in range(10)).apply_async()
    assert results.get(timeout=10) == [2 * i for i in range(10)]
    total = chord([add.s(i, 1) for i in range(20)], tsum.s()).apply_async()
    assert total.get(timeout=10) == sum(range(1, 21))
    assert chord([add.s(1, 1), add.s(2, 2)])(tsum.s()).get(timeout=10) == 6


def test_chord_of_typed_results(app_worker: tuple[App, Worker]) -> None:
    """Header results pass through the backend's chord store and reach the body typed."""
    app, _worker = app_worker
    to_decimal, tsum = app.tasks["canvas.to_decimal"], app.tasks["canvas.tsum"]
    total = chord([to_decimal.s("1.10"), to_decimal.s("2.25")], tsum.s()).apply_async()
    assert total.get(timeout=10) == Decimal("3.35")
    assert isinstance(total.get(timeout=10), Decimal)


def test_chord_with_a_failed_header_fails_the_body(app_worker: tuple[App, Worker]) -> None:
    app, worker = app_worker
    add, fail, tsum = app.tasks["canvas.add"], app.tasks["canvas.fail"], app.tasks["canvas.tsum"]
    body = chord([add.s(1, 1), fail.s()], tsum.s()).apply_async()
    # Await the body's own result first: join()'s idle check can race a message
    # that a remote broker has handed over but the consumer has not yet reserved.
    assert body.get(timeout=10, propagate=False) is not None
    with pytest.raises(ValueError):
        worker.join()
    worker.join()
    assert body.state == "FAILURE"
    assert "Dependency" in str(body.result)


def test_signature_round_trips_as_celery_dict(memory_app: App) -> None:
    sig = Signature.of("x.y", (1,), {"a": 2}, app=memory_app, queue="q")
    assert dict(sig) == {
        "task": "x.y",
        "args": [1],
        "kwargs": {"a": 2},
        "options": {"queue": "q"},
        "subtask_type": None,
        "immutable": False,
        "chord_size": None,
    }
    with pytest.raises(ValueError):
        Signature.from_dict({"args": []})


@pytest.fixture
def redis_worker(redis_url: str, queue_name: str) -> Iterator[tuple[App, Worker]]:
    app = App(
        "canvas", broker=redis_url, backend=redis_url, config={"task_default_queue": queue_name}
    )
    _tasks(app)
    worker = app.Worker(concurrency=20)
    worker.start()
    yield app, worker
    worker.stop(timeout=10)
    delete_queues_and_close(app, queue_name)


@pytest.mark.timeout(60)
def test_chord_on_redis_with_celery_key_layout(redis_worker: tuple[App, Worker]) -> None:
    app, _worker = redis_worker
    add, tsum = app.tasks["canvas.add"], app.tasks["canvas.tsum"]
    total = chord([add.s(i, i) for i in range(30)], tsum.s()).apply_async()
    assert total.get(timeout=20) == sum(2 * i for i in range(30))


@pytest.mark.timeout(60)
def test_celery_producer_chain_group_chord(
    redis_worker: tuple[App, Worker], redis_url: str, queue_name: str
) -> None:
    from celery import Celery
    from celery import chain as cchain
    from celery import chord as cchord
    from celery import group as cgroup

    client = Celery("producer", broker=redis_url, backend=redis_url)
    client.conf.update(task_default_queue=queue_name)
    try:
        add = client.signature("canvas.add")
        tsum = client.signature("canvas.tsum")
        mul = client.signature("canvas.mul")
        chained = cchain(add.clone((2, 3)), mul.clone((4,)), add.clone((1,))).apply_async()
        assert chained.get(timeout=20) == 21
        grouped = cgroup(add.clone((i, 1)) for i in range(5)).apply_async()
        assert grouped.get(timeout=20) == [1, 2, 3, 4, 5]
        chorded = cchord([add.clone((i, i)) for i in range(8)], tsum.clone()).apply_async()
        assert chorded.get(timeout=20) == sum(2 * i for i in range(8))
    finally:
        client.close()
