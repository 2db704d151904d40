"""Celery's remote-control commands, one function each, registered by name with
:func:`command`; :class:`~greenworker.control.mailbox.CommandTable` serves them.

Each command gets a :class:`ControlTarget`: the parts of the worker a command may
read or change, and nothing else.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from kombu.utils.url import maybe_sanitize_url

from .. import __version__, green
from ..worker.state import RevokedStamps

if TYPE_CHECKING:
    from kombu.connection import Connection
    from kombu.entity import Queue

    from ..client.task import Task
    from ..config import Settings
    from ..transport.base import TaskConsumer
    from ..worker.autoscale import Autoscaler
    from ..worker.pool import GreenPool
    from ..worker.ratelimit import RateLimiter
    from ..worker.state import WorkerState
    from ..worker.watchdog import BlockStats
    from .cluster import Heart
    from .events import EventDispatcher

log = logging.getLogger("greenworker.control")


@dataclass
class ControlTarget:
    """What remote-control commands may read and change: the worker's components
    and the few acts that are the worker's own (revoke, stop).  Built once by the
    worker; kombu's pidbox node hands it to each command as its ``state``."""

    hostname: str
    app_name: str | None
    #: The broker and result backend, as configured (commands show them sanitised).
    broker_url: str
    result_backend_url: str | None
    settings: Settings
    tasks: dict[str, Task]
    #: A new (lazy) broker connection: ``stats`` shows how kombu parses the URL.
    connect: Callable[[], Connection]
    #: The declared queue of a name, as ``active_queues`` describes it.
    queue: Callable[[str], Queue]
    state: WorkerState
    pool: GreenPool
    consumer: TaskConsumer
    rate_limiter: RateLimiter
    hub_blocks: BlockStats
    prefetch_multiplier: int
    #: Revoke ids (``terminate``: end them if running); returns the ids known here.
    revoke: Callable[[Sequence[str], bool], list[str]]
    #: A warm stop, from any greenlet; returns at once.
    request_stop: Callable[[], None]
    #: ``50``, or with autoscaling ``10 {min=3, max=10}``.
    describe_concurrency: Callable[[], str]
    autoscaler: Autoscaler | None = None
    events: EventDispatcher | None = None
    heart: Heart | None = None


def summary(target: ControlTarget) -> dict[str, Any]:
    """The worker's own short stats (``Worker.stats()``): pool, prefetch, counters,
    reconnects, hub blocks."""
    state, pool, blocks = target.state, target.pool, target.hub_blocks
    return {
        "hostname": target.hostname,
        "hub": green.hub_name(),
        "pool": {"max-concurrency": pool.size, "active": pool.active, "waiting": pool.waiting},
        "prefetch_count": target.consumer.prefetch,
        "autoscaler": target.autoscaler.info() if target.autoscaler is not None else None,
        "total": dict(state.total),
        "succeeded": state.succeeded,
        "failed": state.failed,
        "retried": state.retried,
        "revoked": state.revoked_count,
        "rejected": state.rejected,
        "uptime": int(time.time() - state.started_at),
        "broker_reconnects": target.consumer.reconnects,
        "hub_blocks": {
            "count": blocks.count,
            "longest_s": round(blocks.longest, 3),
            "total_s": round(blocks.total, 3),
        },
    }


def set_rate_limit(
    tasks: dict[str, Task], limiter: RateLimiter, task_name: str, rate: str | float | None
) -> None:
    """Change a task's rate limit while running (``None`` or 0 removes it)."""
    task = tasks[task_name]
    task.rate_limit = str(rate) if rate else None
    limiter.set_rate(task_name, rate)


def set_time_limit(
    tasks: dict[str, Task], task_name: str, soft: float | None, hard: float | None
) -> None:
    """Change a task's time limits for the runs that start from now on."""
    task = tasks[task_name]
    task.soft_time_limit, task.time_limit = soft, hard


Handler = Callable[..., Any]
#: Celery's command names, each answered by the function of that name below.
HANDLERS: dict[str, Handler] = {}


F = TypeVar("F", bound=Handler)


def command(fn: F) -> F:
    HANDLERS[fn.__name__] = fn
    return fn


