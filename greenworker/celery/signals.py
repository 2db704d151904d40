"""Celery's worker signals, sent from greenworker's hooks.

The task signals inside a run (``task_prerun``, ``task_postrun``,
``task_success``, ``task_failure``, ``task_retry``) come from Celery's own
tracer; revocations and hard time limits from
:class:`~greenworker.celery.runner.CeleryTaskRunner`.  This middleware sends
the rest, at the moments Celery's worker sends them: ``task_received``,
``task_rejected`` / ``task_unknown``, ``worker_process_init`` (once: there
is one process), ``celeryd_after_setup``, ``worker_ready``,
``heartbeat_sent``, ``worker_shutdown``, as
:class:`~greenworker.worker.task_signals.WorkerSignals` sends them for either kind of
app.  Django's fixup, sentry-sdk and OpenTelemetry listen to these.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from celery import Celery, signals
from celery.exceptions import NotRegistered

from ..worker import task_signals
from ..worker.task_signals import WorkerSignals

if TYPE_CHECKING:
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


class CelerySignals(WorkerSignals):
    """Sends Celery's worker signals for a worker running ``app``, with ``view`` as sender."""

    def __init__(self, app: Celery, view: WorkerView) -> None:
        super().__init__(signals, conf=app.conf, tasks=app.tasks, unknown_error=NotRegistered)
        self.app = app
        self.view = view

    def sender(self, worker: Worker) -> WorkerView:
        return self.view

    def init_process(self) -> None:
        self.app.loader.init_worker_process()

    def worker_stop(self, worker: Worker) -> None:
        super().worker_stop(worker)
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


def shutting_down(hostname: str, sig: str, how: str) -> None:
    """Celery's ``worker_shutting_down``: a signal started a ``how`` ("Warm", "Cold")
    shutdown of worker ``hostname``."""
    task_signals.shutting_down(hostname, sig, how, signals=signals)
