"""The ``greenworker`` command.

``greenworker -A proj [-P gevent|eventlet] [-c N] [-Q q1,q2]`` runs a worker.
Eight subcommands: ``call``, ``purge``, ``inspect``, ``control``, ``status`` and
``events`` act as clients; ``beat`` runs the scheduler alone; ``statedb`` shows,
compacts or clears a state store.  The chosen hub patches the process before the
user's module is imported, so nothing here imports kombu or the app at module
level.
"""

from __future__ import annotations

import functools
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

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(name)s] %(message)s"


class CLIError(click.ClickException):
    """One readable line on stderr and exit code 2; never a traceback."""

    exit_code = 2


class CommandFailed(click.ClickException):
    """One readable line on stderr and exit code 1: the usage was right, the outcome was not
    (a broker that cannot be reached, a result that did not come)."""

    exit_code = 1


NO_REMOTE_CONTROL = "the embedded default has no remote control; use Redis or RabbitMQ"
NO_EVENTS = "the embedded default has no events; use Redis or RabbitMQ"

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


#: The main command's options, in the order ``--help`` lists them.
_MAIN_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option(
        "-A",
        "--app",
        "app_spec",
        metavar="MODULE[:ATTR]",
        help="The app: module (attribute `app`) or module:attr.",
    ),
    click.option(
        "-P",
        "--pool",
        "hub",
        type=click.Choice(green.HUBS),
        default="gevent",
        show_default=True,
        help="The green hub that patches the process.",
    ),
    click.option(
        "-c",
        "--concurrency",
        type=click.IntRange(min=1),
        help="Tasks run at once (greenlets).  [default: worker_concurrency, 100]",
    ),
    click.option("-Q", "--queues", help="Comma-separated queues to consume.  [default: celery]"),
    click.option(
        "-b",
        "--broker",
        help="Broker URL (redis://, amqp://, filesystem://, memory://).  [default: embedded]",
    ),
    click.option("--result-backend", help="Result backend URL (redis://, lmdb:///dir, memory://)."),
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        help="Data directory of the embedded default.  [default: ./.greenworker]",
    ),
    click.option("-n", "--hostname", help="Worker name.  [default: greenworker@<host>]"),
    click.option(
        "--prefetch-multiplier",
        type=click.IntRange(min=1),
        help="Prefetch = concurrency x this.  [default: 4]",
    ),
    click.option(
        "--soft-shutdown-timeout",
        type=click.FloatRange(min=0),
        help="Seconds a warm shutdown waits for running tasks.  [default: 30]",
    ),
    click.option(
        "--autoscale",
        metavar="MAX,MIN",
        help="Grow the pool up to MAX when tasks wait, shrink to MIN when idle.",
    ),
    click.option("-E", "--task-events", is_flag=True, help="Send task events (for Flower)."),
    click.option(
        "-B", "--beat", "embed_beat", is_flag=True, help="Also run beat (periodic tasks) here."
    ),
    click.option("--without-gossip", is_flag=True, help="Do not watch other workers' events."),
    click.option("--without-mingle", is_flag=True, help="Do not sync with the cluster at startup."),
    click.option("--without-heartbeat", is_flag=True, help="Send no worker-heartbeat events."),
    click.option(
        "--statedb",
        type=click.Path(file_okay=False),
        help="LMDB state store directory (revoked ids, hub blockers, counters, clock).  "
        "[default: DATA_DIR/state on the embedded default, none otherwise]",
    ),
    click.option(
        "--soft-time-limit",
        type=click.FloatRange(min=0, min_open=True),
        help="Seconds before SoftTimeLimitExceeded is raised in a task (task_soft_time_limit).",
    ),
    click.option(
        "--time-limit",
        type=click.FloatRange(min=0, min_open=True),
        help="Seconds before a task is killed and fails (task_time_limit).",
    ),
    click.option(
        "-l",
        "--loglevel",
        type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
        default="info",
        show_default=True,
    ),
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
    """The worker's own options of the main command (ignored before a subcommand)."""

    concurrency: int | None
    queues: str | None
    hostname: str | None
    prefetch_multiplier: int | None
    soft_shutdown_timeout: float | None
    autoscale: str | None
    task_events: bool
    embed_beat: bool
    without_gossip: bool
    without_mingle: bool
    without_heartbeat: bool
    statedb: str | None
    soft_time_limit: float | None
    time_limit: float | None


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_with_options(_MAIN_OPTIONS)
@click.version_option(__version__, prog_name="greenworker")
@click.pass_context
def main(
    ctx: click.Context,
    /,
    app_spec: str | None,
    hub: green.HubName,
    broker: str | None,
    result_backend: str | None,
    data_dir: str | None,
    loglevel: str,
    **worker: Any,
) -> None:
    """Run a greenworker worker (with no command), or a client command."""
    if ctx.resilient_parsing:
        return
    try:
        green.patch(hub)
    except green.HubError as exc:
        raise CLIError(str(exc)) from None
    logging.basicConfig(level=loglevel.upper(), format=LOG_FORMAT)
    loader = AppLoader(app_spec, broker, result_backend, data_dir)
    ctx.obj = loader
    if ctx.invoked_subcommand is not None:
        return  # the subcommand loads the app once its own options (and --help) are parsed
    options = WorkerOptions(**worker)
    app = loader.load()
    if options.soft_shutdown_timeout is not None:
        app.conf.worker_shutdown_timeout = options.soft_shutdown_timeout
    try:
        _run_worker(app, options)
    finally:
        app.close()


