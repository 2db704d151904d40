"""Celery's remote-control commands, one function each, registered by name with
:func:`command`; :class:`~greenworker.control.mailbox.CommandTable` serves them.
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
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

from kombu.utils.url import maybe_sanitize_url

from .. import __version__, green
from ..worker.state import RevokedStamps

if TYPE_CHECKING:
    from ..worker.worker import Worker

log = logging.getLogger("greenworker.control")


Handler = Callable[..., Any]
#: Celery's command names, each answered by the function of that name below.
HANDLERS: dict[str, Handler] = {}


F = TypeVar("F", bound=Handler)


def command(fn: F) -> F:
    HANDLERS[fn.__name__] = fn
    return fn


@command
def ping(worker: Worker) -> dict[str, str]:
    return {"ok": "pong"}


@command
def clock(worker: Worker) -> dict[str, int]:
    return {"clock": worker.state.clock.value}


@command
def stats(worker: Worker) -> dict[str, Any]:
    app = worker.app
    conn = app.connection()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = app.conf.task_soft_time_limit, app.conf.task_time_limit
    base = worker.stats()
    return {
        "total": dict(worker.state.total),
        "pid": os.getpid(),
        "clock": str(worker.state.clock.value),
        "uptime": int(time.time() - worker.state.started_at),
        "pool": {
            "implementation": f"greenworker:{green.hub_name()}",
            "max-concurrency": worker.pool.size,
            "processes": [os.getpid()],
            "running": worker.pool.active,
            "waiting": worker.pool.waiting,
            "timeouts": [soft or 0, hard or 0],
            "put-guarded-by-semaphore": False,
        },
        "prefetch_count": worker.consumer.prefetch or 0,
        "autoscaler": base["autoscaler"] or {},
        "broker": {
            "hostname": conn.hostname,
            "port": conn.port,
            "transport": conn.transport_cls,
            "virtual_host": conn.virtual_host,
            "userid": conn.userid,
            "uri": maybe_sanitize_url(app.broker_url),
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
    }


@command
def active(worker: Worker, safe: bool = False) -> list[dict[str, Any]]:
    return [r.describe() for r in list(worker.state.active.values())]


@command
def reserved(worker: Worker, safe: bool = False) -> list[dict[str, Any]]:
    return [r.describe() for r in list(worker.state.reserved.values()) if r.msg.eta is None]


@command
def scheduled(worker: Worker, safe: bool = False) -> list[dict[str, Any]]:
    return [
        {"eta": r.msg.eta.isoformat(), "priority": 0, "request": r.describe()}
        for r in list(worker.state.reserved.values())
        if r.msg.eta is not None
    ]


@command
def revoked(worker: Worker) -> list[str]:
    return list(worker.state.revoked.as_dict())


@command
def registered(worker: Worker, taskinfoitems: list[str] | None = None) -> list[str]:
    names = sorted(worker.app.tasks)
    if not taskinfoitems:
        return names
    out = []
    for name in names:
        task = worker.app.tasks[name]
        extra = [f"{k}={getattr(task, k, None)}" for k in taskinfoitems if hasattr(task, k)]
        out.append(" ".join([name, *(f"[{e}]" for e in extra)]))
    return out


@command
def query_task(worker: Worker, ids: list[str] | str) -> dict[str, Any]:
    wanted = [ids] if isinstance(ids, str) else list(ids)
    found: dict[str, Any] = {}
    for task_id in wanted:
        if task_id in worker.state.active:
            found[task_id] = ["active", worker.state.active[task_id].describe()]
        elif task_id in worker.state.reserved:
            request = worker.state.reserved[task_id]
            kind = "scheduled" if request.msg.eta is not None else "reserved"
            found[task_id] = [kind, request.describe()]
    return found


@command
def active_queues(worker: Worker) -> list[dict[str, Any]]:
    return [worker.app.queue(name).as_dict(recurse=True) for name in worker.consumer.queue_names]


@command
def conf(worker: Worker, with_defaults: bool = False) -> dict[str, Any]:
    shown = safe_settings(worker.app.conf.as_dict())
    # what this worker runs with, which -c / --autoscale / the constructor may override
    shown["worker_concurrency"] = worker.pool.size
    shown["worker_prefetch_multiplier"] = worker.prefetch_multiplier
    return shown


@command
def report(worker: Worker) -> dict[str, str]:
    lines = [
        f"software -> greenworker:{__version__} hub:{green.hub_name()}",
        f"app -> {worker.app.main}",
        f"broker -> {maybe_sanitize_url(worker.app.broker_url)}",
        f"results -> {maybe_sanitize_url(worker.app.result_backend_url or 'disabled')}",
        f"queues -> {', '.join(worker.consumer.queue_names)}",
        f"concurrency -> {worker.describe_concurrency()}",
    ]
    return {"ok": "\n".join(lines)}


@command
def hello(worker: Worker, from_node: str, revoked: dict[str, float] | None = None) -> Any:
    """Mingle: another worker starting asks for our revoked ids and clock."""
    if from_node == worker.hostname:
        return None
    if revoked:
        worker.state.revoked.update({k: float(v) for k, v in revoked.items()})
    return {"revoked": worker.state.revoked.as_dict(), "clock": worker.state.clock.forward()}


# ------------------------------------------------------------------ control


@command
def revoke(
    worker: Worker,
    task_id: str | list[str] | None,
    terminate: bool = False,
    signal: str | None = None,
) -> dict[str, str]:
    """Revoke tasks by id; with ``terminate`` also end those running (Celery's replies)."""
    ids = _task_ids(task_id)
    known = dict.fromkeys(worker.revoke(ids, terminate=bool(terminate)))
    if terminate:
        if not known:
            return {"ok": "terminate: tasks unknown"}
        return {"ok": f"terminate: {', '.join(known)}"}
    log.info("Tasks flagged as revoked: %s", ", ".join(ids))
    return {"ok": f"tasks {_set_text(ids)} flagged as revoked"}


@command
def terminate(worker: Worker, signal: str | None, task_id: str | list[str]) -> dict[str, str]:
    """Revoke and end running tasks (the signal is accepted: a greenlet is simply killed)."""
    return revoke(worker, task_id, terminate=True, signal=signal)


@command
def revoke_by_stamped_headers(
    worker: Worker,
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
        worker.state.revoked_stamps.add(name, values)
    state = worker.state
    waiting = [
        r.id for r in list(state.reserved.values()) if state.revoked_stamps.match(r.msg.headers)
    ]
    if waiting:
        worker.revoke(waiting)
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
            worker.revoke([request.id], terminate=True)
    if not ended:
        return {"ok": f"headers {wanted!r} were not terminated"}
    shown = ", ".join(f"{name!r}: {_set_text(values)}" for name, values in ended.items())
    return {"ok": f"headers {{{shown}}} revoked"}


@command
def rate_limit(worker: Worker, task_name: str, rate_limit: str | float | None) -> dict[str, str]:
    if task_name not in worker.app.tasks:
        return {"error": f"unknown task {task_name!r}"}
    try:
        worker.set_rate_limit(task_name, rate_limit)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"ok": f"new rate limit set successfully: {task_name} {rate_limit}"}


@command
def time_limit(
    worker: Worker, task_name: str, soft: float | None = None, hard: float | None = None
) -> dict[str, str]:
    if task_name not in worker.app.tasks:
        return {"error": f"unknown task {task_name!r}"}
    worker.set_time_limit(task_name, soft, hard)
    return {"ok": "time limits set successfully"}


@command
def pool_grow(worker: Worker, n: int = 1) -> dict[str, str]:
    worker.pool.grow(int(n))
    return {"ok": f"pool will grow to {worker.pool.size}"}


@command
def pool_shrink(worker: Worker, n: int = 1) -> dict[str, str]:
    worker.pool.shrink(int(n))
    return {"ok": f"pool will shrink to {worker.pool.size}"}


@command
def pool_restart(worker: Worker, **kwargs: Any) -> dict[str, str]:
    return {"error": "pool_restart is not supported: greenworker has no child processes"}


@command
def autoscale(worker: Worker, max: int, min: int) -> dict[str, str]:  # Celery's names
    if worker.autoscaler is None:
        return {"error": "autoscale is not enabled on this worker (start it with --autoscale)"}
    try:
        worker.autoscaler.update(maximum=int(max), minimum=int(min))
    except ValueError as exc:
        return {"error": str(exc)}
    return {"ok": f"autoscale now max={worker.autoscaler.maximum} min={worker.autoscaler.minimum}"}


@command
def add_consumer(worker: Worker, queue: str, **options: Any) -> dict[str, str]:
    if queue in worker.consumer.queue_names:
        return {"ok": f"already consuming from {queue!r}"}
    worker.consumer.add_queue(queue)
    return {"ok": f"add consumer {queue}"}


@command
def cancel_consumer(worker: Worker, queue: str, **options: Any) -> dict[str, str]:
    if queue not in worker.consumer.queue_names:
        return {"error": f"not consuming from {queue!r}"}
    worker.consumer.cancel_queue(queue)
    return {"ok": f"no longer consuming from {queue}"}


@command
def enable_events(worker: Worker) -> dict[str, str]:
    if worker.events is None:
        return {"error": "events are not available on this transport"}
    worker.events.task_events = True
    return {"ok": "task events enabled"}


@command
def disable_events(worker: Worker) -> dict[str, str]:
    if worker.events is None:
        return {"error": "events are not available on this transport"}
    worker.events.task_events = False
    return {"ok": "task events disabled"}


@command
def heartbeat(worker: Worker) -> dict[str, str]:
    if worker.heart is None:
        return {"error": "heartbeats are off on this worker"}
    worker.heart.beat()
    return {"ok": "heartbeat sent"}


@command
def shutdown(worker: Worker, msg: str = "Got shutdown from remote") -> dict[str, str]:
    log.warning("remote shutdown: %s", msg)
    worker.request_stop()
    return {"ok": "shutting down"}


# ------------------------------------------------------------------ debugging


@command
def memsample(worker: Worker) -> str:
    """Sample the worker's RSS now, for ``memdump``; the sample as text (``"58.469MB"``)."""
    rss, _current = _rss_bytes()
    worker.state.memory_samples.append(rss)
    return _human_bytes(rss)


@command
def memdump(worker: Worker, samples: int = 10) -> str:
    """Celery's memory report: up to ``samples`` of the ``memsample`` samples (then
    forgotten), and the RSS after a garbage collection."""
    taken = list(worker.state.memory_samples)
    worker.state.memory_samples.clear()
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
    worker: Worker,
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
