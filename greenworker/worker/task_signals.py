"""Celery's signals sent from the worker's hooks, for either kind of app.

:class:`WorkerSignals` sends what both kinds of app send the same way, from
the moments Celery's worker sends them: ``worker_process_init`` (once: there
is one process), ``celeryd_after_setup``, ``worker_ready``,
``heartbeat_sent``, ``worker_shutdown``, and ``task_rejected`` /
``task_unknown`` for messages the worker refuses.  It is given the signals to
send: :mod:`greenworker.signals` for a :class:`greenworker.App` (here,
:class:`AppSignals`, which sends the task signals too), ``celery.signals``
for a Celery app (:class:`greenworker.celery.signals.CelerySignals`, whose
task signals come from Celery's own tracer).  One worker sends one kind.

Every hook first asks whether the signal has receivers: without any, a task
costs one attribute test per hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .. import signals as app_signals
from ..exceptions import NotRegistered
from .executor import REJECTED_BY_TASK
from .hooks import Middleware

if TYPE_CHECKING:
    from kombu.message import Message

    from .request import Request
    from .worker import Worker

#: The request whose ``task_prerun`` was sent in this greenlet (each greenlet has its
#: own): ``task_postrun`` is sent only there, as Celery sends it from the task's process.
_prerun_sent: ContextVar[Request | None] = ContextVar("greenworker_prerun_sent", default=None)


class WorkerSignals(Middleware):
    """Sends the worker signals and the refused-message signals found in ``signals`` (a
    module or namespace with Celery's signal names).

    ``conf`` is what ``celeryd_after_setup`` passes; ``tasks`` are the tasks the
    worker knows, ``unknown_error(name)`` the exception ``task_unknown`` passes.
    """

    def __init__(
        self,
        signals: Any,
        *,
        conf: object,
        tasks: Mapping[str, object],
        unknown_error: Callable[[str], Exception],
    ) -> None:
        self.signals = signals
        self.conf = conf
        self.tasks = tasks
        self.unknown_error = unknown_error
        self._process_initialised = False
        #: The sender of the worker and message signals, once the worker started.
        self._sender: object = None

    def sender(self, worker: Worker) -> object:
        """What the worker signals name as their sender: here the worker itself."""
        return worker

    def init_process(self) -> None:
        """Called once, at the first start, before ``worker_process_init``."""

    def worker_start(self, worker: Worker) -> None:
        signals = self.signals
        if not self._process_initialised:  # one process: "each pool process" means once
            self._process_initialised = True
            self.init_process()
            signals.worker_process_init.send(sender=worker.hostname)
        sender = self._sender = self.sender(worker)
        signals.celeryd_after_setup.send(sender=worker.hostname, instance=sender, conf=self.conf)
        if worker.heart is not None:
            heartbeat_sent = signals.heartbeat_sent

            def beat() -> None:
                if heartbeat_sent.receivers:
                    heartbeat_sent.send(sender=sender)

            worker.heart.on_beat = beat

    def worker_ready(self, worker: Worker) -> None:
        self.signals.worker_ready.send(sender=self._sender)

    def worker_stop(self, worker: Worker) -> None:
        self.signals.worker_shutdown.send(sender=self._sender)

    def task_rejected(self, message: Message, reason: str, requeue: bool) -> None:
        if reason.startswith(REJECTED_BY_TASK):
            return  # Reject() in a task: Celery sends no signal for it, only the event
        signals = self.signals
        if not (signals.task_unknown.receivers or signals.task_rejected.receivers):
            return
        headers: dict[str, Any] = message.headers or {}
        name = headers.get("task")
        if isinstance(name, str) and name not in self.tasks:
            signals.task_unknown.send(
                sender=self._sender,
                message=message,
                exc=self.unknown_error(name),
                name=name,
                id=headers.get("id"),
            )
            return
        signals.task_rejected.send(sender=self._sender, message=message, exc=ValueError(reason))


class AppSignals(WorkerSignals):
    """All of :mod:`greenworker.signals` for a worker running a :class:`greenworker.App`:
    the worker signals, and the task signals from the task's hooks, in the greenlets
    where Celery's worker sends them (``task_prerun`` and ``task_postrun`` in the
    task's own, with ``self.request`` / ``current_request`` set)."""

    def __init__(self, conf: object, tasks: Mapping[str, object]) -> None:
        super().__init__(app_signals, conf=conf, tasks=tasks, unknown_error=NotRegistered)

    def task_received(self, request: Request) -> None:
        if app_signals.task_received.receivers:
            app_signals.task_received.send(sender=self._sender, request=request)

    def before_task(self, request: Request) -> None:
        if not (app_signals.task_prerun.receivers or app_signals.task_postrun.receivers):
            return
        _prerun_sent.set(request)
        msg, task = request.msg, request.task
        app_signals.task_prerun.send(
            sender=task, task_id=request.id, task=task, args=msg.args, kwargs=msg.kwargs
        )

    def after_task(self, request: Request, state: str, result: Any) -> None:
        if _prerun_sent.get() is not request:
            return  # not run, or ended from another greenlet (hard time limit, terminate)
        _prerun_sent.set(None)
        if not app_signals.task_postrun.receivers:
            return
        msg, task = request.msg, request.task
        app_signals.task_postrun.send(
            sender=task,
            task_id=request.id,
            task=task,
            args=msg.args,
            kwargs=msg.kwargs,
            retval=result,
            state=state,
        )

    def task_succeeded(self, request: Request, result: Any, runtime: float) -> None:
        if app_signals.task_success.receivers:
            app_signals.task_success.send(sender=request.task, result=result, runtime=runtime)

    def task_failed(self, request: Request, exc: BaseException, traceback: str | None) -> None:
        if not app_signals.task_failure.receivers:
            return
        msg = request.msg
        app_signals.task_failure.send(
            sender=request.task,
            task_id=request.id,
            exception=exc,
            args=msg.args,
            kwargs=msg.kwargs,
            traceback=exc.__traceback__,
            einfo=app_signals.ExceptionInfo(exc, traceback),
        )

    def task_retried(self, request: Request, exc: BaseException | None, when: Any) -> None:
        if not app_signals.task_retry.receivers:
            return
        reason = request.retry  # the Retry, as Celery's reason; set while these hooks run
        if reason is None:
            return
        app_signals.task_retry.send(
            sender=request.task,
            request=request.context(),
            reason=reason,
            einfo=app_signals.ExceptionInfo(reason),
        )

    def task_revoked(self, request: Request, reason: str) -> None:
        if not app_signals.task_revoked.receivers:
            return
        app_signals.task_revoked.send(
            sender=request.task,
            request=request.context(),
            terminated=reason == "terminated",
            signum=None,
            expired=reason == "expired",
        )


def shutting_down(hostname: str, sig: str, how: str, *, signals: Any = app_signals) -> None:
    """``worker_shutting_down`` of ``signals`` (greenworker's by default): a signal named
    ``sig`` started a ``how`` ("Warm", "Cold") shutdown of worker ``hostname``."""
    signals.worker_shutting_down.send(sender=hostname, sig=sig, how=how, exitcode=0)