@command
def ping(target: ControlTarget) -> dict[str, str]:
    return {"ok": "pong"}


@command
def clock(target: ControlTarget) -> dict[str, int]:
    return {"clock": target.state.clock.value}


@command
def stats(target: ControlTarget) -> dict[str, Any]:
    conn = target.connect()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = target.settings.task_soft_time_limit, target.settings.task_time_limit
    base = summary(target)
    held = list(target.state.reserved.values())
    return {
        "total": dict(target.state.total),
        "pid": os.getpid(),
        "clock": str(target.state.clock.value),
        "uptime": int(time.time() - target.state.started_at),
        "pool": {
            "implementation": f"greenworker:{green.hub_name()}",
            "max-concurrency": target.pool.size,
            "processes": [os.getpid()],
            "running": target.pool.active,
            "waiting": target.pool.waiting,
            "timeouts": [soft or 0, hard or 0],
            "put-guarded-by-semaphore": False,
        },
        "prefetch_count": target.consumer.prefetch or 0,
        "autoscaler": base["autoscaler"] or {},
        "broker": {
            "hostname": conn.hostname,
            "port": conn.port,
            "transport": conn.transport_cls,
            "virtual_host": conn.virtual_host,
            "userid": conn.userid,
            "uri": maybe_sanitize_url(target.broker_url),
        },
        "rusage": {
            "utime": usage.ru_utime,
            "stime": usage.ru_stime,
            "maxrss": usage.ru_maxrss,
            "minflt": usage.ru_minflt,
            "majflt": usage.ru_majflt,
            "nvcsw": usage.ru_nvcsw,
            "nivcsw": usage.ru_nivcsw,
        },
        "sw_ident": "greenworker",
        "sw_ver": __version__,
        "hub_blocks": base["hub_blocks"],
        "broker_reconnects": base["broker_reconnects"],
        "retried": base["retried"],
        "failed": base["failed"],
        "succeeded": base["succeeded"],
        "rejected": base["rejected"],
        # greenworker's own: the counts of ``reserved`` and ``scheduled``, without the
        # lists, for a view that asks every second (``status --watch``)
        "reserved": sum(1 for r in held if r.msg.eta is None),
        "scheduled": sum(1 for r in held if r.msg.eta is not None),
    }


@command
def active(target: ControlTarget, safe: bool = False) -> list[dict[str, Any]]:
    return [r.describe() for r in list(target.state.active.values())]


@command
def reserved(target: ControlTarget, safe: bool = False) -> list[dict[str, Any]]:
    return [r.describe() for r in list(target.state.reserved.values()) if r.msg.eta is None]


@command
def scheduled(target: ControlTarget, safe: bool = False) -> list[dict[str, Any]]:
    return [
        {"eta": r.msg.eta.isoformat(), "priority": 0, "request": r.describe()}
        for r in list(target.state.reserved.values())
        if r.msg.eta is not None
    ]


@command
def revoked(target: ControlTarget) -> list[str]:
    return list(target.state.revoked.as_dict())


@command
def registered(target: ControlTarget, taskinfoitems: list[str] | None = None) -> list[str]:
    names = sorted(target.tasks)
    if not taskinfoitems:
        return names
    out = []
    for name in names:
        task = target.tasks[name]
        extra = [f"{k}={getattr(task, k, None)}" for k in taskinfoitems if hasattr(task, k)]
        out.append(" ".join([name, *(f"[{e}]" for e in extra)]))
    return out


@command
def query_task(target: ControlTarget, ids: list[str] | str) -> dict[str, Any]:
    wanted = [ids] if isinstance(ids, str) else list(ids)
    found: dict[str, Any] = {}
    for task_id in wanted:
        if task_id in target.state.active:
            found[task_id] = ["active", target.state.active[task_id].describe()]
        elif task_id in target.state.reserved:
            request = target.state.reserved[task_id]
            kind = "scheduled" if request.msg.eta is not None else "reserved"
            found[task_id] = [kind, request.describe()]
    return found


@command
def active_queues(target: ControlTarget) -> list[dict[str, Any]]:
    return [target.queue(name).as_dict(recurse=True) for name in target.consumer.queue_names]


