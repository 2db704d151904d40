"""Beat: crontab and interval schedules on a fake clock, restarts, the lock, and real time."""

from __future__ import annotations

import itertools
import logging
import random
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from croniter import CroniterBadDateError, croniter

from greenworker import App, green
from greenworker.beat import Beat, PeriodicEntry, crontab, every
from greenworker.exceptions import ImproperlyConfigured
from greenworker.worker.store import StateStore, StoreLocked
from greenworker.worker.timer import Timer

from .conftest import run_cli, start_cli

BERLIN = ZoneInfo("Europe/Berlin")


def _utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def _runs(schedule: crontab, start: datetime, count: int) -> list[datetime]:
    out, moment = [], start
    for _ in range(count):
        moment = schedule.next_after(moment)
        out.append(moment)
    return out


# ----------------------------------------------------------------- crontab


def test_crontab_fields_parse_like_cron() -> None:
    c = crontab.from_string("*/15 9-17 * * mon-fri")
    assert c.minutes == [0, 15, 30, 45]
    assert c.hours == list(range(9, 18))
    assert c.days_of_week == frozenset({1, 2, 3, 4, 5})
    assert crontab(day_of_week="sun,7").days_of_week == frozenset({0})
    assert crontab(month_of_year="jan-mar/2").months == frozenset({1, 3})
    assert crontab(minute=[5, 10]).minutes == [5, 10]
    assert crontab(minute="5/20").minutes == [5, 25, 45]


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("* * * *", "5 fields"),
        ("61 * * * *", "outside"),
        ("*/0 * * * *", "bad step"),
        ("5-1 * * * *", "backwards"),
        ("x * * * *", "not a number"),
        ("* * * * funday", "not a number"),
        ("0 0 30 2 *", "never matches"),
    ],
)
def test_crontab_rejects_bad_expressions(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        crontab.from_string(expression).next_after(_utc(2026, 1, 1))


def test_crontab_month_ends_and_leap_days() -> None:
    # the 31st skips the months that have none
    assert _runs(crontab.from_string("0 0 31 * *"), _utc(2026, 1, 31), 3) == [
        _utc(2026, 3, 31),
        _utc(2026, 5, 31),
        _utc(2026, 7, 31),
    ]
    # Feb 29 only in leap years
    assert crontab.from_string("30 12 29 2 *").next_after(_utc(2026, 3, 1)) == _utc(
        2028, 2, 29, 12, 30
    )
    # across a year end
    assert crontab.from_string("0 0 1 1 *").next_after(_utc(2026, 12, 31, 23, 59)) == _utc(
        2027, 1, 1
    )
    # day of month and day of week must both match (Celery's rule): Friday the 13th
    assert crontab(minute=0, hour=0, day_of_month=13, day_of_week="fri").next_after(
        _utc(2026, 1, 1)
    ) == _utc(2026, 2, 13)


def test_crontab_dst_start_runs_a_missing_time_once_after_the_jump() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist
    daily = crontab.from_string("30 2 * * *", tz="Europe/Berlin")
    runs = _runs(daily, _utc(2026, 3, 27, 12), 3)
    assert [r.astimezone(BERLIN).strftime("%d %H:%M %Z") for r in runs] == [
        "28 02:30 CET",
        "29 03:00 CEST",  # croniter's reading: the first minute that exists after the gap
        "30 02:30 CEST",
    ]
    every_half_hour = crontab.from_string("*/30 1-3 29 3 *", tz="Europe/Berlin")
    runs = _runs(every_half_hour, _utc(2026, 3, 1), 5)
    # 02:00 and 02:30 do not exist that night: both land on 03:00, which runs once
    assert [r.astimezone(BERLIN).strftime("%Y %H:%M") for r in runs] == [
        "2026 01:00",
        "2026 01:30",
        "2026 03:00",
        "2026 03:30",
        "2027 01:00",
    ]


def test_crontab_dst_end_runs_a_repeated_time_each_time_it_happens() -> None:
    # Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice
    daily = crontab.from_string("30 2 * * *", tz="Europe/Berlin")
    runs = _runs(daily, _utc(2026, 10, 24, 12), 3)
    assert [r.astimezone(BERLIN).strftime("%d %H:%M %Z") for r in runs] == [
        "25 02:30 CEST",
        "25 02:30 CET",  # croniter's reading: the same wall time again, an hour later
        "26 02:30 CET",
    ]
    hourly = crontab.from_string("0 * * * *", tz="Europe/Berlin")
    night = _runs(hourly, _utc(2026, 10, 24, 22, 30), 5)  # 00:30 CEST local onward
    assert [r.astimezone(BERLIN).strftime("%H:%M %Z") for r in night] == [
        "01:00 CEST",
        "02:00 CEST",
        "02:00 CET",  # hourly stays hourly through the repeated hour
        "03:00 CET",
        "04:00 CET",
    ]


def test_crontab_finds_a_date_decades_away() -> None:
    # Feb 29 on a Monday: 2044 after 2016, then 2072 (it used to fail after 8 years)
    leap_monday = crontab(minute=0, hour=0, day_of_month=29, month_of_year=2, day_of_week="mon")
    assert _runs(leap_monday, _utc(2026, 1, 1), 2) == [_utc(2044, 2, 29), _utc(2072, 2, 29)]
    # across 2100, which is no leap year: Wednesday Feb 29 goes from 2096 to 2108
    leap_wednesday = crontab.from_string("0 0 29 2 wed")
    assert leap_wednesday.next_after(_utc(2096, 3, 1)) == _utc(2108, 2, 29)


#: Zones with the awkward cases: DST both ways, half-hour DST (Lord Howe), "negative"
#: DST (Dublin), a two-hour shift (Troll), transitions at midnight (Santiago), a
#: skipped day (Apia, 2011), odd offsets (St John's, Chatham, Kathmandu), no DST.
RANDOM_ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Europe/Dublin",
    "Antarctica/Troll",
    "America/Santiago",
    "Pacific/Apia",
    "America/St_Johns",
    "Pacific/Chatham",
    "Asia/Kathmandu",
    "Asia/Tokyo",
)


