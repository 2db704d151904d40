"""Settings with Celery's names and (mostly) Celery's defaults.

Layers, later ones win: defaults, then a module / object / dict given to
:meth:`Settings.update` (``App(config=...)`` or ``app.config_from_object(...)``),
then ``GREENWORKER_<NAME>`` environment variables (and Celery's own
``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``), then command-line options.

No name a user wrote is dropped without a word: a Celery setting greenworker
does not implement is logged as a warning (once per name and load), a
near-miss of a greenworker setting is a :class:`ConfigError` with a "did you
mean", and so is any other unknown key of a dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "GREENWORKER_"

#: Celery's environment variables for settings greenworker has, read after ours.
CELERY_ENV = {"broker_url": "CELERY_BROKER_URL", "result_backend": "CELERY_RESULT_BACKEND"}

#: Celery's environment variables for settings greenworker does not have: warned about.
CELERY_ENV_UNUSED = ("CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting has an unknown name or a value of the wrong type."""


#: The queue types greenworker declares (Celery's ``task_default_queue_type`` values).
QUEUE_TYPES = ("classic", "quorum")


@dataclass
class Settings:
    """Worker and client settings (names as in Celery's configuration docs)."""

    #: Broker URL; ``None`` means the embedded default (the LMDB broker in ``data_dir``).
    broker_url: str | None = None
    #: Result backend URL: ``redis://...``, ``lmdb:///path``, ``memory://``; ``None`` means
    #: LMDB in ``data_dir`` on the embedded default and no results with another broker.
    result_backend: str | None = None
    #: Where the embedded default keeps its LMDB broker, results and state.
    data_dir: str = ".greenworker"
    broker_transport_options: dict[str, Any] = field(default_factory=dict)
    broker_connection_timeout: float = 4.0
    #: TLS to the broker (Celery's name): True, or a dict of options.  RabbitMQ takes
    #: py-amqp's (``ca_certs``, ``cert_reqs``, ``certfile``, ``keyfile``,
    #: ``server_hostname``); Redis takes redis-py's (``ssl_ca_certs``, ``ssl_cert_reqs``,
    #: ``ssl_certfile``, ``ssl_keyfile``...), for kombu's transport and the native paths.
    broker_use_ssl: bool | dict[str, Any] | None = None
    #: TLS to a Redis result backend (Celery's name): redis-py's ``ssl_*`` options.
    redis_backend_use_ssl: dict[str, Any] | None = None
    #: Options of the result backend's connection (Celery's name); for ``sentinel://``:
    #: ``master_name``, ``sentinel_kwargs``, ``min_other_sentinels``.
    result_backend_transport_options: dict[str, Any] = field(default_factory=dict)
    #: Retry a result store that failed for a lost connection (Celery's name; Celery's
    #: default is False: greenworker's keeps results through a failover or restart).
    result_backend_always_retry: bool = True
    #: How many times (Celery's default: no limit).
    result_backend_max_retries: float = float("inf")
    #: The first pause, doubling up to the maximum, each fully jittered (Celery's names).
    result_backend_base_sleep_between_retries_ms: int = 10
    result_backend_max_sleep_between_retries_ms: int = 10000
    #: On Redis, consume and publish with greenworker's native paths (kombu's key layout,
    #: atomic pops, batched acks, one round trip per publish); False uses kombu's Redis
    #: transport.  A transport option in REDIS_LAYOUT_OPTIONS turns them off too.
    broker_native_redis: bool = True
    #: Seconds between reconnect attempts grow up to this.
    broker_connection_max_backoff: float = 10.0
    #: Reconnect after a lost broker connection (Celery's meaning); False: the worker
    #: logs one CRITICAL line and exits with status 1 instead.
    broker_connection_retry: bool = True
    #: The same for the first connection at startup; None: ``broker_connection_retry``
    #: decides (Celery 5's rule).
    broker_connection_retry_on_startup: bool | None = None
    #: Retries before the worker gives up on the broker (one CRITICAL line, exit 1), counted
    #: from the last connection; None or 0: retry forever (Celery's default is 100).
    broker_connection_max_retries: int | None = None
    task_serializer: str = "json"
    accept_content: list[str] = field(default_factory=lambda: ["json"])
    task_default_queue: str = "celery"
    task_default_exchange_type: str = "direct"
    #: Celery's routes: a dict (names, glob patterns, compiled regexes) or a list of dicts,
    #: router functions and import paths of routers (see :mod:`greenworker.client.routes`).
    task_routes: Any = None
    #: How the default queue is declared: "classic" or "quorum" (``x-queue-type``).
    task_default_queue_type: str = "classic"
    #: How every other queue is declared: "classic" or "quorum".
    task_create_missing_queue_type: str = "classic"
    #: On RabbitMQ with quorum queues, ETA and countdown tasks wait in the broker
    #: (Celery's native delayed delivery): the type of its ``celery_delayed_*`` queues,
    #: "quorum" or "classic".
    broker_native_delayed_delivery_queue_type: str = "quorum"
    #: The same on classic queues (greenworker's own; Celery uses it for quorum queues
    #: only, and its producer still sends to classic queues directly).
    broker_native_delayed_delivery_classic_queues: bool = False
    #: Message priority of tasks with none of their own, their route's or the call's.
    task_default_priority: int | None = None
    #: ``x-max-priority`` of the queues greenworker declares (RabbitMQ priority queues).
    task_queue_max_priority: int | None = None
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
    #: Serve Prometheus metrics at ``/metrics`` on this port (``--metrics-port``; 0: any
    #: free port; None: off).  Needs ``pip install greenworker[metrics]``.
    worker_metrics_port: int | None = None
    #: The address the metrics port listens on (``--metrics-bind``; "0.0.0.0": all).
    worker_metrics_bind: str = "127.0.0.1"
    #: The worker command replaces the root logger's handlers with its own (Celery's
    #: name and default); False keeps the handlers the app configured.  An embedded
    #: worker never configures logging.
    worker_hijack_root_logger: bool = True
    #: The worker command's text log format and date format (Celery's names); None:
    #: greenworker's ``[%(asctime)s: %(levelname)s/%(name)s] %(message)s``.
    worker_log_format: str | None = None
    worker_log_datefmt: str | None = None
    #: The worker command logs one JSON object per line (``--log-format json``).
    worker_log_json: bool = False
    #: Seconds between the worker's INFO stats lines (processed, failed, rate, pool,
    #: reserved, held ETA, reconnects); 0: none.
    worker_stats_interval: float = 60.0
    task_store_errors_even_if_ignored: bool = False
    result_expires: float | None = 86400.0
    worker_concurrency: int = 100
    worker_prefetch_multiplier: int = 4
    #: On RabbitMQ, consume queues declared ``x-queue-type: quorum`` with per-consumer
    #: QoS (quorum queues refuse a global one); False keeps the global QoS.
    worker_detect_quorum_queues: bool = True
    worker_hostname: str | None = None
    #: Seconds a warm shutdown waits for running tasks before killing them.
    worker_shutdown_timeout: float = 30.0
    #: After this many tasks the worker stops warm and the ``greenworker`` command
    #: restarts the process in place (None or 0: never); ``--max-tasks-per-child``.
    worker_max_tasks_per_child: int | None = None
    #: The same once a task leaves the process's resident memory above this many KiB
    #: (None or 0: no limit); ``--max-memory-per-child``.
    worker_max_memory_per_child: int | None = None
    #: Longest idle wait (s) of the consumers and listeners before they look again.
    worker_drain_interval: float = 1.0
    #: Timezone of crontab schedules (an IANA name such as "Europe/Paris").
    timezone: str = "UTC"
    #: Periodic tasks, as in Celery: {name: {"task", "schedule", "args", "kwargs", "options"}}.
    beat_schedule: dict[str, Any] = field(default_factory=dict)
    #: Beat's LMDB store of last-run times (a directory); None: DATA_DIR/beat.
    beat_schedule_filename: str | None = None
    #: Beat's scheduler class, Celery's ``--scheduler`` (e.g. django_celery_beat's):
    #: only a Celery app can use one; None: the built-in schedule.
    beat_scheduler: str | None = None
    #: Beat wakes at least this often (s), even when nothing is due.
    beat_max_loop_interval: float = 300.0

    def update(
        self,
        source: Mapping[str, Any] | object | str | None = None,
        *,
        namespace: str | None = None,
        **kw: Any,
    ) -> None:
        """Apply settings from a mapping or keywords, or a module / object / import path
        (``"proj.settings"``, ``"django.conf:settings"``).

        With a ``namespace`` such as ``"CELERY"``, only the names of ``source`` that
        start with it and ``_`` are read, without it: ``CELERY_BROKER_URL`` is
        ``broker_url`` (as Celery reads Django's settings).

        Every name is a greenworker setting (applied), a Celery setting greenworker
        does not use (a warning naming it), or a mistake: a near-miss of a setting
        raises :class:`ConfigError` with a "did you mean", as does any other unknown
        key of a mapping.  On a module or object, names starting with ``_``, imports,
        classes and functions are not settings, nor are other names that are not
        all lower case (a module's own constants); other unknown lower-case
        attributes are warned about.  Nothing is applied when anything is wrong.
        """
        if isinstance(source, str):
            source = import_object(source, "config module")
        prefix = namespace.rstrip("_") + "_" if namespace else None
        known: dict[str, Any] = {}
        problems: list[str] = []
        unused: dict[str, str] = {}
        if isinstance(source, Mapping):
            _sort(_without_prefix(source, prefix), True, known, problems, unused)
        elif source is not None:
            _sort(_attributes(source, prefix), False, known, problems, unused)
        _sort(kw, True, known, problems, unused)
        if problems:
            raise ConfigError(f"unknown setting(s): {', '.join(problems)}")
        checked = {name: _check(name, value) for name, value in known.items()}
        for name, value in checked.items():
            setattr(self, name, value)
        for why in unused.values():
            log.warning("%s; ignored", why)

    def update_from_env(self, environ: Mapping[str, str] | None = None) -> None:
        """Apply ``GREENWORKER_<SETTING>`` environment variables, and Celery's
        ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` where ours are unset."""
        env = os.environ if environ is None else environ
        for name in _FIELD_NAMES:
            variable = ENV_PREFIX + name.upper()
            raw = env.get(variable)
            if raw is None and name in CELERY_ENV:
                variable = CELERY_ENV[name]
                raw = env.get(variable)
            if raw is not None:
                value = _parse_env(name, raw, variable)
                _check_value(name, value, f"environment variable {variable}")
                setattr(self, name, value)
        for variable in CELERY_ENV_UNUSED:
            if variable in env:
                log.warning(
                    "environment variable %s is not used by greenworker, which has one "
                    "broker URL (broker_url: GREENWORKER_BROKER_URL or CELERY_BROKER_URL); "
                    "ignored",
                    variable,
                )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))