@command
def conf(target: ControlTarget, with_defaults: bool = False) -> dict[str, Any]:
    shown = safe_settings(target.settings.as_dict())
    # what this worker runs with, which -c / --autoscale / the constructor may override
    shown["worker_concurrency"] = target.pool.size
    shown["worker_prefetch_multiplier"] = target.prefetch_multiplier
    return shown


@command
def report(target: ControlTarget) -> dict[str, str]:
    lines = [
        f"software -> greenworker:{__version__} hub:{green.hub_name()}",
        f"app -> {target.app_name}",
        f"broker -> {maybe_sanitize_url(target.broker_url)}",
        f"results -> {maybe_sanitize_url(target.result_backend_url or 'disabled')}",
        f"queues -> {', '.join(target.consumer.queue_names)}",
        f"concurrency -> {target.describe_concurrency()}",
    ]
    return {"ok": "\n".join(lines)}


@command
def hello(target: ControlTarget, from_node: str, revoked: dict[str, float] | None = None) -> Any:
    """Mingle: another worker starting asks for our revoked ids and clock."""
    if from_node == target.hostname:
        return None
    if revoked:
        target.state.revoked.update({k: float(v) for k, v in revoked.items()})
    return {"revoked": target.state.revoked.as_dict(), "clock": target.state.clock.forward()}


# ------------------------------------------------------------------ control


@command
def revoke(
    target: ControlTarget,
    task_id: str | list[str] | None,
    terminate: bool = False,
    signal: str | None = None,
) -> dict[str, str]:
    """Revoke tasks by id; with ``terminate`` also end those running (Celery's replies)."""
    ids = _task_ids(task_id)
    known = dict.fromkeys(target.revoke(ids, bool(terminate)))
    if terminate:
        if not known:
            return {"ok": "terminate: tasks unknown"}
        return {"ok": f"terminate: {', '.join(known)}"}
    log.info("Tasks flagged as revoked: %s", ", ".join(ids))
    return {"ok": f"tasks {_set_text(ids)} flagged as revoked"}


@command
def terminate(
    target: ControlTarget, signal: str | None, task_id: str | list[str]
) -> dict[str, str]:
    """Revoke and end running tasks (the signal is accepted: a greenlet is simply killed)."""
    return revoke(target, task_id, terminate=True, signal=signal)


@command
def revoke_by_stamped_headers(
    target: ControlTarget,
    headers: dict[str, Any] | list[str],
    terminate: bool = False,
    signal: str | None = None,
) -> dict[str, str]:
    """Revoke the tasks whose stamps match ``headers`` (``{name: value or [values]}``,
    or Celery's CLI form ``["name=value", ...]``).

    Matching tasks waiting here are revoked at once, later ones when they
    arrive; with ``terminate``, matching running tasks are ended too.
    """
    wanted = _stamp_headers(headers)
    for name, values in wanted.items():
        target.state.revoked_stamps.add(name, values)
    state = target.state
    waiting = [
        r.id for r in list(state.reserved.values()) if state.revoked_stamps.match(r.msg.headers)
    ]
    if waiting:
        target.revoke(waiting, False)
    if not terminate:
        return {"ok": f"headers {wanted!r} flagged as revoked, but not terminated"}
    asked = RevokedStamps()
    for name, values in wanted.items():
        asked.add(name, values)
    ended: dict[str, list[Any]] = {}
    for request in list(state.active.values()):
        matched = asked.matches(request.msg.headers)
        if matched:
            for name, value in matched:
                ended.setdefault(name, [])
                if value not in ended[name]:
                    ended[name].append(value)
            target.revoke([request.id], True)
    if not ended:
        return {"ok": f"headers {wanted!r} were not terminated"}
    shown = ", ".join(f"{name!r}: {_set_text(values)}" for name, values in ended.items())
    return {"ok": f"headers {{{shown}}} revoked"}


@command
def rate_limit(
    target: ControlTarget, task_name: str, rate_limit: str | float | None
) -> dict[str, str]:
    # Celery's replies and log lines, word for word
    if task_name not in target.tasks:
        log.error("Rate limit attempt for unknown task %s", task_name)
        return {"error": "unknown task"}
    try:
        set_rate_limit(target.tasks, target.rate_limiter, task_name, rate_limit)
    except ValueError as exc:
        return {"error": f"Invalid rate limit string: {exc!r}"}
    if not rate_limit:
        log.info("Rate limits disabled for tasks of type %s", task_name)
        return {"ok": "rate limit disabled successfully"}
    log.info("New rate limit for tasks of type %s: %s.", task_name, rate_limit)
    return {"ok": "new rate limit set successfully"}


