"""Celery's worker signals, sent from greenworker's hooks.

The task signals inside a run (``task_prerun``, ``task_postrun``,
``task_success``, ``task_failure``, ``task_retry``) come from Celery's own
tracer; revocations and hard time limits from
:class:`~greenworker.celery.runner.CeleryTaskRunner`.  This middleware sends
the rest, at the moments Celery's worker sends them: ``task_received``,
``task_rejected`` / ``task_unknown``, ``worker_process_init`` (once: there
is one process), ``celeryd_after_setup``, ``worker_ready``,
``heartbeat_sent``, ``worker_shutdown``.  Django's fixup, sentry-sdk and
OpenTelemetry listen to these.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.exceptions import NotRegistered

from ..worker.executor import REJECTED_BY_TASK
from ..worker.hooks import Middleware

if TYPE_CHECKING:
    from kombu.message import Message

    from ..worker.request import Request
    from ..worker.worker import Worker

log = logging.getLogger("greenworker.celery")


class WorkerView:
    """The sender of the worker signals, in place of Celery's ``WorkController`` (and of its
    consumer): what receivers read from it, such as Celery's Django fixup (``app``,
    ``pool_cls``) or handlers keyed on the node name (``hostname``)."""

    #: Not a prefork pool: Celery's Django fixup keeps connection pools open then.
    pool_cls = "greenworker.worker.pool:GreenPool"

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        #: The greenworker worker, once built.
        self.worker: Worker | None = None

    @property
    def controller(self) -> WorkerView:
        return self  # Celery's consumer has .controller, the WorkController

    @property
    def concurrency(self) -> int:
        return self.worker.pool.size if self.worker is not None else 0

    def __repr__(self) -> str:
        return f"<greenworker worker {self.hostname}>"


class CelerySignals(Middleware):
    """Sends Celery's worker signals for a worker running ``app``, with ``view`` as sender."""

    def __init__(self, app: Celery, view: WorkerView) -> None:
        self.app = app
        self.view = view
        self._process_initialised = False

    def worker_start(self, worker: Worker) -> None:
        if not self._process_initialised:  # one process: "each pool process" means once
            self._process_initialised = True
            self.app.loader.init_worker_process()
            signals.worker_process_init.send(sender=worker.hostname)
        signals.celeryd_after_setup.send(
            sender=worker.hostname, instance=self.view, conf=self.app.conf
        )
        if worker.heart is not None:
            worker.heart.on_beat = self._heartbeat_sent

    def _heartbeat_sent(self) -> None:
        if signals.heartbeat_sent.receivers:
            signals.heartbeat_sent.send(sender=self.view)

    def worker_ready(self, worker: Worker) -> None:
        signals.worker_ready.send(sender=self.view)

    def worker_stop(self, worker: Worker) -> None:
        signals.worker_shutdown.send(sender=self.view)
        self.app.loader.shutdown_worker()

    def task_received(self, request: Request) -> None:
        if not signals.task_received.receivers:
            return  # Celery's Request is built only for someone who listens
        from celery.worker.request import Request as CeleryRequest

        msg = request.msg
        celery_request = CeleryRequest(
            request.message,
            app=self.app,
            hostname=request.executor.hostname,
            task=self.app.tasks[request.name],
            headers=msg.headers,
            body=(msg.args, msg.kwargs, msg.embed),  # already decoded (and v1 converted)
            decoded=True,
        )
        signals.task_received.send(sender=self.view, request=celery_request)

    def task_rejected(self, message: Message, reason: str, requeue: bool) -> None:
        if reason.startswith(REJECTED_BY_TASK):
            return  # Reject() in a task: Celery sends no signal for it, only the event
        headers: dict[str, Any] = message.headers or {}
        name = headers.get("task")
        if isinstance(name, str) and name not in self.app.tasks:
            signals.task_unknown.send(
                sender=self.view,
                message=message,
                exc=NotRegistered(name),
                name=name,
                id=headers.get("id"),
            )
            return
        signals.task_rejected.send(sender=self.view, message=message, exc=ValueError(reason))


def shutting_down(hostname: str, sig: str, how: str) -> None:
    """Celery's ``worker_shutting_down``: a signal started a ``how`` ("Warm", "Cold")
    shutdown of worker ``hostname``."""
    signals.worker_shutting_down.send(sender=hostname, sig=sig, how=how, exitcode=0)