def _transitions(zone: ZoneInfo, first_year: int, last_year: int) -> list[datetime]:
    """UTC instants (to the minute) where ``zone`` changes its UTC offset."""
    found = []
    day = _utc(first_year, 1, 1, 12)
    offset = day.astimezone(zone).utcoffset()
    while day.year <= last_year:
        following = day + timedelta(days=1)
        if following.astimezone(zone).utcoffset() != offset:
            low, high = day, following  # bisect to the minute
            while high - low > timedelta(minutes=1):
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            found.append(high.replace(second=0, microsecond=0))
            offset = following.astimezone(zone).utcoffset()
        day = following
    return found


def _random_field(rng: random.Random, low: int, high: int, names: list[str]) -> str:
    def one() -> str:
        kind = rng.choice(("star", "step", "value", "range", "range_step", "from_step", "name"))
        a, b = sorted(rng.sample(range(low, high + 1), 2))
        step = str(rng.randint(1, max(1, (high - low) // 2)))
        if kind == "star":
            return "*"
        if kind == "step":
            return "*/" + step
        if kind == "value":
            return str(a)
        if kind == "range":
            return f"{a}-{b}"
        if kind == "range_step":
            return f"{a}-{b}/{step}"
        if kind == "from_step":
            return f"{a}/{step}"
        if names:  # a name, or a range of names
            i, j = sorted(rng.sample(range(len(names)), 2))
            return names[i] if rng.random() < 0.5 else f"{names[i]}-{names[j]}"
        return str(b)

    return ",".join(one() for _ in range(rng.choice((1, 1, 1, 2, 3))))


def test_crontab_agrees_with_croniter_on_random_schedules_zones_and_dst() -> None:
    """Thousands of random expressions, zones and start moments (a third of them next
    to a DST transition), three runs each: our crontab gives exactly croniter's times."""
    rng = random.Random(1313)
    months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    weekdays = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
    transitions = {name: _transitions(ZoneInfo(name), 2010, 2030) for name in RANDOM_ZONES}
    cases = mismatches = near_dst = 0
    failures: list[str] = []
    started = time.monotonic()
    for _ in range(3000):
        zone_name = rng.choice(RANDOM_ZONES)
        zone = ZoneInfo(zone_name)
        # a third start next to a DST change, with schedules dense enough to meet it
        near_change = bool(transitions[zone_name]) and rng.random() < 0.35
        if near_change:
            change = rng.choice(transitions[zone_name])
            start = change + timedelta(seconds=rng.randint(-3 * 3600, 3 * 3600))
        else:
            start = _utc(2010, 1, 1) + timedelta(seconds=rng.randint(0, 20 * 365 * 86400))
        every_day = 0.9 if near_change else 0.5
        expression = " ".join(
            (
                _random_field(rng, 0, 59, []),
                "*" if near_change and rng.random() < 0.5 else _random_field(rng, 0, 23, []),
                # mostly every day of month, so that dom-and-dow schedules stay possible
                "*" if rng.random() < max(every_day, 0.6) else _random_field(rng, 1, 31, []),
                "*" if rng.random() < every_day else _random_field(rng, 1, 12, months),
                "*" if rng.random() < every_day else _random_field(rng, 0, 7, weekdays),
            )
        )
        ours: list[datetime | str] = []
        theirs: list[datetime | str] = []
        try:
            ours.extend(_runs(crontab.from_string(expression, tz=zone_name), start, 3))
        except ValueError:
            ours.append("no date")
        try:
            iterator = croniter(expression, start.astimezone(zone), day_or=False)
            theirs.extend(iterator.get_next(datetime).astimezone(UTC) for _ in range(3))
        except CroniterBadDateError:
            theirs.append("no date")
        cases += 1
        near_dst += any(
            isinstance(run, datetime)
            and any(abs(run - moment) <= timedelta(hours=2) for moment in transitions[zone_name])
            for run in theirs
        )
        if ours != theirs:
            mismatches += 1
            failures.append(f"{expression!r} {zone_name} from {start}: {ours} != {theirs}")
    elapsed = time.monotonic() - started
    print(
        f"{cases} random crontabs vs croniter: {mismatches} mismatches in {elapsed:.1f}s; "
        f"{near_dst} ran within 2 hours of a DST change"
    )
    assert failures == []
    assert near_dst >= 300  # the DST gaps and folds were really exercised
    assert elapsed < 30


def test_interval_schedule() -> None:
    assert every(2).next_after(_utc(2026, 1, 1)) == _utc(2026, 1, 1, 0, 0, 2)
    assert every(timedelta(minutes=1)).interval == timedelta(seconds=60)
    with pytest.raises(ValueError, match="positive"):
        every(0)


# ----------------------------------------------------------------- beat on a fake clock


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def beat_app(tmp_path: Path, memory_app: App) -> Iterator[App]:
    memory_app.conf.beat_schedule_filename = str(tmp_path / "beat")
    yield memory_app


def _sent(app: App) -> list[tuple[int, ...]]:
    """(args) of every message beat put on the default queue, drained."""
    out = []
    with app.connection() as conn:
        queue = app.queue()(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            args, _kwargs, _embed = message.decode()
            out.append(tuple(args))
    return out


def _beat(app: App, clock: FakeClock) -> tuple[Beat, StateStore]:
    store = StateStore(app.conf.beat_schedule_filename or "").open()
    beat = Beat(app, store, Timer(), clock=clock)
    beat.load_entries()
    return beat, store


def test_beat_sends_when_due_and_a_restart_neither_skips_nor_doubles(beat_app: App) -> None:
    beat_app.add_periodic_task(10.0, "x.every10", args=(10,), name="ten")
    beat_app.add_periodic_task(crontab(minute=0), "x.hourly", args=(60,), name="hourly")
    clock = FakeClock(_utc(2026, 6, 1, 12, 0, 30))
    beat, store = _beat(beat_app, clock)
    assert beat.tick() == pytest.approx(10.0)  # new entries start their clock now
    assert _sent(beat_app) == []
    clock.advance(10)
    beat.tick()
    assert _sent(beat_app) == [(10,)]
    clock.advance(5)
    assert beat.tick() == pytest.approx(5.0)
    store.close()

    # restart before the next run is due: nothing is sent twice
    beat, store = _beat(beat_app, clock)
    beat.tick()
    assert _sent(beat_app) == []
    clock.advance(5)
    beat.tick()
    assert _sent(beat_app) == [(10,)]  # on time, not skipped by the restart
    store.close()

    # down for an hour and a half: every entry that fell due runs once at start
    clock.advance(5400)
    beat, store = _beat(beat_app, clock)
    beat.tick()
    assert sorted(_sent(beat_app)) == [(10,), (60,)]
    assert beat.tick() == pytest.approx(10.0)  # the interval's phase restarts from now
    assert _sent(beat_app) == []
    store.close()


class BrokenSchedule:
    """A user's own schedule class with a bug."""

    def next_after(self, moment: datetime) -> datetime:
        raise ZeroDivisionError("division by zero")

    def __str__(self) -> str:
        return "<broken>"


def test_one_failing_entry_is_logged_once_and_the_others_keep_their_times(
    beat_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    beat_app.add_periodic_task(BrokenSchedule(), "x.broken", name="broken")
    # next due in 2044: it used to fail every tick, and stop every other entry with it
    beat_app.add_periodic_task(
        crontab(minute=0, hour=0, day_of_month=29, month_of_year=2, day_of_week="mon"),
        "x.leap",
        name="leap-monday",
    )
    beat_app.add_periodic_task(10.0, "x.every10", args=(10,), name="ten")
    clock = FakeClock(_utc(2026, 6, 1, 12))
    beat, store = _beat(beat_app, clock)
    try:
        with caplog.at_level(logging.ERROR, logger="greenworker.beat"):
            for _ in range(3):
                assert beat.tick() == pytest.approx(10.0)
                clock.advance(10)
            beat.tick()
        assert _sent(beat_app) == [(10,), (10,), (10,)]
    finally:
        store.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "beat: broken (x.broken) left out until beat restarts: its schedule <broken> "
        "failed: ZeroDivisionError: division by zero"
    ]
    assert not any(r.exc_info for r in caplog.records)  # a user's mistake: no traceback
    assert set(beat.failed) == {"broken"}


def test_beat_schedule_setting_and_its_errors(beat_app: App) -> None:
    beat_app.conf.beat_schedule = {
        "cron": {
            "task": "x.y",
            "schedule": "*/5 * * * *",
            "kwargs": {"a": 1},
            "options": {"queue": "other", "expires": 30},
        },
        "delta": {"task": "x.z", "schedule": timedelta(seconds=3)},
    }
    beat, store = _beat(beat_app, FakeClock(_utc(2026, 1, 1, 0, 1)))
    assert set(beat.entries) == {"cron", "delta"}
    assert beat.entries["cron"].options == {"queue": "other", "expires": 30}
    store.close()
    bad: list[dict[str, object]] = [
        {"schedule": 1},
        {"task": "x", "schedule": "nope"},
        {"task": "x", "schedule": 1, "args": "abc"},
        {"task": "x", "schedule": 1, "options": {"exchange": "e"}},
        {"task": "x", "schedule": 1, "color": "red"},
    ]
    for spec in bad:
        with pytest.raises(ImproperlyConfigured, match=r"beat_schedule\['e'\]"):
            PeriodicEntry.from_setting("e", spec)


def test_one_beat_per_schedule_store(beat_app: App) -> None:
    path = beat_app.conf.beat_schedule_filename or ""
    first = StateStore(path).open()
    try:
        with pytest.raises(StoreLocked, match="in use by pid"):
            StateStore(path).open()
        worker = beat_app.Worker(beat=True)
        with pytest.raises(StoreLocked, match=path):
            worker.start()
    finally:
        first.close()


def test_a_warm_shutdown_stops_embedded_beat_before_running_tasks_end(beat_app: App) -> None:
    """``-B``: from the start of a warm shutdown beat sends nothing, while a task runs on."""
    started, release, ended = green.new_event(), green.new_event(), green.new_event()
    ticked = green.new_event()

    @beat_app.task(name="beat.hold")
    def hold() -> None:
        started.set()
        release.wait(10)
        ended.set()

    @beat_app.task(name="beat.tick")
    def tick() -> None:
        ticked.set()

    beat_app.add_periodic_task(0.05, tick)
    worker = beat_app.Worker(concurrency=5, beat=True)
    worker.start()
    stopper = None
    try:
        beat = worker.beat
        assert isinstance(beat, Beat)
        hold.delay()
        assert started.wait(10) and ticked.wait(10)
        stopper = green.spawn(worker.stop)
        release.wait(0.1)  # the stop gets to its wait for the task
        sent_at_stop = beat.sent
        release.wait(0.3)  # six intervals, the task still running: nothing may be sent
        assert not ended.is_set()
        assert beat.sent == sent_at_stop
    finally:
        release.set()
        if stopper is not None:
            stopper.join(10)
        else:
            worker.stop()


def test_cli_worker_with_beat_on_a_schedule_in_use_exits_2(
    hub: str, tmp_path: Path, queue_name: str
) -> None:
    schedule = str(tmp_path / "schedule")
    other_beat = StateStore(schedule).open()
    try:
        env = {"BEATAPP_BROKER": "memory://", "BEATAPP_QUEUE": queue_name}
        done = run_cli("-A", "tests.beatapp", "worker", "-P", hub, "-B", "-s", schedule, env=env)
    finally:
        other_beat.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"Error: the state store {schedule} is in use")
    assert "Traceback" not in done.stderr and " ready:" not in done.stderr


# ----------------------------------------------------------------- real time


def test_embedded_beat_fires_a_one_second_interval_five_times_in_five_seconds(
    beat_app: App,
) -> None:
    fired: list[float] = []

    @beat_app.task(name="beat.tick")
    def tick() -> None:
        fired.append(time.monotonic())

    beat_app.add_periodic_task(1.0, tick)
    worker = beat_app.Worker(concurrency=5, beat=True)
    started = time.monotonic()
    worker.start()
    try:
        deadline = started + 10
        while len(fired) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop(timeout=5)
    elapsed = fired[4] - started
    print(f"5 runs of a 1 s interval in {elapsed:.2f}s")
    assert len(fired) == 5
    assert 4.8 <= elapsed <= 6.0
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    assert all(0.8 <= gap <= 1.2 for gap in gaps), gaps


@pytest.mark.timeout(60)
def test_cli_beat_sends_and_a_second_beat_is_refused(
    hub: str, redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    env = {"BEATAPP_BROKER": redis_url, "BEATAPP_QUEUE": queue_name}
    schedule = str(tmp_path / "schedule")
    proc = start_cli("-A", "tests.beatapp", "-P", hub, "beat", "-s", schedule, env=env)
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 20
        while client.llen(queue_name) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.llen(queue_name) >= 2
        second = run_cli("-A", "tests.beatapp", "-P", hub, "beat", "-s", schedule, env=env)
        assert second.returncode == 2
        assert "Error: the state store" in second.stderr
        assert "in use by pid" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        client.delete(queue_name)
    assert proc.returncode == 0, out
    assert "beat: sent tick (beatapp.tick)" in out