@command
def time_limit(
    target: ControlTarget, task_name: str, soft: float | None = None, hard: float | None = None
) -> dict[str, str]:
    if task_name not in target.tasks:
        return {"error": f"unknown task {task_name!r}"}
    set_time_limit(target.tasks, task_name, soft, hard)
    return {"ok": "time limits set successfully"}


@command
def pool_grow(target: ControlTarget, n: int = 1) -> dict[str, str]:
    target.pool.grow(int(n))
    return {"ok": f"pool will grow to {target.pool.size}"}


@command
def pool_shrink(target: ControlTarget, n: int = 1) -> dict[str, str]:
    target.pool.shrink(int(n))
    return {"ok": f"pool will shrink to {target.pool.size}"}


@command
def pool_restart(target: ControlTarget, **kwargs: Any) -> dict[str, str]:
    return {"error": "pool_restart is not supported: greenworker has no child processes"}


@command
def autoscale(target: ControlTarget, max: int, min: int) -> dict[str, str]:  # Celery's names
    if target.autoscaler is None:
        return {"error": "autoscale is not enabled on this worker (start it with --autoscale)"}
    try:
        target.autoscaler.update(maximum=int(max), minimum=int(min))
    except ValueError as exc:
        return {"error": str(exc)}
    return {"ok": f"autoscale now max={target.autoscaler.maximum} min={target.autoscaler.minimum}"}


@command
def add_consumer(target: ControlTarget, queue: str, **options: Any) -> dict[str, str]:
    if queue in target.consumer.queue_names:
        return {"ok": f"already consuming from {queue!r}"}
    target.consumer.add_queue(queue)
    return {"ok": f"add consumer {queue}"}


@command
def cancel_consumer(target: ControlTarget, queue: str, **options: Any) -> dict[str, str]:
    if queue not in target.consumer.queue_names:
        return {"error": f"not consuming from {queue!r}"}
    target.consumer.cancel_queue(queue)
    return {"ok": f"no longer consuming from {queue}"}


@command
def enable_events(target: ControlTarget) -> dict[str, str]:
    if target.events is None:
        return {"error": "events are not available on this transport"}
    target.events.task_events = True
    return {"ok": "task events enabled"}


@command
def disable_events(target: ControlTarget) -> dict[str, str]:
    if target.events is None:
        return {"error": "events are not available on this transport"}
    target.events.task_events = False
    return {"ok": "task events disabled"}


@command
def heartbeat(target: ControlTarget) -> dict[str, str]:
    if target.heart is None:
        return {"error": "heartbeats are off on this worker"}
    target.heart.beat()
    return {"ok": "heartbeat sent"}


@command
def shutdown(target: ControlTarget, msg: str = "Got shutdown from remote") -> dict[str, str]:
    log.warning("remote shutdown: %s", msg)
    target.request_stop()
    return {"ok": "shutting down"}


# ------------------------------------------------------------------ debugging


@command
def memsample(target: ControlTarget) -> str:
    """Sample the worker's RSS now, for ``memdump``; the sample as text (``"58.469MB"``)."""
    rss, _current = _rss_bytes()
    target.state.memory_samples.append(rss)
    return _human_bytes(rss)


@command
def memdump(target: ControlTarget, samples: int = 10) -> str:
    """Celery's memory report: up to ``samples`` of the ``memsample`` samples (then
    forgotten), and the RSS after a garbage collection."""
    taken = list(target.state.memory_samples)
    target.state.memory_samples.clear()
    count = max(int(samples), 1)
    if len(taken) > count:  # evenly spread, as Celery picks them
        step = len(taken) // count
        taken = taken[::step][:count]
    gc.collect()
    rss, current = _rss_bytes()
    lines = []
    if taken:
        lines.append("- rss (sample):")
        lines.extend(f"-    > {_human_bytes(sample)}," for sample in taken)
    lines.append(f"- rss ({'end' if current else 'peak'}): {_human_bytes(rss)}.")
    return "\n".join(lines) + "\n"


