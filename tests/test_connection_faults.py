"""Connection handling: backoff after repeated outages, tasks of a lost connection,
a broker that is not there (yet).

Outages come from a TCP proxy in a process of its own (tests/faults.py), cut and
restored by the test; the broker behind it keeps running.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from greenworker import App, Worker, green
from greenworker.transport.consumer import Consumer
from greenworker.transport.reconnect import FIRST_BACKOFF, STABLE_AFTER, Backoff
from greenworker.transport.redis_consumer import NativeRedisConsumer, RedisMessage
from greenworker.transport.redis_layout import UNACKED_KEY

from .conftest import ROOT, delete_queues_and_close
from .faults import TcpProxy, env_with, free_port, log_tail

PAUSE = re.compile(r"reconnecting in ([\d.]+)s")


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a state no event announces (log records, a flag of another greenlet)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        green.sleep(0.01)


def _retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "greenworker.consumer" and PAUSE.search(r.getMessage())
    ]


# ------------------------------------------------------------------ backoff


def test_backoff_doubles_and_starts_over_only_after_a_stable_connection() -> None:
    backoff = Backoff(maximum=8.0)
    pauses = [backoff.next_pause() for _ in range(6)]
    steps = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert all(step / 2 <= pause <= step for pause, step in zip(pauses, steps, strict=True))
    backoff.connected_for(STABLE_AFTER / 4)  # a connection that flapped: keep backing off
    assert backoff.next_pause() >= 4.0
    backoff.connected_for(STABLE_AFTER)
    assert backoff.next_pause() <= FIRST_BACKOFF


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_second_outage_is_retried_from_the_first_backoff(
    broker: str,
    request: pytest.FixtureRequest,
    queue_name: str,
    proxy: Callable[[int], TcpProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_url = request.getfixturevalue("redis_url")
    if broker == "redis":
        through = proxy(6379)
        url = f"redis://127.0.0.1:{through.port}/0"
    else:
        request.getfixturevalue("amqp_url")
        through = proxy(5672)
        url = f"amqp://guest:guest@127.0.0.1:{through.port}//"
    through.start()
    app = App(
        "backoff",
        broker=url,
        backend=redis_url,
        config={
            "task_default_queue": queue_name,
            "broker_connection_max_backoff": 8,
            # kombu's consumer: the native one's visibility sweep can hold its loop in
            # kombu's own connection retries for seconds of an outage (reported apart)
            "broker_native_redis": False,
        },
    )
    worker = app.Worker(concurrency=2)
    caplog.set_level(logging.WARNING, logger="greenworker")
    worker.start()
    try:
        assert worker.consumer.ready
        # a first outage long enough to grow the backoff: three failed attempts
        through.cut()
        _poll(lambda: len(_retry_records(caplog)) >= 3, 20, "three retries")
        through.restore()
        assert worker.consumer.wait_ready(20)
        green.sleep(STABLE_AFTER + 0.3)  # the connection stays up: that outage is over
        seen = len(_retry_records(caplog))
        through.cut()
        _poll(lambda: len(_retry_records(caplog)) >= seen + 2, 20, "two retries")
        first, second = _retry_records(caplog)[seen : seen + 2]
        pause = float(PAUSE.search(first.getMessage()).group(1))  # type: ignore[union-attr]
        waited = second.created - first.created
        print(f"first retry after the second outage: pause {pause:.2f}s, waited {waited:.2f}s")
        assert pause <= FIRST_BACKOFF
        assert waited <= FIRST_BACKOFF + 0.4
    finally:
        _tear_down(through, worker, app, queue_name)


def _tear_down(through: TcpProxy, worker: Worker, app: App, queue_name: str) -> None:
    """Bring the proxy back if a test left it cut, stop the worker, leave the broker clean."""
    if through.proc is None:
        through.restore()
    worker.stop(timeout=5)
    delete_queues_and_close(app, queue_name)


# ------------------------------------------------------------------ a lost channel


@pytest.mark.timeout(90)
def test_tasks_of_a_lost_connection_are_not_started_and_failed_acks_make_one_line(
    amqp_url: str,
    redis_url: str,
    queue_name: str,
    proxy: Callable[[int], TcpProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Four slow tasks run, 36 more wait in the prefetch window; the connection drops.
    The consumer loop is kept from cleaning up (its write lock is held, as by a greenlet
    stuck writing to the dead socket), so the only guard left is the one at task start:
    no task of the dead connection may start, and the four acks that fail make one line."""
    through = proxy(5672)
    through.start()
    app = App(
        "lostchannel",
        broker=f"amqp://guest:guest@127.0.0.1:{through.port}//",
        backend=redis_url,
        config={
            "task_default_queue": queue_name,
            "task_acks_late": True,
            "broker_connection_max_backoff": 1,
        },
    )
    release = green.new_event()
    starts: list[tuple[float, int]] = []
    done: set[int] = set()

    @app.task(name="lostchannel.slow", ignore_result=True)
    def slow(n: int) -> None:
        starts.append((time.monotonic(), n))
        release.wait()
        done.add(n)

    worker = app.Worker(concurrency=4, prefetch_multiplier=10)
    caplog.set_level(logging.DEBUG, logger="greenworker")
    worker.start()
    try:
        for n in range(40):
            slow.delay(n)
        _poll(lambda: len(starts) == 4 and len(worker.state.reserved) == 36, 20, "prefetch")
        consumer = worker.consumer
        assert isinstance(consumer, Consumer)  # AMQP: kombu's consumer, not the native Redis one
        with consumer._write_lock:
            cut_at = time.monotonic()
            through.cut()
            _poll(lambda: not consumer.ready, 10, "the consumer to see the loss")
            release.set()  # the four running tasks end; their slots free up
            assert worker.pool.join(10)  # the pool started (or dropped) all it held
            started_after_cut = [n for at, n in starts if at > cut_at]
            assert started_after_cut == [], "tasks of a dead connection started"
        through.restore()
        _poll(lambda: done == set(range(40)), 30, "every task, redelivered")
        _poll(
            lambda: any("could not ack 4 message(s)" in r.getMessage() for r in caplog.records),
            10,
            "the failed-ack line",
        )
        failed_ack_lines = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and "could not ack" in r.getMessage()
        ]
        assert len(failed_ack_lines) == 1, [r.getMessage() for r in failed_ack_lines]
    finally:
        release.set()
        _tear_down(through, worker, app, queue_name)


