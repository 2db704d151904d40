"""The application: settings, the task registry and the client side (sending, results)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import urlsplit

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer

from ..backends import backend_from_url, check_backend_url
from ..backends.base import ResultBackend, StoreRetry
from ..backends.lmdb import LMDBBackend
from ..config import (
    POLLING_WAKE,
    QUEUE_TYPES,
    REDIS_LAYOUT_OPTIONS,
    ConfigError,
    Settings,
    check_priority,
    import_object,
    redis_tls_options,
)
from ..exceptions import ImproperlyConfigured
from ..protocol import build_task_message, utcnow
from ..signals import after_task_publish, before_task_publish, worker_init
from . import delayed_delivery
from . import shared as shared_module
from .result import AsyncResult
from .routes import Destination, Router, resolve
from .task import Task, check_delivery_mode, check_serializer

if TYPE_CHECKING:
    from ..beat import PeriodicEntry
    from ..transport.redis_publisher import NativeRedisPublisher
    from ..worker.hooks import Middleware
    from ..worker.worker import Worker

EMBEDDED_BROKER = "lmdb://localhost/"

#: URL schemes whose broker (kombu's transport) or result backend needs redis-py.
REDIS_BROKER_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
REDIS_BACKEND_SCHEMES = frozenset({"redis", "rediss", "unix"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

#: How the producer retries a publish that fails on the connection (kombu's retry_policy).
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5}


log = logging.getLogger("greenworker.app")


def masked_url(url: str) -> str:
    """``url`` as written with its password masked (``**``), even when it does not parse:
    what stands between ``user:`` and the last ``@`` of the authority."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1**@", url)


def check_url_syntax(url: str) -> None:
    """Raise ValueError for a URL whose host or port is malformed (each URL of a
    ``;``-separated failover list)."""
    for each in url.split(";"):
        urlsplit(each.strip()).port  # noqa: B018  (ValueError: not a number, out of range)


class SendQueue(Queue):
    """A queue as a message's destination declares it.  kombu's declaration cache
    keys a queue by its name alone, so a second binding of the same queue (another
    exchange or routing key) would never be declared: this one is keyed by its
    binding."""

    def __hash__(self) -> int:
        return hash(("Q", self.name, self.exchange.name, self.routing_key))

    # Queue's own equality compares the binding too; only the hash changes
    __eq__ = Queue.__eq__


