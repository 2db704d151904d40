"""A Celery app's configuration, read as the worker's settings.

Celery itself reads the configuration (``config_from_object`` with its
``namespace``, Django's settings, Celery's environment variables); this module
only decides, name by name, what greenworker's worker takes from it:

* a setting the worker side of greenworker has (``task_acks_late``,
  ``worker_prefetch_multiplier``...) takes the app's value **when the user
  set it**; where the user did not, greenworker's default holds (acks late,
  100 greenlets...), so the banner and the docs can say what runs;
* a setting Celery's own objects honour in this process (the result backend,
  the producer, routes, the tracer, beat) needs nothing from the worker;
* a worker-side Celery setting greenworker does not implement is named in a
  warning at startup: never silence.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.app.defaults import DEFAULTS

from ..config import CELERY_SETTING_NAMES, ConfigError, Settings

log = logging.getLogger("greenworker.celery")

_FIELDS = tuple(f.name for f in dataclasses.fields(Settings))

#: Read from the app whatever its origin (greenworker needs the effective value, and the
#: Celery default is also what Celery's own client and tracer use in this process).
_ALWAYS = frozenset({"accept_content", "task_serializer", "task_default_queue", "timezone"})

#: Settings of greenworker that a Celery app does not carry: the broker URL comes from the
#: app's connection, beat runs through Celery's scheduler classes.
_NOT_MAPPED = frozenset(
    {"broker_url", "result_backend", "beat_schedule", "beat_schedule_filename", "beat_scheduler"}
)

#: Worker-side Celery settings greenworker does not honour, with what it does instead.
UNHONOURED: dict[str, str] = {
    "worker_pool": "greenworker runs on one green hub (-P gevent or eventlet)",
    "worker_pool_restarts": "pool_restart is refused; SIGHUP restarts the worker in place",
    "worker_pool_putlocks": "there is no process pool",
    "worker_pool_start_method": "there is no process pool",
    "worker_proc_alive_timeout": "there is no process pool",
    "worker_lost_wait": "there is no process pool",
    "worker_agent": "no worker agent is started",
    "worker_autoscaler": "greenworker's own autoscaler runs (--autoscale)",
    "worker_consumer": "greenworker's own consumer runs",
    "worker_timer": "greenworker's own green timer runs",
    "worker_timer_precision": "greenworker's own green timer runs",
    "worker_direct": "no per-worker direct queue is consumed; use -Q",
    "worker_cancel_long_running_tasks_on_connection_loss": (
        "running tasks carry on when the connection is lost; their acks wait for it"
    ),
    "worker_enable_soft_shutdown_on_idle": "a warm shutdown waits worker_shutdown_timeout",
    "worker_soft_shutdown_timeout": (
        "a warm shutdown waits greenworker's worker_shutdown_timeout (30 s by default)"
    ),
    "worker_eta_task_limit": "held ETA tasks raise the prefetch count instead",
    "worker_enable_prefetch_count_reduction": "prefetch follows the pool size and held ETA tasks",
    "worker_disable_prefetch": "prefetch is pool size x worker_prefetch_multiplier",
    "worker_redirect_stdouts": "print() in a task goes to the worker's stdout",
    "worker_redirect_stdouts_level": "print() in a task goes to the worker's stdout",
    "worker_hijack_root_logger": "the worker command configures the root logger (-l)",
    "worker_log_color": "log lines are not coloured",
    "worker_log_format": "the worker command's log format is used",
    "worker_log_datefmt": "the worker command's log format is used",
    "worker_task_log_format": "the worker command's log format is used",
    "worker_task_log_datefmt": "the worker command's log format is used",
    "control_exchange": "remote control uses Celery's default celery.pidbox exchange",
    "control_queue_ttl": "greenworker's pidbox queue settings are used",
    "control_queue_expires": "greenworker's pidbox queue settings are used",
    "control_queue_exclusive": "greenworker's pidbox queue settings are used",
    "control_queue_durable": "greenworker's pidbox queue settings are used",
    "event_exchange": "events go to Celery's default celeryev exchange",
    "event_serializer": "events are sent as JSON",
    "event_queue_prefix": "gossip uses greenworker's own event queue",
    "event_queue_ttl": "gossip uses greenworker's own event queue",
    "event_queue_expires": "gossip uses greenworker's own event queue",
    "event_queue_exclusive": "gossip uses greenworker's own event queue",
    "event_queue_durable": "gossip uses greenworker's own event queue",
    "broker_native_delayed_delivery_queue_type": (
        "ETA tasks are held by the worker, not delayed by the broker"
    ),
    "task_acks_on_failure": "task_acks_on_failure_or_timeout decides both",
    "task_acks_on_timeout": "task_acks_on_failure_or_timeout decides both",
    "beat_enable_remote_control": "beat answers no remote control",
}


def user_set(app: Celery, name: str) -> bool:
    """Whether the user set ``name``: in the app's constructor or ``conf.update`` before it
    was configured, in the configuration source (under its namespace), or to a value
    other than Celery's default."""
    if name in app._preconf:
        return True
    conf = app.conf
    if name in DEFAULTS:
        if conf.get(name) != DEFAULTS[name]:
            return True
    elif name in conf:
        return True
    source = _resolved_source(app)
    if source is None:
        return False
    key = f"{app.namespace}_{name}".upper() if app.namespace else name
    return _has(source, key)


def _resolved_source(app: Celery) -> Any:
    source = app._config_source
    if isinstance(source, str):
        try:
            return app.loader._smart_import(source, imp=app.loader.import_from_cwd)
        except Exception:  # Celery already reported it, or was told to be silent
            return None
    return source


def _has(source: Any, key: str) -> bool:
    if isinstance(source, dict):
        return key in source
    try:
        getattr(source, key)
    except Exception:  # AttributeError, or Django's ImproperlyConfigured for unset settings
        return False
    return True


def worker_settings(app: Celery) -> Settings:
    """greenworker's settings for a worker running ``app``.

    Raises :class:`~greenworker.config.ConfigError` naming a setting whose value
    greenworker cannot use (a wrong type).
    """
    settings = Settings()
    conf = app.conf
    values: dict[str, Any] = {}
    for name in _FIELDS:
        if name in _NOT_MAPPED:
            continue
        if name in _ALWAYS or user_set(app, name):
            value = conf.get(name)
            if value is None and getattr(settings, name) is not None:
                continue  # "no value" in Celery: greenworker's default means the same
            values[name] = _plain(value)
    if not values.get("timezone"):
        values["timezone"] = "UTC"
    try:
        settings.update(values)
    except ConfigError as exc:
        raise ConfigError(f"the Celery app's configuration: {exc}") from None
    return settings


def _plain(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, tuple):
        return list(value)
    return value


def warn_unhonoured(app: Celery) -> list[str]:
    """Log one warning for each worker-side Celery setting the user set that greenworker
    does not honour; return their names."""
    named = []
    for name, instead in UNHONOURED.items():
        if name in CELERY_SETTING_NAMES and user_set(app, name):
            if name == "worker_pool" and str(app.conf.get(name)) in ("gevent", "eventlet"):
                continue
            log.warning("Celery setting %s is not used by greenworker: %s", name, instead)
            named.append(name)
    return named
