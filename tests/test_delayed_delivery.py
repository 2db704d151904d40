"""RabbitMQ native delayed delivery: countdown and ETA tasks on quorum queues wait in
the ``celery_delayed_*`` topology (declared by the worker, as Celery 5.5+ declares it)
instead of in the worker's memory, from a Celery 5.7 client and from greenworker's.

Each test deletes its own queues and exchanges; the ``celery_delayed_*`` topology is
shared by every app on the broker and stays, as Celery leaves it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from greenworker import App, green
from greenworker.celery.app import CeleryApp
from greenworker.client import delayed_delivery
from greenworker.config import UNHONOURED, ConfigError, Settings
from greenworker.worker.worker import Worker

from .test_quorum import QUORUM, stop

#: Seconds a delayed task may run after it was due (the broker's TTLs, a loaded box).
LATE = 1.2


@pytest.fixture
def cleanup(amqp_url: str) -> Iterator[Callable[..., None]]:
    """Register queues to delete after the test, with the exchange named like each."""
    names: list[str] = []
    yield names.extend
    with Connection(amqp_url) as conn:
        for name in names:
            channel = conn.channel()
            channel.queue_delete(name)
            channel.exchange_delete(name)
            channel.close()


def topic_quorum_app(amqp_url: str, redis_url: str, queue_name: str, **config: Any) -> App:
    settings = {
        "task_default_queue": queue_name,
        "task_default_exchange_type": "topic",  # a direct exchange cannot be delayed
        "worker_hostname": f"{queue_name}@test",
        "worker_enable_mingle": False,
        "worker_enable_gossip": False,
        **QUORUM,
        **config,
    }
    return App("delayed", broker=amqp_url, backend=redis_url, config=settings)


def celery_client(amqp_url: str, redis_url: str, queue_name: str) -> Celery:
    """A Celery 5.7 producer whose queue is the same quorum queue on a topic exchange."""
    client = Celery("client", broker=amqp_url, backend=redis_url, set_as_current=False)
    client.conf.update(
        task_default_queue=queue_name,
        task_queues=[
            Queue(
                queue_name,
                Exchange(queue_name, type="topic"),
                routing_key=queue_name,
                queue_arguments={"x-queue-type": "quorum"},
            )
        ],
    )
    return client


def watch_until(done: Callable[[], bool], worker: Worker, timeout: float) -> tuple[int, int]:
    """Wait for ``done`` while sampling what the worker holds; return the most ETA
    tasks it held and the widest prefetch window it had (no event announces these)."""
    held, window = 0, 0
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the delayed tasks did not run in time"
        held = max(held, worker.handler.eta_held)
        window = max(window, worker.consumer.prefetch or 0)
        green.sleep(0.02)
    return held, window


@pytest.fixture
def runs() -> dict[str, list[float]]:
    """Task id -> the wall-clock times it ran."""
    return {}


def register_stamp(app: App, runs: dict[str, list[float]]) -> Any:
    @app.task(name="delayed.stamp", bind=True)
    def stamp(self: Any, n: int) -> int:
        runs.setdefault(self.request.id, []).append(time.time())
        return n

    return stamp


def check_on_time(runs: dict[str, list[float]], sent: dict[str, float], delay: float) -> None:
    assert sorted(runs) == sorted(sent)
    for task_id, times in runs.items():
        assert len(times) == 1, f"{task_id} ran {len(times)} times"
        late = times[0] - sent[task_id] - delay
        assert 0 <= late <= LATE, f"{task_id} ran {late:+.2f} s after it was due"


# ---------------------------------------------------------------- the worker's topology


def test_celery_countdown_tasks_wait_in_rabbitmq_not_in_the_worker(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    cleanup: Callable[..., None],
    runs: dict[str, list[float]],
) -> None:
    """A Celery 5.7 client sends countdown=2 tasks to a quorum queue greenworker
    consumes: Celery's producer routes them to ``celery_delayed_27`` (the worker
    declared the topology and bound the queue), they run once each, 2 s after they
    were sent and no more than ~1 s late, and while they wait the worker holds none
    and its window never grows."""
    cleanup([queue_name])
    app = topic_quorum_app(amqp_url, redis_url, queue_name)
    register_stamp(app, runs)
    client = celery_client(amqp_url, redis_url, queue_name)
    worker = app.Worker(concurrency=4)
    worker.start()
    try:
        assert worker.consumer.wait_ready(15)
        base = worker.consumer.prefetch
        sent: dict[str, float] = {}
        results = []
        for i in range(5):
            sent_at = time.time()
            result = client.send_task("delayed.stamp", (i,), countdown=2)
            sent[result.id] = sent_at
            results.append(result)
        held, window = watch_until(lambda: all(r.ready() for r in results), worker, 10)
        assert [r.get(timeout=1) for r in results] == list(range(5))
        assert (held, window) == (0, base)
        check_on_time(runs, sent, 2)
    finally:
        stop(worker)
        client.close()
        app.close()


def test_greenworker_client_countdown_eta_and_retry_wait_in_rabbitmq(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    cleanup: Callable[..., None],
    runs: dict[str, list[float]],
) -> None:
    """greenworker's own client sends countdown and eta tasks to a quorum queue the way
    Celery's producer does; a task delivered through the topology that retries with a
    countdown goes back through it to its queue (the delay stripped off its key)."""
    other = f"{queue_name}.retry"
    cleanup([queue_name, other])
    app = topic_quorum_app(amqp_url, redis_url, queue_name)
    stamp = register_stamp(app, runs)
    tries: list[float] = []
    keys: list[str] = []

    @app.task(name="delayed.again", bind=True, max_retries=1)
    def again(self: Any) -> int:
        tries.append(time.time())
        keys.append(self.request.delivery_info["routing_key"])
        if self.request.retries == 0:
            raise self.retry(countdown=1)
        return len(tries)

    worker = app.Worker(concurrency=4, queues=[queue_name, other])
    worker.start()
    try:
        assert worker.consumer.wait_ready(15)
        base = worker.consumer.prefetch
        sent: dict[str, float] = {}
        results = []
        for i in range(4):
            sent_at = time.time()
            if i % 2:
                due = datetime.now(UTC) + timedelta(seconds=2)
                result = stamp.apply_async((i,), eta=due)
            else:
                result = stamp.apply_async((i,), countdown=2)
            sent[result.id] = sent_at
            results.append(result)
        retried_at = time.time()
        retried = again.apply_async(countdown=1, queue=other)
        results.append(retried)
        held, window = watch_until(lambda: all(r.ready() for r in results), worker, 12)
        assert [r.get(timeout=1) for r in results] == [0, 1, 2, 3, 2]
        assert (held, window) == (0, base)
        check_on_time(runs, sent, 2)
        assert len(tries) == 2
        assert [delayed_delivery.original_routing_key(k) for k in keys] == [other, other]
        assert keys[1] != other  # the retry came through the topology too
        assert tries[0] - retried_at >= 1 and tries[1] - tries[0] >= 1
        assert tries[1] - retried_at <= 2 + 2 * LATE
    finally:
        stop(worker)
        app.close()


def test_celery_app_run_by_greenworker_sets_up_the_topology(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    cleanup: Callable[..., None],
) -> None:
    """A Celery app (as ``greenworker -A proj worker`` runs it) whose ``task_queues``
    queue is quorum on a topic exchange: the worker binds it, and Celery's own
    producer delays its countdown tasks in RabbitMQ.  Celery delays whole seconds,
    rounded down: a countdown of 2.5 s arrives half a second early, and the worker
    holds it until it is due (as it holds one early for clock skew)."""
    cleanup([queue_name])
    celery_app = celery_client(amqp_url, redis_url, queue_name)
    ran: dict[int, float] = {}

    @celery_app.task(name="delayed.celery_stamp", shared=False)  # type: ignore[untyped-decorator]
    def celery_stamp(n: int) -> int:
        ran[n] = time.time()
        return n

    app = CeleryApp(celery_app)
    worker = app.Worker(concurrency=2, queues=[queue_name], hostname=f"{queue_name}@test")
    worker.start()
    try:
        assert worker.consumer.wait_ready(15)
        sent_at = time.time()
        whole = celery_stamp.apply_async((0,), countdown=2)
        early = celery_stamp.apply_async((1,), countdown=2.5)
        held, _ = watch_until(lambda: whole.ready() and early.ready(), worker, 10)
        assert (whole.get(timeout=1), early.get(timeout=1)) == (0, 1)
        assert held == 1  # the early one only, for its last half second
        assert 2 <= ran[0] - sent_at <= 2 + LATE
        assert 2.5 <= ran[1] - sent_at <= 2.5 + LATE
    finally:
        stop(worker, celery_app)


def test_a_classic_queue_keeps_the_tasks_in_the_worker(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    cleanup: Callable[..., None],
    runs: dict[str, list[float]],
) -> None:
    """Without a quorum queue nothing changes (as in Celery): a countdown task goes
    straight to its queue and the worker holds it until it is due."""
    cleanup([queue_name])
    app = topic_quorum_app(
        amqp_url,
        redis_url,
        queue_name,
        task_default_queue_type="classic",
        task_create_missing_queue_type="classic",
    )
    stamp = register_stamp(app, runs)
    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        assert worker.consumer.wait_ready(15)
        sent_at = time.time()
        result = stamp.apply_async((7,), countdown=2)
        held, _ = watch_until(result.ready, worker, 10)
        assert result.get(timeout=1) == 7 and held == 1
        check_on_time(runs, {result.id: sent_at}, 2)
    finally:
        stop(worker)
        app.close()


def test_classic_queues_when_turned_on(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    cleanup: Callable[..., None],
    runs: dict[str, list[float]],
) -> None:
    """``broker_native_delayed_delivery_classic_queues``: a classic queue's countdown
    tasks from greenworker's client wait in RabbitMQ too, none held by the worker."""
    cleanup([queue_name])
    app = topic_quorum_app(
        amqp_url,
        redis_url,
        queue_name,
        task_default_queue_type="classic",
        task_create_missing_queue_type="classic",
        broker_native_delayed_delivery_classic_queues=True,
    )
    stamp = register_stamp(app, runs)
    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        assert worker.consumer.wait_ready(15)
        sent_at = time.time()
        result = stamp.apply_async((7,), countdown=2)
        held, _ = watch_until(result.ready, worker, 10)
        assert result.get(timeout=1) == 7 and held == 0
        check_on_time(runs, {result.id: sent_at}, 2)
    finally:
        stop(worker)
        app.close()


