"""Blocked-hub watchdog: finds the task that keeps the hub from running the others.

A task that never yields (a CPU loop, an unpatched ``time.sleep``, a long C
call) stops every other task, the consumer and the timers.  While tasks run, a
timer on the hub stamps the time every ``threshold / 4``; a real OS thread (it
runs while the hub cannot) checks the stamp.  With no task running the stamps
pause (an idle worker does not wake for them) and the next task submitted
resumes them.  When it is older than ``threshold`` the
hub is blocked: the thread logs which task runs (found from the hub thread's
current Python frames), counts it, and, if the block outlasts that task's
hard time limit, applies the policy:

* ``exit`` (default): log and end the process with :data:`EXIT_HUB_BLOCKED`
  so a supervisor restarts it; unacked messages are redelivered by the broker.
* ``log``: only log and count.

On gevent, the hub's own monitor thread (``gevent.config.monitor_thread``)
reports the same condition but cannot say which task; eventlet's
``hub_blocking_detection`` raises into the blocking code, which would change
the task's outcome.  So both hubs use this one watchdog.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from . import green

if TYPE_CHECKING:
    from .request import Request
    from .timer import Entry
    from .worker import Worker

log = logging.getLogger(__name__)

#: Exit status when a task blocked the hub past its hard time limit (EX_SOFTWARE).
EXIT_HUB_BLOCKED = 70
POLICIES = ("exit", "log")


@dataclass
class BlockStats:
    count: int = 0
    longest: float = 0.0
    total: float = 0.0


class Watchdog:
    def __init__(self, worker: Worker, threshold: float, policy: str = "exit") -> None:
        if policy not in POLICIES:
            raise ValueError(f"worker_block_policy must be one of {POLICIES}, not {policy!r}")
        self.worker = worker
        self.threshold = threshold
        self.policy = policy
        self.stats = BlockStats()
        self._stamp = time.monotonic()
        self._running = False
        self._ticker: Entry | None = None
        self.paused = False  # no task running: no stamps
        self._hub_thread = 0

    def start(self) -> None:
        if self.threshold <= 0 or self._running:
            return
        self._running = True
        self._hub_thread = green.real_thread_ident()
        self._stamp = time.monotonic()
        self._ticker = self.worker.timer.call_repeatedly(self.threshold / 4, self._tick)
        green.start_real_thread(self._watch)

    def stop(self) -> None:
        self._running = False
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def task_submitted(self) -> None:
        """Resume the stamps if they were paused (called on the hub for every task)."""
        if self.paused and self._running:
            self.paused = False
            self._stamp = time.monotonic()
            self._ticker = self.worker.timer.call_repeatedly(self.threshold / 4, self._tick)

    def _tick(self) -> None:
        self._stamp = time.monotonic()
        if self.worker.pool.active == 0 and self.worker.pool.waiting == 0:
            self.paused = True  # nothing can block the hub for a task: stop waking
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None

    def _watch(self) -> None:
        episode_stamp = None  # the hub's stamp when the current block began
        reported_past_limit = False
        while self._running:
            green.real_sleep(self.threshold / (1 if self.paused else 4))
            if self.paused:
                episode_stamp = None
                continue
            stamp = self._stamp
            blocked_for = time.monotonic() - stamp
            if blocked_for < self.threshold:
                if episode_stamp is not None:
                    self._episode_ended(time.monotonic() - episode_stamp)
                episode_stamp = None
                continue
            request = self._running_request()
            if episode_stamp != stamp:
                episode_stamp = stamp
                reported_past_limit = False
                self.stats.count += 1
                log.warning(
                    "hub blocked for %.2fs by %s: no other task, timer or broker I/O runs",
                    blocked_for,
                    _describe(request),
                )
            hard = request.time_limits[1] if request is not None else None
            if hard and request is not None and request.time_start is not None:
                running_for = time.monotonic() - request.time_start
                if running_for > hard and not reported_past_limit:
                    reported_past_limit = True
                    self._past_hard_limit(request, running_for, hard)

    def _episode_ended(self, duration: float) -> None:
        self.stats.total += duration
        self.stats.longest = max(self.stats.longest, duration)
        log.warning("hub unblocked after %.2fs", duration)

    def _past_hard_limit(self, request: Request, running_for: float, hard: float) -> None:
        if self.policy == "log":
            log.error(
                "task %s blocks the hub %.1fs past its hard time limit (%ss); policy 'log': "
                "waiting for it",
                _describe(request),
                running_for - hard,
                hard,
            )
            return
        if self.policy == "exit":
            log.critical(
                "task %s blocks the hub %.1fs past its hard time limit (%ss): exiting with "
                "status %d so a supervisor restarts the worker; its message is redelivered",
                _describe(request),
                running_for - hard,
                hard,
                EXIT_HUB_BLOCKED,
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_HUB_BLOCKED)

    def _running_request(self) -> Request | None:
        frame: FrameType | None = sys._current_frames().get(self._hub_thread)
        from .request import Request

        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Request) and frame.f_code.co_name == "_run":
                return candidate
            frame = frame.f_back
        return None


def _describe(request: Request | None) -> str:
    if request is None:
        return "code outside any task"
    return f"task {request.name}[{request.id}]"
