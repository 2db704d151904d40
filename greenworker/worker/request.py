"""One task execution, and the strategy that turns a broker message into one.

``MessageHandler.on_message`` decodes and validates; a bad message is
rejected with one log line.  A good one becomes a :class:`Request` that runs
now (in the pool), later (ETA or rate limit, on the timer) or never (revoked,
expired).

A request ends exactly once, in :meth:`Request._finish`: result stored,
hooks called, message acked or rejected by the policy.  A hard time limit or
a terminate ends it from outside its greenlet, so the pool slot is free at
once even if the task's greenlet is slow to die.
"""

from __future__ import annotations

import logging
import os
import random
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from kombu.message import Message

from .. import green
from ..backends.base import (
    FAILURE,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    build_meta,
    celery_exception,
    encode_meta,
    exception_to_meta,
)
from ..client.task import Context, Task, current_request
from ..exceptions import HardTimeLimit, Retry, SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from ..protocol import TaskMessage, utcnow

if TYPE_CHECKING:
    from .timer import Entry
    from .worker import Worker

log = logging.getLogger("greenworker.request")


def backoff_countdown(factor: bool | float, retries: int, maximum: float, jitter: bool) -> float:
    """Celery's exponential backoff: ``factor * 2**retries`` capped, optionally full jitter."""
    base = 1.0 if factor is True else float(factor)
    countdown = min(maximum, base * float(2**retries))
    if jitter:
        countdown = random.uniform(0, countdown)
    return max(0.0, countdown)


