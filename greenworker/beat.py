"""Periodic tasks: interval and crontab schedules, sent by a greenlet on the green timer.

Beat runs embedded in a worker (``-B``) or alone (``greenworker -A proj beat``).
Each entry's last run lives in an LMDB state store (table ``beat``), so a
restart neither skips nor doubles a due run.  The rules:

* An entry seen for the first time starts its clock then: an interval first
  fires one interval later, a crontab at its next matching minute.
* A run that fell due while beat was down is sent **once** at start, however
  many were missed; the interval's phase then restarts from that moment.
* The last run is written (and committed) right after the message is
  published.  Only a crash between the two can send a run twice.
* One beat per schedule store: a second gets :class:`~greenworker.worker.store.StoreLocked`.

Crontab times are wall-clock times in the schedule's timezone (the
``timezone`` setting, UTC by default); croniter computes them (see
:class:`crontab` for what that means around DST).

One entry whose schedule fails (a user's own schedule class that raises) is
logged once and left out until beat restarts; the other entries keep their
times.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from . import green
from .exceptions import ImproperlyConfigured
from .worker.store import StateStore

if TYPE_CHECKING:
    from .client.app import App
    from .worker.timer import Entry, Timer

log = logging.getLogger(__name__)

TABLE = "beat"
#: Seconds before a run that could not be sent (broker down) is tried again.
SEND_RETRY = 5.0


class Schedule(Protocol):
    """When an entry runs: the first due moment strictly after another one."""

    def next_after(self, moment: datetime) -> datetime:
        """The first due time after ``moment`` (both timezone-aware)."""
        ...


@dataclass(frozen=True)
class every:
    """Run every ``interval`` (seconds or a :class:`~datetime.timedelta`)."""

    interval: timedelta

    def __init__(self, interval: float | timedelta) -> None:
        seconds = interval.total_seconds() if isinstance(interval, timedelta) else interval
        if not isinstance(seconds, int | float) or not seconds > 0 or math.isinf(seconds):
            raise ValueError(f"an interval must be a positive number of seconds, not {interval!r}")
        object.__setattr__(self, "interval", timedelta(seconds=seconds))

    def next_after(self, moment: datetime) -> datetime:
        return moment + self.interval

    def __str__(self) -> str:
        return f"every {self.interval.total_seconds():g}s"


_DOW_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}


def _parse_field(spec: str | int | Iterable[int], low: int, high: int, what: str) -> frozenset[int]:
    """``*``, ``*/n``, ``a``, ``a-b``, ``a-b/n``, names, and comma lists of those."""
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        return frozenset().union(*(_parse_field(int(v), low, high, what) for v in spec))
    names = _DOW_NAMES if what == "day_of_week" else _MONTH_NAMES if what == "month" else {}
    values: set[int] = set()
    for part in spec.replace(" ", "").lower().split(","):
        if not part:
            raise ValueError(f"crontab {what}: empty item in {spec!r}")
        body, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"crontab {what}: bad step in {part!r}")
            step = int(step_text)
        if body == "*":
            start, end = low, high
        else:
            first, dash, last = body.partition("-")
            start = _value(first, names, what, part)
            end = _value(last, names, what, part) if dash else (high if step_text else start)
        if what == "day_of_week" and start == end == 7:  # 7 is Sunday too
            start = end = 0
        if not (low <= start <= high + (what == "day_of_week")) or not (
            low <= end <= high + (what == "day_of_week")
        ):
            raise ValueError(f"crontab {what}: {part!r} is outside {low}-{high}")
        if end < start:
            raise ValueError(f"crontab {what}: range {part!r} runs backwards")
        values.update(v % 7 if what == "day_of_week" else v for v in range(start, end + 1, step))
    return frozenset(values)


def _value(text: str, names: Mapping[str, int], what: str, part: str) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise ValueError(f"crontab {what}: {part!r} is not a number or name")
    return int(text)


class crontab:
    """A cron schedule: ``crontab(minute="*/15")``, ``crontab(hour=7, day_of_week="mon-fri")``.

    Fields default to ``*`` (every value), like Celery's ``crontab``, except
    that ``minute`` does too.  When both ``day_of_month`` and ``day_of_week``
    are restricted, a day must match both (Celery's rule; classic cron would
    take either).  ``tz`` overrides the app's ``timezone``.

    The next date is computed by croniter (``day_or=False``: Celery's rule);
    this class parses greenworker's (Celery's) arguments and hands croniter
    the expanded fields.  Around DST it follows croniter: a wall time skipped
    when the clock jumps forward runs at the first minute that exists after
    the jump (02:30 runs at 03:00), and a wall time that happens twice when
    the clock falls back runs each time it happens.
    """

    def __init__(
        self,
        minute: str | int | Iterable[int] = "*",
        hour: str | int | Iterable[int] = "*",
        day_of_week: str | int | Iterable[int] = "*",
        day_of_month: str | int | Iterable[int] = "*",
        month_of_year: str | int | Iterable[int] = "*",
        tz: str | None = None,
    ) -> None:
        self.spec = " ".join(
            str(v) if isinstance(v, str | int) else ",".join(map(str, v))
            for v in (minute, hour, day_of_month, month_of_year, day_of_week)
        )
        self.minutes = sorted(_parse_field(minute, 0, 59, "minute"))
        self.hours = sorted(_parse_field(hour, 0, 23, "hour"))
        self.days_of_month = _parse_field(day_of_month, 1, 31, "day_of_month")
        self.months = _parse_field(month_of_year, 1, 12, "month")
        self.days_of_week = _parse_field(day_of_week, 0, 6, "day_of_week")
        self.tz: ZoneInfo | None = _zone(tz) if tz else None
        # checked here, not left to croniter's 50-year search, so that the mistake
        # shows when the schedule is built
        if not any(
            day <= _LONGEST_MONTH[month] for month in self.months for day in self.days_of_month
        ):
            raise ValueError(f"{self!r} never matches a real date")
        # croniter gets "*" or a plain comma list: every value already expanded and checked
        self._expression = " ".join(
            "*" if len(values) == size else ",".join(map(str, sorted(values)))
            for values, size in (
                (self.minutes, 60),
                (self.hours, 24),
                (self.days_of_month, 31),
                (self.months, 12),
                (self.days_of_week, 7),
            )
        )
        self._cron = croniter(self._expression, datetime.now(UTC), day_or=False)

    @classmethod
    def from_string(cls, expression: str, tz: str | None = None) -> crontab:
        """From a classic five-field expression: ``"minute hour day month weekday"``."""
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(f"a crontab expression has 5 fields, got {expression!r}")
        minute, hour, dom, month, dow = fields
        return cls(minute, hour, dow, dom, month, tz=tz)

    def with_default_tz(self, tz: ZoneInfo) -> crontab:
        if self.tz is None:
            self.tz = tz
        return self

    def __repr__(self) -> str:
        zone = f" {self.tz.key}" if self.tz is not None else ""
        return f"<crontab {self.spec}{zone}>"

    __str__ = __repr__

    def next_after(self, moment: datetime) -> datetime:
        """The first matching minute strictly after ``moment``, in UTC."""
        local = moment.astimezone(self.tz or UTC)
        try:
            found = self._cron.get_next(datetime, start_time=local)
        except CroniterBadDateError:
            # every day/month pair exists, so only a weekday never seen on it within
            # croniter's 50 years is left; the calendar has none
            raise ValueError(f"{self!r} found no date within 50 years") from None
        assert isinstance(found, datetime)
        return found.astimezone(UTC)


#: Days in each month of a leap year: a day of month that exists in some year.
_LONGEST_MONTH = {month: calendar.monthrange(2024, month)[1] for month in range(1, 13)}


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ImproperlyConfigured(f"unknown timezone {name!r}: {exc}") from None


def as_schedule(value: Any) -> Schedule:
    """A schedule from what a ``beat_schedule`` entry may hold: seconds, timedelta,
    :class:`every`, :class:`crontab`, or a crontab expression string."""
    if isinstance(value, every | crontab):
        return value
    if isinstance(value, timedelta) or (
        isinstance(value, int | float) and not isinstance(value, bool)
    ):
        return every(value)
    if isinstance(value, str):
        return crontab.from_string(value)
    if callable(getattr(value, "next_after", None)):
        own: Schedule = value  # a user's own schedule class
        return own
    raise ValueError(f"not a schedule: {value!r} (seconds, timedelta, crontab or every)")


@dataclass
class PeriodicEntry:
    """One periodic task: what to send and when."""

    name: str
    task: str
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_setting(cls, name: str, spec: Mapping[str, Any]) -> PeriodicEntry:
        """From a Celery-style ``beat_schedule`` item: ``{"task", "schedule", "args",
        "kwargs", "options"}``."""
        if not isinstance(spec, Mapping):
            raise ImproperlyConfigured(f"beat_schedule[{name!r}] must be a dict")
        unknown = set(spec) - {"task", "schedule", "args", "kwargs", "options", "relative"}
        if unknown:
            raise ImproperlyConfigured(
                f"beat_schedule[{name!r}]: unknown key(s) {', '.join(sorted(unknown))}"
            )
        task = spec.get("task")
        if not isinstance(task, str) or not task:
            raise ImproperlyConfigured(f"beat_schedule[{name!r}]: 'task' must be a task name")
        try:
            schedule = as_schedule(spec.get("schedule"))
        except ValueError as exc:
            raise ImproperlyConfigured(f"beat_schedule[{name!r}]: {exc}") from None
        args = spec.get("args") or ()
        kwargs = spec.get("kwargs") or {}
        options = spec.get("options") or {}
        if not isinstance(args, list | tuple):
            raise ImproperlyConfigured(f"beat_schedule[{name!r}]: 'args' must be a list")
        if not isinstance(kwargs, Mapping) or not isinstance(options, Mapping):
            raise ImproperlyConfigured(
                f"beat_schedule[{name!r}]: 'kwargs' and 'options' must be dicts"
            )
        unknown_options = set(options) - SEND_OPTIONS
        if unknown_options:
            raise ImproperlyConfigured(
                f"beat_schedule[{name!r}]: unsupported option(s) "
                f"{', '.join(sorted(unknown_options))} "
                f"(supported: {', '.join(sorted(SEND_OPTIONS))})"
            )
        return cls(name, task, schedule, tuple(args), dict(kwargs), dict(options))


#: ``options`` a periodic entry may pass on to :meth:`App.send_task`.
SEND_OPTIONS = frozenset(
    {"queue", "expires", "countdown", "ignore_result", "soft_time_limit", "time_limit"}
)


class Beat:
    """Sends the app's periodic tasks when they fall due.

    ``store`` holds the last-run times (table ``beat``); ``clock`` returns the
    current time as POSIX seconds (tests pass a fake one to :meth:`tick`).
    """

    def __init__(
        self,
        app: App,
        store: StateStore,
        timer: Timer,
        *,
        max_interval: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.store = store
        self.timer = timer
        self.clock = clock
        self.max_interval = (
            app.conf.beat_max_loop_interval if max_interval is None else max_interval
        )
        self.entries: dict[str, PeriodicEntry] = {}
        #: Entries left out because their schedule raised: name -> the error.
        self.failed: dict[str, str] = {}
        self.sent = 0
        self._last_run: dict[str, datetime] = {}
        self._pending: Entry | None = None
        self._running = False

    def load_entries(self) -> None:
        """Read ``beat_schedule`` and :meth:`App.add_periodic_task` entries, and last runs."""
        zone = _zone(self.app.conf.timezone)
        entries = {
            name: PeriodicEntry.from_setting(name, spec)
            for name, spec in self.app.conf.beat_schedule.items()
        }
        entries.update(self.app.periodic_tasks)
        for entry in entries.values():
            if isinstance(entry.schedule, crontab):
                entry.schedule.with_default_tz(zone)
        self.entries = entries
        self.failed = {}
        table = self.store.table(TABLE)
        self._last_run = {}
        for name, stamp in table.items():
            if name in entries and isinstance(stamp, int | float):
                self._last_run[name] = datetime.fromtimestamp(stamp, UTC)
            elif name not in entries:
                table.delete(name)  # an entry that left the schedule

    def start(self) -> None:
        """Load the schedule and run it on the timer (the store must be open)."""
        self.load_entries()
        self._running = True
        log.info(
            "beat: %d periodic task(s): %s",
            len(self.entries),
            ", ".join(f"{e.name} ({e.schedule})" for e in self.entries.values()) or "none",
        )
        self._pending = self.timer.call_after(0, self._on_timer)

    def stop(self) -> None:
        self._running = False
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _on_timer(self) -> None:
        if not self._running:
            return
        try:
            delay = self.tick()
        except Exception:
            log.exception("beat: tick failed; trying again in 1s")
            delay = 1.0
        if self._running:
            self._pending = self.timer.call_after(delay, self._on_timer)

    def tick(self) -> float:
        """Send every entry that is due now; return seconds until the next one is."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        table = self.store.table(TABLE)
        next_due: datetime | None = None
        for entry in self.entries.values():
            if entry.name in self.failed:
                continue
            last = self._last_run.get(entry.name)
            if last is None:  # new entry: its clock starts now
                last = self._remember(table, entry, now)
            due = self._next_run(entry, last)
            if due is None:
                continue
            if due <= now:
                if self._send(entry):
                    # catching up after downtime: run once, and restart the phase from now
                    following = self._next_run(entry, due)
                    if following is None:
                        continue
                    due = self._remember(table, entry, due if following > now else now)
                    due = self._next_run(entry, due)
                    if due is None:
                        continue
                else:  # not sent (broker down): still due, try again shortly
                    due = now + timedelta(seconds=SEND_RETRY)
            if next_due is None or due < next_due:
                next_due = due
        if next_due is None:
            return self.max_interval
        return max(0.0, min((next_due - now).total_seconds(), self.max_interval))

    def _next_run(self, entry: PeriodicEntry, after: datetime) -> datetime | None:
        """The entry's next run after ``after``; None (logged once, entry left out from
        now on) when its schedule fails, so that one entry cannot stop the others."""
        try:
            return entry.schedule.next_after(after)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.failed[entry.name] = reason
            log.error(
                "beat: %s (%s) left out until beat restarts: its schedule %s failed: %s",
                entry.name,
                entry.task,
                entry.schedule,
                reason,
            )
            return None

    def _remember(self, table: Any, entry: PeriodicEntry, moment: datetime) -> datetime:
        self._last_run[entry.name] = moment
        table.put(entry.name, moment.timestamp())
        return moment

    def _send(self, entry: PeriodicEntry) -> bool:
        try:
            result = self.app.send_task(entry.task, entry.args, entry.kwargs, **entry.options)
        except Exception as exc:  # e.g. the broker is down; the run stays due
            log.error(
                "beat: could not send %s (%s): %s; again in %gs",
                entry.name,
                entry.task,
                exc,
                SEND_RETRY,
            )
            return False
        self.sent += 1
        log.info("beat: sent %s (%s) id %s", entry.name, entry.task, result.id)
        return True


