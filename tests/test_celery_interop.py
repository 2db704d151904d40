"""Interop with a real, unmodified Celery 5: Celery producers -> greenworker, and back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any

import pytest
from celery import Celery
from celery import exceptions as celery_exceptions

from greenworker import App, Task, Worker, green
from greenworker.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded

from .conftest import ROOT, delete_queues_and_close


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

    @app.task(name="interop.typed_echo")
    def typed_echo(value: object) -> dict[str, object]:
        """The value back, with the type name the task saw it arrive as."""
        return {"type": type(value).__name__, "value": value}

    @app.task(name="interop.header_of", bind=True)
    def header_of(self: Task, name: str) -> dict[str, object]:
        value = self.request.headers.get(name)
        return {"type": type(value).__name__, "value": value}

    @app.task(name="interop.nap")
    def nap(seconds: float) -> str:
        green.sleep(seconds)
        return "woke up"

    @app.task(name="interop.nap_until_soft_limit")
    def nap_until_soft_limit(seconds: float) -> float:
        """Seconds until the soft limit interrupted the nap (raises if it never did)."""
        started = time.monotonic()
        try:
            green.sleep(seconds)
        except SoftTimeLimitExceeded:
            return time.monotonic() - started
        raise AssertionError("no soft time limit")

    worker = app.Worker(concurrency=20)
    worker.start()
    yield worker
    worker.stop(timeout=10)
    delete_queues_and_close(app, queue_name)


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
    # Celery ships no annotations, so its task decorator is untyped.
    @celery_client.task(name="interop.echo_kwargs", shared=False)  # type: ignore[untyped-decorator]
    def echo_kwargs(**kwargs: object) -> None: ...

    @celery_client.task(name="interop.fail", shared=False)  # type: ignore[untyped-decorator]
    def fail(message: str) -> None: ...

    ok = echo_kwargs.apply_async(kwargs={"a": 1, "b": [2, 3]}, queue=queue_name, countdown=0.2)
    assert ok.get(timeout=20) == {"a": 1, "b": [2, 3]}
    bad = fail.apply_async(("no good",), queue=queue_name)
    with pytest.raises(ValueError, match="no good"):
        bad.get(timeout=20)
    assert bad.state == "FAILURE"
    assert "ValueError: no good" in (bad.traceback or "")


#: Values Celery's JSON serializer (kombu's) carries typed, each with its type's name.
TYPED_VALUES: list[tuple[str, Any]] = [
    ("datetime", datetime(2026, 12, 1, 21, 30, 15, 123456, tzinfo=UTC)),
    ("datetime", datetime(2026, 12, 1, 21, 30, 15)),  # naive stays naive
    ("date", date(2026, 2, 28)),
    ("time", time_of_day(23, 59, 1, 5)),
    ("Decimal", Decimal("12345678901234567890.10")),
    ("UUID", uuid.UUID("6f1c5d1e-8d4b-4f8e-9a43-2b0f4a1e3c55")),
    ("bytes", b"plain text"),
    ("bytes", b"\x00\xff\xfe binary"),
]


@pytest.mark.timeout(60)
def test_celery_client_typed_args_and_results(
    gw_worker: Worker, celery_client: Celery, queue_name: str
) -> None:
    """A Celery producer's datetime/Decimal/UUID/bytes arrive typed; its AsyncResult gets
    them back typed from greenworker's stored result."""
    sent = [
        celery_client.send_task("interop.typed_echo", (value,), queue=queue_name)
        for _, value in TYPED_VALUES
    ]
    for (type_name, value), result in zip(TYPED_VALUES, sent, strict=True):
        assert result.get(timeout=20) == {"type": type_name, "value": value}
        assert type(result.result["value"]) is type(value)
    nested = {"when": [TYPED_VALUES[0][1]], "amount": {"due": Decimal("1.5")}}
    echoed = celery_client.send_task("interop.typed_echo", (nested,), queue=queue_name)
    assert echoed.get(timeout=20) == {"type": "dict", "value": nested}


