""":class:`CeleryApp`: a ``celery.Celery`` app as the worker sees an app.

The worker needs settings, a task registry with each task's options, a broker
connection, queue declarations, a result backend and a way to run a task.
For a Celery app every one of them comes from Celery: settings as Celery
read them (:mod:`greenworker.celery.settings`), queues from
``app.amqp.queues`` (``task_queues``, ``task_create_missing_queues``,
``task_default_queue_type``), connections from ``connection_for_read`` (TLS,
failover, heartbeat settings), results in ``app.backend``, and each body
through Celery's tracer (:mod:`greenworker.celery.runner`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.app import trace
from celery.app.task import Task as CeleryTask
from kombu.connection import Connection
from kombu.entity import Queue

from ..client.app import App, check_url_syntax
from ..client.result import AsyncResult
from ..client.task import Task
from ..config import Settings
from ..exceptions import ImproperlyConfigured
from .backend import CeleryResultBackend, fit_redis_pool
from .runner import CeleryTaskRunner, CollectTraceGarbage
from .settings import user_set, warn_unhonoured, worker_settings
from .signals import CelerySignals, WorkerView

if TYPE_CHECKING:
    from ..worker.hooks import Middleware
    from ..worker.worker import Worker


class CeleryApp(App):
    """Runs the tasks of ``celery_app`` (a ``celery.Celery``) on greenworker's worker."""

    def __init__(self, celery_app: Celery) -> None:
        # not the current greenworker App: greenworker's shared tasks belong to those
        super().__init__(celery_app.main or "__main__", set_as_current=False)
        #: The Celery app itself.
        self.celery = celery_app
        self.conf = self._read_settings()
        #: The settings as first read, to tell later changes of Celery's conf from ours.
        self._as_loaded = copy.deepcopy(self.conf)
        #: Whether the app's configuration sets task_acks_late (else greenworker's default).
        self.acks_set_by_app = user_set(celery_app, "task_acks_late")
        self._results: CeleryResultBackend | None = None
        self._prepared = False

    def __repr__(self) -> str:
        return f"<greenworker.CeleryApp {self.main}>"

    # ------------------------------------------------------------ broker

    @property
    def embedded(self) -> bool:
        return False  # a Celery app always names its broker (Celery's default is amqp://)

    @property
    def broker_url(self) -> str:
        if self.conf.broker_url:  # -b on the command line
            return self.conf.broker_url
        connection = self.celery.connection_for_read()
        if connection.transport_cls == "sentinel" and connection.alt:
            return ";".join(connection.alt)  # every sentinel, for the native paths
        uri: str = connection.as_uri(include_password=True)
        return uri

    def connection(self) -> Connection:
        """A new (lazy) connection made as Celery makes its own (TLS, login method,
        failover, heartbeat settings), with greenworker's polling defaults."""
        self.check_client_libraries()
        conn: Connection = self.celery.connection_for_read(
            self.conf.broker_url or None, transport_options=self.transport_options()
        )
        return conn

    def _broker_url_as_written(self) -> str:
        conf = self.celery.conf
        return str(self.conf.broker_url or conf.broker_read_url or conf.broker_url or "amqp://")

    def _backend_url_as_written(self) -> str:
        return self.result_backend_url or ""

    def _check_broker_url(self) -> None:
        """The connection as Celery makes it parses the URL; kombu finds its transport."""
        check_url_syntax(self._broker_url_as_written())
        self.celery.connection_for_read(self.conf.broker_url or None).get_transport_cls()

    def _check_backend_url(self) -> None:
        """Celery finds the backend class for the URL (``by_url``: an unknown one is
        ImproperlyConfigured); the URL's host and port must parse.  Nothing is built."""
        url = self.result_backend_url
        if not url:
            return
        from celery.app.backends import by_url

        try:
            by_url(url, self.celery.loader)
        except ImportError as exc:  # by_url reports only a ValueError as ImproperlyConfigured
            name = url.split("://", 1)[0].split("+", 1)[0]
            raise ImproperlyConfigured(f"Celery has no result backend {name!r} ({exc})") from None
        if "://" in url:
            check_url_syntax(url.split("+", 1)[1] if "+" in url.split("://", 1)[0] else url)

    def queue(
        self,
        name: str | None = None,
        *,
        exchange: str | None = None,
        exchange_type: str | None = None,
        routing_key: str | None = None,
    ) -> Queue:
        """The queue as Celery declares it: from ``task_queues``, else created the way
        ``task_create_missing_queues`` says (``task_default_queue_type`` and all).  The
        binding options are Celery's too: they are ignored here."""
        queue: Queue = self.celery.amqp.queues[name or self.conf.task_default_queue]
        return queue

    def queue_type(self, name: str) -> str:
        arguments: dict[str, Any] = getattr(self.queue(name), "queue_arguments", None) or {}
        return "quorum" if arguments.get("x-queue-type") == "quorum" else "classic"

    # ------------------------------------------------------------ results

    @property
    def result_backend_url(self) -> str | None:
        url = self.conf.result_backend or self.celery.conf.result_backend
        return str(url) if url else None

    @property
    def backend(self) -> CeleryResultBackend:
        if self._results is None:
            if self.conf.result_backend:  # --result-backend on the command line
                self.celery.conf.result_backend = self.conf.result_backend
            self._results = CeleryResultBackend(self.celery.backend, self.result_backend_url or "")
        return self._results

    #: Celery's default name (``celery.utils.nodenames.NODENAME_DEFAULT``).
    node_name_default = "celery"

    # ------------------------------------------------------------ sending

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        exchange: str | None = None,
        routing_key: str | None = None,
        priority: int | None = None,
        serializer: str | None = None,
        delivery_mode: int | str | None = None,
        task_id: str | None = None,
        ignore_result: bool = False,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        retries: int = 0,
        parent_id: str | None = None,
        root_id: str | None = None,
        group: str | None = None,
        group_index: int | None = None,
        embed: Mapping[str, Any] | None = None,
        task_type: Task | None = None,
    ) -> AsyncResult:
        """Send through Celery's own ``send_task`` (its routes, serializer, producer pool)."""
        options: dict[str, Any] = {
            "countdown": countdown,
            "eta": eta,
            "expires": expires,
            "queue": queue,
            "exchange": exchange,
            "routing_key": routing_key,
            "priority": priority,
            "serializer": serializer,
            "delivery_mode": delivery_mode,
            "task_id": task_id,
            "soft_time_limit": soft_time_limit,
            "time_limit": time_limit,
            "retries": retries,
            "parent_id": parent_id,
            "root_id": root_id,
            "group_id": group,
            "group_index": group_index,
        }
        if ignore_result:
            options["ignore_result"] = True
        if embed:
            options.update(
                {k: v for k, v in embed.items() if k in ("link", "link_error", "chain", "chord")}
            )
        sent = self.celery.send_task(
            name, args, kwargs, **{k: v for k, v in options.items() if v is not None}
        )
        return AsyncResult(sent.id, self)

    # ------------------------------------------------------------ worker

    def prepare_worker(self, hostname: str) -> None:
        """What Celery's worker does before it builds its parts: import the task modules
        (``imports``, ``include``, ``autodiscover_tasks``; Django's fixup), finalize the
        app as the current one, and register each task's options here."""
        if self._prepared:
            return
        self._prepared = True
        if not user_set(self.celery, "result_backend_thread_safe"):
            # Celery keeps one backend per thread, and under patching each task greenlet is
            # a thread: one backend object (and one connection pool) for all of them instead
            self.celery.conf.result_backend_thread_safe = True
        self.celery.loader.init_worker()
        trace.setup_worker_optimizations(self.celery, hostname)
        self.refresh_tasks()
        warn_unhonoured(self.celery)

    def refresh_tasks(self) -> None:
        """Register (again) every task of the Celery app with the options the worker reads,
        and only those (in place: the worker's parts hold this dict)."""
        fresh = {
            name: _task_options(self, task, self.celery) for name, task in self.celery.tasks.items()
        }
        self.tasks.clear()
        self.tasks.update(fresh)

    def Worker(self, **options: Any) -> Worker:
        """Build a worker for this Celery app, sending ``celeryd_init`` and ``worker_init``
        as Celery's worker does (a ``celeryd_init`` receiver may still change settings)."""
        from ..worker.worker import Worker

        hostname = options.get("hostname") or self.hostname
        self.prepare_worker(hostname)
        self.check_client_libraries()
        self.check_urls()
        self._refuse_quorum_consumption(options.get("queues") or [self.conf.task_default_queue])
        view = WorkerView(self.celery, hostname)
        signals.celeryd_init.send(
            sender=hostname, instance=view, conf=self.celery.conf, options=dict(options)
        )
        self._apply_changed_settings()
        if self.result_backend_url:
            autoscale = options.get("autoscale")
            greenlets = autoscale[0] if autoscale else options.get("concurrency")
            fit_redis_pool(self.backend.backend, greenlets or self.conf.worker_concurrency)
        runner = CeleryTaskRunner(self.celery, hostname, self.backend)
        # the garbage first: worker_shutdown receivers may close the backend
        kind: list[Middleware] = [CollectTraceGarbage(), CelerySignals(self.celery, view)]
        if options.get("beat"):  # -B: Celery's own beat, not greenworker's
            from .beat import EmbeddedBeat

            options["beat_opener"] = EmbeddedBeat(
                self.celery,
                scheduler=self.conf.beat_scheduler,
                schedule_path=self.conf.beat_schedule_filename,
                max_interval=None,
            )
        worker = Worker(self, task_runner=runner, app_middleware=kind, **options)
        view.worker = worker
        signals.worker_init.send(sender=view)
        return worker

    def _read_settings(self) -> Settings:
        settings = worker_settings(self.celery)
        settings.update_from_env()  # GREENWORKER_<NAME> variables apply here too
        return settings

    def _apply_changed_settings(self) -> None:
        """Settings a ``celeryd_init`` receiver changed in the Celery app's conf (read as
        at load, environment included, so only what the receiver changed differs)."""
        fresh = self._read_settings()
        before = self._as_loaded
        for name, value in vars(fresh).items():
            if value != getattr(before, name) and getattr(self.conf, name) == getattr(before, name):
                setattr(self.conf, name, value)
        self._as_loaded = fresh
        self.refresh_tasks()