def beat_store_path(app: App) -> str:
    """Where beat keeps its last-run times: ``beat_schedule_filename`` or ``DATA_DIR/beat``."""
    import os

    name = app.conf.beat_schedule_filename
    return os.path.abspath(name) if name else os.path.join(app.data_dir, "beat")


def open_embedded_beat(
    app: App, timer: Timer, worker_store: StateStore | None
) -> tuple[Beat, StateStore | None]:
    """Beat for ``worker -B``: its store is the worker's when the paths agree, else one of
    its own (locked), returned second so the worker closes it.  A locked store or a bad
    ``beat_schedule`` fails here, before anything runs; then the stores are closed."""
    path = beat_store_path(app)
    own: StateStore | None = None
    try:
        if worker_store is not None and worker_store.path == path:
            store = worker_store
        else:
            store = own = StateStore(path).open()
        beat = Beat(app, store, timer)
        beat.load_entries()
    except BaseException:
        for opened in (own, worker_store):
            if opened is not None:
                opened.close()
        raise
    return beat, own


def run_beat(app: App, stop: green.Event, store_path: str | None = None) -> int:
    """Run beat alone until ``stop`` is set; returns how many tasks it sent."""
    from .worker.timer import Timer

    store = StateStore(store_path or beat_store_path(app)).open()
    timer = Timer()
    beat = Beat(app, store, timer)
    try:
        timer.start()
        beat.start()
        stop.wait()
    finally:
        beat.stop()
        timer.stop()
        store.close()
    return beat.sent