class Request:
    """A validated task message bound to its task, run once by :meth:`execute`."""

    __slots__ = (
        "_hard_timer",
        "acked",
        "finished",
        "generation",
        "job_id",
        "message",
        "msg",
        "retry",
        "started_at",
        "task",
        "time_start",
        "worker",
    )

    def __init__(self, msg: TaskMessage, message: Message, task: Task, worker: Worker) -> None:
        self.msg = msg
        self.message = message
        self.task = task
        self.worker = worker
        #: The consumer connection it came on (see ``Reconnecting.generation_alive``):
        #: handed over while that connection delivers, so the current one.
        self.generation = worker.consumer.connection_generation
        self.job_id: int | None = None
        #: When the task body started, on the monotonic clock (for durations and limits).
        self.time_start: float | None = None
        #: The same moment in wall-clock epoch seconds, as Celery and Flower show it.
        self.started_at: float | None = None
        #: The :class:`Retry` being handled, while the ``task_retried`` hooks run.
        self.retry: Retry | None = None
        self.finished = False
        self.acked = False
        self._hard_timer: Entry | None = None

    def __repr__(self) -> str:
        return f"<Request {self.msg.task}[{self.msg.id}]>"

    @property
    def id(self) -> str:
        return self.msg.id

    @property
    def name(self) -> str:
        return self.msg.task

    def _option(self, name: str) -> Any:
        value = getattr(self.task, name)
        return getattr(self.worker.app.conf, "task_" + name) if value is None else value

    @property
    def acks_late(self) -> bool:
        return bool(self._option("acks_late"))

    @property
    def time_limits(self) -> tuple[float | None, float | None]:
        """(soft, hard): the message's own, else the task's, else the worker's."""
        conf = self.worker.app.conf
        soft = self.msg.soft_time_limit or self.task.soft_time_limit or conf.task_soft_time_limit
        hard = self.msg.time_limit or self.task.time_limit or conf.task_time_limit
        return soft, hard

    def expired(self) -> bool:
        return self.msg.expires is not None and self.msg.expires <= utcnow()

    def revocation(self) -> tuple[str, dict[str, Any] | None] | None:
        """Why this task must not run, if it must not: ``("revoked", stamp)`` when its id
        or one of its stamped headers (``stamp``, ``{header: value}``) was revoked,
        ``("expired", None)`` past its expiry; None when it may run."""
        state = self.worker.state
        if self.id in state.revoked:
            return "revoked", None
        stamp = state.revoked_stamps.match(self.msg.headers)  # at once while none is revoked
        if stamp is not None:
            return "revoked", stamp
        if self.expired():
            return "expired", None
        return None

    def describe(self) -> dict[str, Any]:
        """The request as ``inspect active/reserved`` reports it."""
        msg = self.msg
        return {
            "id": msg.id,
            "name": msg.task,
            "args": msg.args,
            "kwargs": msg.kwargs,
            "type": msg.task,
            "hostname": self.worker.hostname,
            "time_start": self.started_at,
            "acknowledged": self.acked,
            "delivery_info": dict(self.message.delivery_info or {}),
            "worker_pid": os.getpid(),
        }

    # ------------------------------------------------------------ running

    def execute(self) -> None:
        """Run the task in the current (pool) greenlet, store the result, ack."""
        worker = self.worker
        worker.state.task_started(self)
        try:
            revocation = self.revocation()
            if revocation is not None:
                reason, stamp = revocation
                self.revoke(reason, stamp=stamp)
                return
            if not self.acks_late:
                self._ack()
            if self._option("track_started"):
                meta = {"pid": os.getpid(), "hostname": worker.hostname}
                self._store(build_meta(self.id, STARTED, meta))
            worker.hooks.emit("before_task", self)
            soft, hard = self.time_limits
            if hard:
                self._hard_timer = worker.timer.call_after(hard, self.on_hard_time_limit, hard)
            self._run(soft)
        finally:
            if self._hard_timer is not None:
                self._hard_timer.cancel()
            worker.state.task_finished(self)

    def _context(self) -> Context:
        msg = self.msg
        return Context(
            id=msg.id,
            task=msg.task,
            args=msg.args,
            kwargs=msg.kwargs,
            retries=msg.retries,
            eta=msg.eta,
            expires=msg.expires,
            root_id=msg.root_id,
            parent_id=msg.parent_id,
            group=msg.group,
            group_index=msg.group_index,
            origin=msg.origin,
            hostname=self.worker.hostname,
            delivery_info=dict(self.message.delivery_info or {}),
            headers=msg.headers,
            embed=msg.embed,
            timelimit=(msg.time_limit, msg.soft_time_limit),
            called_directly=False,
        )

    def _run(self, soft: float | None) -> None:
        msg = self.msg
        token = current_request.set(self._context())
        self.time_start = time.monotonic()
        self.started_at = time.time()
        limit: AbstractContextManager[Any] = (
            green.timeout(soft, SoftTimeLimitExceeded(f"soft time limit ({soft}s) exceeded"))
            if soft
            else nullcontext()
        )
        try:
            with limit:
                result = self.task(*msg.args, **msg.kwargs)
        except Retry as retry:
            self._retried(retry)
        except (Terminated, HardTimeLimit):
            pass  # already finished by terminate() / on_hard_time_limit()
        except green.GreenletExit:
            # Killed by a cold shutdown: hand an unacked message back to the broker.
            if not self.finished:
                self.finished = True
                if not self.acked:
                    self.worker.consumer.reject(self.message, requeue=True)
            raise
        except Exception as exc:
            self._failed_or_autoretry(exc)
        else:
            self._succeeded(result)
        finally:
            current_request.reset(token)

    def _elapsed(self) -> float:
        return time.monotonic() - self.time_start if self.time_start is not None else 0.0

    def _succeeded(self, result: Any) -> None:
        elapsed = self._elapsed()
        stored = not self._ignore_result()
        meta: dict[str, Any] = {}
        if stored:  # an ignored result is neither built nor encoded
            meta = build_meta(self.id, SUCCESS, result)
            try:
                encode_meta(meta)
            except (TypeError, ValueError) as exc:  # logged by _failed, with the reason
                self._failed(exc, None)
                return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Task %s[%s] succeeded in %.4fs: %.200r", self.name, self.id, elapsed, result)
        self.worker.state.succeeded += 1
        self.worker.hooks.emit("task_succeeded", self, result, elapsed)
        self._finish(SUCCESS, meta, result, stored=stored)

    def _failed_or_autoretry(self, exc: Exception) -> None:
        task = self.task
        if (
            task.autoretry_for
            and isinstance(exc, task.autoretry_for)
            and not (task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for))
        ):
            options = dict(task.retry_kwargs)
            if task.retry_backoff and "countdown" not in options:
                options["countdown"] = backoff_countdown(
                    task.retry_backoff, self.msg.retries, task.retry_backoff_max, task.retry_jitter
                )
            try:
                task.retry(exc=exc, **options)
            except Retry as retry:
                self._retried(retry)
                return
            except Exception as final:  # max retries reached: exc itself, or MaxRetriesExceeded
                self._failed(final, traceback.format_exc())
                return
        self._failed(exc, traceback.format_exc())

    def _failed(self, exc: BaseException, tb: str | None) -> None:
        log.error(
            "Task %s[%s] raised unexpected: %r (after %.3fs)\n%s",
            self.name,
            self.id,
            exc,
            self._elapsed(),
            tb or "",
        )
        self.worker.state.failed += 1
        self.worker.hooks.emit("task_failed", self, exc, tb)
        meta = build_meta(self.id, FAILURE, exception_to_meta(exc), tb)
        self._finish(FAILURE, meta, exc, stored=self._store_errors())
        self.worker.record_error(self.id, exc)  # after the store: join() raises on a final state

    def _retried(self, retry: Retry) -> None:
        log.info("Task %s[%s] retry: %s", self.name, self.id, retry)
        self.worker.state.retried += 1
        self.retry = retry  # for the hooks that want more than exc and when (events)
        try:
            self.worker.hooks.emit("task_retried", self, retry.exc, retry.when)
        finally:
            self.retry = None  # its traceback holds this run's frames
        reason = retry.exc if retry.exc is not None else retry
        tb = "".join(traceback.format_exception(reason)) if retry.exc is not None else None
        meta = build_meta(self.id, RETRY, exception_to_meta(reason), tb)
        stored = self._store_errors()
        if retry.send is not None:
            if stored:  # first, or the next run's result could be overwritten by RETRY
                self._store(meta)
                stored = False
            try:
                retry.send()
            except Exception as exc:
                self._failed(exc, traceback.format_exc())
                return
        # The new message carries the task on; this one is done either way.
        self._finish(RETRY, meta, reason, stored=stored, force_ack=True)

    def on_hard_time_limit(self, hard: float) -> None:
        """Timer callback: the task ran past its hard limit; end it and free its slot now."""
        if self.finished:
            return
        log.error("Task %s[%s] hard time limit (%ss) exceeded: killed", self.name, self.id, hard)
        exc = TimeLimitExceeded(hard)
        self.worker.state.failed += 1
        self.worker.hooks.emit("task_failed", self, exc, None)
        meta = build_meta(
            self.id, FAILURE, celery_exception("TimeLimitExceeded", hard), "TimeLimitExceeded"
        )
        self._finish(FAILURE, meta, exc, stored=self._store_errors())
        self.worker.record_error(self.id, exc)
        self._kill(HardTimeLimit())

    def terminate(self) -> None:
        """Revoke with ``terminate=True``: kill the running task now."""
        if self.finished:
            return
        log.info("Task %s[%s] terminated", self.name, self.id)
        self._revoked("terminated")
        self._kill(Terminated())

    def _kill(self, exc: BaseException) -> None:
        if self.job_id is not None:
            self.worker.pool.kill(self.job_id, exc, release=True)

    def revoke(self, reason: str, *, stamp: dict[str, Any] | None = None) -> None:
        """Do not run: store REVOKED with ``reason`` and ack the message.

        ``stamp`` names the stamped header that revoked it, for the log line.
        """
        by = f" (revoked by header: {stamp})" if stamp else ""
        log.info("Task %s[%s] revoked: %s%s", self.name, self.id, reason, by)
        self._revoked(reason)

    def _revoked(self, reason: str) -> None:
        self.worker.state.revoked_count += 1
        self.worker.hooks.emit("task_revoked", self, reason)
        meta = build_meta(self.id, REVOKED, celery_exception("TaskRevokedError", reason))
        self._finish(REVOKED, meta, reason, stored=True, force_ack=True)

    # ------------------------------------------------------------ the end

    def _ignore_result(self) -> bool:
        if self.task.ignore_result is not None:
            return self.task.ignore_result
        return self.msg.ignore_result or self.worker.app.conf.task_ignore_result

    def _store_errors(self) -> bool:
        return not self._ignore_result() or self.worker.app.conf.task_store_errors_even_if_ignored

    def _finish(
        self,
        state: str,
        meta: dict[str, Any],
        result: Any,
        *,
        stored: bool,
        force_ack: bool = False,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        if stored:
            self._store(meta)
        self.worker.hooks.emit("after_task", self, state, result)
        if (
            state == SUCCESS
            or force_ack
            or not self.acks_late
            or self._option("acks_on_failure_or_timeout")
        ):
            self._ack()
        else:
            self.acked = True
            self.worker.consumer.reject(self.message, requeue=False)

    def _ack(self) -> None:
        if not self.acked:
            self.acked = True
            self.worker.consumer.ack(self.message)

    def _store(self, meta: dict[str, Any]) -> None:
        try:
            self.worker.app.backend.store(self.id, meta)
        except Exception as exc:
            log.error("could not store the result of %s[%s]: %s", self.name, self.id, exc)