_HINTS = typing.get_type_hints(Settings)


# Every setting name Celery 5 knows (its configuration reference).
_CELERY_NAMES = """
    accept_content arangodb_backend_settings azureblockblob_base_path
    azureblockblob_connection_timeout azureblockblob_container_name
    azureblockblob_read_timeout azureblockblob_retry_increment_base
    azureblockblob_retry_initial_backoff_sec azureblockblob_retry_max_attempts
    beat_cron_starting_deadline beat_enable_remote_control beat_max_loop_interval
    beat_remote_control_max_tick_age beat_schedule beat_schedule_filename beat_scheduler
    beat_sync_every broker_channel_error_retry broker_connection_max_retries
    broker_connection_retry broker_connection_retry_on_startup broker_connection_timeout
    broker_failover_strategy broker_heartbeat broker_heartbeat_checkrate broker_host
    broker_login_method broker_native_delayed_delivery_queue_type broker_password
    broker_pool_acquire_timeout broker_pool_limit broker_port broker_read_url broker_transport
    broker_transport_options broker_url broker_use_ssl broker_user broker_vhost
    broker_write_url cache_backend cache_backend_options cassandra_auth_kwargs
    cassandra_auth_provider cassandra_bundle_path cassandra_entry_ttl cassandra_keyspace
    cassandra_options cassandra_port cassandra_read_consistency cassandra_servers
    cassandra_table cassandra_write_consistency control_exchange control_queue_durable
    control_queue_exclusive control_queue_expires control_queue_ttl
    cosmosdbsql_collection_name cosmosdbsql_consistency_level cosmosdbsql_database_name
    cosmosdbsql_max_retry_attempts cosmosdbsql_max_retry_wait_time couchbase_backend_settings
    database_create_tables_at_setup database_engine_callback database_engine_options
    database_short_lived_sessions database_table_names database_table_schemas database_url
    elasticsearch_max_retries elasticsearch_retry_on_timeout elasticsearch_save_meta_as_text
    elasticsearch_timeout enable_utc event_exchange event_queue_durable event_queue_exclusive
    event_queue_expires event_queue_prefix event_queue_ttl event_serializer gcs_base_path
    gcs_bucket gcs_project gcs_ttl imports include mongodb_backend_settings
    redis_backend_use_ssl redis_db redis_host redis_max_connections redis_password redis_port
    redis_retry_on_timeout redis_socket_connect_timeout redis_socket_keepalive
    redis_socket_timeout redis_username result_accept_content result_backend
    result_backend_always_retry result_backend_base_sleep_between_retries_ms
    result_backend_max_retries result_backend_max_sleep_between_retries_ms
    result_backend_transport_options result_cache_max result_chord_expires
    result_chord_join_timeout result_chord_retry_interval result_compression result_exchange
    result_exchange_type result_expires result_extended result_failure_expires
    result_persistent result_serializer s3_access_key_id s3_base_path s3_bucket
    s3_endpoint_url s3_region s3_secret_access_key security_cert_store security_certificate
    security_digest security_key security_key_password task_acks_late task_acks_on_failure
    task_acks_on_failure_or_timeout task_acks_on_timeout task_allow_error_cb_on_chord_header
    task_always_eager task_annotations task_compression
    task_create_missing_queue_exchange_type task_create_missing_queue_type
    task_create_missing_queues task_default_delivery_mode task_default_exchange
    task_default_exchange_type task_default_priority task_default_queue
    task_default_queue_type task_default_rate_limit task_default_routing_key
    task_eager_propagates task_ignore_result task_inherit_parent_priority task_protocol
    task_publish_retry task_publish_retry_policy task_queue_max_priority task_queues
    task_reject_on_worker_lost task_remote_tracebacks task_repr_maxlevels
    task_retry_on_worker_lost task_routes task_send_sent_event task_serializer
    task_soft_time_limit task_store_eager_result task_store_errors_even_if_ignored
    task_time_limit task_track_started timezone worker_agent worker_autoscaler
    worker_cancel_long_running_tasks_on_connection_loss worker_concurrency worker_consumer
    worker_deduplicate_successful_tasks worker_detect_quorum_queues worker_direct
    worker_disable_prefetch worker_disable_rate_limits worker_enable_prefetch_count_reduction
    worker_enable_remote_control worker_enable_soft_shutdown_on_idle worker_eta_task_limit
    worker_hijack_root_logger worker_log_color worker_log_datefmt worker_log_format
    worker_lost_wait worker_max_memory_per_child worker_max_tasks_per_child worker_pool
    worker_pool_putlocks worker_pool_restarts worker_pool_start_method
    worker_prefetch_multiplier worker_proc_alive_timeout worker_redirect_stdouts
    worker_redirect_stdouts_level worker_send_task_events worker_soft_shutdown_timeout
    worker_state_db worker_task_log_datefmt worker_task_log_format worker_timer
    worker_timer_precision
"""
#: Celery's settings: those greenworker does not have are warned about, never dropped.
CELERY_SETTING_NAMES = frozenset(_CELERY_NAMES.split())