def _task_options(app: App, task: CeleryTask, celery_app: Celery) -> Task:
    """greenworker's view of a Celery task: the options its worker side reads.  A value a
    task has only because Celery copied its app's default into it is left unset (None),
    so the worker's setting decides (greenworker's own default where the user set none)."""
    conf = celery_app.conf
    options: dict[str, Any] = {
        # Celery's tracer stores STARTED itself
        "track_started": False,
        "soft_time_limit": task.soft_time_limit,
        "time_limit": task.time_limit,
        "rate_limit": str(task.rate_limit) if task.rate_limit else None,
    }
    for option, setting in (
        ("acks_late", "task_acks_late"),
        ("acks_on_failure_or_timeout", "task_acks_on_failure_or_timeout"),
        ("ignore_result", "task_ignore_result"),
    ):
        value = getattr(task, option, None)
        inherited = value == conf.get(setting) and not _own_option(task, option)
        options[option] = None if inherited or value is None else bool(value)
    return Task(app, task.run, task.name, **options)


def _own_option(task: CeleryTask, option: str) -> bool:
    """Whether ``option`` was given to the task itself (``@app.task(acks_late=...)`` or a
    ``base=`` class attribute), not copied from the app's configuration."""
    for cls in type(task).__mro__[1:]:
        if option in vars(cls) and vars(cls)[option] is not None:
            return True
    return False
