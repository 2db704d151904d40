"""Tasks: the functions a worker runs, and the context of the one running now."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..config import check_priority, parse_rate
from ..exceptions import MaxRetriesExceededError, Retry
from . import delayed_delivery

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature
    from .result import AsyncResult


@dataclass
class Context:
    """What a running task knows about its own message (``self.request`` in a bound task)."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    origin: str | None = None
    hostname: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=dict)
    #: ``(hard, soft)`` from the message, in Celery's order (``self.request.timelimit``).
    timelimit: tuple[float | None, float | None] = (None, None)
    called_directly: bool = True


#: The context of the task running in the current greenlet (each greenlet has its own).
current_request: ContextVar[Context | None] = ContextVar(
    "greenworker_current_request", default=None
)

#: The app of the task whose body runs in the current greenlet: a shared task sent
#: from there goes through it (see :mod:`greenworker.client.shared`).
current_task_app: ContextVar[App | None] = ContextVar("greenworker_current_task_app", default=None)

#: Celery task options greenworker does not honour (yet), with what to do instead.
UNSUPPORTED_OPTIONS = {
    "backend": "a task's own result backend is not supported: every task uses the "
    "app's result_backend",
    "compression": "message compression is not supported",
    "pydantic": "pydantic argument conversion is not supported",
    "pydantic_strict": "pydantic argument conversion is not supported",
    "pydantic_context": "pydantic argument conversion is not supported",
    "pydantic_dump_kwargs": "pydantic argument conversion is not supported",
    "acks_on_failure": "use acks_on_failure_or_timeout",
    "acks_on_timeout": "use acks_on_failure_or_timeout",
    "store_errors_even_if_ignored": "not a per-task option in greenworker: set the "
    "task_store_errors_even_if_ignored setting",
    "filter": "not supported: apply the function to the task yourself",
}

#: Options accepted only with a value greenworker's behaviour matches, and why.
ONLY_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "send_events": (
        lambda value: value is None or value is True,
        "task events are sent for every task while they are on",
    ),
    "throws": (
        lambda value: not value,
        "expected exceptions are logged as failures like any other",
    ),
    "reject_on_worker_lost": (
        lambda value: value is None or value is True,
        "the worker is the process: a message it held when it died is never acked, "
        "and the broker delivers it again (with acks_late)",
    ),
    "retry_on_worker_lost": (
        lambda value: not value,
        "a message held by a worker that died is delivered again by the broker, "
        "not sent as a retry",
    ),
}

#: Message delivery modes: AMQP's numbers and Celery's names for them.
DELIVERY_MODES = {1: 1, 2: 2, "transient": 1, "persistent": 2}


