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

* ``exit`` (default): record the task id in the state store, log what
  becomes of its message on this broker, and end the process with
  :data:`EXIT_HUB_BLOCKED` so a supervisor restarts it.  A worker on that state
  store refuses the message if it comes back (rejected without requeue: the
  dead-letter exchange on RabbitMQ, if the queue has one) and stores its
  ``FAILURE`` (``TimeLimitExceeded``) -- so one such task does not restart the
  worker for ever.
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import green
from ..backends.base import FAILURE, build_meta, celery_exception
from .executor import request_in_stack
from .signals import block_signals

if TYPE_CHECKING:
    from kombu.message import Message

    from .pool import GreenPool
    from .request import Request
    from .store import StateStore
    from .timer import Entry, Timer

log = logging.getLogger("greenworker.watchdog")

#: Exit status when a task blocked the hub past its hard time limit (EX_SOFTWARE).
EXIT_HUB_BLOCKED = 70
POLICIES = ("exit", "log")
#: Seconds a task that blocked the hub is remembered (and refused) after the exit.
BLOCKER_RETENTION = 7 * 86400.0


@dataclass
class BlockStats:
    count: int = 0
    longest: float = 0.0
    total: float = 0.0


class Watchdog:
    """Watches the hub from a real thread; see the module docstring.

    ``hub_blockers`` is the worker state's mapping that the recorded blockers go
    into at start; ``store`` the state store (opened before :meth:`load_blockers`;
    None without ``--statedb``); ``store_result(task_id, meta)`` stores a blocker's
    ``FAILURE``; ``broker_scheme``, ``visibility_timeout`` and ``ack_pending`` say
    what becomes of the blocking task's message in the exit line.
    """

    def __init__(
        self,
        timer: Timer,
        pool: GreenPool,
        threshold: float,
        policy: str = "exit",
        *,
        hostname: str,
        hub_blockers: dict[str, dict[str, Any]],
        store: StateStore | None,
        store_result: Callable[[str, dict[str, Any]], None],
        broker_scheme: str,
        visibility_timeout: float,
        ack_pending: Callable[[Message], bool],
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"worker_block_policy must be one of {POLICIES}, not {policy!r}")
        self.timer = timer
        self.pool = pool
        self.hostname = hostname
        self.hub_blockers = hub_blockers
        self.store = store
        self.store_result = store_result
        self.broker_scheme = broker_scheme
        self.visibility_timeout = visibility_timeout
        self.ack_pending = ack_pending
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
        self._ticker = self.timer.call_repeatedly(self.threshold / 4, self._tick)
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
            self._ticker = self.timer.call_repeatedly(self.threshold / 4, self._tick)

    def _tick(self) -> None:
        self._stamp = time.monotonic()
        if self.pool.active == 0 and self.pool.waiting == 0:
            self.paused = True  # nothing can block the hub for a task: stop waking
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None

    def _watch(self) -> None:
        # the CLI's signals go to the hub's thread, never to this one: while the hub's
        # thread holds them back (a restart in place), none is taken here instead
        block_signals()
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
                "%s blocks the hub: running %.1fs, past its hard time limit (%ss); policy 'log': "
                "waiting for it",
                _describe(request),
                running_for,
                hard,
            )
            return
        if self.policy == "exit":
            log.critical(
                "%s blocks the hub: running %.1fs, past its hard time limit (%ss); exiting with "
                "status %d so a supervisor restarts the worker; %s; %s",
                _describe(request),
                running_for,
                hard,
                EXIT_HUB_BLOCKED,
                self._message_fate(request),
                self._record(request, hard),
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_HUB_BLOCKED)

    def _record(self, request: Request, hard: float) -> str:
        """Commit ``request`` as a hub blocker (from this thread: the hub is stuck in
        it); return what that means for the next worker, for the exit line."""
        store = self.store
        if store is None or store.env is None:
            return (
                "no state store (--statedb) to record it in: if its message comes back "
                "it runs again"
            )
        record = {
            "task": request.name,
            "when": time.time(),
            "hard_limit": hard,
            "hostname": self.hostname,
            "store_result": request.store_errors(),
            "result_stored": False,
        }
        try:
            store.add_blocker(request.id, record)
        except Exception as exc:
            return f"could not record it in {store.path} ({exc}): if it comes back it runs again"
        return (
            f"recorded in the state store {store.path}: a worker on it refuses the "
            "message if it comes back and stores its FAILURE"
        )

    def load_blockers(self) -> None:
        """At start: take the recorded hub blockers into the worker's state (so their
        messages are refused on arrival) and store the FAILURE of those whose result
        is not stored yet -- also when the broker lost their message."""
        store = self.store
        if store is None or store.env is None:
            return
        blockers = store.blockers(BLOCKER_RETENTION)
        self.hub_blockers.update(blockers)
        for task_id, record in blockers.items():
            due = record.get("store_result", True) and not record.get("result_stored")
            if due and self._store_failure(task_id, record):
                store.add_blocker(task_id, {**record, "result_stored": True})
        if blockers:
            log.warning(
                "%d task(s) blocked the hub past their hard time limit and ended an earlier "
                "run of this worker; their messages are refused if they come back: %s",
                len(blockers),
                ", ".join(f"{r.get('task')}[{task_id}]" for task_id, r in blockers.items()),
            )

    def _store_failure(self, task_id: str, record: dict[str, Any]) -> bool:
        hard = record.get("hard_limit")
        meta = build_meta(
            task_id,
            FAILURE,
            celery_exception("TimeLimitExceeded", hard),
            f"TimeLimitExceeded: blocked the hub past its hard time limit ({hard}s) on "
            f"{record.get('hostname')}; the worker exited with status {EXIT_HUB_BLOCKED}",
        )
        try:
            self.store_result(task_id, meta)
        except Exception as exc:
            log.error("could not store the FAILURE of hub blocker %s: %s", task_id, exc)
            return False
        return True

    def _running_request(self) -> Request | None:
        return request_in_stack(sys._current_frames().get(self._hub_thread))

    def _message_fate(self, request: Request) -> str:
        """What becomes of the blocking task's message once this process is gone."""
        scheme = self.broker_scheme
        if scheme == "filesystem":
            return (
                "its message is lost: kombu's filesystem transport "
                "keeps no copy of a message it delivered"
            )
        if scheme == "memory":
            return "its message is lost with the process (memory transport)"
        if scheme == "lmdb":
            return (
                "the embedded broker hands its unacked message to the next consumer as soon as "
                "this process is gone"
            )
        if request.acked and not self.ack_pending(request.message):
            return "its message was acked before it ran (acks_late off): it is not delivered again"
        if scheme.startswith(("amqp", "pyamqp")):
            return "RabbitMQ delivers its unacked message again as soon as this process is gone"
        if scheme.startswith("redis"):
            timeout = self.visibility_timeout
            return f"Redis gives its unacked message back after the visibility timeout ({timeout}s)"
        return f"{scheme} delivers its unacked message again if it keeps one"


def _describe(request: Request | None) -> str:
    if request is None:
        return "code outside any task"
    return f"task {request.name}[{request.id}]"


def describe_blocker(record: dict[str, Any]) -> str:
    """What a recorded hub blocker did, for the line that refuses its message."""
    when = datetime.fromtimestamp(float(record.get("when", 0)), UTC)
    return (
        f"it blocked the hub past its hard time limit ({record.get('hard_limit')}s) on "
        f"{record.get('hostname')} at {when:%Y-%m-%d %H:%M:%S} UTC and the worker exited "
        f"with status {EXIT_HUB_BLOCKED}"
    )
