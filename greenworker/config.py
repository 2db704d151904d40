"""Settings with Celery's names and (mostly) Celery's defaults.

Layers, later ones win: defaults, then a module / object / dict given to
:meth:`Settings.update` (or ``App(config=...)``), then ``GREENWORKER_<NAME>``
environment variables, then command-line options.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "GREENWORKER_"


class ConfigError(ValueError):
    """A setting has an unknown name or a value of the wrong type."""


@dataclass
class Settings:
    """Worker and client settings (names as in Celery's configuration docs)."""

    #: Broker URL; ``None`` means the embedded default (filesystem transport in ``data_dir``).
    broker_url: str | None = None
    #: Result backend URL: ``redis://...``, ``lmdb:///path``, ``memory://``; ``None`` means
    #: LMDB in ``data_dir`` on the embedded default and no results with another broker.
    result_backend: str | None = None
    #: Where the embedded default keeps its queue files and LMDB stores.
    data_dir: str = ".greenworker"
    broker_transport_options: dict[str, Any] = field(default_factory=dict)
    broker_connection_timeout: float = 4.0
    #: On Redis, consume and publish with greenworker's native paths (kombu's key layout,
    #: atomic pops, batched acks, one round trip per publish); False uses kombu's Redis
    #: transport.  A transport option in REDIS_LAYOUT_OPTIONS turns them off too.
    broker_native_redis: bool = True
    #: Seconds between reconnect attempts grow up to this.
    broker_connection_max_backoff: float = 10.0
    task_serializer: str = "json"
    accept_content: list[str] = field(default_factory=lambda: ["json"])
    task_default_queue: str = "celery"
    task_default_exchange_type: str = "direct"
    task_default_delivery_mode: int = 2
    #: greenworker acks after the task finished (at-least-once); Celery's default is False.
    task_acks_late: bool = True
    task_acks_on_failure_or_timeout: bool = True
    task_ignore_result: bool = False
    #: Store STARTED (with pid and hostname) when a task begins.
    task_track_started: bool = False
    #: Seconds after which SoftTimeLimitExceeded is raised in a task (None: no limit).
    task_soft_time_limit: float | None = None
    #: Seconds after which a task's greenlet is killed and it fails (None: no limit).
    task_time_limit: float | None = None
    #: Rate limit for every task without its own, like "100/s" (None: none).
    task_default_rate_limit: str | None = None
    worker_disable_rate_limits: bool = False
    #: Larger task messages are rejected unread (bytes; 0: no limit).
    worker_max_message_size: int = 4 * 1024 * 1024
    #: Serve Celery's remote-control mailbox (inspect/control).
    worker_enable_remote_control: bool = True
    #: Send task events (-E); worker events (online, heartbeat, offline) are always sent
    #: where the broker has fanout.
    worker_send_task_events: bool = False
    #: Seconds between worker-heartbeat events (0: no heart).
    worker_heartbeat: float = 2.0
    worker_enable_gossip: bool = True
    worker_enable_mingle: bool = True
    #: Seconds mingle waits for the other workers' replies at startup (Celery: 1 s).
    worker_mingle_timeout: float = 0.3
    #: Autoscaler: seconds between samples, and seconds without pressure before shrinking.
    worker_autoscale_interval: float = 1.0
    worker_autoscale_keepalive: float = 30.0
    #: Remote commands this worker answers (None: all of them).
    worker_control_allow: list[str] | None = None
    #: The LMDB state store directory (Celery's ``--statedb``); None: inside ``data_dir``
    #: on the embedded default, none with another broker.
    worker_state_db: str | None = None
    #: Seconds between batched writes of counters and clock to the state store.
    worker_state_flush_interval: float = 1.0
    #: Revoked task ids kept (Celery's defaults: 50,000 ids for 3 hours).
    worker_revokes_max: int = 50_000
    worker_revoke_expires: float = 10_800.0
    #: Hub blocked longer than this (s) is logged with the task that blocked it (0: off).
    worker_block_threshold: float = 1.0
    #: What to do when a task blocks the hub past its hard time limit: "exit" or "log".
    worker_block_policy: str = "exit"
    task_store_errors_even_if_ignored: bool = False
    result_expires: float | None = 86400.0
    worker_concurrency: int = 100
    worker_prefetch_multiplier: int = 4
    worker_hostname: str | None = None
    #: Seconds a warm shutdown waits for running tasks before killing them.
    worker_shutdown_timeout: float = 30.0
    #: Longest idle wait (s) of the consumers and listeners before they look again.
    worker_drain_interval: float = 1.0
    #: Timezone of crontab schedules (an IANA name such as "Europe/Paris").
    timezone: str = "UTC"
    #: Periodic tasks, as in Celery: {name: {"task", "schedule", "args", "kwargs", "options"}}.
    beat_schedule: dict[str, Any] = field(default_factory=dict)
    #: Beat's LMDB store of last-run times (a directory); None: DATA_DIR/beat.
    beat_schedule_filename: str | None = None
    #: Beat wakes at least this often (s), even when nothing is due.
    beat_max_loop_interval: float = 300.0
    #: Seconds between polls of the filesystem transport on the embedded default.
    filesystem_polling_interval: float = 0.05

    def update(self, source: Mapping[str, Any] | object | str | None = None, **kw: Any) -> None:
        """Apply settings from a mapping (strict names), or a module / object / module path
        (lowercase attributes whose names are settings; others are ignored)."""
        if isinstance(source, str):
            try:
                source = importlib.import_module(source)
            except ImportError as exc:
                raise ConfigError(f"cannot import config module {source!r}: {exc}") from exc
        if source is None:
            items: dict[str, Any] = {}
        elif isinstance(source, Mapping):
            items = dict(source)
            unknown = sorted(set(items) - _FIELD_NAMES)
            if unknown:
                raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        else:
            items = {n: getattr(source, n) for n in _FIELD_NAMES if hasattr(source, n)}
        unknown_kw = sorted(set(kw) - _FIELD_NAMES)
        if unknown_kw:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown_kw)}")
        items.update(kw)
        for name, value in items.items():
            setattr(self, name, _check(name, value))

    def update_from_env(self, environ: Mapping[str, str] | None = None) -> None:
        """Apply ``GREENWORKER_<SETTING>`` environment variables."""
        env = os.environ if environ is None else environ
        for name in _FIELD_NAMES:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                setattr(self, name, _parse_env(name, raw))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))