@pytest.mark.timeout(60)
def test_native_redis_runs_what_it_held_across_a_reconnect(
    redis_url: str, queue_name: str, proxy: Callable[[int], TcpProxy]
) -> None:
    """The native Redis consumer's messages stay ours on the server through an outage
    (their acks work on the new connection): nothing it held is dropped, nothing waits
    for the visibility timeout."""
    through = proxy(6379)
    through.start()
    app = App(
        "nativeheld",
        broker=f"redis://127.0.0.1:{through.port}/0",
        backend=redis_url,
        config={"task_default_queue": queue_name, "broker_connection_max_backoff": 1},
    )
    assert app.native_redis
    release = green.new_event()
    done: set[int] = set()

    @app.task(name="nativeheld.slow", ignore_result=True)
    def slow(n: int) -> None:
        release.wait()
        done.add(n)

    worker = app.Worker(concurrency=1, prefetch_multiplier=10)
    worker.start()
    try:
        for n in range(5):
            slow.delay(n)
        _poll(lambda: worker.pool.active == 1 and len(worker.state.reserved) == 4, 20, "prefetch")
        through.cut()
        _poll(lambda: not worker.consumer.ready, 10, "the consumer to see the loss")
        through.restore()
        assert worker.consumer.wait_ready(20)
        release.set()
        _poll(lambda: done == set(range(5)), 10, "the held tasks")
    finally:
        release.set()
        _tear_down(through, worker, app, queue_name)


# ------------------------------------------------------------------ no broker


def _start_worker(
    hub: str, broker: str, redis_url: str, queue: str, log: Path
) -> subprocess.Popen[bytes]:
    env = env_with(SIGAPP_BROKER=broker, SIGAPP_REDIS=redis_url, SIGAPP_QUEUE=queue)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "greenworker", "-A", "tests.sigapp", "-P", hub, "-l", "info"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_line(log: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} after {timeout}s; worker log:\n{log_tail(log)}")
        time.sleep(0.05)


