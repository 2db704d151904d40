"""RabbitMQ quorum queues: declared as Celery 5.5+ declares them, consumed with
per-consumer QoS, prefetch changes effective at once, delivery limits and
dead-lettering passed through.

Each test uses queues of its own and deletes them (and its exchanges) after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.app import trace
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from greenworker import App, green
from greenworker.celery.app import CeleryApp
from greenworker.celery.settings import warn_unhonoured
from greenworker.exceptions import ImproperlyConfigured
from greenworker.worker.worker import Worker

from .conftest import start_cli, wait_for_output

QUORUM = {"task_default_queue_type": "quorum", "task_create_missing_queue_type": "quorum"}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a state of the worker or the broker that no event announces."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        green.sleep(0.02)


@pytest.fixture
def cleanup(amqp_url: str) -> Iterator[Callable[..., None]]:
    """Register queues to delete after the test, with the exchange named like each (as
    Celery declares them), and other exchanges as ``exchange:NAME``."""
    names: list[str] = []
    yield names.extend
    with Connection(amqp_url) as conn:
        for name in names:
            channel = conn.channel()
            if name.startswith("exchange:"):
                channel.exchange_delete(name.partition(":")[2])
            else:
                channel.queue_delete(name)
                channel.exchange_delete(name)
            channel.close()


def queue_kind(amqp_url: str, name: str) -> str:
    """ "quorum" if a classic redeclaration of ``name`` is refused for its x-queue-type."""
    from amqp.exceptions import PreconditionFailed

    with Connection(amqp_url) as conn:
        try:
            Queue(name, Exchange(name), name)(conn.channel()).declare()
        except PreconditionFailed as exc:
            assert "x-queue-type" in str(exc)
            return "quorum"
    return "classic"


def message_count(amqp_url: str, name: str) -> int:
    with Connection(amqp_url) as conn:
        return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)


def stop(worker: Worker, celery_app: Celery | None = None) -> None:
    worker.stop(timeout=10)
    if celery_app is not None:
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()


# ---------------------------------------------------------------- greenworker.App


def test_app_worker_consumes_quorum_queues_a_celery_client_sends_to(
    amqp_url: str, redis_url: str, queue_name: str, cleanup: Callable[..., None]
) -> None:
    """greenworker's worker declares both queues quorum and consumes them (RabbitMQ
    refuses a global QoS there); a Celery 5.7 client with the same settings sends to
    them without PRECONDITION_FAILED, and every task runs."""
    other = f"{queue_name}.other"
    cleanup([queue_name, other])
    settings = {"task_default_queue": queue_name, "worker_hostname": f"{queue_name}@test", **QUORUM}
    app = App("quorum", broker=amqp_url, backend=redis_url, config=settings)
    celery_app = Celery("quorum", broker=amqp_url, backend=redis_url, set_as_current=False)
    celery_app.conf.update(QUORUM, task_default_queue=queue_name)

    @app.task(name="quorum.add")
    def add(x: int, y: int) -> int:
        return x + y

    worker = app.Worker(concurrency=10, queues=[queue_name, other])
    worker.start()
    try:
        assert worker.consumer.wait_ready(10)
        assert queue_kind(amqp_url, queue_name) == queue_kind(amqp_url, other) == "quorum"
        sent = [celery_app.send_task("quorum.add", (i, 1)) for i in range(20)]
        sent += [celery_app.send_task("quorum.add", (i, 2), queue=other) for i in range(20)]
        sent += [celery_app.send_task("quorum.add", (i, 3), countdown=0.5) for i in range(5)]
        assert [app.AsyncResult(r.id).get(timeout=20) for r in sent] == (
            [i + 1 for i in range(20)] + [i + 2 for i in range(20)] + [i + 3 for i in range(5)]
        )
        assert add.delay(40, 2).get(timeout=10) == 42  # greenworker's own client too
    finally:
        stop(worker, celery_app)
        app.close()


def test_celery_project_on_quorum_queues_from_the_command_line(
    amqp_url: str, redis_url: str, queue_name: str, cleanup: Callable[..., None]
) -> None:
    """``greenworker -A proj worker`` with ``task_default_queue_type = "quorum"``: the
    worker declares and consumes the quorum queue, a Celery client with the same
    setting sends to it, and the tasks (countdown ones too) run."""
    cleanup([queue_name])
    env = {"QUORUM_BROKER": amqp_url, "QUORUM_BACKEND": redis_url, "QUORUM_QUEUE": queue_name}
    worker = start_cli("-A", "tests.quorumapp", "worker", "-c", "5", "-l", "info", env=env)
    client = Celery("client", broker=amqp_url, backend=redis_url, set_as_current=False)
    client.conf.update(task_default_queue=queue_name, task_default_queue_type="quorum")
    try:
        wait_for_output(worker, "global QoS is disabled")
        sent = [client.send_task("quorumapp.add", (i, 1)) for i in range(10)]
        sent += [client.send_task("quorumapp.add", (i, 2), countdown=0.5) for i in range(3)]
        assert [r.get(timeout=20) for r in sent] == [i + 1 for i in range(10)] + [2, 3, 4]
        assert queue_kind(amqp_url, queue_name) == "quorum"
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
        client.close()
    assert worker.returncode == 0, output
    assert "Traceback" not in output and "not used by greenworker" not in output, output


def test_classic_queues_keep_the_global_qos(
    amqp_url: str, queue_name: str, cleanup: Callable[..., None]
) -> None:
    cleanup([queue_name])
    config = {"task_default_queue": queue_name, "worker_enable_mingle": False}
    app = App("classic", broker=amqp_url, config=config)
    worker = app.Worker(concurrency=3)
    worker.start()
    try:
        assert worker.consumer.wait_ready(10)
        consumer: Any = worker.consumer
        assert consumer._qos_global and consumer._credit is None
        assert consumer.prefetch == 12
        assert queue_kind(amqp_url, queue_name) == "classic"
    finally:
        stop(worker)
        app.close()


def test_without_detection_a_quorum_queue_is_refused_clearly(
    amqp_url: str, queue_name: str
) -> None:
    """worker_detect_quorum_queues=False keeps the global QoS, which quorum queues
    refuse: one clear error instead of a reconnect loop."""
    config = {"task_default_queue": queue_name, "worker_detect_quorum_queues": False, **QUORUM}
    app = App("nodetect", broker=amqp_url, config=config)
    with pytest.raises(ImproperlyConfigured, match="worker_detect_quorum_queues is False"):
        app.Worker()
    app.close()
    # a Celery app's setting is honoured the same way, and no longer warned about
    celery_app = Celery("nodetect", broker=amqp_url, set_as_current=False)
    celery_app.conf.update(config)
    try:
        assert warn_unhonoured(celery_app) == []
        with pytest.raises(ImproperlyConfigured, match=f"quorum queues \\({queue_name}\\)"):
            CeleryApp(celery_app).Worker()
        celery_app.conf.worker_detect_quorum_queues = True
        assert CeleryApp(celery_app).conf.worker_detect_quorum_queues is True
    finally:
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()


# ---------------------------------------------------------------- prefetch changes


@pytest.fixture
def quorum_app(
    amqp_url: str, redis_url: str, queue_name: str, cleanup: Callable[..., None]
) -> Iterator[App]:
    cleanup([queue_name])
    config = {
        "task_default_queue": queue_name,
        "worker_hostname": f"{queue_name}@test",
        "worker_prefetch_multiplier": 1,
        "worker_enable_mingle": False,
        "worker_enable_gossip": False,
        **QUORUM,
    }
    app = App("prefetch", broker=amqp_url, backend=redis_url, config=config)
    yield app
    app.close()


def test_held_eta_tasks_raise_the_per_consumer_prefetch_at_once(quorum_app: App) -> None:
    """One greenlet, prefetch 1: eight countdown tasks are all held at once and a plain
    task sent after them still runs before they are due (a static per-consumer count
    would stop at the first held one); once they ran the window is 1 again."""
    app = quorum_app

    @app.task(name="prefetch.echo")
    def echo(x: int) -> int:
        return x

    worker = app.Worker(concurrency=1)
    worker.start()
    try:
        assert worker.consumer.wait_ready(10)
        assert worker.consumer.prefetch == 1
        later = [echo.apply_async((i,), countdown=4) for i in range(8)]
        now = echo.delay(99)
        assert now.get(timeout=3.5) == 99
        assert worker.handler.eta_held == 8  # all of them in hand, none due yet
        assert [r.get(timeout=20) for r in later] == list(range(8))
        wait_for(lambda: worker.consumer.prefetch == 1, 10, "the window shrinks back to 1")
    finally:
        stop(worker)


def test_a_grown_pool_gets_more_messages_at_once(quorum_app: App) -> None:
    """pool_grow (as the autoscaler does) widens the per-consumer window at once: tasks
    waiting behind a busy single greenlet start while it still blocks."""
    app = quorum_app
    release = green.new_event()
    started: list[int] = []
    all_started = green.new_event()

    @app.task(name="prefetch.block")
    def block(n: int) -> int:
        started.append(n)
        if len(started) == 4:
            all_started.set()
        release.wait(20)
        return n

    worker = app.Worker(concurrency=1)
    worker.start()
    try:
        assert worker.consumer.wait_ready(10)
        results = [block.delay(n) for n in range(4)]
        wait_for(lambda: started == [0], 10, "the first task starts")
        worker.pool.grow(3)
        assert all_started.wait(10), f"only {started} started after the pool grew"
        assert worker.consumer.prefetch == 4
        release.set()
        assert sorted(r.get(timeout=10) for r in results) == [0, 1, 2, 3]
    finally:
        release.set()
        stop(worker)


# ---------------------------------------------------------------- a Celery app


def test_celery_app_worker_on_quorum_queues_with_a_delivery_limit(
    amqp_url: str, redis_url: str, queue_name: str, cleanup: Callable[..., None]
) -> None:
    """A Celery app (as ``greenworker -A proj worker`` loads it) with
    ``task_default_queue_type = "quorum"`` and a ``task_queues`` queue with
    ``x-delivery-limit`` and dead-letter arguments: Celery's client sends to both, the
    tasks run, and a task that rejects itself with requeue every time is dead-lettered
    once the limit is used up (requeues count toward it), not redelivered forever."""
    from celery.exceptions import Reject

    limited = f"{queue_name}.limited"
    dead = f"{queue_name}.dead"
    dlx = f"{queue_name}.dlx"
    cleanup([queue_name, limited, dead, f"exchange:{dlx}"])
    with Connection(amqp_url) as conn:  # where the dead letters go
        dead_queue = Queue(dead, Exchange(dlx, type="direct", durable=True), routing_key=dead)
        dead_queue(conn.default_channel).declare()
    celery_app = Celery("quorumcelery", broker=amqp_url, backend=redis_url, set_as_current=False)
    celery_app.conf.update(
        task_default_queue=queue_name,
        task_default_queue_type="quorum",
        task_queues=[
            Queue(
                queue_name,
                Exchange(queue_name),
                routing_key=queue_name,
                queue_arguments={"x-queue-type": "quorum"},
            ),
            Queue(
                limited,
                Exchange(limited),
                routing_key=limited,
                queue_arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": 2,
                    "x-dead-letter-exchange": dlx,
                    "x-dead-letter-routing-key": dead,
                },
            ),
        ],
    )
    runs: list[int] = []

    @celery_app.task(name="quorumcelery.add", shared=False)  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    @celery_app.task(name="quorumcelery.poison", shared=False, acks_late=True)  # type: ignore[untyped-decorator]
    def poison() -> None:
        runs.append(1)
        raise Reject("poison", requeue=True)

    app = CeleryApp(celery_app)
    worker = app.Worker(concurrency=5, queues=[queue_name, limited], hostname=f"{queue_name}@test")
    worker.start()
    try:
        assert worker.consumer.wait_ready(10)
        assert queue_kind(amqp_url, queue_name) == "quorum"
        assert [add.delay(i, 1).get(timeout=20) for i in range(5)] == [1, 2, 3, 4, 5]
        assert add.apply_async((1, 1), queue=limited).get(timeout=20) == 2
        poison.apply_async(queue=limited)
        wait_for(lambda: message_count(amqp_url, dead) == 1, 20, "the poison is dead-lettered")
        assert len(runs) == 3  # the first delivery and the two the limit allows
        assert message_count(amqp_url, limited) == 0
    finally:
        stop(worker, celery_app)


def test_a_quorum_queue_added_at_run_time_is_consumed(
    amqp_url: str, redis_url: str, queue_name: str, cleanup: Callable[..., None]
) -> None:
    """add_consumer of a quorum queue on a worker whose queues were classic: the channel's
    global QoS would be refused, so the consumer reconnects with per-consumer QoS and
    consumes both; cancelling a queue there stops its consumers."""
    added = f"{queue_name}.added"
    cleanup([queue_name, added])
    config = {
        "task_default_queue": queue_name,
        "task_create_missing_queue_type": "quorum",
        "worker_enable_mingle": False,
        "worker_enable_gossip": False,
    }
    app = App("added", broker=amqp_url, backend=redis_url, config=config)

    @app.task(name="added.echo")
    def echo(x: int) -> int:
        return x

    worker = app.Worker(concurrency=4)
    worker.start()
    consumer: Any = worker.consumer
    try:
        assert consumer.wait_ready(10) and consumer._qos_global
        assert echo.delay(1).get(timeout=10) == 1
        consumer.add_queue(added)
        assert echo.apply_async((2,), queue=added).get(timeout=20) == 2
        assert consumer._credit is not None and not consumer._qos_global
        assert queue_kind(amqp_url, added) == "quorum"
        assert echo.delay(3).get(timeout=10) == 3  # the classic queue, per consumer too
        tags = [tag for _, tag, _ in consumer._credit._consumers[added]]
        consumer.cancel_queue(added)
        # the consumer greenlet forgets a tag once the broker confirmed its cancel
        wait_for(lambda: not set(tags) & set(consumer._ack_channel.callbacks), 10, "cancel-ok")
        assert added not in consumer._credit._consumers
        echo.apply_async((4,), queue=added)
        assert echo.delay(5).get(timeout=10) == 5
        assert message_count(amqp_url, added) == 1  # not consumed any more
    finally:
        stop(worker)
        app.close()


def test_quorum_settings_change_nothing_off_rabbitmq(queue_name: str) -> None:
    """On kombu's other transports the queue type is only a declaration argument: the
    worker consumes as before, a queue added at run time included."""
    config = {"task_default_queue": queue_name, "worker_hostname": f"{queue_name}@test", **QUORUM}
    app = App("offrabbit", broker="memory://", backend=f"memory://{queue_name}", config=config)

    @app.task(name="offrabbit.echo")
    def echo(x: int) -> int:
        return x

    worker = app.Worker(concurrency=2)
    worker.start()
    consumer: Any = worker.consumer
    try:
        assert echo.delay(1).get(timeout=10) == 1
        consumer.add_queue(f"{queue_name}.added")
        assert echo.apply_async((2,), queue=f"{queue_name}.added").get(timeout=10) == 2
        assert consumer._credit is None and consumer.reconnects == 0
    finally:
        stop(worker)
        app.close()


def test_a_message_that_keeps_killing_the_worker_is_dead_lettered(
    hub: str, amqp_url: str, queue_name: str, cleanup: Callable[..., None], tmp_path: Any
) -> None:
    """The poison case: a task that ends the worker process every time it runs. Each
    death is a redelivery, which counts toward the quorum queue's ``x-delivery-limit``
    (1 here): after the second death RabbitMQ dead-letters it instead of handing it to
    the next worker, and a worker started after that runs nothing more."""
    dead = f"{queue_name}.dead"
    cleanup([queue_name, dead])
    with Connection(amqp_url) as conn:  # where the dead letter goes
        Queue(dead, Exchange(dead), routing_key=dead)(conn.default_channel).declare()
    crashes = tmp_path / "crashes"
    env = {
        "QUORUM_BROKER": amqp_url,
        "QUORUM_QUEUE": queue_name,
        "QUORUM_DEAD_LETTERS": dead,
        "QUORUM_CRASHES": str(crashes),
    }
    from tests import quorumapp

    sender = Celery("poisonclient", broker=amqp_url, set_as_current=False)
    sender.conf.task_queues = quorumapp.dead_lettered(queue_name, dead)  # declared alike
    exits = []
    for attempt in range(3):
        worker = start_cli("-A", "tests.quorumapp", "worker", "-P", hub, "-c", "1", env=env)
        wait_for_output(worker, "ready")
        if attempt == 0:
            sender.send_task("quorumapp.crash", queue=queue_name)
        if attempt < 2:
            exits.append(worker.wait(60))  # the task ends the process
        else:  # the third worker gets nothing: the message is dead-lettered
            with Connection(amqp_url) as conn:
                deadline = time.monotonic() + 20
                while Queue(dead)(conn.default_channel).queue_declare(passive=True)[1] != 1:
                    assert time.monotonic() < deadline, "the message is dead-lettered"
                    time.sleep(0.1)  # RabbitMQ's queue length: no event to await
            worker.terminate()
            assert worker.wait(30) == 0
        if worker.stdout is not None:
            worker.stdout.close()
    assert exits == [3, 3]
    assert crashes.read_text().count("crash") == 2