#: Celery's worker-side settings greenworker does not honour, with what it does instead:
#: the warning for a Celery app's (at startup) and a greenworker App's (when loaded) says
#: it.  Every other worker_*, control_* and event_* setting of Celery is a Settings field.
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
    "worker_deduplicate_successful_tasks": (
        "a redelivered task runs again, whatever its stored state"
    ),
    "worker_eta_task_limit": "held ETA tasks raise the prefetch count instead",
    "worker_enable_prefetch_count_reduction": "prefetch follows the pool size and held ETA tasks",
    "worker_disable_prefetch": "prefetch is pool size x worker_prefetch_multiplier",
    "worker_redirect_stdouts": "print() in a task goes to the worker's stdout",
    "worker_redirect_stdouts_level": "print() in a task goes to the worker's stdout",
    "worker_log_color": "log lines are not coloured",
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
    "task_acks_on_failure": "task_acks_on_failure_or_timeout decides both",
    "task_acks_on_timeout": "task_acks_on_failure_or_timeout decides both",
    "beat_enable_remote_control": "beat answers no remote control",
}


#: How close (difflib's ratio) an unknown name must be to a setting to count as its typo.
_TYPO_CUTOFF = 0.8


def import_object(path: str, what: str) -> Any:
    """The module or object ``path`` names: ``pkg.mod``, ``pkg.mod:attr`` or
    ``pkg.mod.attr``.  Raises :class:`ConfigError` naming ``what`` could not be imported."""
    module_name, colon, attr = path.partition(":")
    missing: ImportError | None = None
    if not colon:
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError as exc:
            module_name, dot, attr = path.rpartition(".")
            if exc.name != path or not dot:  # not this name's own absence: report it
                raise ConfigError(f"cannot import {what} {path!r}: {exc}") from exc
            missing = exc  # perhaps pkg.mod.attr: reported if that is not it either
        except ImportError as exc:
            raise ConfigError(f"cannot import {what} {path!r}: {exc}") from exc
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {what} {path!r}: {missing or exc}") from exc
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            reason = missing or f"{module_name!r} has no attribute {attr!r}"
            raise ConfigError(f"cannot import {what} {path!r}: {reason}") from None
    return value