READY = r"worker \S+ ready"
WAITING = r"waiting for the broker at redis://127\.0\.0\.1:\d+/0"


@pytest.mark.timeout(60)
def test_without_a_broker_one_line_per_retry_no_ready_and_a_quick_stop(
    hub: str, redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    worker = _start_worker(hub, f"redis://127.0.0.1:{free_port()}/0", redis_url, queue_name, log)
    try:
        _wait_for_line(log, WAITING, 30)
        watched = 6.0
        time.sleep(watched)  # what it logs over that time is the point
        text = log.read_text(errors="replace")
        warnings = [line for line in text.splitlines() if "WARNING" in line]
        print(f"{len(warnings)} warning line(s) in {watched:.0f}s without a broker")
        # backoff 0.5, 1, 2, 4 s (jittered): at most 5 retries in 6 s, plus "waiting"
        assert len(warnings) <= 7, "\n".join(warnings)  # one of slack for a slow start
        assert len(re.findall(WAITING, text)) == 1
        assert not re.search(READY, text), "said ready without a broker"
        assert all("greenworker.consumer" in w or "waiting for" in w for w in warnings)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, log_tail(log)
        took = time.monotonic() - started
        print(f"SIGTERM without a broker: exited in {took:.2f}s")
        assert took <= 1.0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


@pytest.mark.timeout(60)
def test_ready_is_said_once_the_broker_answers(
    hub: str,
    redis_url: str,
    queue_name: str,
    tmp_path: Path,
    proxy: Callable[[int], TcpProxy],
) -> None:
    log = tmp_path / "worker.log"
    later = proxy(6379)  # its port refuses connections until it starts
    worker = _start_worker(hub, f"redis://127.0.0.1:{later.port}/0", redis_url, queue_name, log)
    try:
        _wait_for_line(log, WAITING, 30)
        assert not re.search(READY, log.read_text(errors="replace"))
        later.start()
        _wait_for_line(log, READY, 30)
        text = log.read_text(errors="replace")
        assert len(re.findall(WAITING, text)) == 1
        assert text.index("consuming from") < re.search(READY, text).start()  # type: ignore[union-attr]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, log_tail(log)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


@pytest.mark.timeout(60)
def test_native_redis_acks_held_back_by_an_outage_make_one_line_and_one_when_sent(
    redis_url: str,
    queue_name: str,
    proxy: Callable[[int], TcpProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ack loop retries every 0.5 s while the broker is away: one WARNING for the
    outage (it was one a retry), one INFO once the acks are sent."""
    through = proxy(6379)
    through.start()
    app = App(
        "heldacks",
        broker=f"redis://127.0.0.1:{through.port}/0",
        config={"task_default_queue": queue_name},
    )
    received: list[RedisMessage] = []
    all_in = green.new_event()

    def on_message(message: RedisMessage) -> None:
        received.append(message)
        if len(received) == 3:
            all_in.set()

    consumer = NativeRedisConsumer(app, [queue_name], on_message, lambda: 10)
    failed_flushes = 0
    flush = consumer._flush_acks

    def counted_flush() -> bool:
        nonlocal failed_flushes
        sent = flush()
        failed_flushes += not sent
        return sent

    consumer._flush_acks = counted_flush  # type: ignore[method-assign]
    direct = redis.Redis.from_url(redis_url)
    caplog.set_level(logging.INFO, logger="greenworker.consumer")
    consumer.start()
    try:
        assert consumer.wait_ready(10)
        for n in range(3):
            app.send_task("held.echo", (n,))
        assert all_in.wait(10)
        through.cut()
        for message in received:
            message.ack()
        _poll(lambda: failed_flushes >= 4, 20, "four failed ack flushes")
        through.restore()
        tags = [message.delivery_tag for message in received]
        _poll(lambda: not any(direct.hexists(UNACKED_KEY, t) for t in tags), 20, "the acks")
    finally:
        if through.proc is None:
            through.restore()
        consumer.stop_consuming()
        consumer.close()
        delete_queues_and_close(app, queue_name)
    lines = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if "ack" in r.getMessage() and "reconnecting" not in r.getMessage()
    ]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines
    assert lines[0][1].startswith("could not ack 3 message(s) yet: ")
    assert lines[1][1] == "sent 3 ack(s) held back while the broker was away"
