"""The ``greenworker`` command.

``greenworker -A proj [-P gevent|eventlet] [-c N] [-Q q1,q2]`` runs a worker.
Ten subcommands: ``call``, ``purge``, ``inspect``, ``control``, ``status``, ``top``
and ``events`` act as clients; ``beat`` runs the scheduler alone; ``statedb`` shows,
compacts or clears a state store, ``brokerdb`` shows or compacts the embedded
broker's store.  The chosen hub patches the process before the user's module is
imported, so nothing here imports kombu or the app at module level.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from . import __version__, green

if TYPE_CHECKING:
    from kombu.connection import Connection

    from .client.app import App
    from .worker.worker import Worker

from .observe.logs import LOG_FORMAT

log = logging.getLogger("greenworker.cli")


class CLIError(click.ClickException):
    """One readable line on stderr and exit code 2; never a traceback."""

    exit_code = 2


class CommandFailed(click.ClickException):
    """One readable line on stderr and exit code 1: the usage was right, the outcome was not
    (a broker that cannot be reached, a result that did not come)."""

    exit_code = 1


class CannotCreate(CommandFailed):
    """A file the command must own is another's (a pid file a live worker holds): exit
    status 73, ``EX_CANTCREAT``, as Celery's."""

    exit_code = getattr(os, "EX_CANTCREAT", 73)


NO_REMOTE_CONTROL = (
    "kombu's filesystem transport has no remote control; use the embedded default, Redis "
    "or RabbitMQ"
)
NO_EVENTS = (
    "kombu's filesystem transport has no events; use the embedded default, Redis or RabbitMQ"
)

# Celery's %-abbreviations: a percent sign and one word character, or %% for a literal one.
_PERCENT_KEY = re.compile(r"%([%\w])")


