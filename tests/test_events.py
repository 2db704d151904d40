"""Events seen by Celery's own receiver; heartbeats; gossip and mingle; control fuzzing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.messaging import Producer

from greenworker import App, Task, green
from greenworker.control.mailbox import broadcast, mailbox

from .conftest import ROOT, delete_queues_and_close


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else str(request.getfixturevalue("amqp_url"))


def _app(broker: str, redis_url: str, queue_name: str, **config: Any) -> App:
    return App(
        "events",
        broker=broker,
        backend=redis_url,
        config={"task_default_queue": queue_name, **config},
    )


@pytest.fixture
def cleanup(queue_name: str, redis_url: str) -> Iterator[list[App]]:
    apps: list[App] = []
    yield apps
    for app in apps:
        delete_queues_and_close(app, queue_name)


@pytest.mark.timeout(90)
def test_celery_receiver_sees_worker_and_task_events(
    broker: str, redis_url: str, queue_name: str, cleanup: list[App]
) -> None:
    app = _app(broker, redis_url, queue_name, worker_send_task_events=True, worker_heartbeat=0.3)
    cleanup.append(app)

    @app.task(name="ev.ok")
    def ok(x: int) -> int:
        return x

    @app.task(name="ev.bad")
    def bad() -> None:
        raise ValueError("boom")

    @app.task(name="ev.again", bind=True, max_retries=1)
    def again(self: Task) -> None:
        raise self.retry(countdown=0)

    host = f"ev-{uuid.uuid4().hex[:6]}@test"
    seen: list[dict[str, Any]] = []
    client = Celery("watcher", broker=broker)
    receiver_ready = green.new_event()

    def watch() -> None:
        with client.connection_for_read() as conn:
            receiver = client.events.Receiver(
                conn, handlers={"*": lambda event: seen.append(event)}
            )
            receiver_ready.set()
            receiver.capture(limit=None, timeout=30, wakeup=False)

    watcher = green.spawn(watch)
    assert receiver_ready.wait(10)
    green.sleep(0.5)  # the receiver's queue is bound once capture() consumes
    worker = app.Worker(concurrency=4, hostname=host)
    worker.start()
    try:
        ok.delay(1).get(timeout=10)
        with pytest.raises(ValueError):
            bad.delay().get(timeout=10)
        with pytest.raises(Exception):  # noqa: B017 - MaxRetries/Retry, either way final
            again.delay().get(timeout=10)
        green.sleep(0.8)  # heartbeats every 0.3 s, events flushed every 0.2 s
    finally:
        worker.stop(timeout=5)
    green.sleep(0.5)
    watcher.kill()
    client.close()
    mine = [e for e in seen if e.get("hostname") == host]
    types = {e["type"] for e in mine}
    expected = {
        "worker-online",
        "worker-heartbeat",
        "task-received",
        "task-started",
        "task-succeeded",
        "task-failed",
        "task-retried",
        "worker-offline",
    }
    assert expected <= types, types
    for event in mine:
        assert {"hostname", "timestamp", "type", "clock", "utcoffset", "pid"} <= set(event)
    beat = next(e for e in mine if e["type"] == "worker-heartbeat")
    assert {"freq", "active", "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys"} <= set(beat)
    done = next(e for e in mine if e["type"] == "task-succeeded")
    assert {"uuid", "result", "runtime"} <= set(done)
    received = next(e for e in mine if e["type"] == "task-received")
    assert {"uuid", "name", "args", "kwargs", "retries", "root_id"} <= set(received)
    clocks = [e["clock"] for e in mine]
    assert clocks == sorted(clocks)  # one Lamport clock, always forward


@pytest.mark.timeout(60)
def test_gossip_sees_the_other_and_mingle_merges_a_revoke(
    broker: str, redis_url: str, queue_name: str, cleanup: list[App]
) -> None:
    app = _app(broker, redis_url, queue_name, worker_heartbeat=0.3)
    cleanup.append(app)
    first = app.Worker(hostname=f"first-{uuid.uuid4().hex[:6]}@test")
    first.start()
    assert first.control is not None and first.control.wait_ready(10)
    first.revoke("revoked-before-second")
    second = app.Worker(hostname=f"second-{uuid.uuid4().hex[:6]}@test")
    second.start()
    try:
        assert second.mingled.wait(10)
        assert "revoked-before-second" in second.state.revoked  # mingle
        assert second.gossip is not None and first.gossip is not None
        for _ in range(100):
            if first.hostname in second.gossip.alive() and second.hostname in first.gossip.alive():
                break
            green.sleep(0.05)
        assert first.hostname in second.gossip.alive()
        assert second.hostname in first.gossip.alive()
    finally:
        second.stop(timeout=5)
    for _ in range(100):  # worker-offline reaches the other one
        if second.hostname not in first.gossip.alive():
            break
        green.sleep(0.05)
    assert second.hostname not in first.gossip.alive()
    first.stop(timeout=5)


@pytest.mark.timeout(60)
def test_fuzzed_control_messages_get_no_crash(
    broker: str, redis_url: str, queue_name: str, cleanup: list[App]
) -> None:
    app = _app(broker, redis_url, queue_name)
    cleanup.append(app)
    host = f"fuzz-{uuid.uuid4().hex[:6]}@test"
    worker = app.Worker(hostname=host)
    worker.start()
    assert worker.control is not None and worker.control.wait_ready(10)
    try:
        box = mailbox()
        with app.connection() as conn:
            exchange = box(conn).exchange
            producer = Producer(conn)
            for body in (
                [1, 2],
                "text",
                {"method": 5},
                {"method": "ping", "arguments": [1]},
                {"method": "ping", "destination": "x"},
                {"method": "ping", "reply_to": "nowhere"},
                {"method": "no_such_command", "arguments": {}},
                {"method": "revoke", "arguments": {"task_id": {"a": 1}}},
            ):
                producer.publish(
                    body, exchange=exchange, routing_key="", serializer="json", declare=[exchange]
                )
            replies = broadcast(conn, "no_such_command", {}, destination=[host], timeout=3)
            assert "error" in replies[0][host]
            typed = broadcast(
                conn,
                "rate_limit",
                {"task_name": 1, "rate_limit": []},
                destination=[host],
                timeout=3,
            )
            assert "error" in typed[0][host]
            assert broadcast(conn, "ping", {}, destination=[host], timeout=3) == [
                {host: {"ok": "pong"}}
            ]
    finally:
        worker.stop(timeout=5)


class _Capture:
    """Celery's own event receiver, in a greenlet, keeping every event it sees."""

    def __init__(self, broker: str) -> None:
        self.client = Celery("watcher", broker=broker)
        self.seen: list[dict[str, Any]] = []
        self._greenlet = green.spawn(self._run)

    def _run(self) -> None:
        with self.client.connection_for_read() as conn:
            receiver = self.client.events.Receiver(conn, handlers={"*": self.seen.append})
            receiver.capture(limit=None, timeout=60, wakeup=False)

    def wait_for(self, test: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(test(e) for e in list(self.seen)):
            assert time.monotonic() < deadline, "event not seen in time"
            green.sleep(0.02)

    def close(self) -> None:
        self._greenlet.kill()
        self.client.close()


def _retry_scenario(capture: _Capture, client: Celery, host: str, queue: str) -> dict[str, Any]:
    """A child task that retries once then fails, and a top-level one doing the same; the
    events each worker sent about them."""
    # the receiver's queue is bound once it consumes: a heartbeat seen says it is
    capture.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["hostname"] == host)
    child_id = client.send_task("celery_side.parent", queue=queue).get(timeout=30)
    top = client.send_task("celery_side.again", queue=queue)
    for task_id in (child_id, top.id):
        capture.wait_for(lambda e: e["type"] == "task-failed" and e.get("uuid") == task_id)  # noqa: B023
    mine = [e for e in capture.seen if e.get("hostname") == host]

    def of(task_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in mine if e.get("uuid") == task_id and e["type"] == kind]

    parent_id = next(e["uuid"] for e in mine if e.get("name") == "celery_side.parent")
    return {
        "parent_id": parent_id,
        "child_id": child_id,
        "top_id": top.id,
        "child_received": of(child_id, "task-received"),
        "top_received": of(top.id, "task-received"),
        "retried": of(child_id, "task-retried") + of(top.id, "task-retried"),
    }


