"""Running a Celery task's body through Celery's own tracer.

:class:`CeleryTaskRunner` is the :class:`~greenworker.worker.executor.TaskRunner`
of a Celery app.  Each task gets the tracer Celery's own pools call,
``celery.app.trace.build_tracer`` (looked up when the tracer is built, so the
integrations that wrap it, such as sentry-sdk's, see it as under Celery).  The
tracer sends ``task_prerun`` / ``task_postrun`` / ``task_success`` /
``task_failure`` / ``task_retry``, stores the result in the app's own
backend with the app's serializer, calls the task class's handlers, links,
errbacks and chord counters, and logs the end as Celery does.  greenworker
keeps what surrounds the body: the soft time limit (Celery's
``SoftTimeLimitExceeded`` raised in the task), the hard limit, revocation,
acks.  What Celery's worker does outside the tracer (a hard time limit, a
revocation, ``Reject``) is done here with Celery's calls and signals.
"""

from __future__ import annotations

import gc
import logging
import signal
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery import Celery, signals
from celery import states as celery_states
from celery.app import trace
from celery.app.task import Context
from celery.app.task import Task as CeleryTask
from celery.exceptions import NotRegistered, Reject, SoftTimeLimitExceeded, TimeLimitExceeded

from ..backends.base import FAILURE, RETRY, SUCCESS
from ..exceptions import Retry
from ..worker.executor import IGNORED, REJECTED, Outcome, body_started
from ..worker.hooks import Middleware
from .backend import CeleryResultBackend

if TYPE_CHECKING:
    from ..worker.request import Request
    from ..worker.worker import Worker

log = logging.getLogger("greenworker.request")

Tracer = Callable[[str, list[Any], dict[str, Any], dict[str, Any]], Any]


