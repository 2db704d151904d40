"""The native Redis consumer: kombu's key layout, atomic pops, batched acks, priorities."""

from __future__ import annotations

import base64
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from kombu.messaging import Producer

from greenworker import App, green
from greenworker.transport.redis_consumer import NativeRedisConsumer, RedisMessage
from greenworker.transport.redis_layout import UNACKED_INDEX_KEY, UNACKED_KEY, server_has_blmove

from .conftest import ROOT
from .faults import env_with, log_tail


@pytest.fixture
def redis_app(redis_url: str, queue_name: str) -> Iterator[App]:
    app = App(
        "native",
        broker=redis_url,
        backend=redis_url,
        config={"task_default_queue": queue_name, "worker_enable_mingle": False},
    )
    yield app
    client = redis.Redis.from_url(redis_url)
    client.delete(*[queue_name + suffix for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169")])
    app.close()


def test_messages_held_are_in_kombus_unacked_keys_until_acked(
    redis_app: App, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    gate = redis_app  # the task waits on a Redis key the test sets
    key = f"gate:{redis_app.conf.task_default_queue}"

    @redis_app.task(name="native.wait")
    def wait() -> str:
        while not client.exists(key):
            time.sleep(0.01)
        return "done"

    worker = gate.Worker(concurrency=2)
    assert isinstance(worker.consumer, NativeRedisConsumer)
    worker.start()
    try:
        result = wait.delay()
        deadline = time.monotonic() + 10
        while not client.hexists(UNACKED_KEY, _tag_of(worker)) and time.monotonic() < deadline:
            time.sleep(0.01)
        tag = _tag_of(worker)
        envelope, exchange, routing_key = json.loads(client.hget(UNACKED_KEY, tag) or b"null")
        assert envelope["headers"]["id"] == result.id  # kombu's [message, exchange, rk]
        assert envelope["properties"]["delivery_tag"] == tag
        assert (exchange, routing_key) == (
            redis_app.conf.task_default_queue,
            redis_app.conf.task_default_queue,
        )
        assert client.zscore(UNACKED_INDEX_KEY, tag) is not None
        client.set(key, 1)
        assert result.get(timeout=10) == "done"
        deadline = time.monotonic() + 5
        while client.hexists(UNACKED_KEY, tag) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not client.hexists(UNACKED_KEY, tag)  # the batched ack went out
        assert client.zscore(UNACKED_INDEX_KEY, tag) is None
    finally:
        client.delete(key)
        worker.stop(timeout=5)


def _tag_of(worker: object) -> str:
    held = list(worker.consumer._held)  # type: ignore[attr-defined]
    return held[0] if held else ""


def test_priorities_malformed_envelopes_and_many_tasks(
    redis_app: App, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = redis_app.conf.task_default_queue
    client = redis.Redis.from_url(redis_url)

    @redis_app.task(name="native.echo")
    def echo(n: int) -> int:
        return n

    client.lpush(queue, b"this is not json")
    client.lpush(queue, json.dumps({"properties": {"delivery_tag": "x"}, "body": 5}))
    # a high-priority message, published the way kombu does (its own list)
    with redis_app.connection() as conn:
        Producer(conn).publish(
            [[7], {}, {}],
            routing_key=queue,
            exchange=redis_app.queue().exchange,
            declare=[redis_app.queue()],
            headers={"id": "prio-1", "task": "native.echo", "lang": "py", "argsrepr": ""},
            serializer="json",
            priority=9,
        )
    assert client.llen(f"{queue}\x06\x169") == 1
    results = [echo.delay(n) for n in range(500)]
    worker = redis_app.Worker(concurrency=50)
    with caplog.at_level(logging.ERROR, logger="greenworker"):
        worker.start()
        try:
            assert [r.get(timeout=30) for r in results] == list(range(500))
            assert redis_app.AsyncResult("prio-1").get(timeout=10) == 7
        finally:
            worker.stop(timeout=5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("not kombu's JSON envelope" in e for e in errors), errors
    assert len([e for e in errors if "Rejected malformed" in e]) == 2, errors
    assert client.llen(queue) == 0


def test_kombus_redis_transport_is_still_there_when_asked_for(redis_app: App) -> None:
    redis_app.conf.broker_native_redis = False

    @redis_app.task(name="native.add")
    def add(x: int, y: int) -> int:
        return x + y

    worker = redis_app.Worker(concurrency=5)
    assert not isinstance(worker.consumer, NativeRedisConsumer)
    worker.start()
    try:
        assert [add.delay(i, i).get(timeout=10) for i in range(20)] == [2 * i for i in range(20)]
    finally:
        worker.stop(timeout=5)


@pytest.mark.timeout(120)
def test_kill_9_mid_load_loses_nothing(
    hub: str, redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    """Every popped message is recorded in unacked in the same step: after a kill -9 the
    visibility sweep gives back what the dead worker held, and a second worker runs it."""
    runs = redis.Redis.from_url(redis_url)
    key = f"nativeruns:{queue_name}"
    total = 300
    client = App("native", broker=redis_url, config={"task_default_queue": queue_name})
    for n in range(total):
        client.send_task("sig.work", (n, 0.05), ignore_result=True)
    client.close()
    env = env_with(
        SIGAPP_BROKER=redis_url,
        SIGAPP_REDIS=redis_url,
        SIGAPP_QUEUE=queue_name,
        SIGAPP_KEY=key,
        GREENWORKER_BROKER_TRANSPORT_OPTIONS='{"visibility_timeout": 3}',
    )
    command = [sys.executable, "-m", "greenworker", "-A", "tests.sigapp", "-P", hub, "-c", "40"]
    command += ["--without-mingle"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        with logs[0].open("wb") as out:
            first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while runs.hlen(key) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = runs.hlen(key)
        with logs[1].open("wb") as out:
            second = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while runs.hlen(key) < total and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, log_tail(logs[1])
        counts = {int(k): int(v) for k, v in runs.hgetall(key).items()}
        missing = sorted(set(range(total)) - set(counts))
        print(
            f"sent {total}, done before kill -9 {killed_at}, done {len(counts)}, "
            f"lost {len(missing)}, run twice {sum(c - 1 for c in counts.values())}"
        )
        assert not missing, f"lost {missing[:20]}\n{log_tail(logs[1])}"
    finally:
        runs.delete(key)


def test_native_publish_sends_kombus_envelope_and_survives_lost_bindings(
    redis_app: App, redis_url: str
) -> None:
    """After a queue's first message (sent and declared through kombu), the client pushes
    kombu's exact envelope itself in one round trip; if the exchange's bindings vanish it
    declares them again through kombu and nothing is lost."""
    client = redis.Redis.from_url(redis_url)
    queue = redis_app.conf.task_default_queue
    assert redis_app.native_redis
    redis_app.send_task("native.add", (1, 2))  # kombu: declares the queue
    assert (queue, queue, queue) in redis_app._native_queues  # queue, exchange, routing key
    redis_app.send_task("native.add", (3, 4))  # native
    assert redis_app._native_publisher is not None
    native, by_kombu = (json.loads(raw) for raw in client.lrange(queue, 0, -1))

    def shape(envelope: dict[str, object]) -> dict[str, object]:
        props = dict(envelope["properties"])  # type: ignore[call-overload]
        headers = dict(envelope["headers"])  # type: ignore[call-overload]
        for varying in ("delivery_tag", "correlation_id"):
            props.pop(varying)
        for varying in ("id", "root_id", "argsrepr"):
            headers.pop(varying)
        return {**envelope, "properties": props, "headers": headers, "body": None}

    assert shape(native) == shape(by_kombu)
    assert json.loads(base64.b64decode(native["body"]))[0] == [3, 4]

    client.delete(f"_kombu.binding.{queue}")
    redis_app.send_task("native.add", (5, 6))  # nothing bound: bound again, as kombu binds
    assert client.exists(f"_kombu.binding.{queue}")
    redis_app.send_task("native.add", (7, 8))
    bodies = [
        json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        for raw in client.lrange(queue, 0, -1)
    ]
    assert sorted(bodies) == [[1, 2], [3, 4], [5, 6], [7, 8]]


def test_a_key_layout_option_turns_the_native_paths_off(redis_url: str) -> None:
    app = App("layout", broker=redis_url, config={"broker_transport_options": {"sep": ":"}})
    assert not app.native_redis
    assert not isinstance(app.Worker(concurrency=1).consumer, NativeRedisConsumer)


def _orphan_everything(client: redis.Redis, queue: str, when: float) -> list[str]:
    """Move every message of ``queue`` (its priority lists too) into ``unacked`` as a
    consumer that took them at ``when`` and then died would have left them (kombu's
    entry: envelope, exchange, routing key); return their delivery tags."""
    tags = []
    pipe = client.pipeline()
    route = json.dumps(queue).encode()
    for key in (queue, *(f"{queue}\x06\x16{step}" for step in (3, 6, 9))):
        for raw in cast("list[bytes]", client.lrange(key, 0, -1)):
            tag = json.loads(raw)["properties"]["delivery_tag"]
            pipe.hset(UNACKED_KEY, tag, b"[" + raw + b"," + route + b"," + route + b"]")
            pipe.zadd(UNACKED_INDEX_KEY, {tag: when})
            tags.append(tag)
        pipe.delete(key)
    pipe.execute()
    return tags


@pytest.mark.timeout(90)
def test_orphans_are_all_restored_on_schedule_under_a_backlog(
    scratch_redis: str, queue_name: str
) -> None:
    """A dead consumer's 700 unacked messages are all back within about the visibility
    timeout while the queue keeps a long backlog (the sweep used to run only when a pop
    came back short, and restored 100 messages per turn)."""
    visibility = 2.0
    app = App(
        "orphans",
        broker=scratch_redis,
        config={
            "task_default_queue": queue_name,
            "worker_enable_mingle": False,
            "broker_transport_options": {"visibility_timeout": visibility},
        },
    )
    client = redis.Redis.from_url(scratch_redis)
    marks = "orphans:ran"

    @app.task(name="native.mark", ignore_result=True)
    def mark(n: int) -> None:
        client.hset(marks, str(n), 1)

    @app.task(name="native.slow", ignore_result=True)
    def slow() -> None:
        time.sleep(0.05)

    orphans = 700
    for n in range(orphans):
        mark.delay(n)
    taken_at = time.time()
    assert len(_orphan_everything(client, queue_name, taken_at)) == orphans
    for _ in range(2000):  # 20 s of work for 5 slots: still there when the test ends
        slow.delay()
    worker = app.Worker(concurrency=5)
    worker.start()
    try:
        deadline = taken_at + visibility + 4.0
        while client.hlen(marks) < orphans and time.time() < deadline:
            time.sleep(0.05)
        all_ran_after = time.time() - taken_at
        backlog = client.llen(queue_name)
    finally:
        worker.stop(timeout=5)
        app.close()
    ran = client.hlen(marks)
    print(f"{ran}/{orphans} orphans ran {all_ran_after:.2f}s after they were taken")
    assert ran == orphans, f"only {ran} of {orphans} restored and run by {all_ran_after:.1f}s"
    assert all_ran_after >= visibility  # not before their time
    assert backlog > 0  # the queue never ran dry meanwhile


def test_restore_puts_back_only_whats_due_on_kombus_lists(
    scratch_redis: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep follows kombu's restore: the binding lookup, the priority list, the
    redelivered flags; it leaves fresh entries, cleans index-only ones, and skips an
    entry that changed after it was read."""
    app = App(
        "restore",
        broker=scratch_redis,
        config={
            "task_default_queue": queue_name,
            "broker_transport_options": {"visibility_timeout": 60},
        },
    )
    client = redis.Redis.from_url(scratch_redis)
    app.send_task("native.echo", (0,))  # through kombu: declares the queue and binding
    with app.connection() as conn:
        Producer(conn).publish(
            [[9], {}, {}],
            routing_key=queue_name,
            exchange=app.queue().exchange,
            headers={"id": "prio-9", "task": "native.echo", "lang": "py"},
            serializer="json",
            priority=9,
        )
    old = time.time() - 120
    due = _orphan_everything(client, queue_name, old)
    app.send_task("native.echo", (1,))
    (fresh,) = _orphan_everything(client, queue_name, time.time())  # its consumer lives
    client.zadd(UNACKED_INDEX_KEY, {"index-only": old})
    consumer = NativeRedisConsumer(app, [queue_name], lambda message: None, lambda: 1)
    try:
        assert consumer.restore_visible() == 2
        assert client.zscore(UNACKED_INDEX_KEY, "index-only") is None
        assert client.hexists(UNACKED_KEY, fresh)
        plain = [json.loads(raw) for raw in client.lrange(queue_name, 0, -1)]
        high = [json.loads(raw) for raw in client.lrange(f"{queue_name}\x06\x169", 0, -1)]
        assert [m["properties"]["priority"] for m in plain + high] == [0, 9]
        for message in plain + high:
            assert message["headers"]["redelivered"] is True
            assert message["properties"]["delivery_info"]["redelivered"] is True
        assert not any(client.hexists(UNACKED_KEY, tag) for tag in due)

        # read, then acked (or renewed) by its consumer before the move: left alone
        client.zadd(UNACKED_INDEX_KEY, {fresh: old})
        entry = cast("bytes | None", client.hget(UNACKED_KEY, fresh))
        stale = consumer._restore_args(client, fresh, entry, {})
        client.hset(UNACKED_KEY, fresh, b'[{}, "", ""]')
        moved = consumer._restore_script(
            keys=[UNACKED_KEY, UNACKED_INDEX_KEY], args=[repr(time.time()), *stale]
        )
        assert moved == 0 and client.hexists(UNACKED_KEY, fresh)

        # its bindings deleted meanwhile: to the queue named by its routing key, not lost
        client.delete(queue_name, f"_kombu.binding.{queue_name}")
        assert entry is not None
        client.hset(UNACKED_KEY, fresh, entry)
        with caplog.at_level(logging.WARNING, logger="greenworker.consumer"):
            assert consumer.restore_visible() == 1
        assert client.llen(queue_name) == 1
        assert "no queue is bound to exchange" in caplog.text
    finally:
        consumer.close()
        app.close()


@pytest.mark.parametrize(
    ("version", "has_it"),
    [
        *[("7.0.15", True), ("6.2.0", True), ("6.2", True), ("10.0.1", True)],
        *[("6.0.16", False), ("5.0.7", False), ("2.8.4", False), ("", None), ("unknown", None)],
    ],
)
def test_blmove_needs_redis_6_2(version: str, has_it: bool | None) -> None:
    assert server_has_blmove(version) is has_it


class _OldServerConsumer(NativeRedisConsumer):
    def server_version(self, client: redis.Redis) -> str:
        return "6.0.16"  # what INFO says on a Redis without BLMOVE


def _blocked_in_blmove(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("cmd") == "blmove")


@pytest.mark.parametrize("server", ["current", "older than 6.2"])
def test_an_idle_consumer_blocks_in_blmove_or_says_once_it_polls(
    scratch_redis: str, queue_name: str, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("old", broker=scratch_redis, config={"task_default_queue": queue_name})
    client = redis.Redis.from_url(scratch_redis)
    received: list[str] = []
    arrived = green.new_event()

    def on_message(message: RedisMessage) -> None:
        received.append(message.headers["id"])
        message.ack()
        arrived.set()

    consumer_class = NativeRedisConsumer if server == "current" else _OldServerConsumer
    consumer = consumer_class(app, [queue_name], on_message, lambda: 10)
    with caplog.at_level(logging.WARNING, logger="greenworker.consumer"):
        consumer.start()
        try:
            assert consumer.wait_ready(10)
            for n in range(3):
                sent = app.send_task("native.echo", (n,))
                assert arrived.wait(10), f"message {n} did not arrive"
                arrived.clear()
                assert received[-1] == sent.id
                # idle now: blocked in BLMOVE soon (at once), or never while it polls
                look_until = time.monotonic() + (5.0 if server == "current" else 0.3)
                blocked = 0
                while not blocked and time.monotonic() < look_until:
                    blocked = _blocked_in_blmove(client)
                    time.sleep(0.01)
                assert blocked == (1 if server == "current" else 0)
        finally:
            consumer.stop_consuming()
            consumer.close()
            app.close()
    notes = [r.getMessage() for r in caplog.records if "no BLMOVE" in r.getMessage()]
    if server == "current":
        assert consumer.blocking_wait and not notes
    else:
        assert not consumer.blocking_wait
        assert len(notes) == 1 and "Redis 6.0.16 is older than 6.2" in notes[0], notes


def test_close_lets_the_ack_flush_under_way_finish(
    redis_app: App, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while the ack loop's pipeline is on the wire waits for it: killed there,
    the flush dropped the acks it had taken, and their tasks ran again."""
    queue = redis_app.conf.task_default_queue
    received: list[RedisMessage] = []
    all_in = green.new_event()

    def on_message(message: RedisMessage) -> None:
        received.append(message)
        if len(received) == 3:
            all_in.set()

    consumer = NativeRedisConsumer(redis_app, [queue], on_message, lambda: 10)
    consumer.start()
    try:
        assert consumer.wait_ready(10)
        for n in range(3):
            redis_app.send_task("native.echo", (n,))
        assert all_in.wait(10)
        consumer.stop_consuming()
        client = consumer._connection()
        real_pipeline = client.pipeline
        in_flush, gate = green.new_event(), green.new_event()

        def held_pipeline(transaction: bool = True) -> redis.client.Pipeline:
            pipe = real_pipeline(transaction=transaction)
            send = pipe.execute

            def execute(raise_on_error: bool = True) -> list[Any]:
                in_flush.set()
                gate.wait(10)  # on the wire, its reply not read yet
                return send(raise_on_error)

            pipe.execute = execute  # type: ignore[method-assign]
            return pipe

        monkeypatch.setattr(client, "pipeline", held_pipeline)
        for message in received:
            message.ack()
        assert in_flush.wait(5)  # the ack loop took the three acks and sends them
        closer = green.spawn(consumer.close)
        green.sleep(0)  # close runs up to its wait (or, before, to its end)
        gate.set()
        assert closer.join(10)
    finally:
        consumer.close()
    check = redis.Redis.from_url(redis_url)
    tags = [message.delivery_tag for message in received]
    assert [bool(check.hexists(UNACKED_KEY, tag)) for tag in tags] == [False] * 3
    assert [check.zscore(UNACKED_INDEX_KEY, tag) for tag in tags] == [None] * 3