def test_a_topology_that_cannot_be_declared_is_one_warning(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    cleanup: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``broker_native_delayed_delivery_queue_type = "classic"`` against the quorum
    topology already there: RabbitMQ refuses it, the worker says so in one line and
    consumes all the same."""
    cleanup([queue_name])
    quorum = topic_quorum_app(amqp_url, redis_url, queue_name)
    delayed_delivery.declare(quorum, [])  # the shared topology, as quorum
    quorum.close()
    app = topic_quorum_app(
        amqp_url, redis_url, queue_name, broker_native_delayed_delivery_queue_type="classic"
    )

    @app.task(name="delayed.echo")
    def echo(x: int) -> int:
        return x

    worker = app.Worker(concurrency=2)
    with caplog.at_level(logging.WARNING, logger="greenworker.consumer"):
        worker.start()
        try:
            assert worker.consumer.wait_ready(15)
            assert echo.delay(5).get(timeout=10) == 5
        finally:
            stop(worker)
            app.close()
    lines = [r.getMessage() for r in caplog.records if "delayed delivery" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "native delayed delivery is not set up on amqp://guest:**@" in lines[0]
    assert "PRECONDITION_FAILED" in lines[0] and queue_name in lines[0]


# ---------------------------------------------------------------- without a broker


def test_routing_keys_and_settings() -> None:
    key = delayed_delivery.delayed_routing_key(4.1, "q.x")
    assert key == "0." * 25 + "1.0.1.q.x"  # whole seconds, rounded up: never early
    assert delayed_delivery.delayed_routing_key(0.9, "q") is None  # the worker holds it
    assert delayed_delivery.original_routing_key(key) == "q.x"
    assert delayed_delivery.original_routing_key("q.x") == "q.x"
    for name in ("celery_delayed_0", "celery_delayed_27", "celery_delayed_delivery"):
        assert delayed_delivery.is_topology_exchange(name)
    assert not delayed_delivery.is_topology_exchange("celery")
    assert not delayed_delivery.is_topology_exchange(None)
    assert "broker_native_delayed_delivery_queue_type" not in UNHONOURED
    assert Settings().broker_native_delayed_delivery_queue_type == "quorum"
    assert Settings().broker_native_delayed_delivery_classic_queues is False
    with pytest.raises(ConfigError, match="broker_native_delayed_delivery_queue_type"):
        Settings().update({"broker_native_delayed_delivery_queue_type": "lazy"})


def test_off_rabbitmq_nothing_is_delayed(queue_name: str) -> None:
    app = App("memory", broker="memory://", config={"task_default_queue": queue_name, **QUORUM})
    try:
        assert not delayed_delivery.wanted(app, [queue_name])
    finally:
        app.close()
