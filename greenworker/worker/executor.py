"""How a request runs: the worker's side of one task execution.

:class:`Executor` is built once per worker with what every request needs
(settings, result writes, ack/reject, hooks, state, timer, kill) and runs
each one: the checks at start, the early ack, STARTED, the hard time limit,
then the body through its :class:`TaskRunner`, and the end.  A request ends
exactly once, in :meth:`Executor._finish`: result stored, hooks called,
message acked or rejected by the policy.  A hard time limit or a terminate
ends it from outside its greenlet, so the pool slot is free at once even if
the task's greenlet is slow to die.

:class:`TaskRunner` is the replaceable part: it calls the task function,
maps how it ended (return, retry, failure, soft time limit, ignore, reject)
to an :class:`Outcome`, and records results, revocations and hard time
limits.  :class:`AppTaskRunner` runs the tasks of a :class:`greenworker.App`;
:class:`greenworker.celery.runner.CeleryTaskRunner` runs a Celery app's
through Celery's own tracer.
"""

from __future__ import annotations

import logging
import os
import random
import time
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from kombu.message import Message

from .. import green
from ..backends.base import (
    FAILURE,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    ResultBackend,
    build_meta,
    celery_exception,
    encode_meta,
    exception_to_meta,
)
from ..client.task import Context, current_request
from ..exceptions import (
    HardTimeLimit,
    Retry,
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
)
from ..observe import logs as task_log

if TYPE_CHECKING:
    from ..config import Settings
    from .hooks import Hooks
    from .request import Request
    from .state import WorkerState
    from .timer import Timer

log = logging.getLogger("greenworker.request")


def backoff_countdown(factor: bool | float, retries: int, maximum: float, jitter: bool) -> float:
    """Celery's exponential backoff: ``factor * 2**retries`` capped, optionally full jitter."""
    base = 1.0 if factor is True else float(factor)
    countdown = min(maximum, base * float(2**retries))
    if jitter:
        countdown = random.uniform(0, countdown)
    return max(0.0, countdown)


#: Celery's names for a run that asked to be dropped (``Ignore``) or handed back (``Reject``).
IGNORED = "IGNORED"
REJECTED = "REJECTED"
#: How a ``task_rejected`` hook's reason starts when the task itself rejected its message.
REJECTED_BY_TASK = "rejected by the task"


@dataclass(slots=True)
class Outcome:
    """How a task body's run ended, as a :class:`TaskRunner` maps it."""

    state: str  #: SUCCESS, FAILURE, RETRY, IGNORED or REJECTED
    value: Any = None  #: SUCCESS: the return value
    exc: BaseException | None = None  #: FAILURE: the exception
    traceback: str | None = None  #: FAILURE: its formatted traceback
    retry: Retry | None = None  #: RETRY: the retry asked for
    meta: dict[str, Any] | None = None  #: SUCCESS: the result document, when it is stored
    #: The runner already stored the result, logged the end and sent the callbacks
    #: (Celery's tracer does all three): the executor counts, calls hooks and acks.
    handled: bool = False
    #: REJECTED: give the message back to the broker (True) or drop / dead-letter it.
    requeue: bool = False


class TaskRunner(Protocol):
    """The replaceable part of a task's execution: call the body, map its end, write results."""

    def run(self, request: Request, soft: float | None) -> Outcome:
        """Call the task body in the current greenlet, within the ``soft`` limit, and map
        how it ended.  ``Terminated``, ``HardTimeLimit`` and ``GreenletExit`` propagate:
        the request was ended from outside."""
        ...

    def store(self, request: Request, meta: dict[str, Any]) -> None:
        """Write a result document (Celery's format) for ``request``; never raises."""
        ...

    def revoked(self, request: Request, reason: str, terminated: bool) -> None:
        """Record that ``request`` was revoked (``reason``: revoked, expired, terminated)
        and will not run, or not run on; never raises."""
        ...

    def timed_out(self, request: Request, hard: float) -> None:
        """Record that ``request`` ran past its ``hard`` time limit and was killed;
        never raises."""
        ...


