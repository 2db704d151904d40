"""The embedded default's broker (LMDB): at-least-once across kill -9, several processes on
one directory, fanout, the visibility timeout, crashes mid-write, a full store, 0.1.0 data."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from greenworker import App, green
from greenworker.protocol import build_task_message
from greenworker.transport.lmdb_consumer import NativeLmdbConsumer
from greenworker.transport.lmdb_store import BrokerStoreError, QueueInfo, open_store

from .conftest import ROOT, run_cli, run_python, start_cli, wait_for_output

pytestmark = pytest.mark.timeout(120)


def runs(path: Path) -> Counter[str]:
    """Task id → times run, from embedapp's log."""
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line)


def wait_until(condition: object, timeout: float, what: str) -> None:
    """Poll ``condition`` (a callable) on a file other processes write: no event to await."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs.log"


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def start_worker(
    hub: str,
    data: Path,
    log: Path,
    name: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    proc = start_cli(
        "-A",
        "tests.embedapp",
        "--data-dir",
        str(data),
        "worker",
        "-P",
        hub,
        "-n",
        f"{name}@test",
        "-S",
        str(data / f"state-{name}"),
        "--without-mingle",
        *extra,
        env={"EMBED_RUNS": str(log), **(env or {})},
    )
    wait_for_output(proc, "ready")
    return proc


def client(data: Path) -> App:
    from tests import embedapp

    app = App("embedclient", data_dir=str(data))
    app.tasks.update(embedapp.app.tasks)  # same names: send_task by name works either way
    return app


# ------------------------------------------------------------------ the store itself


def test_priority_first_then_publish_order(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "broker"))
    store.declare_queue("q", QueueInfo())
    for body, priority in (("low-1", 0), ("high", 9), ("low-2", 0), ("mid", 5)):
        store.put(["q"], body.encode(), priority)
    taken = store.take(["q"], 10)
    assert [t.envelope for t in taken] == [b"high", b"mid", b"low-1", b"low-2"]
    assert store.size("q") == 0 and store.unacked_count() == 4
    store.ack([t.tag for t in taken])
    assert store.unacked_count() == 0


def test_requeue_puts_a_message_back_where_it_was_marked_redelivered(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "broker"))
    store.declare_queue("q", QueueInfo())
    for body in (b"a", b"b", b"c"):
        store.put(["q"], body, 0)
    first = store.take(["q"], 1)[0]
    assert not first.redelivered
    assert store.requeue([first.tag]) == 1
    again = store.take(["q"], 3)
    assert [t.envelope for t in again] == [b"a", b"b", b"c"]  # back at the head
    assert [t.redelivered for t in again] == [True, False, False]


def test_ttls_purge_and_counts(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "broker"))
    store.declare_queue("ttl", QueueInfo(message_ttl=0.05))
    store.declare_queue("plain", QueueInfo())
    store.put(["ttl", "plain"], b"both", 0)  # one transaction, two queues (fanout)
    store.put(["plain"], b"expiring", 0, expires_at=time.time() - 1)
    assert (store.size("ttl"), store.size("plain")) == (1, 2)
    time.sleep(0.1)  # past the queue's message TTL
    assert store.take(["ttl"], 5) == []  # expired: dropped, as RabbitMQ drops it
    assert [t.envelope for t in store.take(["plain"], 5)] == [b"both"]
    store.put(["plain"], b"x", 0)
    store.put(["plain"], b"y", 0)
    assert store.purge("plain") == 2 and store.size("plain") == 0


def test_a_full_store_fails_the_publish_loudly_and_keeps_what_it_has(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "broker"), max_map_size=2 << 20)
    store.declare_queue("q", QueueInfo())
    body = os.urandom(50_000)
    kept = 0
    with pytest.raises(BrokerStoreError, match=r"is full .*max_map_size.*nothing was written"):
        for _ in range(1000):
            store.put(["q"], body, 0)
            kept += 1
    assert 0 < kept < 1000 and store.size("q") == kept  # nothing partial, nothing lost
    drained = 0
    while taken := store.take(["q"], 2):  # the room kept back lets consumers drain it
        assert all(t.envelope == body for t in taken)
        store.ack([t.tag for t in taken])
        drained += len(taken)
    assert drained == kept
    store.put(["q"], body, 0)  # room again


def test_space_of_deleted_messages_is_reused(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "broker"))
    store.declare_queue("q", QueueInfo())
    body = b"x" * 1000
    sizes = []
    for _ in range(30):  # 30 MB through the store, 1 MB at a time
        for _ in range(1000):
            store.put(["q"], body, 0)
        store.ack([t.tag for t in store.take(["q"], 1000)])
        sizes.append(os.path.getsize(tmp_path / "broker" / "data.mdb"))
    assert sizes[-1] == sizes[5], sizes  # the file stopped growing: pages are reused
    assert sizes[-1] < 8 << 20


# ------------------------------------------------------------------ the task consumer


def test_the_native_consumer_delivers_by_priority_requeues_and_rejects_malformed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("nativeconsumer", data_dir=str(tmp_path))
    queue = app.conf.task_default_queue
    seen: list[tuple[int, bool]] = []
    done = green.new_event()

    def on_message(message: Any) -> None:
        n = message.decode()[0][0]
        redelivered = bool(message.delivery_info.get("redelivered"))
        seen.append((n, redelivered))
        if n == 3 and not redelivered:
            consumer.reject(message, requeue=True)  # back at the head of its queue
        else:
            consumer.ack(message)
        if len(seen) == 7:
            done.set()

    consumer = NativeLmdbConsumer(app, [queue], on_message, lambda: 1)
    with app.connection() as conn:  # declares the queue and its binding
        app.queue()(conn.default_channel).declare()
    store = open_store(str(tmp_path / "broker"))
    store.put([queue], b"this is not json", 0)
    store.put([queue], b'["a list", "not an envelope"]', 0)
    for n in range(1, 6):
        app.send_task("native.record", (n,), priority=0)
    app.send_task("native.record", (99,), priority=9)
    with caplog.at_level(logging.ERROR, logger="greenworker"):
        consumer.start()
        try:
            assert done.wait(10), seen
        finally:
            consumer.stop_consuming()
            consumer.close()
    # the highest priority first, whatever came before it; the requeued one at once again
    assert seen == [
        (99, False),
        (1, False),
        (2, False),
        (3, False),
        (3, True),
        (4, False),
        (5, False),
    ]
    errors = [r.getMessage() for r in caplog.records if "Rejected malformed" in r.getMessage()]
    assert len(errors) == 2 and all("not kombu's JSON envelope" in e for e in errors), errors
    assert store.size(queue) == 0 and store.unacked_count() == 0  # nothing left unsettled


# ------------------------------------------------------------------ worker processes


def test_kill_9_loses_no_held_or_prefetched_message(
    hub: str, data: Path, log: Path, workers: list[subprocess.Popen[str]]
) -> None:
    app = client(data)
    ids = [app.send_task("embed.work", (0.1,)).id for _ in range(200)]
    first = start_worker(hub, data, log, "first", "-c", "20")
    workers.append(first)
    wait_until(lambda: len(runs(log)) >= 30, 30, "the first worker runs tasks")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    store = open_store(str(data / "broker"))
    held = store.unacked_count()
    assert held > 20  # running and prefetched when it died: still on disk
    workers.append(start_worker(hub, data, log, "second", "-c", "20"))
    wait_until(lambda: set(ids) <= set(runs(log)), 60, "every task runs")
    done = runs(log)
    assert set(done) == set(ids)  # 0 lost
    assert sum(done.values()) - len(ids) <= 20  # again: at most what was running
    app.close()


def test_two_workers_and_an_outside_producer_share_one_directory(
    hub: str, data: Path, log: Path, workers: list[subprocess.Popen[str]]
) -> None:
    workers.append(start_worker(hub, data, log, "w1", "-c", "10"))
    workers.append(start_worker(hub, data, log, "w2", "-c", "10"))
    producer = (
        "import sys; from tests.embedapp import now; [print(now.delay().id) for _ in range(300)]"
    )
    sent = run_python(producer, env={"GREENWORKER_DATA_DIR": str(data)}, timeout=60)
    assert sent.returncode == 0, sent.stderr
    ids = sent.stdout.split()
    assert len(ids) == 300
    wait_until(lambda: set(ids) <= set(runs(log)), 30, "every task runs")
    done = runs(log)
    assert all(done[i] == 1 for i in ids)  # exactly once without a crash
    hosts = Counter(line.split()[1] for line in log.read_text().splitlines())
    assert set(hosts) == {"w1@test", "w2@test"}, hosts  # both took their share
    # fanout: the mailbox reaches both workers through the same directory
    pinged = run_cli("-A", "tests.embedapp", "--data-dir", str(data), "inspect", "ping")
    assert pinged.returncode == 0, pinged.stderr
    assert "w1@test: OK" in pinged.stdout and "w2@test: OK" in pinged.stdout
    assert "2 node(s) replied" in pinged.stdout


def test_remote_control_and_events_on_the_embedded_default(
    hub: str, data: Path, log: Path, workers: list[subprocess.Popen[str]]
) -> None:
    workers.append(start_worker(hub, data, log, "rc", "-c", "4", "-E"))
    base = ("-A", "tests.embedapp", "--data-dir", str(data))
    status = run_cli(*base, "status")
    assert status.returncode == 0 and "rc@test: OK" in status.stdout, status.stderr
    limited = run_cli(*base, "control", "rate_limit", "embed.now", "10/s")
    assert limited.returncode == 0 and "rc@test" in limited.stdout, limited.stderr
    watcher = subprocess.Popen(
        [sys.executable, "-m", "greenworker", *base, "events", "--dump", "--count", "40"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        app = client(data)
        deadline = time.monotonic() + 30
        # tasks until the watcher has its 40 events (it binds its queue a moment after start)
        while watcher.poll() is None and time.monotonic() < deadline:
            app.send_task("embed.now").get(timeout=10)
        app.close()
        seen = watcher.communicate(timeout=30)[0]
    finally:
        if watcher.poll() is None:
            watcher.kill()
        watcher.wait(10)
    types = {json.loads(line)["type"] for line in seen.splitlines() if line.startswith("{")}
    assert {"task-received", "task-started", "task-succeeded"} <= types, seen


def test_eta_runs_exactly_once_past_the_visibility_timeout(
    hub: str, data: Path, log: Path, workers: list[subprocess.Popen[str]]
) -> None:
    options = {
        "GREENWORKER_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 1, "sweep_interval": 0.2}'
    }
    workers.append(start_worker(hub, data, log, "e1", "-c", "4", env=options))
    workers.append(start_worker(hub, data, log, "e2", "-c", "4", env=options))
    app = client(data)
    eta = app.send_task("embed.now", countdown=3)  # held 3 visibility timeouts long
    wait_until(lambda: eta.id in runs(log), 20, "the ETA task runs")
    time.sleep(1.5)  # the absence of a second run: more sweeps than one timeout's worth
    assert runs(log)[eta.id] == 1
    app.close()


def test_kill_9_in_the_middle_of_writes_100_rounds(tmp_path: Path) -> None:
    path = str(tmp_path / "broker")
    published: list[str] = []
    acked: set[str] = set()
    ack_positions: dict[str, int] = {}
    taken_after: list[tuple[int, str]] = []
    step = 0
    for round_no in range(100):
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "crash_broker.py"), path, str(round_no)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        opened = proc.stdout.readline()
        assert opened.startswith("open "), (opened, proc.stderr.read() if proc.stderr else "")
        time.sleep(random.uniform(0.005, 0.05))  # kill it somewhere in its writes
        proc.send_signal(signal.SIGKILL)
        # the rest through the same file object: communicate() would skip what readline()
        # already buffered (eventlet's pipes)
        out = opened + proc.stdout.read()
        proc.wait(10)
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
        for line in out.splitlines():
            what, _, message_id = line.partition(" ")
            step += 1
            if what == "published":
                published.append(message_id)
            elif what == "taken":
                taken_after.append((step, message_id))
            elif what == "acked":
                acked.add(message_id)
                ack_positions[message_id] = step
    # nothing acked is delivered again
    assert not [m for s, m in taken_after if m in ack_positions and s > ack_positions[m]]
    # nothing lost: what was not acked is still in the store (the killed holder's back)
    store = open_store(path)
    store.sweep()
    left = {json.loads(t.envelope)["id"] for t in store.take(["crash"], 1_000_000)}
    missing = set(published) - acked - left
    assert len(missing) <= 100, missing  # at most the one acked-but-not-printed per round


# ------------------------------------------------------------------ upgrade from 0.1.0


def test_a_0_1_0_data_directory_is_taken_over(data: Path, log: Path, hub: str) -> None:
    """0.1.0 kept the embedded default's queues in kombu's filesystem transport: its
    messages are moved into the LMDB broker on first open, oldest first, and run."""
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue
    from kombu.messaging import Producer

    folders = {
        "data_folder_in": str(data / "queues" / "messages"),
        "data_folder_out": str(data / "queues" / "messages"),
        "control_folder": str(data / "queues" / "control"),
    }
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    ids = [uuid.uuid4().hex for _ in range(5)]
    queue = Queue("celery", Exchange("celery", type="direct"), routing_key="celery")
    with Connection("filesystem://localhost/", transport_options=folders) as conn:
        producer = Producer(conn.default_channel)
        for task_id in ids:
            body, headers, properties = build_task_message("embed.now", (), {}, task_id=task_id)
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key="celery",
                declare=[queue],
                headers=headers,
                serializer="json",
                **properties,
            )
    assert len(os.listdir(data / "queues" / "messages")) == 5
    os.environ["EMBED_RUNS"] = str(log)
    try:
        from tests import embedapp

        app = App("upgraded", data_dir=str(data))
        app.tasks.update(embedapp.app.tasks)
        worker = app.Worker(concurrency=4)
        worker.start()
        try:
            wait_until(lambda: set(ids) <= set(runs(log)), 20, "the moved messages run")
        finally:
            worker.stop()
            app.close()
    finally:
        del os.environ["EMBED_RUNS"]
    assert not (data / "queues").exists()  # moved, folders removed
    assert runs(log) == Counter(dict.fromkeys(ids, 1))


def test_brokerdb_shows_and_compacts_and_refuses_while_a_consumer_lives(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = open_store(str(data / "broker"))
    store.declare_queue("q", QueueInfo())
    for _ in range(2000):
        store.put(["q"], b"x" * 1000, 0)
    held = store.take(["q"], 1)  # this process is now a live consumer
    shown = run_cli("brokerdb", str(data), "show")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["queues"] == {"q": 1999} and summary["unacked"] == 1
    assert summary["consumers_alive"] == 1
    refused = run_cli("brokerdb", str(data), "compact")
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("stop the workers (and the programs that publish) first")
    store.ack([t.tag for t in held])
    store.ack([t.tag for t in store.take(["q"], 2000)])
    store.release()  # gone: no consumer left
    compacted = run_cli("brokerdb", str(data), "compact")
    assert compacted.returncode == 0, compacted.stderr
    before, after = (
        int(n) for n in compacted.stdout.split(": ")[1].split(" bytes")[0].split(" -> ")
    )
    assert after < before
    missing = run_cli("brokerdb", str(tmp_path / "nothing"), "show")
    assert missing.returncode == 2 and "no embedded broker store" in missing.stderr


def test_the_native_consumer_takes_a_queue_added_while_it_runs(tmp_path: Path) -> None:
    app = App("addqueue", data_dir=str(tmp_path))
    got = green.new_event()
    seen: list[Any] = []

    def on_message(message: Any) -> None:
        seen.append(message.decode()[0][0])
        consumer.ack(message)
        got.set()

    consumer = NativeLmdbConsumer(app, [app.conf.task_default_queue], on_message, lambda: 5)
    consumer.start()
    try:
        assert consumer.wait_ready(10)
        consumer.add_queue("added")  # consumed from now on, without a restart
        app.send_task("native.record", ("to the added queue",), queue="added")
        assert got.wait(10), seen
        consumer.cancel_queue("added")
        assert consumer.queue_names == [app.conf.task_default_queue]
    finally:
        consumer.stop_consuming()
        consumer.close()
    assert seen == ["to the added queue"]
    assert open_store(str(tmp_path / "broker")).unacked_count() == 0
