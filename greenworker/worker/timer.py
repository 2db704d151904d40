"""Green timers: ``call_after``, ``call_at``, ``call_repeatedly`` and ``cancel``.

One greenlet sleeps until the earliest entry is due, runs what is due, and
sleeps again; scheduling an earlier entry wakes it.  Callbacks run in the
timer greenlet and must be short (hand real work to the pool).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .. import green

log = logging.getLogger("greenworker.timer")


class Entry:
    """A scheduled call; pass it to :meth:`Timer.cancel`."""

    __slots__ = ("args", "cancelled", "fn", "interval", "when")

    def __init__(
        self, when: float, fn: Callable[..., Any], args: tuple[Any, ...], interval: float | None
    ) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timer:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()
        self._wake = green.new_event()
        self._greenlet: green.Greenlet | None = None
        self._running = False

    def __len__(self) -> int:
        return sum(1 for _, _, e in self._heap if not e.cancelled)

    def start(self) -> None:
        if self._greenlet is None or self._greenlet.dead:
            self._running = True
            self._greenlet = green.spawn(self._loop)

    def stop(self) -> None:
        self._running = False
        self._wake.set()
        if self._greenlet is not None:
            self._greenlet.join(1.0)
            if not self._greenlet.dead:
                self._greenlet.kill()
        self._greenlet = None

    def call_after(self, seconds: float, fn: Callable[..., Any], *args: Any) -> Entry:
        return self._push(Entry(time.monotonic() + max(seconds, 0.0), fn, args, None))

    def call_at(self, when: datetime | float, fn: Callable[..., Any], *args: Any) -> Entry:
        """Run at a wall-clock time (an aware datetime or a POSIX timestamp)."""
        stamp = when.timestamp() if isinstance(when, datetime) else when
        return self.call_after(stamp - time.time(), fn, *args)

    def call_repeatedly(self, seconds: float, fn: Callable[..., Any], *args: Any) -> Entry:
        if seconds <= 0:
            raise ValueError("interval must be positive")
        return self._push(Entry(time.monotonic() + seconds, fn, args, seconds))

    def cancel(self, entry: Entry) -> None:
        entry.cancel()

    def _push(self, entry: Entry) -> Entry:
        first = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (entry.when, next(self._seq), entry))
        if first is None or entry.when < first:
            self._wake.set()
        return entry

    def _loop(self) -> None:
        while self._running:
            delay = self._heap[0][0] - time.monotonic() if self._heap else None
            if delay is None or delay > 0:
                self._wake.wait(delay)
                self._wake.clear()
                continue
            _, _, entry = heapq.heappop(self._heap)
            if entry.cancelled:
                continue
            try:
                entry.fn(*entry.args)
            except Exception:
                log.exception("timer callback %r raised", entry.fn)
            if entry.interval is not None and not entry.cancelled:
                entry.when += entry.interval
                now = time.monotonic()
                if entry.when < now:  # fell behind: skip missed beats, keep the phase
                    missed = int((now - entry.when) // entry.interval) + 1
                    entry.when += missed * entry.interval
                heapq.heappush(self._heap, (entry.when, next(self._seq), entry))