def _expand_percent(template: str, keys: dict[str, str], what: str) -> str:
    def resolve(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "%":
            return "%"
        if key not in keys:
            known = ", ".join(f"%{k}" for k in keys)
            raise CLIError(f"{what}: unknown %{key} in {template!r} (known: {known}, %%)")
        return keys[key]

    return _PERCENT_KEY.sub(resolve, template)


def _host_keys(host: str, name: str) -> dict[str, str]:
    short, _, domain = host.partition(".")
    # %i/%I are the pool process index in Celery; greenworker is one process, which Celery
    # formats as its main process: %i -> "0", %I -> "" (no "-N" suffix).
    return {"h": host, "n": name or short, "d": domain, "i": "0", "I": ""}


def expand_node_name(value: str, host: str | None = None, what: str = "-n/--hostname") -> str:
    """Expand ``-n`` as Celery does: ``%h`` the full host name of this machine (or
    ``host``), ``%n`` its first label, ``%d`` its domain, ``%i`` ``0``, ``%I`` empty,
    ``%%`` a percent sign.  An unknown ``%x`` is a :class:`CLIError` naming ``what``."""
    return _expand_percent(value, _host_keys(host or socket.gethostname(), ""), what)


def expand_node_path(template: str, node: str, what: str, host: str | None = None) -> str:
    """Expand a path option for worker ``node`` (``name@host``) as Celery does: ``%h`` the
    host part, ``%n`` the name part, ``%d`` the host's domain, ``%p`` the whole node name,
    ``%i`` ``0``, ``%I`` empty, ``%%`` a percent sign.  A node name without ``@`` is all
    name, on this machine (or ``host``)."""
    name, at, node_host = node.partition("@")
    if not at:
        node_host = host or socket.gethostname()
    keys = _host_keys(node_host, name)
    keys["p"] = node
    return _expand_percent(template, keys, what)


def _json_arg(value: str | None, what: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--{what} is not valid JSON: {exc}") from None
    if not isinstance(parsed, kind):
        raise CLIError(f"--{what} must be a JSON {'array' if kind is list else 'object'}")
    return parsed


#: Where the command was started.  A restart in place (SIGHUP, a worker_max_*_per_child
#: limit) and -D run the same command line again from here, so that its relative paths,
#: --workdir's among them, mean what they meant.
_LAUNCH_DIR = os.getcwd()


class _GroupedOption(click.Option):
    """An option listed under a heading in ``--help``, as Celery lists its own."""

    def __init__(self, *args: Any, help_group: str = "Options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help_group = help_group


class _Command(click.Command):
    """Options under their headings in ``--help``; a usage error is one line
    (``Error: ...``, exit status 2), without the usage and the hint click adds."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            exc.ctx = None  # what click shows the usage and the hint from
            raise

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "help_group", "Options"), []).append(record)
        for heading, records in sections.items():
            with formatter.section(heading):
                formatter.write_dl(records)


class _Main(_Command, click.Group):
    command_class = _Command

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        self.format_commands(ctx, formatter)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # "No such command", and ctx.fail in a callback
            exc.ctx = None
            raise


def _option(*decls: str, group: str, **kwargs: Any) -> Callable[[Any], Any]:
    return click.option(*decls, cls=_GroupedOption, help_group=group, **kwargs)


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _pool_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value.lower() in green.HUBS:
        return None if value is None else value.lower()
    raise click.BadParameter(
        f"{value}: greenworker runs on gevent or eventlet only (green threads in one "
        "process); use -P gevent or -P eventlet"
    )


def _concurrency(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise click.BadParameter(
            f"{value}: a number of greenlets, such as -c 200 (greenworker runs on gevent or "
            "eventlet only: green threads in one process, no process pool to size)"
        )
    return number or None  # 0 is worker_concurrency, as in Celery


def _autoscale(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    """Celery's reading: ``MAX,MIN`` in either order, or ``MAX`` alone (MIN 0)."""
    if value is None:
        return None
    parts = value.split(",")
    try:
        if len(parts) > 2:
            raise ValueError
        numbers = sorted((int(p) for p in parts), reverse=True)
    except ValueError:
        raise click.BadParameter(f"{value}: expected MAX,MIN (two integers) or MAX") from None
    high, low = numbers[0], numbers[1] if len(numbers) > 1 else 0
    if low < 0:
        raise click.BadParameter(f"{value}: needs MIN >= 0")
    if high < 1:
        raise click.BadParameter(f"{value}: needs MAX >= 1")
    return high, low


def _umask(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from .daemon import DaemonError, parse_umask

    if value is None:
        return None
    try:
        return parse_umask(value)
    except DaemonError as exc:
        raise click.BadParameter(str(exc)) from None


def _global_option_after_worker(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value:
        name = "/".join(param.opts)
        raise click.UsageError(
            f"{name} is an option of greenworker itself: put it before the command, as "
            f"with celery: greenworker {param.opts[0]} ... worker ..."
        )


_GLOBAL = "Global Options"

#: The options of the command itself (Celery's global options, and --data-dir): before
#: ``worker`` or another command, or anywhere in the form without a command.
_GLOBAL_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    _option(
        "-A",
        "--app",
        "app_spec",
        metavar="MODULE[:ATTR]",
        group=_GLOBAL,
        help="The app: module (attribute `app`) or module:attr.",
    ),
    _option(
        "-b",
        "--broker",
        group=_GLOBAL,
        help="Broker URL (redis://, amqp://, filesystem://, memory://).  [default: embedded]",
    ),
    _option(
        "--result-backend",
        group=_GLOBAL,
        help="Result backend URL (redis://, lmdb:///dir, memory://).",
    ),
    _option(
        "--data-dir",
        type=click.Path(file_okay=False),
        group=_GLOBAL,
        help="Data directory of the embedded default.  [default: ./.greenworker]",
    ),
    _option(
        "--workdir",
        type=click.Path(exists=True, file_okay=False),
        is_eager=True,
        expose_value=False,
        callback=lambda ctx, param, value: os.chdir(value) if value else None,
        group=_GLOBAL,
        help="Change to this directory before anything else (before the app is loaded).",
    ),
    _option("-q", "--quiet", is_flag=True, group=_GLOBAL, help="The worker prints no banner."),
    _option(
        "-C",
        "--no-color",
        is_flag=True,
        group=_GLOBAL,
        help="Accepted: greenworker's output has no colours.",
    ),
    _option(
        "--config",
        metavar="MODULE",
        group=_GLOBAL,
        help="Settings module (CELERY_CONFIG_MODULE for a Celery app).",
    ),
    _option("--loader", group=_GLOBAL, help="A Celery app's loader (CELERY_LOADER)."),
    _option(
        "--skip-checks",
        is_flag=True,
        group=_GLOBAL,
        help="Skip Django core checks on startup (CELERY_SKIP_CHECKS).",
    ),
)

_WORKER = "Worker Options"
_POOL = "Pool Options"
_QUEUE = "Queue Options"
_FEATURES = "Features"
_BEAT = "Embedded Beat Options"
_DAEMON = "Daemonization Options"

#: The worker's options, Celery's (and greenworker's --soft-shutdown-timeout): after
#: ``worker``, or before it, or in the form without a command.
_WORKER_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    _option(
        "-n",
        "--hostname",
        group=_WORKER,
        help="Set custom hostname (e.g., 'w1@%h').  Expands: %h (hostname), %n (name) and "
        "%d, (domain).  [default: worker_hostname, else greenworker@%h; celery@%h for a "
        "Celery app]",
    ),
    _option(
        "-D",
        "--detach",
        is_flag=True,
        group=_WORKER,
        help="Start worker as a background process.",
    ),
    _option(
        "-S",
        "--statedb",
        type=click.Path(file_okay=False),
        group=_WORKER,
        help="Path to the state database (an LMDB directory: revoked ids, hub blockers, "
        "counters, clock).  [default: worker_state_db, DATA_DIR/state on the embedded default]",
    ),
    _option(
        "-l",
        "--loglevel",
        type=click.Choice(
            ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL"], case_sensitive=False
        ),
        group=_WORKER,
        help="Logging level.  [default: INFO]",
    ),
    _option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        group=_WORKER,
        help="Log lines as text, or one JSON object per line.  [default: text, or json "
        "when worker_log_json is True]",
    ),
    _option(
        "-O",
        "--optimization",
        type=click.Choice(["default", "fair"]),
        group=_WORKER,
        help="Apply optimization profile (greenworker always dispatches fairly).",
    ),
    _option(
        "--prefetch-multiplier",
        type=click.IntRange(min=1),
        metavar="<prefetch multiplier>",
        group=_WORKER,
        help="Set custom prefetch multiplier value for this worker instance (prefetch = "
        "concurrency x this).  [default: worker_prefetch_multiplier, 4]",
    ),
    _option(
        "--disable-prefetch",
        is_flag=True,
        group=_WORKER,
        help="Fetch a task only when a greenlet is free (prefetch multiplier 1, acks late).",
    ),
    _option(
        "-c",
        "--concurrency",
        callback=_concurrency,
        metavar="<concurrency>",
        group=_POOL,
        help="Number of greenlets processing the queue.  [default: worker_concurrency, 100]",
    ),
    _option(
        "-P",
        "--pool",
        callback=_pool_name,
        metavar="[gevent|eventlet]",
        group=_POOL,
        help="Pool implementation: the green hub that patches the process.  [default: gevent]",
    ),
    _option(
        "-E",
        "--task-events",
        "--events",
        "task_events",
        is_flag=True,
        group=_POOL,
        help="Send task-related events that can be captured by monitors like celery "
        "events, Flower and greenworker events.",
    ),
    _option(
        "--time-limit",
        type=click.FloatRange(min=0, min_open=True),
        group=_POOL,
        help="Enables a hard time limit (in seconds int/float) for tasks.",
    ),
    _option(
        "--soft-time-limit",
        type=click.FloatRange(min=0, min_open=True),
        group=_POOL,
        help="Enables a soft time limit (in seconds int/float) for tasks.",
    ),
    _option(
        "--max-tasks-per-child",
        type=click.IntRange(min=0),
        group=_POOL,
        help="Maximum number of tasks the worker can execute before its process is "
        "restarted in place (worker_max_tasks_per_child).",
    ),
    _option(
        "--pool-start-method",
        type=click.Choice(["fork", "spawn"]),
        group=_POOL,
        help="Accepted with a warning: greenworker starts no pool processes.",
    ),
    _option(
        "--max-memory-per-child",
        type=click.IntRange(min=0),
        group=_POOL,
        help="Maximum amount of resident memory, in KiB, that the worker may consume before "
        "its process is restarted in place.  If a single task causes the worker to exceed "
        "this limit, the task will be completed and the process restarted afterwards "
        "(worker_max_memory_per_child).  Default: no limit.",
    ),
    _option(
        "--soft-shutdown-timeout",
        type=click.FloatRange(min=0),
        group=_POOL,
        help="Seconds a warm shutdown waits for running tasks.  [default: 30]",
    ),
    _option(
        "--purge",
        "--discard",
        is_flag=True,
        group=_QUEUE,
        help="Purge the queues consumed before starting.",
    ),
    _option(
        "-Q",
        "--queues",
        callback=_comma_list,
        group=_QUEUE,
        help="Comma-separated queues to consume.  [default: celery]",
    ),
    _option(
        "-X",
        "--exclude-queues",
        callback=_comma_list,
        group=_QUEUE,
        help="Comma-separated queues not to consume.",
    ),
    _option(
        "-I",
        "--include",
        callback=_comma_list,
        group=_QUEUE,
        help="Comma-separated modules to import after the app.",
    ),
    _option("--without-gossip", is_flag=True, group=_FEATURES, help="Do not watch other workers."),
    _option(
        "--without-mingle",
        is_flag=True,
        group=_FEATURES,
        help="Do not sync with the cluster at startup.",
    ),
    _option(
        "--without-heartbeat",
        is_flag=True,
        group=_FEATURES,
        help="Send no worker events (worker-heartbeat, -online, -offline).",
    ),
    _option(
        "--heartbeat-interval",
        type=click.FloatRange(min=0, min_open=True),
        group=_FEATURES,
        help="Seconds between worker-heartbeat events (worker_heartbeat).  [default: 2]",
    ),
    _option(
        "--autoscale",
        callback=_autoscale,
        metavar="MAX,MIN",
        group=_FEATURES,
        help="Grow the pool up to MAX when tasks wait, shrink to MIN when idle.",
    ),
    _option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        metavar="PORT",
        group=_FEATURES,
        help="Serve Prometheus metrics at http://BIND:PORT/metrics (worker_metrics_port; "
        "0: any free port; needs greenworker[metrics]).  [default: off]",
    ),
    _option(
        "--metrics-bind",
        metavar="ADDR",
        group=_FEATURES,
        help="The address --metrics-port listens on (worker_metrics_bind).  [default: 127.0.0.1]",
    ),
    _option(
        "-B",
        "--beat",
        "embed_beat",
        is_flag=True,
        group=_BEAT,
        help="Also run beat (periodic tasks) in this worker.",
    ),
    _option(
        "-s",
        "--schedule-filename",
        "--schedule",
        "schedule",
        group=_BEAT,
        help="Beat's store of last-run times (beat_schedule_filename).  [default: DATA_DIR/beat]",
    ),
    _option("--scheduler", group=_BEAT, help="Beat's scheduler class (a Celery app only)."),
    _option("-f", "--logfile", group=_DAEMON, help="Log destination; defaults to stderr."),
    _option("--pidfile", group=_DAEMON, help="PID file path; defaults to no PID file."),
    _option("--uid", group=_DAEMON, help="Drops privileges to this user ID."),
    _option("--gid", group=_DAEMON, help="Drops privileges to this group ID."),
    _option(
        "--umask",
        callback=_umask,
        group=_DAEMON,
        help="Create files and directories with this umask (octal with a leading 0).",
    ),
    _option(
        "--executable",
        group=_DAEMON,
        help="Override path to the Python executable (with -D).",
    ),
)

#: Celery 5 refuses its global options after ``worker``; so does greenworker, saying where
#: they go.
_MISPLACED_GLOBAL_OPTIONS: tuple[Callable[[Any], Any], ...] = tuple(
    click.option(
        *decls,
        is_flag=flag,
        hidden=True,
        expose_value=False,
        callback=_global_option_after_worker,
    )
    for decls, flag in (
        (("-A", "--app"), False),
        (("-b", "--broker"), False),
        (("--result-backend",), False),
        (("--data-dir",), False),
        (("--workdir",), False),
        (("--config",), False),
        (("--loader",), False),
        (("-q", "--quiet"), True),
        (("-C", "--no-color"), True),
        (("--skip-checks",), True),
    )
)


def _with_options(options: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    """Apply click options as if stacked as decorators, first listed first in ``--help``."""

    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@dataclass(frozen=True)
class WorkerOptions:
    """The worker's options, as parsed (``None``: not given)."""

    hostname: str | None
    detach: bool
    statedb: str | None
    loglevel: str | None
    log_format: str | None
    optimization: str | None
    prefetch_multiplier: int | None
    disable_prefetch: bool
    concurrency: int | None
    pool: green.HubName | None
    task_events: bool
    time_limit: float | None
    soft_time_limit: float | None
    max_tasks_per_child: int | None
    pool_start_method: str | None
    max_memory_per_child: int | None
    soft_shutdown_timeout: float | None
    purge: bool
    queues: list[str] | None
    exclude_queues: list[str] | None
    include: list[str] | None
    without_gossip: bool
    without_mingle: bool
    without_heartbeat: bool
    heartbeat_interval: float | None
    autoscale: tuple[int, int] | None
    metrics_port: int | None
    metrics_bind: str | None
    embed_beat: bool
    schedule: str | None
    scheduler: str | None
    logfile: str | None
    pidfile: str | None
    uid: str | None
    gid: str | None
    umask: int | None
    executable: str | None


#: Worker options that mean something before another command too: the hub and logging.
_OPTIONS_OF_EVERY_COMMAND = ("pool", "loglevel")


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def _option_name(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return "/".join(param.opts)


@click.group(
    cls=_Main,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@_with_options(_GLOBAL_OPTIONS + _WORKER_OPTIONS)
@click.version_option(__version__, prog_name="greenworker")
@click.pass_context
def main(
    ctx: click.Context,
    /,
    app_spec: str | None,
    broker: str | None,
    result_backend: str | None,
    data_dir: str | None,
    quiet: bool,
    no_color: bool,
    config: str | None,
    loader: str | None,
    skip_checks: bool,
    **worker: Any,
) -> None:
    """Run a worker (greenworker -A proj worker ..., or the same without "worker"), or
    another command.  The global options go before the command."""
    if ctx.resilient_parsing:
        return
    # what celery's command does with these three, for a Celery app to read
    for variable, value in (
        ("CELERY_CONFIG_MODULE", config),
        ("CELERY_LOADER", loader),
        ("CELERY_SKIP_CHECKS", "true" if skip_checks else None),
    ):
        if value:
            os.environ[variable] = value
    ctx.obj = AppLoader(app_spec, broker, result_backend, data_dir, config=config, loader=loader)
    command = ctx.invoked_subcommand
    if command is None:
        _worker(ctx.obj, quiet, WorkerOptions(**worker))
        return
    if command == "worker":
        return  # the worker command takes the worker options given here too
    for name in worker:
        if name not in _OPTIONS_OF_EVERY_COMMAND and _given(ctx, name):
            raise CLIError(
                f"{_option_name(ctx, name)} is a worker option; {command} does not use it"
            )
    _patch(worker["pool"])
    logging.basicConfig(level=(worker["loglevel"] or "INFO").upper(), format=LOG_FORMAT)
    # the command loads the app once its own options (and --help) are parsed


@main.command("worker")
@_with_options(_WORKER_OPTIONS + _MISPLACED_GLOBAL_OPTIONS)
@click.pass_context
def worker_command(ctx: click.Context, /, **options: Any) -> None:
    """Start worker instance.

    \b
    Examples
    --------

    \b
    $ greenworker --app=proj worker -l INFO
    $ greenworker -A proj worker -l INFO -Q hipri,lopri
    $ greenworker -A proj worker --concurrency=1000 -P eventlet
    $ greenworker -A proj worker --autoscale=100,10
    """
    main_ctx = ctx.parent
    assert main_ctx is not None
    # an option given after `worker` wins over the same one given before it
    for name in options:
        if not _given(ctx, name) and _given(main_ctx, name):
            options[name] = main_ctx.params[name]
    _worker(ctx.obj, main_ctx.params["quiet"], WorkerOptions(**options))


def _patch(hub: green.HubName | None) -> None:
    try:
        green.patch(hub or "gevent")
    except green.HubError as exc:
        raise CLIError(str(exc)) from None


def _worker(loader: AppLoader, quiet: bool, options: WorkerOptions) -> None:
    """Patch, log, load the app, run the worker; restart in place when it asks."""
    from .worker.signals import restart_in_place

    _patch(options.pool)
    from .daemon import already_detached
    from .observe.logs import early_handler

    early = early_handler()  # the root logger stays the app's to configure on import
    app = loader.load(worker=True)
    try:
        restart = _run_worker(app, options, quiet, early)
    except click.ClickException as exc:
        if already_detached():  # stderr is /dev/null: say it in the log file
            log.error("%s", exc.format_message())
        raise
    finally:
        app.close()
    if restart:
        restart_in_place(cwd=_LAUNCH_DIR)


@dataclass(frozen=True)
class _WorkerPlan:
    """What the options resolve to once the app is loaded."""

    hostname: str
    queues: list[str]
    prefetch_multiplier: int | None
    autoscale: tuple[int, int] | None
    pidfile: str | None
    logfile: str | None
    metrics: tuple[str, int] | None  # where the metrics are served: (address, port)
    notes: list[tuple[int, str]]  # (logging level, line), said once the log is set up


def _run_worker(app: App, options: WorkerOptions, quiet: bool, early: logging.Handler) -> bool:
    """Run the worker until it stops; True if the process should restart in place."""
    from .daemon import DaemonError, PidfileInUse
    from .exceptions import BeatError, ImproperlyConfigured, MetricsError
    from .worker.signals import SignalSupervisor
    from .worker.store import StoreError

    try:
        plan = _plan(app, options)
        _prepare_process(options, plan)
        _setup_logging(app, options, plan, early)
        worker = app.Worker(
            concurrency=options.concurrency,
            queues=plan.queues,
            hostname=plan.hostname,
            prefetch_multiplier=plan.prefetch_multiplier,
            autoscale=plan.autoscale,
            beat=options.embed_beat,
        )
        for level, line in plan.notes:
            log.log(level, "%s", line)
        if options.purge:
            _purge_before_start(app, plan.queues)
        if not quiet:
            _print_banner(app, worker)
        supervisor = SignalSupervisor(
            warm_stop=functools.partial(_warm_stop, worker),
            cold_stop=functools.partial(worker.stop, 0),
            running_tasks=lambda: worker.pool.active,
            on_shutdown=_shutdown_listener(app, worker.hostname),
        )
        supervisor.install()
        worker.start(ready_timeout=None)
        supervisor.deliver()
        worker.wait_stopped()
    except PidfileInUse as exc:
        raise CannotCreate(str(exc)) from None
    except MetricsError as exc:  # its port is taken: the usage was right
        raise CommandFailed(str(exc)) from None
    except (StoreError, BeatError, ImproperlyConfigured, ValueError, DaemonError) as exc:
        raise CLIError(str(exc)) from None
    if worker.fatal is not None:
        raise SystemExit(1)  # said already, in one CRITICAL line
    if not (supervisor.restart or worker.restart_reason is not None):
        return False
    # a SIGTERM during the stop for a limit, or from now to the exec: no restart
    return not supervisor.hold_for_restart()


def _warm_stop(worker: Worker) -> None:
    if worker.restart_reason is None:  # else a warm stop (for a limit) is under way already
        worker.request_stop()


def _plan(app: App, options: WorkerOptions) -> _WorkerPlan:
    """Apply the options to ``app.conf``; resolve names, queues and paths; import -I."""
    conf = app.conf
    notes: list[tuple[int, str]] = []
    if options.soft_shutdown_timeout is not None:
        conf.worker_shutdown_timeout = options.soft_shutdown_timeout
    if options.soft_time_limit is not None:
        conf.task_soft_time_limit = options.soft_time_limit
    if options.time_limit is not None:
        conf.task_time_limit = options.time_limit
    if options.max_tasks_per_child is not None:
        conf.worker_max_tasks_per_child = options.max_tasks_per_child
    if options.max_memory_per_child is not None:
        conf.worker_max_memory_per_child = options.max_memory_per_child
    if options.task_events:
        conf.worker_send_task_events = True
    if options.without_gossip:
        conf.worker_enable_gossip = False
    if options.without_mingle:
        conf.worker_enable_mingle = False
    if options.heartbeat_interval is not None:
        conf.worker_heartbeat = options.heartbeat_interval
    if options.without_heartbeat:
        conf.worker_heartbeat = 0
    if options.metrics_port is not None:
        conf.worker_metrics_port = options.metrics_port
    if options.metrics_bind is not None:
        conf.worker_metrics_bind = options.metrics_bind
    if options.schedule is not None:
        conf.beat_schedule_filename = options.schedule
    if options.scheduler is not None:
        conf.beat_scheduler = options.scheduler
    _check_scheduler(app, option_given=options.scheduler is not None, beat_runs=options.embed_beat)
    if options.hostname:
        hostname = expand_node_name(_celery_node_name(options.hostname, app.node_name_default))
    elif conf.worker_hostname:
        hostname = expand_node_name(conf.worker_hostname, what="worker_hostname")
    else:
        hostname = app.hostname
    state_db = options.statedb if options.statedb is not None else conf.worker_state_db
    if state_db:
        conf.worker_state_db = expand_node_path(state_db, hostname, "-S/--statedb")
    queues = _consumed_queues(options.queues or [conf.task_default_queue], options.exclude_queues)
    prefetch = options.prefetch_multiplier
    if options.disable_prefetch:
        if prefetch not in (None, 1):
            raise CLIError(f"--disable-prefetch and --prefetch-multiplier {prefetch} disagree")
        prefetch = 1
    autoscale = options.autoscale
    if autoscale is not None and autoscale[1] == 0:
        autoscale = (autoscale[0], 1)
        notes.append((logging.INFO, "--autoscale: MIN 0 keeps 1 greenlet (idle, it costs nothing)"))
    if options.optimization is not None:
        notes.append(
            (
                logging.INFO,
                f"-O {options.optimization}: greenworker always dispatches fairly (a free "
                "greenlet takes the next message; prefetch is concurrency x multiplier)",
            )
        )
    notes.extend((logging.WARNING, line) for line in _unused_options(options))
    _import_includes(options.include)
    return _WorkerPlan(
        hostname=hostname,
        queues=queues,
        prefetch_multiplier=prefetch,
        autoscale=autoscale,
        pidfile=expand_node_path(options.pidfile, hostname, "--pidfile")
        if options.pidfile
        else None,
        logfile=expand_node_path(options.logfile, hostname, "-f/--logfile")
        if options.logfile
        else None,
        metrics=None
        if conf.worker_metrics_port is None
        else (conf.worker_metrics_bind, conf.worker_metrics_port),
        notes=notes,
    )


def _celery_node_name(value: str, default_name: str) -> str:
    """Celery's -n, as its ``default_nodename`` reads it: without ``@`` the host part,
    with the app's default name (``celery@box`` for a Celery app); an empty part is the
    default name, or this machine's host name."""
    name, at, host = value.partition("@")
    if not at:
        name, host = "", value
    return f"{name or default_name}@{host or socket.gethostname()}"


def _consumed_queues(queues: list[str], excluded: list[str] | None) -> list[str]:
    if not excluded:
        return queues
    unknown = [name for name in excluded if name not in queues]
    if unknown:  # Celery says nothing; greenworker says it once
        log.warning(
            "-X/--exclude-queues: %s not consumed anyway (the queues: %s)",
            ", ".join(unknown),
            ", ".join(queues),
        )
    kept = [name for name in queues if name not in excluded]
    if not kept:
        raise CLIError(f"-X/--exclude-queues leaves no queue to consume (of {', '.join(queues)})")
    return kept


def _run_celery_beat(app: App, schedule_path: str | None, max_interval: float | None) -> None:
    """``greenworker -A proj beat`` for a Celery app: Celery's beat, on the green hub."""
    from .celery.app import CeleryApp
    from .celery.beat import BeatError, run_forever

    assert isinstance(app, CeleryApp)
    click.echo(f"greenworker {__version__} beat · Celery app {app.main}", err=True)
    try:
        run_forever(
            app.celery,
            scheduler=app.conf.beat_scheduler,
            schedule_path=schedule_path,
            max_interval=max_interval,
        )
    except BeatError as exc:
        raise CLIError(str(exc)) from None


def _shutdown_listener(app: App, hostname: str) -> Callable[[str, str], object]:
    """An app hears of a shutdown as under Celery (``worker_shutting_down``): a Celery
    app from Celery's signal, a greenworker App from :mod:`greenworker.signals`."""
    if not _runs_celery_app(app):
        from .worker.task_signals import shutting_down as app_shutting_down

        return functools.partial(app_shutting_down, hostname)
    from .celery.signals import shutting_down

    return functools.partial(shutting_down, hostname)


def _runs_celery_app(app: App) -> bool:
    """A celery.Celery app, run through :mod:`greenworker.celery`."""
    return type(app).__module__.startswith("greenworker.celery")


def _check_scheduler(app: App, *, option_given: bool, beat_runs: bool) -> None:
    """A beat scheduler class is Celery's: a greenworker App runs its own schedule."""
    if app.conf.beat_scheduler is None or _runs_celery_app(app):
        return
    if option_given:
        raise CLIError("--scheduler needs a Celery app")
    if beat_runs:
        raise CLIError("beat_scheduler needs a Celery app (a greenworker App runs beat_schedule)")


def _unused_options(options: WorkerOptions) -> list[str]:
    """One line for each option accepted from Celery's command line that does nothing here."""
    lines = []
    if options.pool_start_method is not None:
        lines.append(
            f"--pool-start-method {options.pool_start_method}: ignored; greenworker starts "
            "no pool processes (green threads in one process)"
        )
    if not options.embed_beat:
        for given, name in (
            (options.schedule, "-s/--schedule"),
            (options.scheduler, "--scheduler"),
        ):
            if given is not None:
                lines.append(f"{name}: ignored without -B/--beat")
    if options.executable is not None and not options.detach:
        lines.append("--executable: ignored without -D/--detach")
    return lines


def _import_includes(modules: list[str] | None) -> None:
    for name in modules or ():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise CLIError(f"-I/--include: cannot import module {name!r}: {exc}") from None
        except Exception as exc:  # a failing import-time statement
            raise CLIError(
                f"-I/--include: module {name!r} failed to import: {type(exc).__name__}: {exc}"
            ) from None


def _prepare_process(options: WorkerOptions, plan: _WorkerPlan) -> None:
    """The umask, the user and group, -D, the pid file and the log file, in Celery's order."""
    from .daemon import Pidfile, already_detached, check_logfile, detach, drop_privileges
    from .worker.signals import restart_in_place

    if options.umask is not None:
        os.umask(options.umask)
    drop_privileges(options.uid, options.gid)
    pidfile = Pidfile(plan.pidfile) if plan.pidfile else None
    if options.detach and not already_detached():
        # what would fail in the daemon fails here, on the terminal
        if pidfile is not None:
            pidfile.check_writable()
        if plan.metrics is not None:
            from .observe.metrics import check_port  # needs prometheus_client, said here too

            check_port(*plan.metrics)
        if plan.logfile is not None:
            check_logfile(plan.logfile)
        else:
            log.warning("-D/--detach without -f/--logfile: the worker's log goes to /dev/null")
        environ = detach()
        restart_in_place(cwd=_LAUNCH_DIR, executable=options.executable, environ=environ)
    if pidfile is not None:
        pidfile.acquire()


def _setup_logging(
    app: App, options: WorkerOptions, plan: _WorkerPlan, early: logging.Handler
) -> None:
    """-l, -f (reopened when logrotate moves it), --log-format, the log settings."""
    from .daemon import check_logfile
    from .observe.logs import configure

    conf = app.conf
    if plan.logfile is not None:
        check_logfile(plan.logfile)
    configure(
        level=options.loglevel or "INFO",
        logfile=plan.logfile,
        json_lines=options.log_format == "json"
        if options.log_format is not None
        else conf.worker_log_json,
        worker=plan.hostname,
        hijack=conf.worker_hijack_root_logger,
        text_format=conf.worker_log_format,
        datefmt=conf.worker_log_datefmt,
        early=early,
        warn=log.warning,
    )


def _purge_before_start(app: App, queues: list[str]) -> None:
    with _broker_connection(app) as conn:
        count = _purge_queues(app, conn, queues)
    log.info("purge: Erased %d %s from the queue.", count, "message" if count == 1 else "messages")


def _purge_queues(app: App, conn: Connection, names: list[str]) -> int:
    total = 0
    for name in names:
        queue = app.queue(name)(conn.default_channel)
        queue.declare()
        total += queue.purge() or 0
    return total


@dataclass
class AppLoader:
    """Loads the user's app when a command needs it (after the hub patched the process)."""

    spec: str | None
    broker: str | None
    backend: str | None
    data_dir: str | None
    #: --config: a settings module, applied before -b and --result-backend.
    config: str | None = None
    #: --loader: a Celery app's loader (celery's CELERY_LOADER); a greenworker App has none.
    loader: str | None = None

    def load(self, *, worker: bool = False) -> App:
        """The app with the command line's settings applied, its URLs checked: the
        broker's, and for a ``worker`` the result backend's too."""
        from .config import ConfigError
        from .exceptions import ImproperlyConfigured
        from .loader import load_app

        if not self.spec:
            raise CLIError("missing -A/--app MODULE[:ATTR] (the module that defines your App)")
        try:
            app = load_app(self.spec)
        except ImproperlyConfigured as exc:
            raise CLIError(str(exc)) from None
        except ConfigError as exc:
            raise CLIError(f"bad configuration in {self.spec}: {exc}") from None
        if not _runs_celery_app(app):  # a Celery app read both from the environment
            if self.loader:
                log.warning("--loader %s: ignored; a greenworker App has no loader", self.loader)
            if self.config:
                try:
                    app.conf.update(self.config)
                except ConfigError as exc:
                    raise CLIError(f"--config {self.config}: {exc}") from None
        if self.broker:
            app.conf.broker_url = self.broker
        if self.backend:
            app.conf.result_backend = self.backend
        if self.data_dir:
            app.conf.data_dir = self.data_dir
        try:
            app.check_client_libraries()  # one line naming the extra, not an ImportError
            app.check_urls(backend=worker)
        except (ImproperlyConfigured, ConfigError) as exc:
            raise CLIError(str(exc)) from None
        return app


def _printable(value: Any) -> Any:
    """A JSON-printable stand-in for a typed result (datetime, Decimal, UUID, bytes)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _connection_errors(app: App) -> tuple[type[BaseException], ...]:
    """What a broker (or a Redis result backend) that cannot be reached raises."""
    from kombu.exceptions import OperationalError

    errors: tuple[type[BaseException], ...] = (OperationalError, ConnectionError)
    errors += tuple(app.connection().connection_errors)  # the transport's own (redis-py's...)
    redis = sys.modules.get("redis")  # loaded only when a Redis broker or backend is used
    if redis is not None:
        errors += (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    return errors


@contextmanager
def _broker_connection(app: App) -> Iterator[Connection]:
    """A connection to the broker, connected.  A broker that cannot be reached is one
    line on stderr and exit status 1, said within about a second (three attempts)
    rather than after kombu's default retries."""
    from kombu.utils.url import maybe_sanitize_url

    from .exceptions import ImproperlyConfigured

    try:
        errors = _connection_errors(app)
    except ImproperlyConfigured as exc:  # a broker setting that cannot work
        raise CLIError(str(exc)) from None
    try:
        with app.connection() as conn:
            conn.ensure_connection(
                max_retries=2, interval_start=0.25, interval_step=0.25, interval_max=0.5
            )
            yield conn
    except errors as exc:
        where = maybe_sanitize_url(app.broker_url)
        raise CommandFailed(f"broker unreachable ({where}): {exc}") from None


def _require_remote_control(app: App, message: str = NO_REMOTE_CONTROL) -> None:
    """kombu's filesystem transport has no fanout between processes:
    a worker on it serves no mailbox and sends no events, so asking it would only time out."""
    if app.broker_url.split("://", 1)[0] == "filesystem":
        raise CLIError(message)


def _print_banner(app: App, worker: Worker) -> None:
    from kombu.utils.url import maybe_sanitize_url

    lines = [
        f"greenworker {__version__} · {worker.hostname}",
        f"  app:         {app.main}",
        f"  hub:         {green.hub_name()}, concurrency {worker.describe_concurrency()}",
        f"  broker:      {maybe_sanitize_url(app.broker_url)}"
        + (f" (embedded, {app.data_dir})" if app.embedded else ""),
        f"  results:     {maybe_sanitize_url(app.result_backend_url or 'disabled')}",
        f"  queues:      {', '.join(worker.queues)}",
        f"  tasks:       {len(app.tasks)} registered",
        f"  acks:        {_describe_acks(app)}",
    ]
    if _runs_celery_app(app):
        lines[1] += " (a Celery app: each task runs through Celery's tracer)"
    click.echo("\n".join(lines), err=True)


def _describe_acks(app: App) -> str:
    if not app.conf.task_acks_late:
        return "early, before the task runs (task_acks_late = False)"
    said = "late, after the task ends (at-least-once)"
    if _runs_celery_app(app):
        from .celery.app import CeleryApp

        if isinstance(app, CeleryApp) and not app.acks_set_by_app:
            said += "; greenworker's default, as the app sets no task_acks_late"
    return said


@main.command()
@click.argument("name")
@click.option("--args", "args_json", metavar="JSON", help="Positional arguments as a JSON array.")
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("-Q", "--queue", help="Queue to send to.  [default: celery]")
@click.option("--countdown", type=float, help="Run no sooner than this many seconds from now.")
@click.option("--expires", type=float, help="Discard if not started within this many seconds.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="With --wait: give up after this many seconds.",
)
@click.pass_obj
def call(
    loader: AppLoader,
    name: str,
    args_json: str | None,
    kwargs_json: str | None,
    queue: str | None,
    countdown: float | None,
    expires: float | None,
    wait: bool,
    timeout: float,
) -> None:
    """Send task NAME and print its id (or, with --wait, its result)."""
    from .exceptions import ImproperlyConfigured
    from .exceptions import TimeoutError as ResultTimeout

    app = loader.load()
    args = _json_arg(args_json, "args", list)
    kwargs = _json_arg(kwargs_json, "kwargs", dict)
    try:
        with _broker_connection(app):  # sends on the app's own producer: this fails fast
            try:
                result = app.send_task(
                    name, args, kwargs, queue=queue, countdown=countdown, expires=expires
                )
            except ValueError as exc:
                raise CLIError(str(exc)) from None
        if not wait:
            click.echo(result.id)
            return
        try:
            value = result.get(timeout=timeout, propagate=False)
            state = result.state
        except ResultTimeout:
            target = queue or app.conf.task_default_queue
            raise CommandFailed(
                f"no result for {result.id} after {timeout:g}s; "
                f"no worker may be consuming queue {target!r}"
            ) from None
        except ImproperlyConfigured as exc:
            raise CLIError(f"sent {result.id}, but cannot wait for it: {exc}") from None
        except _connection_errors(app) as exc:
            raise CommandFailed(
                f"sent {result.id}, but the result backend is unreachable: {exc}"
            ) from None
    finally:
        app.close()
    if state == "SUCCESS":
        click.echo(json.dumps(value, default=_printable))
        return
    click.echo(f"{state}: {value!r}", err=True)
    sys.exit(1)


@main.command()
@click.option("-Q", "--queues", help="Comma-separated queues to purge.  [default: celery]")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(loader: AppLoader, queues: str | None, force: bool) -> None:
    """Delete every waiting message from the queues."""
    app = loader.load()
    names = [q.strip() for q in (queues or app.conf.task_default_queue).split(",") if q.strip()]
    if not force and not click.confirm(f"Delete all messages in {', '.join(names)}?"):
        raise SystemExit(1)
    try:
        with _broker_connection(app) as conn:
            total = _purge_queues(app, conn, names)
    finally:
        app.close()
    click.echo(f"purged {total} message(s) from {', '.join(names)}")


@main.command()
@click.argument("path", type=click.Path(file_okay=False))
@click.argument("action", type=click.Choice(["show", "compact", "clear"]))
@click.option("-f", "--force", is_flag=True, help="clear: do not ask for confirmation.")
def statedb(path: str, action: str, force: bool) -> None:
    """Inspect or maintain the LMDB state store at PATH (stop the worker first)."""
    from .worker.store import StateStore, StoreError

    if not os.path.isdir(path):
        raise CLIError(f"no state store at {path}")
    store = StateStore(path)
    try:
        store.open()
    except StoreError as exc:
        raise CLIError(str(exc)) from None
    try:
        if action == "show":
            click.echo(json.dumps(store.summary(), indent=2, sort_keys=True))
        elif action == "compact":
            before, after = store.compact()
            click.echo(f"compacted {path}: {before} -> {after} bytes")
        else:
            if not force and not click.confirm(
                f"Delete revoked ids, hub blockers, counters and clock in {path}?"
            ):
                raise SystemExit(1)
            store.clear()
            click.echo(f"cleared {path}")
    finally:
        store.close()


@main.command()
@click.argument("path", type=click.Path(file_okay=False))
@click.argument("action", type=click.Choice(["show", "compact"]))
def brokerdb(path: str, action: str) -> None:
    """Inspect or compact the embedded broker's store: PATH is the data directory (or
    its broker folder).  Compact with the workers and producers stopped."""
    from .transport.lmdb_store import BrokerStoreError, open_store

    store_dir = os.path.join(path, "broker")
    if not os.path.isfile(os.path.join(store_dir, "data.mdb")):
        store_dir = path
    if not os.path.isfile(os.path.join(store_dir, "data.mdb")):
        raise CLIError(f"no embedded broker store at {path}")
    try:
        store = open_store(store_dir)
        if action == "show":
            click.echo(json.dumps(store.summary(), indent=2, sort_keys=True))
        else:
            before, after = store.compact()
            click.echo(f"compacted {store_dir}: {before} -> {after} bytes")
    except BrokerStoreError as exc:
        raise CLIError(str(exc)) from None


INSPECT_COMMANDS = (
    "ping",
    "stats",
    "active",
    "reserved",
    "scheduled",
    "revoked",
    "registered",
    "query_task",
    "active_queues",
    "conf",
    "report",
    "clock",
    "memsample",
    "memdump",
    "objgraph",
)
CONTROL_COMMANDS = (
    "revoke",
    "revoke_by_stamped_headers",
    "terminate",
    "rate_limit",
    "time_limit",
    "pool_grow",
    "pool_shrink",
    "autoscale",
    "add_consumer",
    "cancel_consumer",
    "enable_events",
    "disable_events",
    "heartbeat",
    "shutdown",
    "pool_restart",
)


def _remote(
    loader: AppLoader,
    name: str,
    arguments: dict[str, Any],
    destination: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    from .control.mailbox import broadcast

    app = loader.load()
    _require_remote_control(app)
    targets = [d.strip() for d in destination.split(",")] if destination else None
    try:
        with _broker_connection(app) as conn:
            replies = broadcast(conn, name, arguments, destination=targets, timeout=timeout)
    finally:
        app.close()
    merged: dict[str, Any] = {}
    for reply in replies:
        merged.update(reply)
    if as_json:
        click.echo(json.dumps(merged, indent=2, sort_keys=True, default=str))
    else:
        for host in sorted(merged):
            value = merged[host]
            failed = isinstance(value, dict) and "error" in value
            click.echo(f"-> {host}: {'ERROR' if failed else 'OK'}")
            click.echo(_readable(value))
        click.echo(f"{len(merged)} node(s) replied.")
    if not merged:
        click.echo("Error: no node replied within the timeout", err=True)
        sys.exit(1)


def _readable(value: Any) -> str:
    if isinstance(value, dict) and set(value) <= {"ok", "error"}:
        return "    " + str(next(iter(value.values()))).replace("\n", "\n    ")
    if isinstance(value, list):
        if not value:
            return "    - empty -"
        return "\n".join(
            "    * " + (v if isinstance(v, str) else json.dumps(v, default=str)) for v in value
        )
    return "\n".join(
        "    " + line
        for line in json.dumps(value, indent=2, sort_keys=True, default=str).splitlines()
    )


def _parse_arguments(pairs: tuple[str, ...]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise CLIError(f"--arg takes KEY=VALUE, got {pair!r}")
        try:
            args[key] = json.loads(raw)
        except json.JSONDecodeError:
            args[key] = raw
    return args


_reply_timeout_option = click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds to wait for replies.",
)
_destination_option = click.option(
    "-d", "--destination", help="Comma-separated worker names (default: all)."
)
_remote_options = [
    _destination_option,
    _reply_timeout_option,
    click.option("-j", "--json", "as_json", is_flag=True, help="Print the replies as JSON."),
]


def _with_remote_options(fn: Any) -> Any:
    for option in reversed(_remote_options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("name", type=click.Choice(INSPECT_COMMANDS))
@click.argument("ids", nargs=-1)
@_with_remote_options
@click.pass_obj
def inspect(
    loader: AppLoader,
    name: str,
    ids: tuple[str, ...],
    destination: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Ask workers about their state (Celery's inspect commands; IDS for query_task)."""
    arguments: dict[str, Any] = {"ids": list(ids)} if name == "query_task" else {}
    _remote(loader, name, arguments, destination, timeout, as_json)


@main.command()
@click.argument("name", type=click.Choice(CONTROL_COMMANDS))
@click.argument("params", nargs=-1)
@click.option(
    "--arg",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A named argument (JSON value), e.g. --arg terminate=true.",
)
@_with_remote_options
@click.pass_obj
def control(
    loader: AppLoader,
    name: str,
    params: tuple[str, ...],
    pairs: tuple[str, ...],
    destination: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Steer workers (Celery's control commands).

    \b
    Positional PARAMS, as in Celery's CLI:
      revoke ID...            rate_limit TASK RATE      time_limit TASK SOFT HARD
      pool_grow N             pool_shrink N             add_consumer QUEUE
      cancel_consumer QUEUE   autoscale MAX MIN         terminate SIGNAL ID...
      revoke_by_stamped_headers NAME=VALUE...
    """
    arguments = _parse_arguments(pairs)
    p = list(params)
    try:
        if name == "revoke":
            arguments.setdefault("task_id", p)
        elif name == "revoke_by_stamped_headers":
            if not p or any("=" not in pair for pair in p):
                raise ValueError
            arguments.setdefault("headers", p)
        elif name == "terminate":
            arguments.update(signal=p[0], task_id=p[1:])
        elif name == "rate_limit":
            arguments.update(task_name=p[0], rate_limit=p[1])
        elif name == "time_limit":
            arguments.update(
                task_name=p[0], soft=float(p[1]), hard=float(p[2]) if len(p) > 2 else None
            )
        elif name in ("pool_grow", "pool_shrink"):
            arguments.setdefault("n", int(p[0]) if p else 1)
        elif name in ("add_consumer", "cancel_consumer"):
            arguments.setdefault("queue", p[0])
        elif name == "autoscale":
            arguments.update(max=int(p[0]), min=int(p[1]))
    except (IndexError, ValueError):
        raise CLIError(f"bad parameters for {name}: {' '.join(p) or '(none)'}") from None
    _remote(loader, name, arguments, destination, timeout, as_json)


@main.command()
@click.option(
    "-s",
    "--schedule",
    "schedule_path",
    type=click.Path(file_okay=False),
    help="LMDB store of last-run times.  [default: beat_schedule_filename, or DATA_DIR/beat]",
)
@click.option(
    "--max-interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Wake at least this often (s).  [default: beat_max_loop_interval, 300]",
)
@click.option(
    "-S",
    "--scheduler",
    help="A Celery app's scheduler class (module:Class, or an alias such as django).  "
    "[default: beat_scheduler; greenworker's LMDBScheduler for Celery's shelve one]",
)
@click.pass_obj
def beat(
    loader: AppLoader,
    schedule_path: str | None,
    max_interval: float | None,
    scheduler: str | None,
) -> None:
    """Run beat alone: send the app's periodic tasks when they fall due (Ctrl-C to stop)."""
    import signal

    from .beat import beat_store_path, run_beat
    from .exceptions import ImproperlyConfigured
    from .worker.store import StoreError

    app = loader.load()
    if scheduler is not None:
        app.conf.beat_scheduler = scheduler
    if _runs_celery_app(app):
        _run_celery_beat(app, schedule_path, max_interval)
        return
    _check_scheduler(app, option_given=scheduler is not None, beat_runs=True)
    if schedule_path:
        app.conf.beat_schedule_filename = schedule_path
    if max_interval is not None:
        app.conf.beat_max_loop_interval = max_interval
    stop = green.new_event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        green.on_signal(signum, stop.set)
    click.echo(
        f"greenworker {__version__} beat · app {app.main} · schedule {beat_store_path(app)}",
        err=True,
    )
    try:
        sent = run_beat(app, stop)
    except (StoreError, ImproperlyConfigured) as exc:
        raise CLIError(str(exc)) from None
    finally:
        app.close()
    logging.getLogger("greenworker.beat").info("beat stopped after sending %d task(s)", sent)


_interval_option = click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between two refreshes of the live view.  [default: 1]",
)


@main.command()
@_reply_timeout_option
@_destination_option
@click.option("-w", "--watch", is_flag=True, help="A live view, refreshed until Ctrl-C.")
@_interval_option
@click.pass_obj
def status(
    loader: AppLoader,
    timeout: float,
    destination: str | None,
    watch: bool,
    interval: float | None,
) -> None:
    """List the workers that answer ping; exit 1 if none does (a health check).
    With --watch: a live view of each worker (see the top command)."""
    from .control.mailbox import broadcast

    if interval is not None and not watch:
        raise CLIError("--interval is for the live view: add --watch")
    if watch:
        _watch(loader, interval or 1.0, timeout, destination)
        return
    app = loader.load()
    _require_remote_control(app)
    targets = [d.strip() for d in destination.split(",")] if destination else None
    try:
        with _broker_connection(app) as conn:
            replies = broadcast(conn, "ping", {}, destination=targets, timeout=timeout)
    finally:
        app.close()
    hosts = sorted(h for reply in replies for h in reply)
    for host in hosts:
        click.echo(f"{host}: OK")
    if not hosts:
        click.echo("Error: no worker answered ping", err=True)
        sys.exit(1)
    click.echo(f"{len(hosts)} node(s) online.")


@main.command()
@_reply_timeout_option
@_destination_option
@_interval_option
@click.pass_obj
def top(loader: AppLoader, timeout: float, destination: str | None, interval: float | None) -> None:
    """A live view of the workers, one line each (status --watch): processed, tasks/s,
    active/pool, reserved, messages waiting per queue; Ctrl-C to stop."""
    _watch(loader, interval or 1.0, timeout, destination)


def _watch(loader: AppLoader, interval: float, timeout: float, destination: str | None) -> None:
    import signal

    from kombu.utils.url import maybe_sanitize_url

    from .control import watch

    app = loader.load()
    _require_remote_control(app)
    targets = [d.strip() for d in destination.split(",")] if destination else None
    with _broker_connection(app):  # an unreachable broker: one line and exit 1, at once
        pass
    stop = green.new_event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        green.on_signal(signum, stop.set)  # exit 0, the terminal restored, no traceback
    sampler = watch.Sampler(app.connection, timeout=min(timeout, interval), destination=targets)
    try:
        watch.run(
            sampler,
            watch.Screen(sys.stdout),
            interval=interval,
            broker=maybe_sanitize_url(app.broker_url),
            connection_errors=_connection_errors(app),
            stop=stop,
        )
    finally:
        app.close()


@main.command()
@click.option("--dump", is_flag=True, help="Print each event as raw JSON.")
@click.option(
    "--count",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after this many events (0: never).",
)
@click.pass_obj
def events(loader: AppLoader, dump: bool, count: int) -> None:
    """Print the live event stream of the workers (Ctrl-C to stop)."""
    import signal

    from kombu.messaging import Consumer
    from kombu.utils.url import maybe_sanitize_url

    from .control.events import event_receiver_queue

    app = loader.load()
    _require_remote_control(app, NO_EVENTS)
    where = maybe_sanitize_url(app.broker_url)
    seen = 0
    done = green.new_event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        green.on_signal(signum, done.set)  # a clean stop and exit 0, not "Aborted!"

    def show(body: Any, message: Any) -> None:
        nonlocal seen
        for event in body if isinstance(body, list) else [body]:
            if done.is_set():
                return  # --count reached inside this batch: the rest stays unprinted
            if not isinstance(event, dict):
                continue
            seen += 1
            if dump:
                click.echo(json.dumps(event, sort_keys=True, default=str))
            else:
                when = time.strftime("%H:%M:%S", time.localtime(event.get("timestamp", 0)))
                what = event.get("uuid") or ""
                extra = event.get("name") or event.get("result") or event.get("exception") or ""
                click.echo(f"{when} {event.get('hostname')} {event.get('type')} {what} {extra}")
            if count and seen >= count:
                done.set()

    try:
        with _broker_connection(app) as conn:
            queue = event_receiver_queue(conn, "greenworker-cli", "#")
            with Consumer(conn, [queue], callbacks=[show], accept=["json"], no_ack=True):
                listening = False
                while not done.is_set():
                    try:
                        # the first wait is short: on Redis it sends the SUBSCRIBE
                        conn.drain_events(timeout=0.5 if listening else 0.01)
                    except TimeoutError:
                        pass
                    if not listening:
                        # subscribed from here on: an event published now is printed
                        click.echo(f"listening for events on {where} (Ctrl-C to stop)", err=True)
                        listening = True
    finally:
        app.close()