@command
def objgraph(
    target: ControlTarget,
    num: int = 200,
    max_depth: int = 10,
    type: str = "Request",  # Celery's argument name
) -> dict[str, str]:
    """Graph what holds the objects of a type (memory-leak hunting), into a PNG file.

    Needs the ``objgraph`` library (and Graphviz to draw); it walks the whole heap,
    so the hub stalls meanwhile: a debugging tool.
    """
    try:
        import objgraph as graphs  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return {"error": "objgraph needs the objgraph library: pip install objgraph"}
    log.info("remote control: dumping the object graph of type %r", type)
    fd, path = tempfile.mkstemp(prefix="greenworker-objgraph-", suffix=".png")
    os.close(fd)
    try:
        objects = graphs.by_type(type)[: int(num)]
        graphs.show_backrefs(
            objects,
            max_depth=int(max_depth),
            highlight=lambda value: value in objects,
            filename=path,
        )
    except Exception as exc:  # e.g. Graphviz missing
        return {"error": f"objgraph failed: {exc}"}
    return {"filename": path}


def _rss_bytes() -> tuple[int, bool]:
    """The resident set size in bytes, and whether it is the current one (psutil, or
    ``/proc/self/statm`` on Linux) or only the peak (the stdlib ``resource`` module)."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        try:
            with open("/proc/self/statm", "rb") as statm:
                return int(statm.read().split()[1]) * resource.getpagesize(), True
        except (OSError, IndexError, ValueError):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return (peak if sys.platform == "darwin" else peak * 1024), False  # KiB on Linux
    return int(psutil.Process().memory_info().rss), True


_BYTE_UNITS = ((2**40, "TB"), (2**30, "GB"), (2**20, "MB"), (2**10, "KB"))


def _human_bytes(size: int) -> str:
    """Bytes as Celery's memdump writes them: ``58.469MB``, ``512b``."""
    for divisor, unit in _BYTE_UNITS:
        if size >= divisor:
            return f"{size / divisor:.5g}{unit}"
    return f"{size}b"


# ------------------------------------------------------------------ helpers


def _task_ids(task_id: Any) -> list[str]:
    """The ids of a revoke: one id or a list of them, each a string, in order, once."""
    ids = [] if task_id is None else [task_id] if isinstance(task_id, str) else task_id
    if not isinstance(ids, list | tuple) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"task_id must be an id or a list of ids, not {task_id!r}")
    return list(dict.fromkeys(ids))


def _set_text(items: Collection[Any]) -> str:
    """``{'a', 'b'}``: how Celery's replies show a set of ids or values (in our order)."""
    return "{" + ", ".join(repr(item) for item in items) + "}"


def _stamp_headers(headers: Any) -> dict[str, Any]:
    """``{name: value or [values]}`` from a dict, or from Celery's ``["name=value", ...]``."""
    if isinstance(headers, list | tuple):
        parsed: dict[str, Any] = {}
        for item in headers:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"stamped headers are name=value, not {item!r}")
            name, _, value = item.partition("=")
            if name in parsed:  # the same name twice: both values
                before = parsed[name]
                parsed[name] = [*(before if isinstance(before, list) else [before]), value]
            else:
                parsed[name] = value
        headers = parsed
    if (
        not isinstance(headers, dict)
        or not headers
        or not all(isinstance(name, str) for name in headers)
    ):
        raise ValueError(f"headers must map stamp names to values, not {headers!r}")
    return headers


_SECRET_WORDS = ("password", "secret", "token", "key")


def safe_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings fit to show: URLs without passwords, secret-looking values masked."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, str) and "://" in value:
            value = maybe_sanitize_url(value)
        elif any(word in name for word in _SECRET_WORDS):
            value = "********"
        elif isinstance(value, dict):
            value = {
                k: ("********" if any(w in str(k).lower() for w in _SECRET_WORDS) else v)
                for k, v in value.items()
            }
        out[name] = value
    shown: dict[str, Any] = json.loads(json.dumps(out, default=str))  # schedules as text
    return shown