def body_started(
    request: Request, soft: float | None, exc_type: type[BaseException]
) -> AbstractContextManager[Any]:
    """Note the start of ``request``'s body (monotonic and wall clock) and return the
    context it runs in: ``exc_type`` raised in it after ``soft`` seconds, if any."""
    request.time_start = time.monotonic()
    request.started_at = time.time()
    if not soft:
        return nullcontext()
    return green.timeout(soft, exc_type(f"soft time limit ({soft}s) exceeded"))


class AppTaskRunner:
    """Runs the tasks of a :class:`greenworker.App`: ``current_request`` set, the soft limit
    raised in the task, ``autoretry_for`` applied, results in the app's backend."""

    def __init__(self, backend: Callable[[], ResultBackend]) -> None:
        self._backend = backend  # the app's, opened on first use

    def run(self, request: Request, soft: float | None) -> Outcome:
        msg = request.msg
        try:
            with body_started(request, soft, SoftTimeLimitExceeded):
                result = request.task(*msg.args, **msg.kwargs)
        except Retry as retry:
            return Outcome(RETRY, retry=retry)
        except Exception as exc:
            return self._failure_or_autoretry(request, exc)
        if request.ignore_result():
            return Outcome(SUCCESS, value=result)  # an ignored result is neither built nor encoded
        meta = build_meta(request.id, SUCCESS, result)
        try:
            encode_meta(meta)
        except (TypeError, ValueError) as exc:  # no JSON form: a failure, with the reason
            return Outcome(FAILURE, exc=exc)
        return Outcome(SUCCESS, value=result, meta=meta)

    def _failure_or_autoretry(self, request: Request, exc: Exception) -> Outcome:
        task = request.task
        if (
            task.autoretry_for
            and isinstance(exc, task.autoretry_for)
            and not (task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for))
        ):
            options = dict(task.retry_kwargs)
            if task.retry_backoff and "countdown" not in options:
                options["countdown"] = backoff_countdown(
                    task.retry_backoff,
                    request.msg.retries,
                    task.retry_backoff_max,
                    task.retry_jitter,
                )
            try:
                task.retry(exc=exc, **options)
            except Retry as retry:
                return Outcome(RETRY, retry=retry)
            except Exception as final:  # max retries reached: exc itself, or MaxRetriesExceeded
                return Outcome(FAILURE, exc=final, traceback=traceback.format_exc())
        return Outcome(FAILURE, exc=exc, traceback=traceback.format_exc())

    def store(self, request: Request, meta: dict[str, Any]) -> None:
        try:
            self._backend().store(request.id, meta)
        except Exception as exc:
            log.error("could not store the result of %s[%s]: %s", request.name, request.id, exc)

    def revoked(self, request: Request, reason: str, terminated: bool) -> None:
        self.store(
            request, build_meta(request.id, REVOKED, celery_exception("TaskRevokedError", reason))
        )

    def timed_out(self, request: Request, hard: float) -> None:
        if request.store_errors():
            exc = celery_exception("TimeLimitExceeded", hard)
            self.store(request, build_meta(request.id, FAILURE, exc, "TimeLimitExceeded"))


