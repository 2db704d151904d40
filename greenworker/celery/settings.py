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
* a worker-side Celery setting greenworker does not implement
  (:data:`~greenworker.config.UNHONOURED`) is named in a warning at startup:
  never silence.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.app.defaults import DEFAULTS

from ..config import CELERY_SETTING_NAMES, UNHONOURED, ConfigError, Settings

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