class CeleryTaskRunner:
    """Runs a Celery app's tasks through ``celery.app.trace.build_tracer``."""

    def __init__(self, app: Celery, hostname: str, results: CeleryResultBackend) -> None:
        self.app = app
        self.hostname = hostname
        self._results = results
        self._tracers: dict[str, Tracer] = {}

    def _tracer(self, task: CeleryTask) -> Tracer:
        tracer = self._tracers.get(task.name)
        if tracer is None:
            # trace.build_tracer, not an imported name: integrations replace it at init
            tracer = trace.build_tracer(
                task.name, task, self.app.loader, self.hostname, app=self.app
            )
            task.__trace__ = tracer
            self._tracers[task.name] = tracer
        return tracer

    def request_dict(self, request: Request) -> dict[str, Any]:
        """The request Celery's worker hands its tracer: the message's headers, its
        properties and delivery info, the arguments and the embedded canvas options."""
        msg, message = request.msg, request.message
        properties = message.properties or {}
        delivery = message.delivery_info or {}
        fields = dict(msg.headers)
        fields.update(
            properties=properties,
            reply_to=properties.get("reply_to"),
            correlation_id=properties.get("correlation_id"),
            hostname=self.hostname,
            delivery_info={
                "exchange": delivery.get("exchange"),
                "routing_key": delivery.get("routing_key"),
                "priority": properties.get("priority"),
                "redelivered": delivery.get("redelivered", False),
            },
            args=msg.args,
            kwargs=msg.kwargs,
            loglevel=None,
            logfile=None,
            is_eager=False,
        )
        fields.update(msg.embed or {})
        return fields

    def context(self, request: Request) -> Context:
        """Celery's ``task.request`` for ``request`` (for the calls made outside the tracer)."""
        return Context(self.request_dict(request))

    def run(self, request: Request, soft: float | None) -> Outcome:
        task = self.app.tasks.get(request.name)
        if task is None:  # unregistered from the Celery app after the worker took it
            return Outcome(FAILURE, exc=NotRegistered(request.name))
        msg = request.msg
        try:
            with body_started(request, soft, SoftTimeLimitExceeded):  # Celery's exception
                retval, info, _, _ = self._tracer(task)(
                    request.id, msg.args, msg.kwargs, self.request_dict(request)
                )
        except Reject as exc:  # raised by the task's on_success or after_return
            return self._rejected(request, task, exc)
        except Exception as exc:  # Celery's machinery itself failed (a backend that cannot store)
            log.error(
                "Task %s[%s]: Celery's tracer raised %r; the message is settled as a failure",
                request.name,
                request.id,
                exc,
                exc_info=True,
            )
            return Outcome(FAILURE, exc=exc, traceback=traceback.format_exc(), handled=True)
        if info is None:
            if isinstance(retval, ExceptionInfo):  # failed before the tracer built its request
                return Outcome(FAILURE, exc=retval.exception, traceback=retval.traceback)
            return Outcome(SUCCESS, value=retval, handled=True)
        state = info.state
        if state == celery_states.RETRY:
            reason = info.retval
            retry = Retry(str(reason), exc=reason.exc, when=reason.when)
            return Outcome(RETRY, retry=retry, handled=True)
        if state == celery_states.REJECTED:
            return self._rejected(request, task, info.retval)
        if state == celery_states.IGNORED:
            return Outcome(IGNORED, handled=True)
        tb = retval.traceback if isinstance(retval, ExceptionInfo) else None
        return Outcome(FAILURE, exc=info.retval, traceback=tb, handled=True)

    def _rejected(self, request: Request, task: CeleryTask, exc: Reject) -> Outcome:
        if not exc.requeue:
            # as Celery's worker: a task that will never run again gets a final FAILURE
            self._fail(request, task, exc, hooks=False)
        return Outcome(REJECTED, exc=exc, requeue=bool(exc.requeue), handled=True)

    def store(self, request: Request, meta: dict[str, Any]) -> None:
        try:
            self._results.store(request.id, meta)
        except Exception as exc:
            log.error("could not store the result of %s[%s]: %s", request.name, request.id, exc)

    def revoked(self, request: Request, reason: str, terminated: bool) -> None:
        task = self.app.tasks.get(request.name)
        if task is None:
            return
        try:
            context = self.context(request)
            task.backend.mark_as_revoked(
                request.id, reason, request=context, store_result=request.store_errors()
            )
            signals.task_revoked.send(
                sender=task,
                request=context,
                terminated=terminated,
                signum=signal.SIGTERM if terminated else None,
                expired=reason == "expired",
            )
        except Exception as exc:
            log.error(
                "could not record the revocation of %s[%s]: %r", request.name, request.id, exc
            )

    def timed_out(self, request: Request, hard: float) -> None:
        task = self.app.tasks.get(request.name)
        if task is not None:
            self._fail(request, task, TimeLimitExceeded(hard), hooks=True)

    def _fail(self, request: Request, task: CeleryTask, exc: BaseException, *, hooks: bool) -> None:
        """What Celery's worker does for a failure outside the tracer: the FAILURE state
        (errbacks, chord), with ``hooks`` the task's ``on_failure`` / ``after_return``,
        and the ``task_failure`` signal."""
        try:
            try:
                raise exc
            except BaseException:
                einfo = ExceptionInfo()
            context = self.context(request)
            task.backend.mark_as_failure(
                request.id, exc, request=context, store_result=request.store_errors()
            )
            msg = request.msg
            if hooks:
                task.on_failure(exc, request.id, msg.args, msg.kwargs, einfo)
                if trace.task_has_custom(task, "after_return"):
                    task.after_return(
                        celery_states.FAILURE, exc, request.id, msg.args, msg.kwargs, None
                    )
            signals.task_failure.send(
                sender=task,
                task_id=request.id,
                exception=exc,
                args=msg.args,
                kwargs=msg.kwargs,
                traceback=exc.__traceback__,
                einfo=einfo,
            )
        except Exception as error:
            log.error(
                "could not record the failure of %s[%s]: %r",
                request.name,
                request.id,
                error,
                exc_info=True,
            )
        finally:
            exc.__traceback__ = None


class CollectTraceGarbage(Middleware):
    """Frees, when the worker stops, what Celery's tracer left in reference cycles.

    A task that sent a message (``self.retry()`` does, as does ``other.delay()``)
    keeps its ``AsyncResult`` in ``task.request.children``; a retry or a failure
    keeps that request in a cycle (the exception's traceback holds the tracer's
    frame, which holds the exception), so only the cyclic garbage collector frees
    it.  ``AsyncResult.__del__`` unsubscribes from the result backend, which under
    gevent needs the current greenlet: at interpreter exit there is none
    (``RuntimeError: greenlet is being finalized``, printed as ``Exception ignored``).
    Collecting while the hub still runs lets those ``__del__`` run as they would
    during the run; one that fails for a real reason is still printed.
    """

    def worker_stop(self, worker: Worker) -> None:
        gc.collect()