_HINTS = typing.get_type_hints(Settings)


def _base_types(name: str) -> tuple[type, ...]:
    hint = _HINTS[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def _check(name: str, value: Any) -> Any:
    allowed = _base_types(name)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool not in allowed and isinstance(value, bool):
        raise ConfigError(f"setting {name} must be {_describe(allowed)}, not a bool")
    if list in allowed and isinstance(value, tuple | set | frozenset):
        return list(value)
    if not isinstance(value, allowed):
        raise ConfigError(
            f"setting {name} must be {_describe(allowed)}, not {type(value).__name__}"
        )
    return value


def _describe(allowed: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in allowed)


def _parse_env(name: str, raw: str) -> Any:
    allowed = _base_types(name)
    text = raw.strip()
    if type(None) in allowed and text.lower() in ("", "none", "null"):
        return None
    try:
        if bool in allowed:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if int in allowed:
            return int(text)
        if float in allowed:
            return float(text)
        if list in allowed:
            return [p.strip() for p in text.split(",") if p.strip()]
        if dict in allowed:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
    except ValueError as exc:
        raise ConfigError(f"environment variable {ENV_PREFIX}{name.upper()}: {exc}") from exc
    return raw


#: How often (s) a consumer on a polling kombu transport (memory, filesystem, kombu's own
#: Redis transport, where it is the BRPOP timeout) wakes to look for a stop, queue or
#: prefetch change: a stop cannot wake those.
POLLING_WAKE = 0.2

#: Transport options that change kombu's Redis key layout: with any of them set, kombu's
#: own transport is used (greenworker's native Redis paths know only the default layout).
REDIS_LAYOUT_OPTIONS = (
    "global_keyprefix",
    "sep",
    "priority_steps",
    "unacked_key",
    "unacked_index_key",
    "unacked_mutex_key",
)