class App:
    """A greenworker application: ``app = App("proj", broker=..., backend=...)``.

    With no broker configured anywhere, the app uses the embedded default:
    kombu's filesystem transport and an LMDB result store in ``data_dir``.

    A new app becomes the current one (``set_as_current=False`` leaves it not), the
    app :func:`~greenworker.shared_task` tasks are sent through; every app gets the
    shared tasks.
    """

    def __init__(
        self,
        main: str = "__main__",
        broker: str | None = None,
        backend: str | None = None,
        *,
        config: Mapping[str, Any] | object | str | None = None,
        data_dir: str | None = None,
        set_as_current: bool = True,
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
        #: (queue, exchange, routing key) declared through kombu by this client: the
        #: native path sends there
        self._native_queues: set[tuple[str, str, str]] = set()
        self._send_targets: dict[tuple[Any, ...], tuple[Exchange, str, Queue | None]] = {}
        self._router: Router | None = None
        #: (queue, exchange, routing key) bound to the delayed topology by this client,
        #: and the queues on direct exchanges already warned about
        self._delayed_bound: set[tuple[str, str, str]] = set()
        self._delayed_warned: set[str] = set()
        shared_module.add_app(self, set_as_current)

    def __repr__(self) -> str:
        return f"<greenworker.App {self.main}>"

    # ------------------------------------------------------------ settings

    def config_from_object(
        self,
        source: Mapping[str, Any] | object | str,
        *,
        silent: bool = False,
        force: bool = False,
        namespace: str | None = None,
    ) -> None:
        """Load settings from a module, an import path (``"proj.settings"``,
        ``"django.conf:settings"``), an object or a dict, as Celery does.

        With ``namespace="CELERY"`` only the names starting ``CELERY_`` are read,
        without it (``CELERY_BROKER_URL`` is ``broker_url``).  ``silent=True``: a
        path that cannot be imported is ignored.  ``force`` is accepted for
        Celery's sake: the settings are always read at once.  The environment
        (``GREENWORKER_<NAME>``, ``CELERY_BROKER_URL``...) is applied again after,
        so it still wins.
        """
        del force  # Celery reads lazily unless forced; greenworker always reads now
        if isinstance(source, str) and silent:
            try:
                import_object(source, "config module")
            except ConfigError:
                return
        self.conf.update(source, namespace=namespace)
        self.conf.update_from_env()
        self._reset_clients()

    def set_current(self) -> None:
        """Make this the app :func:`~greenworker.shared_task` tasks are sent through."""
        shared_module.set_current(self)

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: the LMDB broker and result store in ``data_dir``."""
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

    #: The name part of a worker's default node name, and of ``-n HOST`` (no ``@``).
    node_name_default = "greenworker"

    @property
    def hostname(self) -> str:
        return self.conf.worker_hostname or f"{self.node_name_default}@{socket.gethostname()}"

    def transport_options(self) -> dict[str, Any]:
        options = dict(self.conf.broker_transport_options)
        if self.embedded:
            options.setdefault("data_dir", self.data_dir)
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
                (
                    "broker",
                    self._broker_url_as_written(),  # parses nothing: check_urls does
                    REDIS_BROKER_SCHEMES,
                    ("redis", "packaging"),
                ),
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

    def check_urls(self, *, backend: bool = True) -> None:
        """Raise :class:`ConfigError` naming the setting and its URL (password masked)
        when ``broker_url``, and with ``backend`` the ``result_backend``, cannot be used:
        a scheme no transport or backend has, or a malformed URL (host, port).  Connects
        to nothing.  The client commands need only the broker; a worker needs both."""
        checks = [("broker_url", self._broker_url_as_written, self._check_broker_url)]
        if backend:
            checks.append(("result_backend", self._backend_url_as_written, self._check_backend_url))
        for setting, written, check in checks:
            try:
                check()
            except Exception as exc:  # parsing and resolving only: any failure is the URL's
                reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                raise ConfigError(f"bad {setting} {masked_url(written())!r}: {reason}") from None

    def _broker_url_as_written(self) -> str:
        return self.broker_url

    def _backend_url_as_written(self) -> str:
        return self.conf.result_backend or ""

    def _check_broker_url(self) -> None:
        """kombu parses the URL and finds its transport (KeyError: no such transport)."""
        if self.embedded:
            return
        url = self.broker_url
        if url.partition("://")[0].lower() == "lmdb":
            from ..transport import lmdb_transport  # kombu learns the lmdb:// name

            lmdb_transport.register()
        check_url_syntax(url)
        self._check_sentinel_options()
        # with the app's TLS options, as connection() makes it (else kombu warns of none)
        Connection(url, ssl=self.conf.broker_use_ssl or False).get_transport_cls()

    def _check_backend_url(self) -> None:
        url = self.result_backend_url
        if url:
            check_backend_url(url, self.conf.result_backend_transport_options)

    def _check_sentinel_options(self) -> None:
        if self.broker_url.startswith("sentinel://") and not self.transport_options().get(
            "master_name"
        ):
            raise ImproperlyConfigured(
                "a sentinel:// broker needs the transport option 'master_name' "
                "(broker_transport_options = {'master_name': ...})"
            )

    def connection(self) -> Connection:
        """A new (lazy) kombu connection to the broker."""
        self.check_client_libraries()
        self._check_sentinel_options()
        if self.embedded:
            from ..transport import lmdb_transport  # kombu learns the lmdb:// name

            lmdb_transport.register()
        return Connection(
            self.broker_url,
            ssl=self.conf.broker_use_ssl or False,
            transport_options=self.transport_options(),
            connect_timeout=self.conf.broker_connection_timeout,
        )

    # ------------------------------------------------------------ tasks

    @overload
    def task(self, fn: Callable[..., Any]) -> Task: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        bind: bool = False,
        base: type[Task] | None = None,
        shared: bool = False,
        **options: Any,
    ) -> Callable[[Callable[..., Any]], Task]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        bind: bool = False,
        base: type[Task] | None = None,
        shared: bool = False,
        **options: Any,
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True)``.

        ``base`` is the :class:`~greenworker.client.task.Task` subclass the task is an
        instance of (its class attributes are the defaults of its options);
        ``shared=True`` registers it on every other App too, as
        :func:`~greenworker.shared_task` does (Celery shares every task by default;
        greenworker only when asked).  Other keyword arguments are task options (see
        :class:`~greenworker.client.task.Task`); Celery's ``lazy`` is accepted and
        changes nothing (a task is registered at once).
        """
        options.pop("lazy", None)
        task_type = shared_module.task_class(base)

        def register(func: Callable[..., Any]) -> Task:
            definition = shared_module.TaskDefinition(func, name, bind, task_type, options)
            task = definition.create(self)
            if shared:
                shared_module.share(definition, besides=self)
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

    def queue(
        self,
        name: str | None = None,
        *,
        exchange: str | None = None,
        exchange_type: str | None = None,
        routing_key: str | None = None,
    ) -> Queue:
        """The kombu queue for ``name``, declared the way Celery declares it: bound to
        ``exchange`` (its own name by default) with ``routing_key`` (its name),
        ``x-queue-type: quorum`` when its type (``task_default_queue_type`` for the
        default queue, ``task_create_missing_queue_type`` for others) is quorum, and
        ``x-max-priority`` from ``task_queue_max_priority``."""
        return self._declaration(Queue, name, exchange, exchange_type, routing_key)

    def queue_type(self, name: str) -> str:
        """How queue ``name`` is declared: ``task_default_queue_type`` for the default
        queue, ``task_create_missing_queue_type`` for others (as Celery's missing queues)."""
        conf = self.conf
        if name == conf.task_default_queue:
            kind, setting = conf.task_default_queue_type, "task_default_queue_type"
        else:
            kind, setting = conf.task_create_missing_queue_type, "task_create_missing_queue_type"
        if kind not in QUEUE_TYPES:
            raise ConfigError(f"setting {setting} must be 'classic' or 'quorum', not {kind!r}")
        return kind

    def _declaration(
        self,
        kind_of_queue: type[Queue],
        name: str | None,
        exchange: str | None,
        exchange_type: str | None,
        routing_key: str | None,
    ) -> Queue:
        conf = self.conf
        qname = name or conf.task_default_queue
        arguments: dict[str, Any] = {}
        if self.queue_type(qname) == "quorum":
            arguments["x-queue-type"] = "quorum"
        if conf.task_queue_max_priority is not None:
            arguments["x-max-priority"] = conf.task_queue_max_priority
        return kind_of_queue(
            qname,
            Exchange(
                exchange or qname,
                type=exchange_type or conf.task_default_exchange_type,
                durable=True,
            ),
            routing_key=routing_key or qname,
            durable=True,
            queue_arguments=arguments or None,
        )

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
        """Send a task by name (it need not be registered here) and return its result handle.

        Where it goes follows Celery: ``queue``, ``exchange``, ``routing_key`` and
        ``priority`` given here win, then the options of the task (``task_type``, or
        the task registered under ``name``), then the ``task_routes`` setting, then
        ``task_default_queue`` (see :mod:`greenworker.client.routes`).
        """
        from .task import current_request

        parent = current_request.get()
        if parent is not None and parent_id is None and root_id is None:
            # sent from inside a task: a child of it (a retry or a canvas step says otherwise)
            parent_id, root_id = parent.id, parent.root_id
        task = task_type if task_type is not None else self.tasks.get(name)
        options = task.publish_options() if task is not None else {}
        for key, value in (
            ("queue", queue),
            ("exchange", exchange),
            ("routing_key", routing_key),
            ("priority", priority),
            ("serializer", serializer),
            ("delivery_mode", delivery_mode),
        ):
            if value is not None:
                options[key] = value
        router = self._routes()
        route = router.route(name, args or (), kwargs or {}, options, task) if router else None
        merged = {**route, **options} if route else options
        destination = resolve(
            merged,
            routed=route is not None,
            default_queue=self.conf.task_default_queue,
            default_exchange_type=self.conf.task_default_exchange_type,
        )
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
        message_priority = merged.get("priority", self.conf.task_default_priority)
        if message_priority is not None:
            properties["priority"] = check_priority(message_priority, f"task {name}: priority")
        exchange_, routing_key_, declared = self._send_target(destination)
        if declared is not None and (countdown or eta):
            delay = countdown if countdown is not None else _seconds_until(eta)
            delayed = self._delayed_target(declared, delay)
            if delayed is not None:
                exchange_, routing_key_, declared = delayed
        self.publish(
            body,
            headers,
            properties,
            declared,
            exchange=exchange_,
            routing_key=routing_key_,
            serializer=self._serializer(name, merged.get("serializer")),
            delivery_mode=(
                check_delivery_mode(merged["delivery_mode"], f"task {name}")
                if merged.get("delivery_mode") is not None
                else None
            ),
        )
        return AsyncResult(headers["id"], self)

    def _routes(self) -> Router | None:
        """The ``task_routes`` setting prepared, or None without routes (prepared again
        when the setting is replaced)."""
        setting = self.conf.task_routes
        if not setting:
            return None
        if self._router is None or self._router.setting is not setting:
            self._router = Router(setting)
        return self._router

    def _serializer(self, name: str, serializer: str | None) -> str | None:
        """``serializer`` if it may be sent: ``task_serializer``, or one the workers
        accept (``accept_content``), else :class:`ConfigError`; None for the default."""
        conf = self.conf
        if serializer is None or serializer == conf.task_serializer:
            return None
        check_serializer(serializer, f"task {name}")
        from kombu.serialization import registry

        accepted = set(conf.accept_content)
        if serializer not in accepted and registry.name_to_type[serializer] not in accepted:
            raise ConfigError(
                f"task {name}: serializer {serializer!r} is not in accept_content "
                f"{conf.accept_content!r}: workers would reject its messages "
                f"(add {serializer!r} to accept_content to send it)"
            )
        return serializer

    def _send_target(self, destination: Destination) -> tuple[Exchange, str, Queue | None]:
        """The exchange, routing key and queue to declare for ``destination``, kept per
        destination and the settings that shape a declaration (unbound: publish never
        binds them)."""
        conf = self.conf
        key = (
            destination,
            conf.task_default_queue,
            conf.task_default_queue_type,
            conf.task_create_missing_queue_type,
            conf.task_queue_max_priority,
        )
        target = self._send_targets.get(key)
        if target is None:
            if destination.queue is None:
                exchange = Exchange(
                    destination.exchange, type=destination.exchange_type, durable=True
                )
                target = (exchange, destination.routing_key, None)
            else:
                queue = self._declaration(
                    SendQueue,
                    destination.queue,
                    destination.exchange,
                    destination.exchange_type,
                    destination.routing_key,
                )
                target = (queue.exchange, destination.routing_key, queue)
            self._send_targets[key] = target
        return target

    def _delayed_target(self, queue: Queue, delay: float) -> tuple[Exchange, str, None] | None:
        """Where a message for ``queue`` due in ``delay`` seconds goes when RabbitMQ
        delays it, as Celery's producer sends it (see
        :mod:`~greenworker.transport.delayed_delivery`): the delayed topology's entry
        exchange, for a quorum queue on a non-direct exchange, delayed a second or more;
        else None (it goes to the queue, and the worker holds it)."""
        if not delayed_delivery.wanted(self, [queue.name]):
            return None
        if queue.exchange.type == "direct":
            if queue.name not in self._delayed_warned:
                self._delayed_warned.add(queue.name)
                log.warning(
                    "queue %s is bound to the direct exchange %s: native delayed delivery "
                    "needs a topic or fanout exchange (task_default_exchange_type), so its "
                    "ETA and countdown tasks are held by the worker until due",
                    queue.name,
                    queue.exchange.name,
                )
            return None
        routing_key = delayed_delivery.delayed_routing_key(delay, queue.routing_key)
        if routing_key is None:
            return None
        bound = (queue.name, queue.exchange.name, queue.routing_key)
        if bound not in self._delayed_bound:
            # the worker binds its queues too; binding here as well means a message
            # sent before any worker ran is kept, not dropped as unroutable
            delayed_delivery.declare(self, [queue])
            self._delayed_bound.add(bound)
        return delayed_delivery.entry_exchange(), routing_key, None

    def publish(
        self,
        body: Any,
        headers: dict[str, Any],
        properties: dict[str, Any],
        queue: Queue | None,
        *,
        exchange: Exchange | None = None,
        routing_key: str | None = None,
        serializer: str | None = None,
        delivery_mode: int | None = None,
    ) -> None:
        """Publish one task message on the app's shared producer connection: to
        ``queue``'s exchange with its routing key, declaring it, or to ``exchange``
        with ``routing_key`` (declaring the exchange) when there is no queue.  On
        Redis, after a queue's first message, in one round trip through the native
        path."""
        if queue is not None:
            exchange = exchange or queue.exchange
            routing_key = queue.routing_key if routing_key is None else routing_key
        if exchange is None:
            raise ValueError("publish needs a queue or an exchange")
        routing_key = routing_key or ""
        declare = [queue if queue is not None else exchange]
        if before_task_publish.receivers:  # Celery's; a receiver may add headers
            before_task_publish.send(
                sender=headers.get("task"),
                body=body,
                exchange=exchange.name,
                routing_key=routing_key,
                headers=headers,
                properties=properties,
                declare=declare,
                retry_policy=dict(PUBLISH_RETRY_POLICY),
            )
        native_key = (queue.name, exchange.name, routing_key) if queue is not None else None
        if (
            native_key in self._native_queues
            and queue is not None
            and exchange.type == "direct"
            and exchange.name
            and "priority" not in properties
            and serializer is None
            and delivery_mode is None
        ):
            native = self._native()
            if native.send(body, headers, properties, exchange.name, routing_key, queue.name):
                self._published(body, headers, exchange, routing_key)
                return
        if self._producer_lock is None:
            self._producer_lock = threading.Lock()
        with self._producer_lock:
            if self._producer is None:
                self._producer_conn = self.connection()
                self._producer = Producer(self._producer_conn)
            self._producer.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                serializer=serializer or self.conf.task_serializer,
                headers=headers,
                declare=declare,
                delivery_mode=delivery_mode or self.conf.task_default_delivery_mode,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
                **properties,
            )
        if self.native_redis and native_key is not None:
            self._native_queues.add(native_key)
        self._published(body, headers, exchange, routing_key)

    @staticmethod
    def _published(
        body: Any, headers: dict[str, Any], exchange: Exchange, routing_key: str
    ) -> None:
        if after_task_publish.receivers:
            after_task_publish.send(
                sender=headers.get("task"),
                body=body,
                exchange=exchange.name,
                routing_key=routing_key,
                headers=headers,
            )

    @property
    def native_redis(self) -> bool:
        """Redis, with greenworker's native consumer and publisher on (the default)."""
        if not self.conf.broker_native_redis:
            return False
        if not self.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
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
                self.result_backend_url,
                expires=self.conf.result_expires,
                redis_tls=redis_tls_options(self.conf.redis_backend_use_ssl),
                transport_options=self.conf.result_backend_transport_options,
                retry=StoreRetry(
                    always=self.conf.result_backend_always_retry,
                    max_retries=self.conf.result_backend_max_retries,
                    base_sleep=self.conf.result_backend_base_sleep_between_retries_ms / 1000,
                    max_sleep=self.conf.result_backend_max_sleep_between_retries_ms / 1000,
                ),
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
        self.check_urls()
        self._refuse_quorum_consumption(options.get("queues") or [self.conf.task_default_queue])
        self.set_current()  # the worker's tasks send shared tasks through this app
        worker = Worker(self, **options)
        worker_init.send(sender=worker)  # Celery's, sent when its WorkController is built
        return worker

    def _refuse_quorum_consumption(self, queues: Sequence[str]) -> None:
        """With ``worker_detect_quorum_queues`` off, the worker's consumer sets a global
        QoS on RabbitMQ, which quorum queues refuse (NOT_IMPLEMENTED on basic.consume):
        say so now rather than reconnect forever."""
        if self.conf.worker_detect_quorum_queues:
            return
        if self.broker_url.partition("://")[0].lower() not in AMQP_SCHEMES:
            return
        quorum = [name for name in queues if self.queue_type(name) == "quorum"]
        if quorum:
            raise ImproperlyConfigured(
                f"worker_detect_quorum_queues is False, so the worker sets a global QoS, "
                f"which quorum queues ({', '.join(quorum)}) refuse; set it to True"
            )

    def _reset_clients(self) -> None:
        self.close()
        self._send_targets.clear()
        self._router = None

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


def _seconds_until(eta: datetime | None) -> float:
    """Seconds from now to ``eta`` (naive: UTC, as the message says it)."""
    if eta is None:
        return 0.0
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return (eta - utcnow()).total_seconds()