@pytest.mark.timeout(60)
def test_greenworker_client_typed_args_and_results(gw_worker: Worker) -> None:
    client = gw_worker.app
    sent = [client.send_task("interop.typed_echo", (value,)) for _, value in TYPED_VALUES]
    for (type_name, value), result in zip(TYPED_VALUES, sent, strict=True):
        assert result.get(timeout=20) == {"type": type_name, "value": value}
        assert type(result.result["value"]) is type(value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_celery_typed_header_through_the_native_redis_consumer(
    gw_worker: Worker, celery_client: Celery, queue_name: str
) -> None:
    """kombu's Redis envelope is kombu's JSON too: a typed header arrives typed."""
    sent_at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    result = celery_client.send_task(
        "interop.header_of", ("sent_at",), queue=queue_name, headers={"sent_at": sent_at}
    )
    assert result.get(timeout=20) == {"type": "datetime", "value": sent_at}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_greenworker_client_reads_typed_results_celery_stored(
    celery_client: Celery, redis_url: str
) -> None:
    celery_client.conf.result_expires = None  # plain SET (Celery's SETEX path warns)
    client = App("gwreader", broker=redis_url, backend=redis_url)
    try:
        for _, value in TYPED_VALUES:
            task_id = str(uuid.uuid4())
            celery_client.backend.store_result(task_id, {"value": value}, "SUCCESS")
            assert client.AsyncResult(task_id).get(timeout=5) == {"value": value}
            assert type(client.AsyncResult(task_id).result["value"]) is type(value)
            celery_client.backend.forget(task_id)
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_revoked_and_expired_errors_read_as_celerys(
    gw_worker: Worker, celery_client: Celery, queue_name: str
) -> None:
    """Both clients raise TaskRevokedError('expired') / ('revoked'), as from a Celery worker."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired = celery_client.send_task("interop.add", (1, 1), queue=queue_name, expires=past)
    revoked_id = str(uuid.uuid4())
    gw_worker.revoke(revoked_id)
    revoked = celery_client.send_task("interop.add", (1, 1), queue=queue_name, task_id=revoked_id)
    for result, reason in ((expired, "expired"), (revoked, "revoked")):
        with pytest.raises(celery_exceptions.TaskRevokedError) as celery_side:
            result.get(timeout=20)
        assert celery_side.value.args == (reason,)
        with pytest.raises(TaskRevokedError) as greenworker_side:
            gw_worker.app.AsyncResult(result.id).get(timeout=5)
        assert str(greenworker_side.value) == reason
        assert greenworker_side.value.args == (reason,)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_greenworker_client_reads_celery_stored_revocations(
    celery_client: Celery, redis_url: str
) -> None:
    celery_client.conf.result_expires = None  # plain SET (Celery's SETEX path warns)
    client = App("gwreader", broker=redis_url, backend=redis_url)
    try:
        for reason in ("revoked", "expired", "terminated"):
            task_id = str(uuid.uuid4())
            celery_client.backend.mark_as_revoked(task_id, reason)
            with pytest.raises(TaskRevokedError, match=f"^{reason}$"):
                client.AsyncResult(task_id).get(timeout=5)
            assert client.AsyncResult(task_id).state == "REVOKED"
            celery_client.backend.forget(task_id)
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_celery_client_time_limits_reach_greenworker_as_hard_and_soft(
    gw_worker: Worker, celery_client: Celery, queue_name: str
) -> None:
    """Celery writes ``timelimit`` as [hard, soft]; greenworker must read it so."""
    started = time.monotonic()
    killed = celery_client.send_task("interop.nap", (5,), queue=queue_name, time_limit=0.5)
    with pytest.raises(celery_exceptions.TimeLimitExceeded):
        killed.get(timeout=20)
    assert time.monotonic() - started < 3  # killed at its hard limit, not after the nap
    soft = celery_client.send_task(
        "interop.nap_until_soft_limit",
        (5,),
        queue=queue_name,
        soft_time_limit=0.5,
        time_limit=3,
    )
    assert 0.45 <= soft.get(timeout=20) < 1.5  # soft raised at 0.5 s, not killed


@contextmanager
def running_celery_worker(
    broker_url: str, backend_url: str, queue_name: str, pool: str = "solo"
) -> Iterator[subprocess.Popen[str]]:
    """A real ``celery worker`` (tests/celery_side.py) consuming ``queue_name``; stopped after."""
    env = {**os.environ, "INTEROP_BROKER": broker_url, "INTEROP_BACKEND": backend_url}
    quiet = ["--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "warning"]
    concurrency = ["-c", "1"] if pool == "prefork" else []
    command = [sys.executable, "-m", "celery", "-A", "tests.celery_side", "worker", "-P", pool]
    celery_worker = subprocess.Popen(
        [*command, "-Q", queue_name, *concurrency, *quiet],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield celery_worker
    finally:
        celery_worker.terminate()
        try:
            celery_worker.wait(20)
        except subprocess.TimeoutExpired:
            celery_worker.kill()
            celery_worker.wait(5)
        if celery_worker.stdout is not None:
            celery_worker.stdout.close()


@pytest.fixture
def gw_client(broker_url: str, redis_url: str, queue_name: str) -> Iterator[App]:
    client = App(
        "gwclient", broker=broker_url, backend=redis_url, config={"task_default_queue": queue_name}
    )
    yield client
    delete_queues_and_close(client, queue_name)


@pytest.mark.timeout(90)
def test_greenworker_client_to_a_celery_worker(
    broker_url: str, redis_url: str, queue_name: str, gw_client: App
) -> None:
    with running_celery_worker(broker_url, redis_url, queue_name):
        results = [gw_client.send_task("celery_side.mul", (i, 3)) for i in range(10)]
        assert [r.get(timeout=60) for r in results] == [3 * i for i in range(10)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_celery_gevent_worker_reads_greenworker_time_limits(
    broker_url: str, redis_url: str, queue_name: str, gw_client: App
) -> None:
    """greenworker writes [hard, soft]: Celery's request sees them so and kills at the hard one.

    (Celery's gevent pool enforces only the hard limit; the soft one is checked on the request.)
    """
    with running_celery_worker(broker_url, redis_url, queue_name, pool="gevent"):
        seen = gw_client.send_task("celery_side.own_limits", time_limit=3, soft_time_limit=1)
        assert seen.get(timeout=60) == {"time_limit": 3, "soft_time_limit": 1}
        started = time.monotonic()
        killed = gw_client.send_task("celery_side.nap", (5,), time_limit=0.5)
        with pytest.raises(TimeLimitExceeded):
            killed.get(timeout=20)
        assert time.monotonic() - started < 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_celery_prefork_worker_raises_greenworker_soft_limit(
    broker_url: str, redis_url: str, queue_name: str, gw_client: App
) -> None:
    """Celery's prefork pool enforces both limits: the soft one raises inside the task."""
    with running_celery_worker(broker_url, redis_url, queue_name, pool="prefork"):
        soft = gw_client.send_task(
            "celery_side.nap_until_soft_limit", (5,), soft_time_limit=0.5, time_limit=3
        )
        assert 0.45 <= soft.get(timeout=60) < 1.5
