"""Celery beat on greenworker: LMDBScheduler and the green service, with a real
``celery.Celery`` app sending to Redis, embedded in the test's hub or as a process."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery import beat as celery_beat
from celery.app import trace
from celery.exceptions import ImproperlyConfigured as CeleryImproperlyConfigured
from celery.schedules import crontab, schedule, solar
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message

from greenworker import green
from greenworker.celery.app import CeleryApp
from greenworker.celery.beat import (
    ENTRY_PREFIX,
    TABLE,
    BeatError,
    BeatHandle,
    LMDBScheduler,
    SchedulerNotFound,
    open_schedule_store,
    resolve_scheduler,
    run_beat,
    start_embedded,
)
from greenworker.worker.store import StateStore

from .conftest import ROOT

FAST = timedelta(seconds=0.1)


class RecordingScheduler(LMDBScheduler):
    """A custom scheduler named by string in the tests: records what it applied."""

    applied: list[str] = []  # noqa: RUF012  (one list for the class: the test reads it)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        type(self).applied.append(entry.name)
        super().apply_entry(entry, producer=producer)


def make_app(broker: str, queue: str, path: Path, **conf: Any) -> Celery:
    """A Celery app as a project would have it: tasks registered, a default queue."""
    app = Celery("beattest", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        beat_schedule_filename=str(path),
        result_expires=None,  # no celery.backend_cleanup entry: the schedule is only ours
        **conf,
    )

    @app.task(name="beattest.tick", shared=False)  # type: ignore[untyped-decorator]
    def tick(n: int) -> int:
        return n

    @app.task(name="beattest.routed", shared=False)  # type: ignore[untyped-decorator]
    def routed() -> None:
        return None

    return app


def declare(broker: str, *queues: str) -> None:
    """Bind the queues first, as a worker would: Redis drops a message no queue is bound for."""
    with Connection(broker) as conn:
        for name in queues:
            Queue(name, Exchange(name, "direct"), routing_key=name)(conn.default_channel).declare()


def drain(broker: str, queue: str) -> list[Message]:
    """Every message on ``queue`` now (taken off it)."""
    with Connection(broker) as conn:
        bound = Queue(queue, Exchange(queue, "direct"), routing_key=queue)(conn.default_channel)
        found = []
        while (message := bound.get(no_ack=True)) is not None:
            found.append(message)
        return found


def delete(broker: str, *queues: str) -> None:
    with Connection(broker) as conn:
        for name in queues:
            Queue(name, Exchange(name, "direct"), routing_key=name)(conn.default_channel).delete()


def wait_for_messages(broker: str, queue: str, count: int, timeout: float = 5.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += drain(broker, queue)
        if len(got) < count:
            green.sleep(0.05)
    assert len(got) >= count, f"{len(got)} of {count} messages on {queue} in {timeout}s"
    return got


def fast_only(messages: list[Message]) -> list[Message]:
    """The messages of the entry with args ``(1,)``."""
    return [m for m in messages if m.decode()[0] == [1]]


def stored(path: Path) -> dict[str, Any]:
    """The schedule store's table, opened after beat closed it."""
    store = StateStore(str(path)).open()
    try:
        return dict(store.table(TABLE).items())
    finally:
        store.close()