def _run_worker(app: App, options: WorkerOptions) -> None:
    from .exceptions import ImproperlyConfigured
    from .worker.signals import SignalSupervisor, restart_in_place
    from .worker.store import StoreError

    autoscale = _autoscale_bounds(options.autoscale)
    if options.soft_time_limit is not None:
        app.conf.task_soft_time_limit = options.soft_time_limit
    if options.time_limit is not None:
        app.conf.task_time_limit = options.time_limit
    hostname = options.hostname
    if hostname:
        hostname = expand_node_name(hostname)
    elif app.conf.worker_hostname:
        hostname = expand_node_name(app.conf.worker_hostname, what="worker_hostname")
    state_db = options.statedb if options.statedb is not None else app.conf.worker_state_db
    if state_db:
        app.conf.worker_state_db = expand_node_path(state_db, hostname or app.hostname, "--statedb")
    if options.task_events:
        app.conf.worker_send_task_events = True
    if options.without_gossip:
        app.conf.worker_enable_gossip = False
    if options.without_mingle:
        app.conf.worker_enable_mingle = False
    if options.without_heartbeat:
        app.conf.worker_heartbeat = 0
    try:
        worker = app.Worker(
            concurrency=options.concurrency,
            queues=[q.strip() for q in options.queues.split(",") if q.strip()]
            if options.queues
            else None,
            hostname=hostname,
            prefetch_multiplier=options.prefetch_multiplier,
            autoscale=autoscale,
            beat=options.embed_beat,
        )
        _print_banner(app, worker)
        supervisor = SignalSupervisor(
            warm_stop=worker.request_stop,
            cold_stop=functools.partial(worker.stop, 0),
            running_tasks=lambda: worker.pool.active,
        )
        supervisor.install()
        worker.run()
        if supervisor.restart:
            restart_in_place()
    except (StoreError, ImproperlyConfigured, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _autoscale_bounds(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        high, _, low = value.partition(",")
        bounds = (int(high), int(low) if low else 1)
    except ValueError:
        raise CLIError(f"--autoscale takes MAX,MIN (two integers), got {value!r}") from None
    if not 1 <= bounds[1] <= bounds[0]:
        raise CLIError(f"--autoscale needs 1 <= MIN <= MAX, got {value!r}")
    return bounds


@dataclass
class AppLoader:
    """Loads the user's app when a command needs it (after the hub patched the process)."""

    spec: str | None
    broker: str | None
    backend: str | None
    data_dir: str | None

    def load(self) -> App:
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
        if self.broker:
            app.conf.broker_url = self.broker
        if self.backend:
            app.conf.result_backend = self.backend
        if self.data_dir:
            app.conf.data_dir = self.data_dir
        try:
            app.check_client_libraries()  # one line naming the extra, not an ImportError
        except ImproperlyConfigured as exc:
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

    try:
        with app.connection() as conn:
            conn.ensure_connection(
                max_retries=2, interval_start=0.25, interval_step=0.25, interval_max=0.5
            )
            yield conn
    except _connection_errors(app) as exc:
        where = maybe_sanitize_url(app.broker_url)
        raise CommandFailed(f"broker unreachable ({where}): {exc}") from None


def _require_remote_control(app: App, message: str = NO_REMOTE_CONTROL) -> None:
    """The filesystem transport of the embedded default has no fanout between processes:
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
    ]
    click.echo("\n".join(lines), err=True)


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
    total = 0
    try:
        with _broker_connection(app) as conn:
            for name in names:
                queue = app.queue(name)(conn.default_channel)
                queue.declare()
                total += queue.purge() or 0
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
@click.pass_obj
def beat(loader: AppLoader, schedule_path: str | None, max_interval: float | None) -> None:
    """Run beat alone: send the app's periodic tasks when they fall due (Ctrl-C to stop)."""
    import signal

    from .beat import beat_store_path, run_beat
    from .exceptions import ImproperlyConfigured
    from .worker.store import StoreError

    app = loader.load()
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


@main.command()
@_reply_timeout_option
@_destination_option
@click.pass_obj
def status(loader: AppLoader, timeout: float, destination: str | None) -> None:
    """List the workers that answer ping; exit 1 if none does (a health check)."""
    from .control.mailbox import broadcast

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
