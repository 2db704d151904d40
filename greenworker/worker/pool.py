"""A greenlet pool whose size can change while it runs.

Jobs beyond the size wait in order; growing starts waiting jobs at once,
shrinking lets running jobs finish and starts no new one until the count of
running jobs is below the new size.  No job is ever killed by a resize.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import green

log = logging.getLogger("greenworker.pool")


class GreenPool:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self._size = size
        self._ids = itertools.count(1)
        self._running: dict[int, green.Greenlet | None] = {}
        self._waiting: deque[tuple[int, Callable[..., Any], tuple[Any, ...]]] = deque()
        # Spawned greenlets that have not run yet are never killed (their cleanup
        # would never run); they are marked here and return as soon as they start.
        self._not_started: set[int] = set()
        self._cancelled: set[int] = set()
        self._idle = green.new_event()
        self._idle.set()
        self._on_change: list[Callable[[], None]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def active(self) -> int:
        """Jobs running now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Jobs accepted but not started (the pool was full)."""
        return len(self._waiting)

    def on_resize(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every change of size (the consumer adjusts its prefetch)."""
        self._on_change.append(callback)

    def submit(self, fn: Callable[..., Any], *args: Any) -> int:
        """Run ``fn(*args)`` in a greenlet as soon as a slot is free; return the job id."""
        job_id = next(self._ids)
        self._idle.clear()
        if len(self._running) < self._size and not self._waiting:
            self._start(job_id, fn, args)
        else:
            self._waiting.append((job_id, fn, args))
        return job_id

    def resize(self, size: int) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self._size = size
        self._start_waiting()
        for callback in self._on_change:
            callback()

    def grow(self, n: int = 1) -> None:
        self.resize(self._size + n)

    def shrink(self, n: int = 1) -> None:
        self.resize(max(self._size - n, 1))

    def cancel(self, job_id: int) -> bool:
        """Drop a job that has not started (waiting, or spawned but not yet run);
        False if it runs already (or is unknown): a running job is never touched here."""
        for entry in self._waiting:
            if entry[0] == job_id:
                self._waiting.remove(entry)
                self._maybe_idle()
                return True
        if job_id in self._not_started:
            self._cancelled.add(job_id)
            return True
        return False

    def kill(
        self, job_id: int, exception: BaseException | None = None, *, release: bool = False
    ) -> bool:
        """Stop one job: drop it if waiting, kill its greenlet if running.

        With ``release`` the slot is freed at once, without waiting for the
        greenlet to unwind (a hard time limit must not wait on a slow victim).
        """
        if self.cancel(job_id):
            return True
        if job_id not in self._running:
            return False
        greenlet = self._running[job_id]
        if greenlet is not None:
            greenlet.kill(exception)
        if release:
            del self._running[job_id]
            self._start_waiting()
            self._maybe_idle()
        return True

    def kill_all(self, exception: BaseException | None = None) -> None:
        self._waiting.clear()
        for job_id in list(self._running):
            self.kill(job_id, exception)
        self._maybe_idle()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits; return False on timeout."""
        return self._idle.wait(timeout)

    def _start(self, job_id: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._running[job_id] = None  # reserve the slot before the greenlet can run
        self._not_started.add(job_id)
        self._running[job_id] = green.spawn(self._run, job_id, fn, args)

    def _run(self, job_id: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._not_started.discard(job_id)
        try:
            if job_id in self._cancelled:
                self._cancelled.discard(job_id)
                return
            fn(*args)
        except green.GreenletExit:
            log.debug("pool job %s killed", job_id)
        except BaseException:
            log.exception("pool job %s raised", job_id)
        finally:
            self._running.pop(job_id, None)
            self._start_waiting()
            self._maybe_idle()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._running) < self._size:
            job_id, fn, args = self._waiting.popleft()
            self._start(job_id, fn, args)

    def _maybe_idle(self) -> None:
        if not self._running and not self._waiting:
            self._idle.set()