class Task:
    """A registered task.  Call it to run it here; ``delay``/``apply_async`` to send it.

    Options (keyword arguments of ``@app.task``) and their defaults are the
    class attributes below; they follow Celery's task options.
    """

    queue: str | None = None
    ignore_result: bool | None = None
    acks_late: bool | None = None
    acks_on_failure_or_timeout: bool | None = None
    track_started: bool | None = None
    max_retries: int | None = 3
    default_retry_delay: float = 180.0
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: Mapping[str, Any] = MappingProxyType({})  # read-only: shared by every task
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    soft_time_limit: float | None = None
    time_limit: float | None = None
    rate_limit: str | None = None
    expires: float | None = None
    #: Routing and publishing, as in Celery; the call's own options win, then these,
    #: then ``task_routes`` (see :mod:`greenworker.client.routes`).
    exchange: str | None = None
    routing_key: str | None = None
    priority: int | None = None
    #: A kombu serializer name; other than ``task_serializer``, it must be in
    #: ``accept_content`` (checked when a message is sent).
    serializer: str | None = None
    delivery_mode: int | str | None = None
    #: Check the arguments against the function's signature in ``apply_async``/``delay``.
    typing: bool = True
    #: Celery's: keep the ids of subtasks in ``request.children``.  greenworker keeps
    #: no such list, so either value is accepted.
    trail: bool = True
    send_events: bool | None = True
    throws: tuple[type[BaseException], ...] | None = ()
    reject_on_worker_lost: bool | None = None
    retry_on_worker_lost: bool | None = None

    OPTIONS = frozenset(
        {
            "queue",
            "exchange",
            "routing_key",
            "priority",
            "serializer",
            "delivery_mode",
            "typing",
            "trail",
            "send_events",
            "throws",
            "reject_on_worker_lost",
            "retry_on_worker_lost",
            "ignore_result",
            "acks_late",
            "acks_on_failure_or_timeout",
            "track_started",
            "max_retries",
            "default_retry_delay",
            "autoretry_for",
            "dont_autoretry_for",
            "retry_kwargs",
            "retry_backoff",
            "retry_backoff_max",
            "retry_jitter",
            "soft_time_limit",
            "time_limit",
            "rate_limit",
            "expires",
        }
    )

    def __init__(
        self, app: App, fn: Callable[..., Any], name: str, *, bind: bool = False, **options: Any
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.bind = bind
        for key, value in self.checked_options(name, options).items():
            setattr(self, key, value)
        self._signature: inspect.Signature | None = None
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @classmethod
    def checked_options(cls, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` checked at definition time (not at the first message) together
        with the class's defaults, some normalised: raises TypeError (or
        :class:`~greenworker.config.ConfigError` for a bad priority) naming the option."""
        for key in sorted(options):
            if key in UNSUPPORTED_OPTIONS:
                raise TypeError(f"task {name}: option {key}: {UNSUPPORTED_OPTIONS[key]}")
        unknown = sorted(set(options) - cls.OPTIONS)
        if unknown:
            raise TypeError(f"unknown task option(s) for {name}: {', '.join(unknown)}")
        checked = dict(options)

        def value(key: str) -> Any:
            return checked[key] if key in checked else getattr(cls, key)

        for key, (supported, why) in ONLY_VALUES.items():
            if not supported(value(key)):
                raise TypeError(
                    f"task {name}: {key}={value(key)!r} is not supported by greenworker: {why}"
                )
        for key in ("autoretry_for", "dont_autoretry_for"):
            checked[key] = tuple(value(key))
        if value("rate_limit") is not None:
            parse_rate(value("rate_limit"))
        if value("priority") is not None:
            check_priority(value("priority"), f"task {name}: priority")
        if value("serializer") is not None:
            check_serializer(value("serializer"), f"task {name}")
        if value("delivery_mode") is not None:
            checked["delivery_mode"] = check_delivery_mode(value("delivery_mode"), f"task {name}")
        for key in ("queue", "exchange", "routing_key"):
            if value(key) is not None and not isinstance(value(key), str):
                raise TypeError(f"task {name}: {key} must be a name (str), not {value(key)!r}")
        return checked

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body here (a worker calls this to run it).  A base class may
        override it and call ``super().__call__`` or :meth:`run`."""
        token = current_task_app.set(self.app)
        try:
            return self.run(*args, **kwargs)
        finally:
            current_task_app.reset(token)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task body: the decorated function (given this task first when bound)."""
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise TypeError, as calling the function would, if it cannot take these
        arguments (Celery's ``typing``)."""
        if self._signature is None:
            try:
                signature = inspect.signature(self.fn)
            except (TypeError, ValueError):  # not introspectable: nothing to check
                self.typing = False
                return
            if self.bind:
                signature = signature.replace(parameters=list(signature.parameters.values())[1:])
            self._signature = signature
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name}: {exc}") from None

    @property
    def request(self) -> Context:
        """The running task's context, or an empty one when called directly."""
        return current_request.get() or Context()

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task with these arguments; shortcut for :meth:`apply_async`."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task to a worker and return its :class:`AsyncResult`.

        Takes :meth:`App.send_task <greenworker.client.app.App.send_task>`'s options
        (``priority``, ``exchange``, ``routing_key``, ``serializer``...); with
        ``typing`` on, arguments the function cannot take raise TypeError here.
        """
        if self.typing:
            self.check_arguments(args or (), kwargs or {})
        return self.app.send_task(
            self.name,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires if expires is not None else self.expires,
            queue=queue,
            task_id=task_id,
            ignore_result=bool(self.ignore_result),
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            task_type=self,
            **options,
        )

    def publish_options(self) -> dict[str, Any]:
        """The task's own routing and publishing options that are set."""
        return {key: value for key in PUBLISH_OPTIONS if (value := getattr(self, key)) is not None}

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task with these arguments (for chains, callbacks, groups)."""
        from .canvas import Signature

        return Signature.of(self.name, args, kwargs, app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a parent's result is not prepended to its arguments."""
        sig = self.s(*args, **kwargs)
        sig["immutable"] = True
        return sig

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        max_retries: int | None = None,
        throw: bool = True,
    ) -> Retry:
        """Send this task again (same id, ``retries + 1``) and end this run.

        The new message is published by the worker right after it stored the
        RETRY state (so the next run's result is never overwritten).

        Raises :class:`~greenworker.exceptions.Retry` (let it propagate), or
        re-raises ``exc`` / :class:`~greenworker.exceptions.MaxRetriesExceededError`
        once ``max_retries`` is reached (``None`` retries forever).
        """
        request = self.request
        if request.called_directly:
            if exc is not None:
                raise exc
            raise RuntimeError(f"task {self.name} was called directly: nothing to retry")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        if countdown is None and eta is None:
            countdown = self.default_retry_delay

        # back where it came from, as Celery's retry: a message published to an exchange
        # of its own with another routing key goes there again, others to the queue its
        # routing key names
        info = request.delivery_info
        exchange, routing_key = info.get("exchange"), info.get("routing_key")
        if routing_key and delayed_delivery.is_topology_exchange(exchange):
            # delayed by RabbitMQ: the key is the delay, then the one it was sent with
            exchange, routing_key = None, delayed_delivery.original_routing_key(routing_key)
        if exchange and routing_key and exchange != routing_key:
            where: dict[str, Any] = {"exchange": exchange, "routing_key": routing_key}
        else:
            where = {"queue": routing_key or None}

        def send() -> object:
            return self.app.send_task(
                self.name,
                request.args if args is None else args,
                request.kwargs if kwargs is None else kwargs,
                task_id=request.id,
                retries=request.retries + 1,
                countdown=countdown,
                eta=eta,
                task_type=self,
                **where,
                # as Celery's retry: a task with no parent becomes its retry's parent
                parent_id=request.parent_id or request.id,
                root_id=request.root_id,
                group=request.group,
                group_index=request.group_index,
                embed=request.embed,
                time_limit=request.timelimit[0],
                soft_time_limit=request.timelimit[1],
                expires=request.expires,
                ignore_result=bool(request.headers.get("ignore_result")),
            )

        retry = Retry(exc=exc, when=eta.isoformat() if eta else countdown, send=send)
        if throw:
            raise retry
        send()  # the task goes on, so nothing is stored after this: send now
        retry.send = None
        return retry

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return self.app.AsyncResult(task_id)


#: The task options that go into publishing (Celery's ``extract_exec_options`` ones
#: greenworker uses there).
PUBLISH_OPTIONS = ("queue", "exchange", "routing_key", "priority", "serializer", "delivery_mode")


def check_serializer(serializer: Any, what: str) -> str:
    """A serializer kombu knows (``json``, ``pickle``, ``msgpack``, ``yaml``...)."""
    from kombu.serialization import registry

    if not isinstance(serializer, str) or serializer not in registry.name_to_type:
        known = ", ".join(sorted(registry.name_to_type))
        raise TypeError(
            f"{what}: serializer {serializer!r} is not a kombu serializer (known: {known})"
        )
    return serializer


def check_delivery_mode(value: Any, what: str) -> int:
    """AMQP's delivery mode from 1, 2, ``"transient"`` or ``"persistent"``."""
    mode = DELIVERY_MODES.get(value) if isinstance(value, int | str) else None
    if mode is None or isinstance(value, bool):
        raise TypeError(
            f"{what}: delivery_mode must be 1, 2, 'transient' or 'persistent', not {value!r}"
        )
    return mode