def write_stored(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    store = StateStore(str(path)).open()
    try:
        table = store.table(TABLE)
        for name, value in entries.items():
            table.put(ENTRY_PREFIX + name, value)
    finally:
        store.close()


@pytest.fixture
def queues(redis_url: str, queue_name: str) -> Iterator[tuple[str, str]]:
    routed = f"{queue_name}.routed"
    declare(redis_url, queue_name, routed)
    yield queue_name, routed
    delete(redis_url, queue_name, routed)


def stop_quickly(handle: BeatHandle) -> float:
    started = time.monotonic()
    handle.stop()
    took = time.monotonic() - started
    assert not handle.running and handle.error is None
    return took


# --------------------------------------------------------- embedded, on Redis


def test_embedded_beat_sends_through_celery_and_stores_last_runs(
    redis_url: str, queues: tuple[str, str], tmp_path: Path
) -> None:
    queue, routed_queue = queues
    path = tmp_path / "schedule"
    app = make_app(
        redis_url,
        queue,
        path,
        task_routes={"beattest.routed": {"queue": routed_queue}},
        beat_schedule={
            "fast": {"task": "beattest.tick", "schedule": schedule(FAST), "args": (1,)},
            "routed": {"task": "beattest.routed", "schedule": 0.1, "options": {"expires": 60}},
            "cron": {"task": "beattest.tick", "schedule": crontab(), "args": (2,)},
        },
    )
    gaps: list[float] = []
    ticking = True

    def heartbeat() -> None:  # beat must never hold the hub
        last = time.monotonic()
        while ticking:
            green.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    watcher = green.spawn(heartbeat)
    handle = start_embedded(app)
    try:
        fast = wait_for_messages(redis_url, queue, 5)
        routed = wait_for_messages(redis_url, routed_queue, 3)
        cron = handle.service.scheduler.schedule["cron"]
        is_due, next_check = cron.is_due()
        now = cron.default_now()
        remaining = cron.schedule.remaining_estimate(cron.last_run_at)
    finally:
        took = stop_quickly(handle)
        ticking = False
        watcher.join(1)
    assert took < 1.0
    assert max(gaps) < 0.25, f"the hub was held {max(gaps):.3f}s"

    fast = fast_only(fast + drain(redis_url, queue))  # a minute may pass: crontab() sends (2,)
    routed += drain(redis_url, routed_queue)
    # Celery's own send path: its beat header, the routes and the entry's options
    for message in fast:
        assert message.headers["task"] == "beattest.tick"
        assert message.headers["celery_beat_task"] is True
    assert all(m.headers["task"] == "beattest.routed" for m in routed)
    assert all(m.headers["expires"] is not None for m in routed)
    # crontab(): due at the next whole minute after its last run
    assert not is_due or next_check <= 60
    next_minute = cron.last_run_at.replace(second=0, microsecond=0) + timedelta(minutes=1)
    assert abs((now + remaining - next_minute).total_seconds()) < 1.0
    assert -1 < remaining.total_seconds() <= 60  # below 0: the minute came, beat not yet up

    table = stored(path)
    assert table["meta"]["tz"] is None and table["meta"]["utc_enabled"] is True
    assert set(table) == {"meta", "entry:fast", "entry:routed", "entry:cron"}
    state = table["entry:fast"]
    assert state["total_run_count"] == len(fast)
    last_run = datetime.fromisoformat(state["last_run_at"])
    assert last_run.tzinfo is not None
    assert abs(time.time() - last_run.timestamp()) < 2.0

    # a restart goes on from the stored count
    again = make_app(
        redis_url,
        queue,
        path,
        task_routes=app.conf.task_routes,
        beat_schedule=app.conf.beat_schedule,
    )
    handle = start_embedded(again)
    try:
        more = wait_for_messages(redis_url, queue, 2)
    finally:
        stop_quickly(handle)
    more += drain(redis_url, queue)
    assert stored(path)["entry:fast"]["total_run_count"] == len(fast) + len(fast_only(more))


def test_a_restart_sends_a_missed_run_once_and_keeps_the_stored_phase(
    redis_url: str, queues: tuple[str, str], tmp_path: Path
) -> None:
    queue, _ = queues
    path = tmp_path / "schedule"
    now = datetime.now().astimezone()
    down_since = (now - timedelta(seconds=95)).isoformat()  # three 30 s runs missed
    recent = (now - timedelta(seconds=10)).isoformat()  # next run due in 20 s
    write_stored(
        path,
        {
            "missed": {"last_run_at": down_since, "total_run_count": 7},
            "waiting": {"last_run_at": recent, "total_run_count": 3},
        },
    )
    app = make_app(
        redis_url,
        queue,
        path,
        beat_schedule={
            "missed": {"task": "beattest.tick", "schedule": 30.0, "args": (1,)},
            "waiting": {"task": "beattest.tick", "schedule": 30.0, "args": (2,)},
        },
    )
    handle = start_embedded(app)
    try:
        sent = wait_for_messages(redis_url, queue, 1)
        waiting = handle.service.scheduler.schedule["waiting"]
        _, next_check = waiting.is_due()
    finally:
        stop_quickly(handle)
    sent += drain(redis_url, queue)
    assert [m.decode()[0] for m in sent] == [[1]]  # once, not three times
    assert 15 < next_check <= 20.5  # from the stored run, not from the restart
    table = stored(path)
    assert table["entry:missed"]["total_run_count"] == 8
    assert datetime.fromisoformat(table["entry:missed"]["last_run_at"]) > now
    assert table["entry:waiting"] == {"last_run_at": recent, "total_run_count": 3}


@pytest.fixture
def fast_app(redis_url: str, queues: tuple[str, str], tmp_path: Path) -> Celery:
    """An app with one entry every 0.1 s, sending to the test's queue."""
    return make_app(
        redis_url,
        queues[0],
        tmp_path / "schedule",
        beat_schedule={"fast": {"task": "beattest.tick", "schedule": FAST, "args": (1,)}},
    )


def test_a_scheduler_named_by_string(
    redis_url: str, queues: tuple[str, str], fast_app: Celery
) -> None:
    queue, _ = queues
    RecordingScheduler.applied = []
    handle = start_embedded(fast_app, scheduler="tests.test_celery_beat:RecordingScheduler")
    try:
        assert type(handle.service.scheduler) is RecordingScheduler
        wait_for_messages(redis_url, queue, 2)
    finally:
        stop_quickly(handle)
    assert RecordingScheduler.applied[:2] == ["fast", "fast"]


def test_run_beat_runs_in_the_calling_greenlet_until_stop(
    redis_url: str, queues: tuple[str, str], fast_app: Celery, tmp_path: Path
) -> None:
    queue, _ = queues
    stop = green.new_event()
    runner = green.spawn(functools.partial(run_beat, fast_app, stop=stop, max_interval=60.0))
    wait_for_messages(redis_url, queue, 2)
    started = time.monotonic()
    stop.set()
    assert runner.join(1.0)
    assert time.monotonic() - started < 1.0
    assert stored(tmp_path / "schedule")["entry:fast"]["total_run_count"] >= 2


def test_stop_kills_a_send_stuck_on_an_unreachable_broker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "schedule"
    long_ago = {"last_run_at": "2026-01-01T00:00:00+00:00", "total_run_count": 0}
    write_stored(path, {"due": long_ago})
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    app = make_app(
        f"redis://127.0.0.1:{port}/0",
        "q",
        path,
        beat_schedule={"due": {"task": "beattest.tick", "schedule": 60.0, "args": (1,)}},
    )
    handle = start_embedded(app)
    with caplog.at_level(logging.ERROR, logger="celery.beat"):
        while "Connection error" not in caplog.text:  # the send is stuck retrying
            green.sleep(0.02)
    started = time.monotonic()
    handle.stop(timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert not handle.running and handle.error is None
    assert "still busy after 0.3s" in caplog.text
    # synced and unlocked on the way out; the run was reserved before the send (Celery's rule)
    assert stored(path)["entry:due"]["total_run_count"] == 1


# ------------------------------------------------------- the scheduler alone


def test_stale_entries_are_dropped_and_kept_ones_keep_their_state(tmp_path: Path) -> None:
    path = tmp_path / "schedule"
    first = LMDBScheduler(
        make_app(
            "memory://",
            "q",
            path,
            beat_schedule={
                "kept": {"task": "beattest.tick", "schedule": 5.0, "args": (1,)},
                "gone": {"task": "beattest.tick", "schedule": 5.0},
            },
        )
    )
    kept = first.reserve(first.schedule["kept"])  # as a tick does when it sends
    first.close()
    assert set(stored(path)) == {"meta", "entry:kept", "entry:gone"}

    app = make_app(
        "memory://",
        "q",
        path,
        beat_schedule={"kept": {"task": "beattest.tick", "schedule": 9.0, "args": (2,)}},
    )
    second = LMDBScheduler(app)
    try:
        assert set(second.schedule) == {"kept"}
        entry = second.schedule["kept"]
        assert entry.total_run_count == 1 and entry.last_run_at == kept.last_run_at
        assert entry.args == (2,) and entry.schedule == schedule(9.0)  # the settings win
    finally:
        second.close()
    assert set(stored(path)) == {"meta", "entry:kept"}


@pytest.mark.parametrize(
    ("change", "warning"),
    [
        ({"timezone": "Europe/Berlin"}, "Reset: Timezone changed from None to 'Europe/Berlin'"),
        ({"enable_utc": False}, "Reset: UTC changed from enabled to disabled"),
    ],
)
def test_a_timezone_change_resets_the_stored_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict[str, Any], warning: str
) -> None:
    path = tmp_path / "schedule"
    entries = {"fast": {"task": "beattest.tick", "schedule": 5.0}}
    first = LMDBScheduler(make_app("memory://", "q", path, beat_schedule=entries))
    first.reserve(first.schedule["fast"])
    first.close()
    assert stored(path)["entry:fast"]["total_run_count"] == 1
    with caplog.at_level(logging.WARNING, logger="greenworker.celery.beat"):
        second = LMDBScheduler(make_app("memory://", "q", path, beat_schedule=entries, **change))
    second.close()
    assert warning in caplog.text
    assert second.schedule["fast"].total_run_count == 0
    assert stored(path)["entry:fast"]["total_run_count"] == 0


def test_last_run_at_is_read_back_in_the_apps_timezone(tmp_path: Path) -> None:
    path = tmp_path / "schedule"
    entries = {"daily": {"task": "beattest.tick", "schedule": crontab(minute=0, hour=7)}}
    app = make_app("memory://", "q", path, beat_schedule=entries, timezone="Europe/Berlin")
    write_stored(
        path, {"daily": {"last_run_at": "2026-03-28T06:00:00+00:00", "total_run_count": 4}}
    )
    scheduler = LMDBScheduler(app)
    try:
        last = scheduler.schedule["daily"].last_run_at
        assert last.utcoffset() == timedelta(hours=1) and last.hour == 7
        assert last.tzinfo == app.timezone  # follows DST from here on, not a fixed offset
    finally:
        scheduler.close()


def test_a_stored_value_that_cannot_be_read_starts_that_entry_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "schedule"
    write_stored(path, {"fast": {"last_run_at": "yesterday", "total_run_count": 2}})
    app = make_app("memory://", "q", path, beat_schedule={"fast": {"task": "t", "schedule": 5.0}})
    scheduler = LMDBScheduler(app)
    scheduler.close()
    assert "stored state of 'fast' unreadable" in caplog.text
    assert stored(path)["entry:fast"]["total_run_count"] == 0


HAVE_EPHEM = importlib.util.find_spec("ephem") is not None


@pytest.mark.skipif(HAVE_EPHEM, reason="ephem is installed")
def test_solar_without_ephem_is_celerys_clear_error() -> None:
    # Celery's solar needs the ephem package (celery[solar]), which greenworker does not
    # install: the user's module fails to load, with Celery's message
    with pytest.raises(CeleryImproperlyConfigured, match="install the ephem library"):
        solar("sunset", 52.5, 13.4)


@pytest.mark.skipif(not HAVE_EPHEM, reason="solar schedules need ephem (celery[solar])")
def test_solar_entries_load_and_compute(tmp_path: Path) -> None:
    entries = {"dusk": {"task": "beattest.tick", "schedule": solar("sunset", 52.5, 13.4)}}
    scheduler = LMDBScheduler(make_app("memory://", "q", tmp_path / "s", beat_schedule=entries))
    try:
        entry = scheduler.schedule["dusk"]
        is_due, next_check = entry.is_due()  # just added: the next sunset is ahead
        assert not is_due and 0 < next_check <= 24 * 3600
        entry.last_run_at -= timedelta(days=2)
        is_due, next_check = entry.is_due()
        assert is_due and 0 < next_check <= 24 * 3600
    finally:
        scheduler.close()
    assert "entry:dusk" in stored(tmp_path / "s")


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module_for_beat:Scheduler", "No module named 'no_such_module_for_beat'"),
        ("celery.beat:NoSuchScheduler", "NoSuchScheduler"),
        ("os.path", "not a celery.beat.Scheduler subclass"),
        ("builtins:dict", "not a celery.beat.Scheduler subclass"),
        (dict, "not a celery.beat.Scheduler subclass"),
    ],
)
def test_a_bad_scheduler_is_one_clear_line(tmp_path: Path, spec: Any, says: str) -> None:
    app = make_app("memory://", "q", tmp_path / "schedule")
    with pytest.raises(SchedulerNotFound) as caught:
        start_embedded(app, scheduler=spec)
    text = str(caught.value)
    assert says in text and "\n" not in text and "beat scheduler" in text
    assert not (tmp_path / "schedule").exists()  # nothing ran
    app.conf.beat_scheduler = spec
    with pytest.raises(SchedulerNotFound):
        resolve_scheduler(app)


