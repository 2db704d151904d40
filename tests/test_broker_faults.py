"""Broker faults under load: a Redis restart, a RabbitMQ outage, a broker that never returns.

The worker runs as the CLI runs it, in a subprocess, with acks late; every task
records its run in the suite's main Redis, so counts survive the fault.  Redis
is a private server of the test's own (persistence on, so a restart keeps the
queue); RabbitMQ is reached through a proxy that the test cuts and restores.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from greenworker import App

from .conftest import ROOT, run_cli
from .faults import PrivateRedis, TcpProxy, env_with, log_tail

TOTAL = 300
WORKER_COMMAND = [sys.executable, "-m", "greenworker", "-A", "tests.sigapp", "-c", "40"]
WORKER_COMMAND += ["--without-mingle", "-l", "info"]


@pytest.fixture
def runs(redis_url: str, queue_name: str) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(redis_url)
    key = f"faultruns:{queue_name}"
    yield client, key
    client.delete(key)
    client.close()


def _start_worker(
    hub: str, broker: str, redis_url: str, queue: str, key: str, log: Path
) -> subprocess.Popen[bytes]:
    env = env_with(
        SIGAPP_BROKER=broker,
        SIGAPP_REDIS=redis_url,
        SIGAPP_QUEUE=queue,
        SIGAPP_KEY=key,
        # a message held by a connection that died comes back after 5 s, not an hour
        GREENWORKER_BROKER_TRANSPORT_OPTIONS='{"visibility_timeout": 5}',
        GREENWORKER_BROKER_CONNECTION_MAX_BACKOFF="1",
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [*WORKER_COMMAND, "-P", hub],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; worker log:\n{log_tail(log)}")
        time.sleep(0.05)


def _publish(broker: str, queue: str) -> None:
    client = App("faults", broker=broker, config={"task_default_queue": queue})
    try:
        for n in range(TOTAL):
            client.send_task("sig.work", (n, 0.05 + (n % 5) * 0.02), ignore_result=True)
    finally:
        client.close()


def _run_through_a_fault(
    hub: str,
    broker: str,
    redis_url: str,
    queue: str,
    runs: tuple[redis.Redis, str],
    log: Path,
    fault: Callable[[], None],
) -> None:
    client, key = runs
    _publish(broker, queue)
    worker = _start_worker(hub, broker, redis_url, queue, key, log)
    try:
        _wait(lambda: client.hlen(key) >= 60, 60, "60 tasks before the fault", log)
        before = client.hlen(key)
        fault()
        try:
            _wait(lambda: client.hlen(key) >= TOTAL, 60, "every task after the fault", log)
        except AssertionError:
            done = {int(k) for k in client.hkeys(key)}
            missing = sorted(set(range(TOTAL)) - done)
            raise AssertionError(f"{len(missing)} task(s) never ran: {missing[:20]}") from None
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
    counts = {int(k): int(v) for k, v in client.hgetall(key).items()}
    text = log.read_text(errors="replace")
    assert code == 0, log_tail(log)
    lost = TOTAL - len(counts)
    duplicated = sum(c - 1 for c in counts.values())
    print(
        f"sent {TOTAL}, done before the fault {before}, done {len(counts)}, lost {lost}, "
        f"run twice {duplicated} (at-least-once: in flight when the connection dropped)"
    )
    assert sorted(counts) == list(range(TOTAL)), f"lost {lost}"
    assert "broker connection error" in text
    assert "reconnecting in" in text
    assert text.count("consuming from") >= 2  # it resumed consuming


@pytest.mark.timeout(180)
def test_redis_restart_mid_load_loses_nothing(
    hub: str, redis_url: str, queue_name: str, runs: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path / "redis")
    server.start()

    def restart() -> None:
        server.stop()
        time.sleep(2.0)  # the outage
        server.start()

    try:
        _run_through_a_fault(
            hub, server.url, redis_url, queue_name, runs, tmp_path / "worker.log", restart
        )
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_rabbitmq_outage_mid_load_loses_nothing(
    hub: str,
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    runs: tuple[redis.Redis, str],
    tmp_path: Path,
) -> None:
    proxy = TcpProxy(5672)
    proxy.start()
    broker = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"

    def outage() -> None:
        proxy.cut()
        time.sleep(2.0)  # the outage: connections dropped, new ones refused
        proxy.restore()

    try:
        _run_through_a_fault(
            hub, broker, redis_url, queue_name, runs, tmp_path / "worker.log", outage
        )
    finally:
        proxy.cut()
        run_cli(
            "-A", "tests.sigapp", "purge", "-f", "-Q", queue_name, env={"SIGAPP_BROKER": amqp_url}
        )


@pytest.mark.timeout(120)
def test_a_broker_that_never_returns_is_retried_with_capped_backoff(
    hub: str, amqp_url: str, redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    proxy = TcpProxy(5672)
    proxy.start()
    broker = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
    log = tmp_path / "worker.log"
    worker = _start_worker(hub, broker, redis_url, queue_name, "unused", log)
    try:
        _wait(lambda: "ready" in log.read_text(errors="replace"), 30, "the worker", log)
        assert (
            run_cli("-A", "tests.sigapp", "status", env={"SIGAPP_BROKER": broker}).returncode == 0
        )
        proxy.cut()
        _wait(
            lambda: log.read_text(errors="replace").count("reconnecting in") >= 6,
            60,
            "six reconnect attempts",
            log,
        )
        assert worker.poll() is None, "the worker keeps running without its broker"
        status = run_cli("-A", "tests.sigapp", "status", env={"SIGAPP_BROKER": broker}, timeout=60)
        assert status.returncode == 1
        assert "Error:" in status.stderr
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, log_tail(log)
        print(f"shutdown without a broker took {time.monotonic() - started:.2f}s")
    finally:
        if worker.poll() is None:
            worker.kill()
        proxy.cut()
    pauses = [
        float(p)
        for p in re.findall(
            r"broker connection error: .*?; reconnecting in ([\d.]+)s", log.read_text()
        )
    ]
    print(f"consumer reconnect pauses (s): {pauses}")
    assert len(pauses) >= 5
    assert max(pauses) <= 1.0  # capped by broker_connection_max_backoff
    assert pauses[-1] >= 0.5  # jitter keeps it within [cap/2, cap]
