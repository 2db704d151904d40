"""Task routing: Celery's ``task_routes`` setting, and where a message goes.

``task_routes`` is what Celery accepts: a dict (exact task names, glob patterns
such as ``"feed.*"``, compiled ``re.compile(...)`` keys), or a list/tuple of
such dicts (a list of ``(key, route)`` pairs keeps its order), router functions
``(name, args, kwargs, options, task=None, **kw)``, objects or classes with
``route_for_task(name, args, kwargs)``, and strings naming a router
(``"proj.routers.route_task"`` or ``"proj.routers:route_task"``), imported on
first use.  A route is a queue name or a dict of :data:`ROUTE_KEYS`; the
routers are asked in order and the first route given wins.

Where a message goes (:func:`resolve`) follows Celery: the options given to
``apply_async`` win, then the task's own options (``queue``, ``exchange``,
``routing_key``, ``priority``...), then the route, and the
``task_default_queue`` when no route matched.  A queue is declared bound to
the exchange with the routing key the message is published with (both the
queue's name unless given), so the message reaches it on every broker.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, check_priority, import_object

if TYPE_CHECKING:
    from .task import Task

#: What a route dict may say (the other options of ``apply_async`` are not routing).
ROUTE_KEYS = ("queue", "exchange", "exchange_type", "routing_key", "priority", "delivery_mode")
_ROUTE_KEYS = frozenset(ROUTE_KEYS)

#: A prepared entry of ``task_routes``: Celery's router signature.
RouterCallable = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one message is published: ``exchange`` with ``routing_key``, with
    ``queue`` (when there is one) declared bound to them."""

    queue: str | None
    exchange: str
    exchange_type: str
    routing_key: str


def normalise_route(value: Any, origin: str) -> dict[str, Any] | None:
    """A route as a dict (a queue name is ``{"queue": name}``), checked; ``origin``
    names where it came from in the :class:`ConfigError` for a bad one."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"queue": value}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"task_routes: {origin} gave {type(value).__name__} {value!r:.60}: a route is a "
            f"queue name or a dict of {', '.join(ROUTE_KEYS)}"
        )
    route = dict(value)
    unknown = sorted(str(key) for key in route if key not in _ROUTE_KEYS)
    if unknown:
        raise ConfigError(
            f"task_routes: {origin} has {', '.join(unknown)}, which greenworker does not "
            f"route by (a route may set {', '.join(ROUTE_KEYS)})"
        )
    for key in ("queue", "exchange", "exchange_type", "routing_key"):
        if route.get(key) is not None and not isinstance(route[key], str):
            raise ConfigError(
                f"task_routes: {origin}: {key} must be a name (str), "
                f"not {type(route[key]).__name__}"
            )
    if route.get("priority") is not None:
        check_priority(route["priority"], f"task_routes: {origin}: priority")
    return route


class MapRoute:
    """A dict (or pairs) of task names, glob patterns and compiled regexes to routes."""

    def __init__(self, mapping: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        self.exact: dict[str, dict[str, Any] | None] = {}
        self.patterns: list[tuple[re.Pattern[str], dict[str, Any] | None]] = []
        for item in items:
            try:
                key, value = item
            except (TypeError, ValueError):
                raise ConfigError(
                    f"task_routes: {item!r:.60} is not a (pattern, route) pair"
                ) from None
            if not isinstance(key, str | re.Pattern):
                raise ConfigError(
                    f"task_routes: key {key!r:.60} is not a task name, a glob pattern or a "
                    "compiled regex"
                )
            shown = key.pattern if isinstance(key, re.Pattern) else key
            route = normalise_route(value, f"the route for {shown!r}")
            if isinstance(key, re.Pattern):
                self.patterns.append((key, route))
            elif "*" in key:  # Celery's test: only '*' makes a key a glob
                self.patterns.append((re.compile(fnmatch.translate(key)), route))
            else:
                self.exact[key] = route

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        if name in self.exact:
            route = self.exact[name]
            return None if route is None else dict(route)
        for regex, route in self.patterns:
            if regex.match(name):
                return None if route is None else dict(route)
        return None


class LazyRouter:
    """A router named by its import path, imported (and a class instantiated) when
    first asked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._router: RouterCallable | None = None

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> Any:
        if self._router is None:
            try:
                target = import_object(self.path, "router")
            except ConfigError as exc:
                raise ConfigError(f"task_routes: {exc}") from None
            self._router = prepare_entry(target, self.path)
        return self._router(name, args, kwargs, options, task=task, **kw)


class _RouteForTask:
    """A router object of Celery's older kind: ``route_for_task(name, args, kwargs)``."""

    def __init__(self, router: Any) -> None:
        self.route_for_task = router.route_for_task

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> Any:
        return self.route_for_task(name, args, kwargs)


def prepare_entry(entry: Any, origin: str | None = None) -> RouterCallable:
    """One item of ``task_routes`` as a router callable."""
    if isinstance(entry, Mapping | list | tuple):
        return MapRoute(entry)
    if isinstance(entry, str):
        return LazyRouter(entry)
    if hasattr(entry, "route_for_task"):
        # a class is instantiated, as Celery does for one named by a string
        return _RouteForTask(entry() if isinstance(entry, type) else entry)
    if callable(entry):
        return entry  # type: ignore[no-any-return]
    where = f"router {origin!r}" if origin else "an entry"
    raise ConfigError(
        f"task_routes: {where} is {type(entry).__name__} {entry!r:.60}: expected a dict, a "
        "list of dicts or routers, a router function, an object with route_for_task, or "
        "the import path of a router"
    )


class Router:
    """The ``task_routes`` setting, prepared: :meth:`route` asks each router in order."""

    def __init__(self, setting: Any) -> None:
        self.setting = setting
        entries = () if setting is None else setting
        if not isinstance(entries, list | tuple):
            entries = (entries,)
        self.routers = [prepare_entry(entry) for entry in entries]

    def route(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: Mapping[str, Any],
        task: Task | None,
    ) -> dict[str, Any] | None:
        """The first route a router gives for this message, as a checked dict."""
        for router in self.routers:
            value = router(name, args, kwargs, dict(options), task=task)
            if value is None:
                continue
            if isinstance(router, MapRoute):
                checked: dict[str, Any] = value  # checked when the map was prepared
                return checked
            return normalise_route(value, f"router {_describe(router)} for {name!r}")
        return None


def _describe(router: RouterCallable) -> str:
    if isinstance(router, LazyRouter):
        return repr(router.path)
    target = getattr(router, "route_for_task", router)
    return str(getattr(target, "__qualname__", None) or type(target).__qualname__)


def resolve(
    merged: Mapping[str, Any],
    *,
    routed: bool,
    default_queue: str,
    default_exchange_type: str,
) -> Destination:
    """Where a message goes, from its routing options ``merged`` (the route's, with
    the task's and then the call's over them; unset ones left out).  With no route
    (``routed`` false) and no queue given, the default queue.  A queue publishes to
    its exchange (its own name unless given) with its routing key (its name unless
    given); a route naming only an exchange publishes there, declaring no queue."""
    queue = merged.get("queue")
    exchange = merged.get("exchange")
    if queue is None and (not routed or exchange is None):
        queue = default_queue
    exchange_type = merged.get("exchange_type") or default_exchange_type
    routing_key = merged.get("routing_key")
    if queue is not None:
        return Destination(queue, exchange or queue, exchange_type, routing_key or queue)
    assert exchange is not None  # no queue: only a route that names an exchange
    return Destination(None, exchange, exchange_type, routing_key or "")