def test_which_scheduler_runs(tmp_path: Path) -> None:
    app = make_app("memory://", "q", tmp_path / "schedule")
    assert resolve_scheduler(app) is LMDBScheduler  # Celery's default setting
    named = "tests.test_celery_beat.RecordingScheduler"
    assert resolve_scheduler(app, named) is RecordingScheduler
    assert resolve_scheduler(app, RecordingScheduler) is RecordingScheduler
    assert resolve_scheduler(app, "lmdb") is LMDBScheduler  # the installed alias (setup.cfg)
    explicit = "celery.beat:PersistentScheduler"
    assert resolve_scheduler(app, explicit) is celery_beat.PersistentScheduler
    app.conf.beat_scheduler = "tests.test_celery_beat:RecordingScheduler"
    assert resolve_scheduler(app) is RecordingScheduler  # the setting is honoured


def test_a_shelve_file_at_the_path_and_a_second_beat_are_clear_errors(tmp_path: Path) -> None:
    shelve_file = tmp_path / "celerybeat-schedule"
    shelve_file.write_bytes(b"\x00shelve")
    with pytest.raises(BeatError, match=r"is a file \(celery beat's shelve\?\)") as caught:
        start_embedded(make_app("memory://", "q", shelve_file))
    assert "\n" not in str(caught.value)

    path = tmp_path / "schedule"
    first = start_embedded(make_app("memory://", "q", path))
    try:
        with pytest.raises(BeatError, match=rf"in use by pid {os.getpid()}") as caught:
            start_embedded(make_app("memory://", "q", path))
        assert "\n" not in str(caught.value)
    finally:
        first.stop()


