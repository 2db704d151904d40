"""Shared fixtures.  The suite runs only in a monkeypatched process (tests/run_patched.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kombu.message import Message
from kombu.messaging import Producer

from greenworker import App, Worker, green

if TYPE_CHECKING:
    from .faults import TcpProxy

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("GREENWORKER_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("GREENWORKER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def pytest_configure(config: pytest.Config) -> None:
    if green.patched_by() is None:
        raise pytest.UsageError(
            "run the suite through the monkeypatching runner: "
            "python tests/run_patched.py gevent|eventlet (or tox -e gevent / -e eventlet)"
        )


def pytest_report_header() -> str:
    return f"greenworker hub: {green.patched_by()} (CI={IN_CI})"


@pytest.fixture(scope="session")
def hub() -> str:
    name = green.patched_by()
    assert name is not None
    return name


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _need_broker(port: int, name: str) -> None:
    if not _port_open(port):
        message = f"{name} is not running on 127.0.0.1:{port}"
        if IN_CI:
            pytest.fail(message + " (CI=true: integration tests must run)")
        pytest.skip(message)


@pytest.fixture
def redis_url() -> str:
    _need_broker(6379, "Redis")
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    _need_broker(5672, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def scratch_redis(tmp_path: Path) -> Iterator[str]:
    """The URL of a Redis of the test's own (no persistence), for tests with a short
    visibility timeout: on the shared server their sweeps would restore the messages
    other tests' workers hold in the one ``unacked`` hash."""
    from .faults import PrivateRedis

    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path / "scratch-redis", durable=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """Make TCP proxies to broker ports (``proxy(6379)``); each is cut after the test."""
    from .faults import TcpProxy

    made: list[TcpProxy] = []

    def make(upstream: int) -> TcpProxy:
        made.append(TcpProxy(upstream))
        return made[-1]

    yield make
    for each in made:
        each.cut()


@pytest.fixture
def queue_name() -> str:
    """A queue of its own for each test, so leftovers never leak between tests."""
    return f"gwtest.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def memory_app(queue_name: str) -> Iterator[App]:
    app = App(
        "memtest",
        broker="memory://",
        backend=f"memory://{uuid.uuid4().hex}",
        config={"task_default_queue": queue_name, "worker_hostname": f"{queue_name}@test"},
    )
    yield app
    app.close()


BROKERS = ("memory", "redis", "amqp", "embedded")


@pytest.fixture(params=BROKERS)
def any_app(request: pytest.FixtureRequest, queue_name: str, tmp_path: Path) -> Iterator[App]:
    """The same test on kombu memory://, real Redis, real RabbitMQ and the embedded default."""
    kind = request.param
    # a node name of its own: a mailbox the broker still keeps for the last test's
    # worker (its connection closing) must not be shared
    config = {"task_default_queue": queue_name, "worker_hostname": f"{queue_name}@test"}
    if kind == "memory":
        app = App(
            "anyapp", broker="memory://", backend=f"memory://{uuid.uuid4().hex}", config=config
        )
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        app = App("anyapp", broker=url, backend=url, config=config)
    elif kind == "amqp":
        backend = request.getfixturevalue("redis_url")
        app = App(
            "anyapp", broker=request.getfixturevalue("amqp_url"), backend=backend, config=config
        )
    else:
        app = App("anyapp", data_dir=str(tmp_path), config=config)
    yield app
    delete_queues_and_close(app, *([queue_name] if kind in ("redis", "amqp") else []))


def delete_queues_and_close(app: App, *queues: str) -> None:
    """Leave the broker as the test found it: delete its queues and the exchanges of the
    same name the App declared for them, then close the app."""
    with app.connection() as conn:
        for name in queues:
            queue = app.queue(name)(conn.default_channel)
            queue.delete()
            if queue.exchange.name == name:
                queue.exchange.delete()
    app.close()


@pytest.fixture
def any_worker(any_app: App) -> Iterator[Worker]:
    """A started worker (concurrency 20) on ``any_app``; stopped after the test."""
    w = any_app.Worker(concurrency=20)
    w.start()
    yield w
    w.stop(timeout=5)


@pytest.fixture
def worker(memory_app: App) -> Iterator[Worker]:
    """A started worker (concurrency 20) on the memory app; stopped after the test."""
    w = memory_app.Worker(concurrency=20)
    w.start()
    yield w
    w.stop(timeout=5)


def publish_raw(app: App, body: Any, headers: dict[str, Any], **options: Any) -> None:
    """Publish a hand-made message to the app's default queue (for bad-input tests)."""
    queue = app.queue()
    with app.connection() as conn:
        Producer(conn).publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            headers=headers,
            declare=[queue],
            **options,
        )


def take(app: App, queue: str) -> Message | None:
    """The next message waiting in ``queue`` (removed from it), or None."""
    with app.connection() as conn:
        message: Message | None = conn.default_channel.basic_get(queue, no_ack=True)
        return message


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m greenworker ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "greenworker", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 90.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE`` in the project root (a client in a process of its own)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m greenworker ARGS`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "greenworker", *args],
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def keep_draining(proc: subprocess.Popen[str]) -> list[str]:
    """Read ``proc``'s output from now on in the background, into the list returned: a
    worker at INFO writes a line or two per task, and a pipe nobody reads fills up and
    blocks its writes (and so its hub)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []

    def drain() -> None:
        for line in stdout:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return lines


def wait_for_output(proc: subprocess.Popen[str], needle: str, timeout: float = 30.0) -> str:
    """Read ``proc``'s output up to the first line containing ``needle``; return what was
    read (an AssertionError with it if the line does not come within ``timeout``)."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(seen)}")
