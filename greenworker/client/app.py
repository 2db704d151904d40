"""The application: settings, the task registry and the client side (sending, results)."""

from __future__ import annotations

import importlib
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, overload

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer

from ..backends import backend_from_url
from ..backends.base import ResultBackend
from ..backends.lmdb import LMDBBackend
from ..config import POLLING_WAKE, REDIS_LAYOUT_OPTIONS, Settings
from ..exceptions import ImproperlyConfigured
from ..protocol import build_task_message
from .result import AsyncResult
from .task import Task

if TYPE_CHECKING:
    from ..beat import PeriodicEntry
    from ..transport.redis_publisher import NativeRedisPublisher
    from ..worker.hooks import Middleware
    from ..worker.worker import Worker

EMBEDDED_BROKER = "filesystem://localhost/"

#: URL schemes whose broker (kombu's transport) or result backend needs redis-py.
REDIS_BROKER_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
REDIS_BACKEND_SCHEMES = frozenset({"redis", "rediss", "unix"})


class App:
    """A greenworker application: ``app = App("proj", broker=..., backend=...)``.

    With no broker configured anywhere, the app uses the embedded default:
    kombu's filesystem transport and an LMDB result store in ``data_dir``.
    """

    def __init__(
        self,
        main: str = "__main__",
        broker: str | None = None,
        backend: str | None = None,
        *,
        config: Mapping[str, Any] | object | str | None = None,
        data_dir: str | None = None,
    ) -> None:
        self.main = main
        self.conf = Settings()
        self.conf.update(config)
        if broker is not None:
            self.conf.broker_url = broker
        if backend is not None:
            self.conf.result_backend = backend
        if data_dir is not None:
            self.conf.data_dir = data_dir
        self.conf.update_from_env()
        self.tasks: dict[str, Task] = {}
        #: Middleware every worker of this app uses (see :mod:`greenworker.worker.hooks`).
        self.middleware: list[Middleware] = []
        #: Periodic tasks added in code (see :meth:`add_periodic_task`); beat also reads
        #: the ``beat_schedule`` setting.
        self.periodic_tasks: dict[str, PeriodicEntry] = {}
        self._backend: ResultBackend | None = None
        self._producer_lock: threading.Lock | None = None
        self._producer_conn: Connection | None = None
        self._producer: Producer | None = None
        self._native_publisher: NativeRedisPublisher | None = None
        #: queues declared through kombu by this client: the native path sends to them
        self._native_queues: set[str] = set()
        self._send_queues: dict[tuple[str, str], Queue] = {}

    def __repr__(self) -> str:
        return f"<greenworker.App {self.main}>"

    # ------------------------------------------------------------ settings

    def config_from_object(self, source: Mapping[str, Any] | object | str) -> None:
        """Load settings from a module, a module path, an object or a dict."""
        self.conf.update(source)
        self._reset_clients()

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: filesystem transport + LMDB in ``data_dir``."""
        return not self.conf.broker_url

    @property
    def data_dir(self) -> str:
        return os.path.abspath(self.conf.data_dir)

    @property
    def broker_url(self) -> str:
        return self.conf.broker_url or EMBEDDED_BROKER

    @property
    def result_backend_url(self) -> str | None:
        if self.conf.result_backend:
            return self.conf.result_backend
        if self.embedded:
            return "lmdb://" + os.path.join(self.data_dir, "results")
        return None

    @property
    def state_db_path(self) -> str | None:
        """Where the worker keeps its state: ``worker_state_db``, else ``data_dir/state``
        on the embedded default, else nowhere."""
        if self.conf.worker_state_db:
            return os.path.abspath(self.conf.worker_state_db)
        return os.path.join(self.data_dir, "state") if self.embedded else None

    @property
    def hostname(self) -> str:
        return self.conf.worker_hostname or f"greenworker@{socket.gethostname()}"

    def transport_options(self) -> dict[str, Any]:
        options = dict(self.conf.broker_transport_options)
        if self.embedded:
            queue_dir = os.path.join(self.data_dir, "queues")
            for sub in ("messages", "control"):
                os.makedirs(os.path.join(queue_dir, sub), exist_ok=True)
            options.setdefault("data_folder_in", os.path.join(queue_dir, "messages"))
            options.setdefault("data_folder_out", os.path.join(queue_dir, "messages"))
            options.setdefault("control_folder", os.path.join(queue_dir, "control"))
            options.setdefault("store_processed", False)
            options.setdefault("polling_interval", self.conf.filesystem_polling_interval)
        elif self.broker_url.startswith("memory://"):
            options.setdefault("polling_interval", 0.005)  # kombu's default is 1 s
        elif self.broker_url.startswith(("redis://", "rediss://")):
            # kombu turns this into the BRPOP timeout (1 s by default), which bounds
            # how long closing the connection waits for the outstanding BRPOP.
            options.setdefault("polling_interval", POLLING_WAKE)
        return options

    def check_client_libraries(self) -> None:
        """Raise :class:`ImproperlyConfigured`, naming the extra to install, when the
        broker or the result backend needs a package of the redis extra that is missing
        (redis; and packaging, which kombu's Redis transport imports)."""
        needs = {
            what: modules
            for what, url, schemes, modules in (
                ("broker", self.broker_url, REDIS_BROKER_SCHEMES, ("redis", "packaging")),
                (
                    "result backend",
                    self.result_backend_url or "",
                    REDIS_BACKEND_SCHEMES,
                    ("redis",),
                ),
            )
            if url.partition("://")[0].lower() in schemes
        }
        for module in dict.fromkeys(m for modules in needs.values() for m in modules):
            try:
                importlib.import_module(module)
            except ImportError:
                users = [what for what, modules in needs.items() if module in modules]
                raise ImproperlyConfigured(
                    f"the Redis {' and '.join(users)} {'needs' if len(users) == 1 else 'need'} "
                    f"the {module} package, which is not installed: "
                    "pip install 'greenworker[redis]'"
                ) from None

    def connection(self) -> Connection:
        """A new (lazy) kombu connection to the broker."""
        self.check_client_libraries()
        return Connection(
            self.broker_url,
            transport_options=self.transport_options(),
            connect_timeout=self.conf.broker_connection_timeout,
        )

    # ------------------------------------------------------------ tasks

    @overload
    def task(self, fn: Callable[..., Any]) -> Task: ...

    @overload
    def task(
        self, *, name: str | None = None, bind: bool = False, **options: Any
    ) -> Callable[[Callable[..., Any]], Task]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        bind: bool = False,
        **options: Any,
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True)``.

        Other keyword arguments are task options (see :class:`~greenworker.client.task.Task`).
        """

        def register(func: Callable[..., Any]) -> Task:
            task_name = name or self._default_name(func)
            task = Task(self, func, task_name, bind=bind, **options)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def add_periodic_task(
        self,
        schedule: Any,
        task: Task | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        **options: Any,
    ) -> PeriodicEntry:
        """Run ``task`` on ``schedule`` (seconds, timedelta, :class:`~greenworker.beat.crontab`
        or a crontab string) whenever beat runs for this app.  ``options`` go to
        :meth:`send_task` (``queue``, ``expires``, ...)."""
        from ..beat import PeriodicEntry

        task_name = task if isinstance(task, str) else task.name
        entry_name = name or f"{task_name}{tuple(args)!r}"
        entry = PeriodicEntry.from_setting(
            entry_name,
            {
                "task": task_name,
                "schedule": schedule,
                "args": list(args),
                "kwargs": dict(kwargs or {}),
                "options": options,
            },
        )
        self.periodic_tasks[entry_name] = entry
        return entry

    def _default_name(self, fn: Callable[..., Any]) -> str:
        module = fn.__module__
        if module == "__main__":
            module = self.main
        return f"{module}.{fn.__qualname__}"

    # ------------------------------------------------------------ sending

    def queue(self, name: str | None = None) -> Queue:
        """The kombu queue for ``name``, declared the way Celery declares it."""
        qname = name or self.conf.task_default_queue
        exchange = Exchange(qname, type=self.conf.task_default_exchange_type, durable=True)
        return Queue(qname, exchange, routing_key=qname, durable=True)

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
    ) -> AsyncResult:
        """Send a task by name (it need not be registered here) and return its result handle."""
        from .task import current_request

        parent = current_request.get()
        if parent is not None and parent_id is None and root_id is None:
            # sent from inside a task: a child of it (a retry or a canvas step says otherwise)
            parent_id, root_id = parent.id, parent.root_id
        body, headers, properties = build_task_message(
            name,
            args or (),
            kwargs,
            task_id=task_id,
            countdown=countdown,
            eta=eta,
            expires=expires,
            retries=retries,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            parent_id=parent_id,
            root_id=root_id,
            group=group,
            group_index=group_index,
            origin=f"{os.getpid()}@{socket.gethostname()}",
            ignore_result=ignore_result,
            embed=embed,
        )
        self.publish(body, headers, properties, self._send_queue(queue))
        return AsyncResult(headers["id"], self)

    def _send_queue(self, name: str | None) -> Queue:
        """:meth:`queue`, kept per name for sending (unbound: publish never binds it)."""
        key = (name or self.conf.task_default_queue, self.conf.task_default_exchange_type)
        queue = self._send_queues.get(key)
        if queue is None:
            queue = self._send_queues[key] = self.queue(key[0])
        return queue

    def publish(
        self,
        body: Any,
        headers: dict[str, Any],
        properties: dict[str, Any],
        queue: Queue,
    ) -> None:
        """Publish one task message on the app's shared producer connection (on Redis,
        after a queue's first message, in one round trip through the native path)."""
        exchange = queue.exchange
        if (
            queue.name in self._native_queues
            and exchange.type == "direct"
            and exchange.name
            and "priority" not in properties
        ):
            native = self._native()
            if native.send(body, headers, properties, exchange.name, queue.routing_key, queue.name):
                return
        if self._producer_lock is None:
            self._producer_lock = threading.Lock()
        with self._producer_lock:
            if self._producer is None:
                self._producer_conn = self.connection()
                self._producer = Producer(self._producer_conn)
            self._producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                serializer=self.conf.task_serializer,
                headers=headers,
                declare=[queue],
                delivery_mode=self.conf.task_default_delivery_mode,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
                **properties,
            )
        if self.native_redis:
            self._native_queues.add(queue.name)

    @property
    def native_redis(self) -> bool:
        """Redis, with greenworker's native consumer and publisher on (the default)."""
        if not self.conf.broker_native_redis:
            return False
        if not self.broker_url.startswith(("redis://", "rediss://")):
            return False
        options = self.conf.broker_transport_options
        return not any(name in options for name in REDIS_LAYOUT_OPTIONS)

    def _native(self) -> NativeRedisPublisher:
        if self._native_publisher is None:
            from ..transport.redis_publisher import NativeRedisPublisher  # needs redis-py

            self._native_publisher = NativeRedisPublisher(self)
        return self._native_publisher

    # ------------------------------------------------------------ results

    @property
    def backend(self) -> ResultBackend:
        if self._backend is None:
            self._backend = backend_from_url(
                self.result_backend_url, expires=self.conf.result_expires
            )
        return self._backend

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, self)

    def purge_expired_results(self) -> int:
        backend = self.backend
        return backend.purge_expired() if isinstance(backend, LMDBBackend) else 0

    # ------------------------------------------------------------ worker

    def Worker(self, **options: Any) -> Worker:
        """Build a worker for this app; see :class:`greenworker.worker.worker.Worker`."""
        from ..worker.worker import Worker

        self.check_client_libraries()
        return Worker(self, **options)

    def _reset_clients(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the client connections (the producer and the result backend)."""
        if self._producer_conn is not None:
            self._producer_conn.release()
        self._producer_conn = None
        self._producer = None
        if self._native_publisher is not None:
            self._native_publisher.close()
        self._native_publisher = None
        self._native_queues.clear()
        if self._backend is not None:
            self._backend.close()
        self._backend = None