def _check_retry_events(seen: dict[str, Any]) -> tuple[set[str], set[str]]:
    """What Celery's worker sends about retries, checked; returns the two events' fields."""
    # the retry of a child keeps its parent; a top-level task is its retry's parent
    child = {e["retries"]: e["parent_id"] for e in seen["child_received"]}
    assert child == {0: seen["parent_id"], 1: seen["parent_id"]}
    top = {e["retries"]: e["parent_id"] for e in seen["top_received"]}
    assert top == {0: None, 1: seen["top_id"]}
    assert len(seen["retried"]) == 2
    for event in seen["retried"]:
        assert "ValueError('nope')" in event["exception"]
        # the traceback of the Retry as the task raised it (Flower's Traceback field)
        assert event["traceback"].startswith("Traceback (most recent call last):")
        assert "raise self.retry(" in event["traceback"]
        assert re.search(r"Retry: Retry in 0s: ValueError\('nope'\)\n$", event["traceback"])
    return set(seen["retried"][0]), set(seen["child_received"][0])


@pytest.mark.timeout(120)
def test_retry_events_match_a_celery_gevent_worker(redis_url: str, queue_name: str) -> None:
    client = Celery("producer", broker=redis_url, backend=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    capture = _Capture(redis_url)
    celery_host = f"cel-{uuid.uuid4().hex[:6]}@test"
    celery_worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "tests.celery_side", "worker"),
            *("-P", "gevent", "-c", "4", "-Q", queue_name, "-n", celery_host, "-E"),
            *("--without-mingle", "--without-gossip", "-l", "warning"),
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "INTEROP_BROKER": redis_url,
            "INTEROP_BACKEND": redis_url,
            "INTEROP_QUEUE": queue_name,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        by_celery = _retry_scenario(capture, client, celery_host, queue_name)
    finally:
        celery_worker.terminate()
        celery_worker.wait(30)

    app = _app(redis_url, redis_url, queue_name, worker_send_task_events=True, worker_heartbeat=0.3)

    @app.task(name="celery_side.again", bind=True, max_retries=1)
    def again(self: Task) -> None:
        raise self.retry(exc=ValueError("nope"), countdown=0)

    @app.task(name="celery_side.parent")
    def parent() -> str:
        return again.delay().id

    gw_host = f"gw-{uuid.uuid4().hex[:6]}@test"
    worker = app.Worker(concurrency=4, hostname=gw_host)
    worker.start()
    try:
        by_greenworker = _retry_scenario(capture, client, gw_host, queue_name)
    finally:
        worker.stop(timeout=5)
        capture.close()
        client.close()
        delete_queues_and_close(app, queue_name)
    assert _check_retry_events(by_greenworker) == _check_retry_events(by_celery)


@pytest.mark.timeout(60)
def test_gossip_listens_again_after_the_worker_is_started_again(
    broker: str, redis_url: str, queue_name: str, cleanup: list[App]
) -> None:
    app = _app(broker, redis_url, queue_name, worker_heartbeat=0.3)
    cleanup.append(app)
    first = app.Worker(hostname=f"again-{uuid.uuid4().hex[:6]}@test")
    first.start()
    first.stop(timeout=5)
    first.start()  # the same worker, in the same process
    assert first.gossip is not None and first.gossip.wait_ready(10)
    second = app.Worker(hostname=f"peer-{uuid.uuid4().hex[:6]}@test")
    second.start()
    try:
        for _ in range(100):
            if second.hostname in first.gossip.alive():
                break
            green.sleep(0.05)
        assert second.hostname in first.gossip.alive()
    finally:
        second.stop(timeout=5)
        first.stop(timeout=5)