class Executor:
    """Runs requests and ends each exactly once.  Built once per worker."""

    def __init__(
        self,
        *,
        runner: TaskRunner,
        settings: Settings,
        hostname: str,
        state: WorkerState,
        hooks: Hooks,
        timer: Timer,
        ack: Callable[[Message], object],
        reject: Callable[[Message, bool], object],
        kill: Callable[[int, BaseException], object],
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.hostname = hostname
        self.state = state
        self.hooks = hooks
        self.timer = timer
        self._ack_message = ack
        self._reject_message = reject
        self._kill_job = kill
        #: Recent task errors, oldest first: ``(task id, exception)`` (``Worker.join``).
        self.errors: deque[tuple[str, BaseException]] = deque(maxlen=100)

    def execute(self, request: Request) -> None:
        """Run ``request`` in the current (pool) greenlet, store the result, ack."""
        self.state.task_started(request)
        try:
            revocation = request.revocation()
            if revocation is not None:
                reason, stamp = revocation
                self.revoke(request, reason, stamp=stamp)
                return
            if not request.acks_late:
                self._ack(request)
            if request.option("track_started"):
                meta = {"pid": os.getpid(), "hostname": self.hostname}
                self.runner.store(request, build_meta(request.id, STARTED, meta))
            # the before_task hooks see the task as running (Celery's task_prerun, tracing)
            context = request.context()
            token = current_request.set(context)
            try:
                self.hooks.emit("before_task", request)
            finally:
                current_request.reset(token)
            soft, hard = request.time_limits
            if hard:
                request._hard_timer = self.timer.call_after(
                    hard, self.on_hard_time_limit, request, hard
                )
            self._run(request, soft, context)
        finally:
            if request._hard_timer is not None:
                request._hard_timer.cancel()
            self.state.task_finished(request)

    def _run(self, request: Request, soft: float | None, context: Context) -> None:
        # set for the ending too: hooks (canvas callbacks) send with this task as parent
        token = current_request.set(context)
        try:
            try:
                outcome = self.runner.run(request, soft)
            except (Terminated, HardTimeLimit):
                return  # already finished by terminate() / on_hard_time_limit()
            except green.GreenletExit:
                # Killed by a cold shutdown: hand an unacked message back to the broker.
                if not request.finished:
                    request.finished = True
                    if not request.acked:
                        self._reject_message(request.message, True)
                raise
            if outcome.state == SUCCESS:
                self._succeeded(request, outcome)
            elif outcome.state == RETRY:
                self._retried(request, outcome)
            elif outcome.state == FAILURE:
                assert outcome.exc is not None
                self._failed(request, outcome.exc, outcome.traceback, handled=outcome.handled)
            else:
                self._dropped(request, outcome)
        finally:
            current_request.reset(token)

    # ------------------------------------------------------------ endings

    def _succeeded(self, request: Request, outcome: Outcome) -> None:
        elapsed = _elapsed(request)
        result = outcome.value
        if not outcome.handled:  # Celery's tracer logged a Celery app's
            task_log.task_succeeded(request.name, request.id, elapsed, result)
        self.state.succeeded += 1
        self.hooks.emit("task_succeeded", request, result, elapsed)
        meta = outcome.meta
        self._finish(
            request, SUCCESS, result, record=None if meta is None else self._storing(request, meta)
        )

    def _failed(
        self, request: Request, exc: BaseException, tb: str | None, *, handled: bool = False
    ) -> None:
        if not handled:
            task_log.task_failed(request.name, request.id, exc)
        self.state.failed += 1
        self.hooks.emit("task_failed", request, exc, tb)
        record = None
        if not handled and request.store_errors():
            meta = build_meta(request.id, FAILURE, exception_to_meta(exc), tb)
            record = self._storing(request, meta)
        self._finish(request, FAILURE, exc, record=record)
        self.errors.append((request.id, exc))  # after the store: join() raises on a final state

    def _retried(self, request: Request, outcome: Outcome) -> None:
        retry = outcome.retry
        assert retry is not None
        if not outcome.handled:
            task_log.task_retried(request.name, request.id, retry)
        self.state.retried += 1
        request.retry = retry  # for the hooks that want more than exc and when (events)
        try:
            self.hooks.emit("task_retried", request, retry.exc, retry.when)
        finally:
            request.retry = None  # its traceback holds this run's frames
        reason = retry.exc if retry.exc is not None else retry
        record = None
        if not outcome.handled and request.store_errors():
            tb = "".join(traceback.format_exception(reason)) if retry.exc is not None else None
            record = self._storing(
                request, build_meta(request.id, RETRY, exception_to_meta(reason), tb)
            )
        if retry.send is not None:
            if record is not None:  # first, or the next run's result could be overwritten
                record()
                record = None
            try:
                retry.send()
            except Exception as exc:
                self._failed(request, exc, traceback.format_exc())
                return
        # The new message carries the task on; this one is done either way.
        self._finish(request, RETRY, reason, record=record, force_ack=True)

    def _dropped(self, request: Request, outcome: Outcome) -> None:
        """IGNORED: acked, nothing stored; REJECTED: given back to the broker or dropped."""
        if outcome.state == IGNORED:
            self._finish(request, IGNORED, None, record=None, force_ack=True)
            return
        if request.finished:
            return
        self.state.rejected += 1
        reason = f"{REJECTED_BY_TASK}: {outcome.exc!r}"
        self.hooks.emit("task_rejected", request.message, reason, outcome.requeue)
        self._finish(request, REJECTED, outcome.exc, record=None, requeue=outcome.requeue)

    def _storing(self, request: Request, meta: dict[str, Any]) -> Callable[[], None]:
        return partial(self.runner.store, request, meta)

    def on_hard_time_limit(self, request: Request, hard: float) -> None:
        """Timer callback: the task ran past its hard limit; end it and free its slot now."""
        if request.finished:
            return
        task_log.task_timed_out(request.name, request.id, hard)
        exc = TimeLimitExceeded(hard)
        self.state.failed += 1
        self.hooks.emit("task_failed", request, exc, None)
        self._finish(request, FAILURE, exc, record=partial(self.runner.timed_out, request, hard))
        self.errors.append((request.id, exc))
        self._kill(request, HardTimeLimit())

    def terminate(self, request: Request) -> None:
        """Revoke with ``terminate=True``: kill the running task now."""
        if request.finished:
            return
        log.info("Task %s[%s] terminated", request.name, request.id)
        self._revoked(request, "terminated", terminated=True)
        self._kill(request, Terminated())

    def revoke(self, request: Request, reason: str, *, stamp: dict[str, Any] | None = None) -> None:
        """Do not run: store REVOKED with ``reason`` and ack the message.

        ``stamp`` names the stamped header that revoked it, for the log line.
        """
        by = f" (revoked by header: {stamp})" if stamp else ""
        log.info("Task %s[%s] revoked: %s%s", request.name, request.id, reason, by)
        self._revoked(request, reason)

    def _revoked(self, request: Request, reason: str, *, terminated: bool = False) -> None:
        if request.finished:
            return
        self.state.revoked_count += 1
        self.hooks.emit("task_revoked", request, reason)
        record = partial(self.runner.revoked, request, reason, terminated)
        self._finish(request, REVOKED, reason, record=record, force_ack=True)

    def _kill(self, request: Request, exc: BaseException) -> None:
        if request.job_id is not None:
            self._kill_job(request.job_id, exc)

    # ------------------------------------------------------------ the end

    def _finish(
        self,
        request: Request,
        state: str,
        result: Any,
        *,
        record: Callable[[], object] | None,
        force_ack: bool = False,
        requeue: bool | None = None,
    ) -> None:
        """End ``request``: ``record`` (the runner writing its result), the hooks, the ack
        (or, with ``requeue`` True or False, the message handed back or dropped)."""
        if request.finished:
            return
        request.finished = True
        if record is not None:
            record()
        self.hooks.emit("after_task", request, state, result)
        if requeue is not None:
            self._reject(request, requeue)
        elif (
            state == SUCCESS
            or force_ack
            or not request.acks_late
            or request.option("acks_on_failure_or_timeout")
        ):
            self._ack(request)
        else:
            self._reject(request, False)

    def _ack(self, request: Request) -> None:
        if not request.acked:
            request.acked = True
            self._ack_message(request.message)

    def _reject(self, request: Request, requeue: bool) -> None:
        if not request.acked:  # acked early: nothing is left to hand back
            request.acked = True
            self._reject_message(request.message, requeue)


def _elapsed(request: Request) -> float:
    return time.monotonic() - request.time_start if request.time_start is not None else 0.0


def request_in_stack(frame: FrameType | None) -> Request | None:
    """The request whose task runs in the stack that ``frame`` is the top of, if any (for
    the watchdog's and ``SIGUSR1``'s reports, which look at other greenlets' stacks)."""
    while frame is not None:
        if frame.f_code is _RUN_CODE:
            request: Request = frame.f_locals["request"]
            return request
        frame = frame.f_back
    return None


_RUN_CODE = Executor._run.__code__
