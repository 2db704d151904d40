"""Tasks: the functions a worker runs, and the context of the one running now."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..config import parse_rate
from ..exceptions import MaxRetriesExceededError, Retry

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

    OPTIONS = frozenset(
        {
            "queue",
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
        unknown = sorted(set(options) - self.OPTIONS)
        if unknown:
            raise TypeError(f"unknown task option(s) for {name}: {', '.join(unknown)}")
        self.app = app
        self.fn = fn
        self.name = name
        self.bind = bind
        for key, value in options.items():
            if key in ("autoretry_for", "dont_autoretry_for"):
                value = tuple(value)
            setattr(self, key, value)
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)  # fail at definition time, not at the first message
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

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
        """Send the task to a worker and return its :class:`AsyncResult`."""
        return self.app.send_task(
            self.name,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires if expires is not None else self.expires,
            queue=queue or self.queue,
            task_id=task_id,
            ignore_result=bool(self.ignore_result),
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            **options,
        )

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

        def send() -> object:
            return self.app.send_task(
                self.name,
                request.args if args is None else args,
                request.kwargs if kwargs is None else kwargs,
                task_id=request.id,
                retries=request.retries + 1,
                countdown=countdown,
                eta=eta,
                queue=request.delivery_info.get("routing_key") or self.queue,
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