def test_a_bad_beat_schedule_entry_leaves_the_store_unlocked(tmp_path: Path) -> None:
    path = tmp_path / "schedule"
    write_stored(path, {"old": {"last_run_at": "2026-01-01T00:00:00+00:00", "total_run_count": 1}})
    bad = make_app("memory://", "q", path, beat_schedule={"bad": {"task": "t", "schedule": "x"}})
    with pytest.raises(BeatError, match="beat cannot set up its scheduler") as caught:
        start_embedded(bad)
    assert "\n" not in str(caught.value)
    assert "entry:old" in stored(path)  # opens (unlocked), and nothing was dropped


def test_the_workers_store_is_shared_when_the_paths_agree(tmp_path: Path) -> None:
    worker_store = StateStore(str(tmp_path / "state")).open()
    try:
        app = make_app(
            "memory://", "q", tmp_path / "state", beat_schedule={"e": {"task": "t", "schedule": 9}}
        )
        handle = start_embedded(app, worker_store=worker_store)
        stop_quickly(handle)
        assert worker_store.env is not None  # beat left the worker's store open
        assert "entry:e" in dict(worker_store.table(TABLE).items())
    finally:
        worker_store.close()


# ------------------------------------------------------- -B in a worker


class BeatSends:
    """The messages Celery's beat published (``before_task_publish`` with its header)."""

    def __init__(self) -> None:
        self.count = 0
        self.first = green.new_event()

    def __call__(self, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if (headers or {}).get("celery_beat_task"):
            self.count += 1
            self.first.set()


@pytest.fixture
def beat_sends() -> Iterator[BeatSends]:
    sends = BeatSends()
    signals.before_task_publish.connect(sends, weak=False)
    yield sends
    signals.before_task_publish.disconnect(sends)


def test_a_warm_shutdown_stops_the_workers_beat_first(
    redis_url: str, queues: tuple[str, str], fast_app: Celery, beat_sends: BeatSends
) -> None:
    """``-B``: beat stops (and sends nothing more) when the warm shutdown begins, not
    when the tasks still running have ended."""
    started, release, ended = green.new_event(), green.new_event(), green.new_event()

    @fast_app.task(name="beattest.hold", shared=False)  # type: ignore[untyped-decorator]
    def hold() -> None:
        started.set()
        release.wait(10)
        ended.set()

    worker = CeleryApp(fast_app).Worker(concurrency=5, beat=True)
    worker.start()
    stopper = None
    try:
        beat = worker.beat
        assert isinstance(beat, BeatHandle) and beat.running
        hold.delay()
        assert started.wait(10) and beat_sends.first.wait(10)
        stopper = green.spawn(worker.stop)  # what SIGTERM and `control shutdown` do
        assert beat.join(2.0), "beat still runs while the warm shutdown waits for a task"
        assert not ended.is_set()  # the task runs on
        sent_before_the_stop = beat_sends.count
    finally:
        release.set()
        if stopper is not None:
            stopper.join(10)
        else:
            worker.stop()
        trace.reset_worker_optimizations(fast_app)
    assert beat_sends.count == sent_before_the_stop
    assert not beat.running and beat.error is None


def test_a_worker_whose_beat_schedule_is_in_use_does_not_start(
    redis_url: str, queues: tuple[str, str], fast_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """A second ``-B`` on a schedule another beat holds: the worker's start raises the
    one-line BeatError before it consumes anything (no hook traceback, no beat-less run)."""
    queue, _ = queues
    path = fast_app.conf.beat_schedule_filename
    other_beat = open_schedule_store(path)
    try:
        waiting = fast_app.send_task("beattest.tick", (7,), queue=queue)
        worker = CeleryApp(fast_app).Worker(concurrency=5, beat=True)
        with pytest.raises(BeatError, match=rf"in use by pid {os.getpid()}") as caught:
            worker.start()
        assert "\n" not in str(caught.value)
        assert worker.beat is None and not worker.consumer.ready
        assert worker.store is None or worker.store.env is None
        trace.reset_worker_optimizations(fast_app)
    finally:
        other_beat.close()
    assert [m.headers["id"] for m in drain(redis_url, queue)] == [waiting.id]  # not consumed
    assert "raised; ignored" not in caplog.text


# ------------------------------------------------------- the standalone process

STANDALONE = """
import sys
from greenworker import green
green.patch(sys.argv[1])
from datetime import timedelta
from celery import Celery, signals
from celery.schedules import schedule
from greenworker.celery.beat import LMDBScheduler, run_forever

class Printing(LMDBScheduler):
    def sync(self):
        super().sync()
        if self._table is not None and "often" in self.schedule:
            print("durable", self.schedule["often"].total_run_count, flush=True)

app = Celery("standalone", broker=sys.argv[3], set_as_current=False)
app.conf.update(
    beat_schedule={"often": {"task": "x.often", "schedule": schedule(timedelta(seconds=0.002))}},
    beat_sync_every=1,
    beat_schedule_filename=sys.argv[2],
    task_default_queue=sys.argv[4],
)
signals.beat_init.connect(lambda sender, **kw: print("ready", flush=True), weak=False)
run_forever(app, scheduler=Printing, remote_control=sys.argv[5] == "on")
print("stopped", flush=True)
"""


def _standalone(
    hub: str, path: Path, broker: str, queue: str, remote: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", STANDALONE, hub, str(path), broker, queue, remote],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    """Read up to the ``ready`` line (sent from Celery's ``beat_init`` signal)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line == "ready\n":
            return
    raise AssertionError(f"beat did not start: {proc.stderr and proc.stderr.read()}")


def test_kill_9_mid_run_then_sigterm_stops_cleanly(
    hub: str, redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "schedule"
    rng = random.Random(11)
    durable = 0
    for _ in range(3):
        proc = _standalone(hub, path, "memory://", queue_name, "off")
        assert proc.stdout is not None
        _wait_ready(proc)
        deadline = time.monotonic() + rng.uniform(0.05, 0.25)
        for line in proc.stdout:  # kill while it writes
            count = int(line.split()[1])
            assert count >= durable
            durable = count
            if time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # opens (the lock died with the process); everything printed as durable is there
        assert stored(path)["entry:often"]["total_run_count"] >= durable

    # SIGTERM: stops within a second, saved; answers remote control ping while it runs
    declare(redis_url, queue_name)
    proc = _standalone(hub, path, redis_url, queue_name, "on")
    try:
        assert proc.stdout is not None
        _wait_ready(proc)
        node = f"celerybeat@{socket.gethostname()}"
        client = Celery("pinger", broker=redis_url, set_as_current=False)
        deadline = time.monotonic() + 5.0
        replies: list[Any] = []
        while not replies and time.monotonic() < deadline:  # until the pidbox thread listens
            replies = client.control.ping(destination=[node], timeout=0.5)
        client.close()
        assert replies == [{node: {"ok": "pong"}}]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        delete(redis_url, queue_name)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "stopped"
    last = int(out.splitlines()[-2].split()[1])
    assert stored(path)["entry:often"]["total_run_count"] == last > durable
    assert took < 2.5, f"SIGTERM took {took:.2f}s"  # the pidbox thread's 1 s poll included