def check_priority(value: Any, what: str) -> int:
    """A message priority: an int from 0 to 255 (AMQP's octet; Redis uses 0-9)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ConfigError(f"{what} must be an int from 0 to 255, not {value!r}")
    return value


def redis_tls_options(value: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """redis-py's keyword arguments for a TLS setting on Redis (``broker_use_ssl``,
    ``redis_backend_use_ssl``): None for no TLS, else the options (maybe none)."""
    if not value:
        return None
    return {} if value is True else dict(value)


def _check_queue_type(value: Any, what: str) -> None:
    if value not in QUEUE_TYPES:
        raise ConfigError(f"{what} must be 'classic' or 'quorum', not {value!r}")


def _check_port(value: Any, what: str) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{what} must be a port number (0 to 65535), not {value!r}")


def _check_not_negative(value: float, what: str) -> None:
    if value < 0:
        raise ConfigError(f"{what} must be 0 (off) or more seconds, not {value}")


#: Checks of a setting's value beyond its type.
_VALUE_CHECKS: dict[str, Callable[[Any, str], object]] = {
    "worker_stats_interval": _check_not_negative,
    "task_default_queue_type": _check_queue_type,
    "task_create_missing_queue_type": _check_queue_type,
    "broker_native_delayed_delivery_queue_type": _check_queue_type,
    "task_default_priority": check_priority,
    "task_queue_max_priority": check_priority,
    "worker_metrics_port": _check_port,
}


def _check_value(name: str, value: Any, what: str) -> None:
    check = _VALUE_CHECKS.get(name)
    if check is not None and value is not None:
        check(value, what)


def _without_prefix(items: Mapping[str, Any], prefix: str | None) -> Mapping[str, Any]:
    """With a namespace prefix, only the names it starts, without it (in lower case)."""
    if prefix is None:
        return items
    return {
        name[len(prefix) :].lower(): value
        for name, value in items.items()
        if isinstance(name, str) and name.startswith(prefix)
    }


def _attributes(source: object, prefix: str | None = None) -> dict[str, Any]:
    """A module's or object's public attributes, less imports, classes and functions
    that are not the value of a setting; with a namespace ``prefix``, only the names
    it starts, without it."""
    items = {}
    for attribute in dir(source):
        if attribute.startswith("_"):
            continue
        if prefix is None:
            name = attribute
        elif attribute.startswith(prefix):
            name = attribute[len(prefix) :].lower()
        else:
            continue
        try:
            value = getattr(source, attribute)
        except AttributeError:  # listed by dir() but not readable: not a setting
            continue
        if name not in _FIELD_NAMES and (
            inspect.ismodule(value) or inspect.isclass(value) or inspect.isroutine(value)
        ):
            continue
        items[name] = value
    return items


def _sort(
    items: Mapping[str, Any],
    strict: bool,
    known: dict[str, Any],
    problems: list[str],
    unused: dict[str, str],
) -> None:
    """File each name as a setting to apply, a mistake to raise, or a name to warn about."""
    for name, value in items.items():
        if name in _FIELD_NAMES:
            known[name] = value
        elif name in CELERY_SETTING_NAMES:
            instead = f": {UNHONOURED[name]}" if name in UNHONOURED else ""
            unused[name] = f"setting {name} is not used by greenworker (a Celery setting{instead})"
        elif name != name.lower():
            counterpart = _lowercase_counterpart(name)
            if counterpart in _FIELD_NAMES:
                namespaced = name.startswith("CELERY_") and counterpart == name[7:].lower()
                unused[name] = (
                    f"setting {name} is not used by greenworker, which reads "
                    f"lower-case names: write {counterpart}"
                    + (", or load with namespace='CELERY'" if namespaced else "")
                )
            elif counterpart is not None:
                unused[name] = (
                    f"setting {name} is not used by greenworker ({counterpart} is a "
                    "Celery setting it does not implement)"
                )
            elif name.startswith("CELERY"):
                unused[name] = f"setting {name} is not used by greenworker"
            elif strict:
                problems.append(name)
            # else: a module's own constant (DEBUG, BASE_DIR), not a setting
        elif typo := difflib.get_close_matches(name, _FIELD_NAMES, n=1, cutoff=_TYPO_CUTOFF):
            problems.append(f"{name} (did you mean {typo[0]}?)")
        elif strict:
            problems.append(name)
        else:
            unused[name] = f"setting {name} is not a greenworker or Celery setting"


def _lowercase_counterpart(name: str) -> str | None:
    """The setting an upper-case (Celery 3 style) name stands for, if any:
    ``BROKER_URL``, ``CELERY_RESULT_BACKEND``, ``CELERYD_CONCURRENCY``..."""
    lower = name.lower()
    candidates = [lower]
    for prefix, replacement in (("celery_", ""), ("celery_", "task_"), ("celeryd_", "worker_")):
        if lower.startswith(prefix):
            candidates.append(replacement + lower[len(prefix) :])
    if lower.startswith("celerybeat_"):
        candidates.append("beat_" + lower[len("celerybeat_") :])
    for candidate in candidates:
        if candidate in _FIELD_NAMES or candidate in CELERY_SETTING_NAMES:
            return candidate
    return None


def _base_types(name: str) -> tuple[type, ...]:
    hint = _HINTS[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def _check(name: str, value: Any) -> Any:
    allowed = _base_types(name)
    if Any in allowed:  # task_routes: its routes are checked when first used
        return value
    value = _check_type(name, value, allowed)
    _check_value(name, value, f"setting {name}")
    return value


def _check_type(name: str, value: Any, allowed: tuple[type, ...]) -> Any:
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


def _parse_env(name: str, raw: str, variable: str) -> Any:
    allowed = _base_types(name)
    text = raw.strip()
    if Any in allowed:  # task_routes: JSON (a dict or list of routes), else a router's path
        if not text.startswith(("{", "[")):
            return text or None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"environment variable {variable}: {exc}") from exc
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
        raise ConfigError(f"environment variable {variable}: {exc}") from exc
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


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(rate: str | float | None) -> float:
    """Tasks per second from ``"N/s"``, ``"N/m"``, ``"N/h"`` or a number (per second).

    0 or None means no limit.  Raises ValueError for anything else.
    """
    if rate is None:
        return 0.0
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        if rate < 0:
            raise ValueError(f"rate limit must not be negative: {rate!r}")
        return float(rate)
    text = str(rate).strip()
    count, _, unit = text.partition("/")
    try:
        value = float(count)
    except ValueError:
        raise ValueError(f"bad rate limit {rate!r}: expected like '10/s', '100/m', '5/h'") from None
    if value < 0 or (unit and unit not in _RATE_UNITS):
        raise ValueError(f"bad rate limit {rate!r}: expected like '10/s', '100/m', '5/h'")
    return value / _RATE_UNITS[unit or "s"]
