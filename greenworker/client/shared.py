"""Shared tasks and the current app, as Celery's ``shared_task`` and ``current_app``.

``@shared_task`` defines a task once, for every :class:`~greenworker.client.app.App`:
each app created before or after registers it.  What it returns,
:class:`SharedTask`, stands for the task of the *current* app: inside a task
body, the app of the task that runs; elsewhere the app made current last -- by
being created (``App(..., set_as_current=True)``, the default), by
``app.set_current()``, or by building a worker (``app.Worker()``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from .task import Task, current_task_app

if TYPE_CHECKING:
    from .app import App
    from .canvas import Signature
    from .result import AsyncResult

log = logging.getLogger("greenworker.app")

#: Task methods Celery calls around a run that greenworker's worker does not call.
CELERY_HOOKS = ("before_start", "on_success", "on_failure", "on_retry", "after_return")


@dataclass(frozen=True)
class TaskDefinition:
    """A decorated function and its options: what an app makes its :class:`Task` from."""

    fn: Callable[..., Any]
    name: str | None = None
    bind: bool = False
    base: type[Task] = Task
    options: Mapping[str, Any] = field(default_factory=dict)

    def create(self, app: App) -> Task:
        """Build the task for ``app`` and register it there."""
        task_name = self.name or app._default_name(self.fn)
        task = self.base(app, self.fn, task_name, bind=self.bind, **self.options)
        app.tasks[task_name] = task
        return task

    def attach(self, app: App) -> None:
        """Register on ``app`` unless it has a task of that name already (a shared
        definition never replaces a task of the app's own)."""
        if (self.name or app._default_name(self.fn)) not in app.tasks:
            self.create(app)


def task_class(base: Any) -> type[Task]:
    """The class a task is made of: ``base`` checked (a :class:`Task` subclass)."""
    if base is None:
        return Task
    if not (isinstance(base, type) and issubclass(base, Task)):
        hint = ""
        if getattr(base, "__module__", "").startswith("celery"):
            hint = " (a celery.Celery app's tasks run through greenworker.celery)"
        raise TypeError(f"base must be a subclass of greenworker.Task, not {base!r}{hint}")
    not_called = [name for name in CELERY_HOOKS if hasattr(base, name)]
    if not_called:
        log.warning(
            "task base %s defines %s, which greenworker's worker does not call",
            base.__qualname__,
            ", ".join(not_called),
        )
    return base


_apps: weakref.WeakSet[App] = weakref.WeakSet()
_current: weakref.ref[App] | None = None
_definitions: list[TaskDefinition] = []


def add_app(app: App, set_as_current: bool) -> None:
    """A new app: give it every shared task; make it current if asked."""
    _apps.add(app)
    for definition in _definitions:
        definition.attach(app)
    if set_as_current:
        set_current(app)


def set_current(app: App) -> None:
    global _current
    _current = weakref.ref(app)


def current_app() -> App:
    """The app of the running task, else the app made current last."""
    app = current_task_app.get() or (_current() if _current is not None else None)
    if app is None:
        raise RuntimeError("no greenworker App exists: create one before using a shared task")
    return app


def share(definition: TaskDefinition, *, besides: App | None = None) -> None:
    """Register ``definition`` on every app there is (but ``besides``) and will be."""
    _definitions.append(definition)
    for app in list(_apps):
        if app is not besides:
            definition.attach(app)


class SharedTask:
    """A shared task: the current app's task of this definition (see the module doc).

    Calling it runs the function here; ``delay``, ``apply_async``, ``s``, ``si``,
    ``retry``, ``name``, ``request`` and every other :class:`Task` attribute are
    the current app's task's.
    """

    def __init__(self, definition: TaskDefinition) -> None:
        self.definition = definition
        self.__doc__ = definition.fn.__doc__
        self.__wrapped__ = definition.fn

    def _task(self) -> Task:
        app = current_app()
        definition = self.definition
        task = app.tasks.get(definition.name or app._default_name(definition.fn))
        if task is None:  # the app's tasks were cleared: register again
            task = definition.create(app)
        return task

    def __repr__(self) -> str:
        return f"<shared task {self.definition.name or self.definition.fn.__qualname__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._task()(*args, **kwargs)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._task(), attribute)

    @property
    def name(self) -> str:
        return self._task().name

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self._task().delay(*args, **kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        return self._task().apply_async(args, kwargs, **options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return self._task().s(*args, **kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        return self._task().si(*args, **kwargs)


@overload
def shared_task(fn: Callable[..., Any]) -> SharedTask: ...


@overload
def shared_task(
    *, name: str | None = None, bind: bool = False, base: type[Task] | None = None, **options: Any
) -> Callable[[Callable[..., Any]], SharedTask]: ...


def shared_task(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    bind: bool = False,
    base: type[Task] | None = None,
    **options: Any,
) -> SharedTask | Callable[[Callable[..., Any]], SharedTask]:
    """Define a task for every app: ``@shared_task`` or ``@shared_task(bind=True, ...)``,
    with :meth:`App.task <greenworker.client.app.App.task>`'s options.  Every App,
    created before or after, registers it; the returned :class:`SharedTask` sends
    through the current app."""
    options.pop("shared", None)  # Celery's option: a shared task is shared
    options.pop("lazy", None)  # Celery's: registration is never deferred here

    def define(func: Callable[..., Any]) -> SharedTask:
        definition = TaskDefinition(func, name, bind, task_class(base), dict(options))
        definition.base.checked_options(name or func.__qualname__, options)  # fail here
        share(definition)
        return SharedTask(definition)

    return define(fn) if fn is not None else define
