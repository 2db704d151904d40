"""Celery's broker retry settings, honoured as Celery 5 does: ``broker_connection_retry_on_startup``
(the first connection; None: ``broker_connection_retry`` decides), ``broker_connection_retry``
(after a connection) and ``broker_connection_max_retries`` (failed attempts in a row, counted
from the last connection; 0 or None: forever).  Giving up is one CRITICAL line and, from the
command line, exit status 1, without a traceback; for a Celery app and a greenworker App."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from greenworker import App, Worker, green

from .conftest import run_cli
from .faults import TcpProxy, free_port

APPS = ["tests.retryapp:gw_app", "tests.retryapp:celery_app"]
LOG_LINE = re.compile(r"^\[[^]]+: (?P<level>[A-Z]+)/(?P<name>[\w.]+)\] (?P<message>.*)$")
RETRY = re.compile(r"reconnecting in [\d.]+s(?: \((\d+)/(\d+)\))?$")
ON_STARTUP_OFF = (
    "Retrying to establish a connection to the message broker after a connection loss has "
    "been disabled (app.conf.broker_connection_retry_on_startup=False). Shutting down..."
)


def _lines(err: str) -> list[tuple[str, str, str]]:
    """(level, logger, message) of each log line."""
    matches = [LOG_LINE.match(line) for line in err.splitlines()]
    return [(m["level"], m["name"], m["message"]) for m in matches if m]


def _run(app: str, hub: str, broker: str, conf: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return run_cli(
        *("-A", app, "worker", "-P", hub, "--without-mingle"),
        timeout=40,
        env={"RETRYAPP_BROKER": broker, "RETRYAPP_CONF": json.dumps(conf)},
    )


def _dead_redis() -> str:
    return f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there


# ------------------------------------------------------------------ the command line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", APPS)
def test_no_retry_on_startup_is_one_critical_line_and_exit_1(app: str, hub: str) -> None:
    broker = _dead_redis()
    result = _run(app, hub, broker, {"broker_connection_retry_on_startup": False})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = _lines(result.stderr)
    critical = [message for level, _name, message in lines if level == "CRITICAL"]
    assert len(critical) == 1, result.stderr
    port = broker.rsplit(":", 1)[1]
    assert critical[0].startswith(f"consumer: Cannot connect to redis://:**@127.0.0.1:{port}: ")
    assert critical[0].endswith(ON_STARTUP_OFF), critical[0]
    assert "s3cret" not in result.stderr
    # no retry, no "waiting for the broker", never ready
    assert [level for level, _name, _message in lines if level == "WARNING"] == []
    assert not any(" ready:" in message for _level, _name, message in lines)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", APPS)
def test_max_retries_gives_up_after_that_many_retries_and_exits_1(app: str, hub: str) -> None:
    # AMQP: kombu's consumer (the Redis URL above runs the native one: the same policy)
    broker = f"amqp://guest:s3cret@127.0.0.1:{free_port()}//"
    conf = {"broker_connection_max_retries": 3, "broker_connection_max_backoff": 0.1}
    result = _run(app, hub, broker, conf)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = _lines(result.stderr)
    counts = [
        match.groups()
        for _level, name, message in lines
        if name == "greenworker.consumer" and (match := RETRY.search(message))
    ]
    assert counts == [("1", "3"), ("2", "3"), ("3", "3")], result.stderr  # Celery's (n/max)
    critical = [message for level, _name, message in lines if level == "CRITICAL"]
    assert len(critical) == 1, result.stderr
    assert critical[0].endswith(
        "Gave up after 3 retries (app.conf.broker_connection_max_retries=3). Shutting down..."
    )
    assert "amqp://guest:**@127.0.0.1:" in critical[0]
    assert "s3cret" not in result.stderr


# ------------------------------------------------------------------ embedded workers


def _worker(broker: str, queue: str, **conf: Any) -> Worker:
    app = App("retry", broker=broker, backend="memory://", config={"task_default_queue": queue})
    app.conf.update({"broker_connection_max_backoff": 0.1, "worker_enable_mingle": False, **conf})
    return app.Worker(concurrency=1, hostname=f"{queue}@test")


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "greenworker.consumer" and RETRY.search(r.getMessage())
    ]


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for log records (no event announces them)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        green.sleep(0.01)


@pytest.mark.timeout(30)
def test_without_retry_on_startup_broker_connection_retry_decides(queue_name: str) -> None:
    """Celery 5's rule: broker_connection_retry_on_startup unset, broker_connection_retry
    False: the first connection is not retried either, and the line names that setting."""
    worker = _worker(_dead_redis(), queue_name, broker_connection_retry=False)
    worker.start(ready_timeout=0)
    try:
        assert worker.wait_stopped(10), "the worker did not stop"
    finally:
        worker.stop(timeout=1)
        worker.app.close()
    assert worker.fatal is not None
    assert worker.fatal.endswith(
        "Retrying to establish a connection to the message broker after a connection loss "
        "has been disabled (app.conf.broker_connection_retry=False). Shutting down..."
    )


@pytest.mark.timeout(30)
def test_retry_on_startup_wins_over_broker_connection_retry_at_startup(
    queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker = _worker(
        _dead_redis(),
        queue_name,
        broker_connection_retry=False,
        broker_connection_retry_on_startup=True,
    )
    caplog.set_level(logging.WARNING, logger="greenworker")
    worker.start(ready_timeout=0)
    try:
        _poll(lambda: len(_retries(caplog)) >= 3, 10, "three retries")
        assert worker.fatal is None
        assert not worker.wait_stopped(0)
    finally:
        worker.stop(timeout=1)
        worker.app.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("limit", [0, None])
def test_max_retries_0_or_none_retries_forever(
    limit: int | None, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker = _worker(_dead_redis(), queue_name, broker_connection_max_retries=limit)
    caplog.set_level(logging.WARNING, logger="greenworker")
    worker.start(ready_timeout=0)
    try:
        _poll(lambda: len(_retries(caplog)) >= 4, 10, "four retries")
        assert worker.fatal is None
        assert all("/" not in line.rsplit(" ", 1)[-1] for line in _retries(caplog))  # no (n/max)
    finally:
        worker.stop(timeout=1)
        worker.app.close()


@pytest.mark.timeout(60)
def test_no_retry_after_a_connection_loss_stops_the_worker(
    redis_url: str, queue_name: str, proxy: Callable[[int], TcpProxy]
) -> None:
    through = proxy(6379)
    through.start()
    worker = _worker(
        f"redis://127.0.0.1:{through.port}/0",
        queue_name,
        broker_connection_retry=False,
        broker_connection_retry_on_startup=True,
    )
    worker.start(ready_timeout=20)
    try:
        assert worker.consumer.ready
        through.cut()
        assert worker.wait_stopped(20), "the worker did not stop"
    finally:
        worker.stop(timeout=1)
        worker.app.close()
    assert worker.fatal is not None
    assert worker.fatal.endswith(
        "Retrying to re-establish a connection to the message broker after a connection "
        "loss has been disabled (app.conf.broker_connection_retry=False). Shutting down..."
    )


@pytest.mark.timeout(60)
def test_max_retries_count_from_the_last_connection(
    redis_url: str,
    queue_name: str,
    proxy: Callable[[int], TcpProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loss, one failed attempt, a connection again: the next outage counts from 1
    again, and the worker gives up after its third failed attempt."""
    through = proxy(6379)
    through.start()
    worker = _worker(
        f"redis://127.0.0.1:{through.port}/0",
        queue_name,
        broker_connection_max_retries=3,
        broker_connection_max_backoff=1.0,  # time to restore the proxy after one retry
    )
    caplog.set_level(logging.WARNING, logger="greenworker")
    worker.start(ready_timeout=20)
    try:
        assert worker.consumer.ready
        through.cut()
        _poll(lambda: any(line.endswith("(1/3)") for line in _retries(caplog)), 20, "(1/3)")
        through.restore()
        assert worker.consumer.wait_ready(20)
        through.cut()
        assert worker.wait_stopped(30), "the worker did not give up"
    finally:
        worker.stop(timeout=1)
        worker.app.close()
    labels = [RETRY.search(line).group(1) for line in _retries(caplog)]  # type: ignore[union-attr]
    # the loss itself is no failed attempt (no count); each outage counts from 1
    assert labels == [None, "1", None, "1", "2", "3"], _retries(caplog)
    assert worker.fatal is not None and worker.fatal.endswith(
        "Gave up after 3 retries (app.conf.broker_connection_max_retries=3). Shutting down..."
    )
