"""The worker: builds its components in order, starts them, stops them in reverse.

Orchestration only: each component gets what it uses, from the constructor.
One message flows consumer -> :class:`~greenworker.worker.handler.MessageHandler`
(decode, validate, ETA hold, rate limit) -> :class:`~greenworker.worker.pool.GreenPool`
-> :class:`~greenworker.worker.executor.Executor` (run, result, ack).

``start()`` returns at once with everything running in background greenlets,
so a program that already monkeypatched can embed a worker.  ``run()`` is the
blocking form the CLI uses.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kombu.utils.url import maybe_sanitize_url

from .. import green
from ..beat import open_embedded_beat
from ..control.cluster import Gossip, Heart, mingle
from ..control.commands import ControlTarget, set_rate_limit, set_time_limit, summary
from ..control.events import EventDispatcher, TaskEvents
from ..control.mailbox import RemoteControl
from ..observe.statsline import StatsLine
from ..transport.base import TaskConsumer
from ..transport.consumer import Consumer
from . import harness
from .autoscale import Autoscaler, ScalingPolicy, start_size
from .canvas import CanvasMiddleware
from .executor import AppTaskRunner, Executor, TaskRunner
from .handler import MessageHandler
from .hooks import Hooks, Middleware
from .pool import GreenPool
from .recycle import ProcessLimits
from .state import RevokedSet, WorkerState
from .store import StateSaver, StateStore
from .task_signals import AppSignals
from .timer import Timer
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..client.app import App
    from ..observe.metrics import WorkerMetrics

log = logging.getLogger("greenworker.worker")


class BeatComponent(Protocol):
    """Beat run by the worker (``-B``): started with it, stopped first when it stops."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """Send nothing more from now on (a warm shutdown has begun)."""
        ...


#: Opens the worker's beat when it starts, before anything runs: given the worker's timer
#: and its open state store (or None), returns the beat and a store of beat's own for
#: the worker to close at stop (or None).  Raises when beat cannot start (a schedule in
#: use by another beat, a bad ``beat_schedule`` entry); the worker's start fails with it.
BeatOpener = Callable[[Timer, StateStore | None], tuple[BeatComponent, StateStore | None]]


class Worker:
    """Runs an app's tasks.  Build with ``app.Worker(concurrency=100, queues=["q"])``."""

    def __init__(
        self,
        app: App,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        hostname: str | None = None,
        prefetch_multiplier: int | None = None,
        middleware: Sequence[Middleware] = (),
        autoscale: tuple[int, int] | None = None,
        autoscale_policy: ScalingPolicy | None = None,
        beat: bool = False,
        task_runner: TaskRunner | None = None,
        app_middleware: Sequence[Middleware] | None = None,
        beat_opener: BeatOpener | None = None,
    ) -> None:
        """``task_runner``, ``app_middleware`` and ``beat_opener`` (what ``beat`` runs) are
        what differs between kinds of app: by default greenworker's own
        (:class:`AppTaskRunner`, canvas callbacks and :mod:`greenworker.signals`,
        :class:`~greenworker.beat.Beat`); a Celery app (:mod:`greenworker.celery`)
        passes Celery's tracer, signals and beat."""
        self.app = app
        conf = app.conf
        self.broker_scheme = app.broker_url.split("://", 1)[0]
        self.concurrency = _pool_size(concurrency, autoscale, conf.worker_concurrency)
        self.queues = list(queues or [conf.task_default_queue])
        self.hostname = hostname or app.hostname
        self.prefetch_multiplier = (
            prefetch_multiplier
            if prefetch_multiplier is not None
            else conf.worker_prefetch_multiplier
        )
        self.state = WorkerState()
        self.state.revoked = RevokedSet(conf.worker_revokes_max, conf.worker_revoke_expires)
        self.timer = Timer()
        self.pool = GreenPool(self.concurrency)
        path = app.state_db_path
        self.store = StateStore(path) if path else None
        self._saver = StateSaver(self.store, self.state) if self.store is not None else None
        self.watchdog = self._build_watchdog()
        self.handler = MessageHandler(
            settings=conf,
            tasks=app.tasks,
            backend=lambda: app.backend,  # opened on first use
            state=self.state,
            timer=self.timer,
            pool=self.pool,
            watchdog=self.watchdog,
            store=self.store,
            broker_scheme=self.broker_scheme,
        )
        self.rate_limiter = self.handler.rate_limiter
        self.consumer: TaskConsumer = self._build_consumer()
        self._background: list[green.Greenlet] = []  # waiting for the broker; ended by stop
        self.autoscaler = self._build_autoscaler(autoscale, autoscale_policy)
        #: The INFO stats line every ``worker_stats_interval`` seconds (None: off).
        self.stats_line = (
            StatsLine(
                timer=self.timer,
                interval=conf.worker_stats_interval,
                hostname=self.hostname,
                state=self.state,
                pool=self.pool,
                eta_held=lambda: self.handler.eta_held,
                reconnects=lambda: self.consumer.reconnects,
            )
            if conf.worker_stats_interval > 0
            else None
        )
        #: Why this worker stopped to be restarted (a ``worker_max_*_per_child`` limit), or
        #: None.  The ``greenworker`` command then restarts the process in place; a
        #: program that embeds the worker decides for itself.
        self.restart_reason: str | None = None
        #: Why this worker stopped because it cannot go on (the broker retry settings gave
        #: up; see :meth:`fatal_error`), or None.  The ``greenworker`` command then exits
        #: with status 1.
        self.fatal: str | None = None
        self.limits = (
            ProcessLimits(
                max_tasks=conf.worker_max_tasks_per_child,
                max_memory_kib=conf.worker_max_memory_per_child,
                reached=self._limit_reached,
            )
            if conf.worker_max_tasks_per_child or conf.worker_max_memory_per_child
            else None
        )
        # Remote control and events need fanout between processes: not on kombu's
        # filesystem transport.
        fanout = self.broker_scheme != "filesystem"
        kind: list[Middleware] = (
            list(app_middleware)
            if app_middleware is not None
            else [CanvasMiddleware(app), AppSignals(conf, app.tasks)]
        )
        #: Prometheus metrics served at ``/metrics`` (``worker_metrics_port``), or None.
        self.metrics = self._build_metrics()
        self._build_events(fanout, kind, middleware)
        self._build_execution(task_runner or AppTaskRunner(lambda: app.backend))
        self._build_control(fanout)
        #: Embedded beat (``-B``): sends the app's periodic tasks from this process.
        self.beat: BeatComponent | None = None
        self._beat_opener: BeatOpener | None = (
            (beat_opener or functools.partial(open_embedded_beat, app)) if beat else None
        )
        self._beat_store: StateStore | None = None
        self._stopped = green.new_event()
        #: Set once mingle has merged the other workers' revoked ids (or was skipped).
        self.mingled = green.new_event()
        self._started = False
        self._stopping = False

    def _build_autoscaler(
        self, autoscale: tuple[int, int] | None, policy: ScalingPolicy | None
    ) -> Autoscaler | None:
        if not autoscale:
            return None
        conf = self.app.conf
        return Autoscaler(
            self.pool,
            self.timer,
            autoscale[0],
            autoscale[1],
            policy=policy,
            interval=conf.worker_autoscale_interval,
            keepalive=conf.worker_autoscale_keepalive,
        )

    def _build_watchdog(self) -> Watchdog:
        app, conf = self.app, self.app.conf
        return Watchdog(
            self.timer,
            self.pool,
            conf.worker_block_threshold,
            conf.worker_block_policy,
            hostname=self.hostname,
            hub_blockers=self.state.hub_blockers,
            store=self.store,
            # the app's backend is opened on first use
            store_result=lambda task_id, meta: app.backend.store(task_id, meta),
            broker_scheme=self.broker_scheme,
            visibility_timeout=conf.broker_transport_options.get("visibility_timeout", 3600),
            # the consumer is built after the handler, which needs the watchdog
            ack_pending=lambda message: self.consumer.ack_pending(message),
        )

    def _build_consumer(self) -> TaskConsumer:
        app = self.app
        if app.native_redis:
            from ..transport.redis_consumer import NativeRedisConsumer  # needs the redis extra

            return NativeRedisConsumer(
                app, self.queues, self.handler.on_message, self._prefetch_count
            )
        if self.broker_scheme == "lmdb":
            from ..transport.lmdb_consumer import NativeLmdbConsumer

            return NativeLmdbConsumer(
                app, self.queues, self.handler.on_message, self._prefetch_count
            )
        return Consumer(app, self.queues, self.handler.on_message, self._prefetch_count)

    def _build_execution(self, runner: TaskRunner) -> None:
        """The executor, and the handler's links to it and to the consumer."""
        self.executor = Executor(
            runner=runner,
            settings=self.app.conf,
            hostname=self.hostname,
            state=self.state,
            hooks=self.hooks,
            timer=self.timer,
            ack=self.consumer.ack,
            reject=self.consumer.reject,
            kill=functools.partial(self.pool.kill, release=True),
        )
        # kombu's consumer on these brokers: what a lost connection held comes back from
        # the broker, and our copies cannot be acked (the native Redis consumer's can)
        lost_with_connection = isinstance(self.consumer, Consumer) and self.broker_scheme not in (
            "filesystem",
            "memory",
        )
        self.handler.attach(
            self.consumer, self.executor, self.hooks, lost_with_connection=lost_with_connection
        )
        self.pool.on_resize(self.consumer.update_prefetch)
        self.consumer.on_unreachable = self._waiting_for_broker
        self.consumer.on_gave_up = self.fatal_error

    def _build_events(
        self, fanout: bool, kind: list[Middleware], middleware: Sequence[Middleware]
    ) -> None:
        """Events, the heartbeat and gossip; the hooks (task events among them)."""
        app, conf, state, consumer = self.app, self.app.conf, self.state, self.consumer
        self.events = (
            EventDispatcher(
                self.hostname,
                app.connection,
                state.clock,
                self.timer,
                task_events=conf.worker_send_task_events,
                broker_ready=lambda: consumer.ready,
            )
            if fanout
            else None
        )
        builtin: list[Middleware] = [*kind]
        if self.events is not None:
            builtin.append(TaskEvents(self.events))
        if self.limits is not None:
            builtin.append(self.limits)
        if self.metrics is not None:
            builtin.append(self.metrics)
        self.hooks: Hooks = Hooks([*builtin, *app.middleware, *middleware])
        self.heart = (
            Heart(
                self.events,
                self.timer,
                conf.worker_heartbeat,
                wait_ready=consumer.wait_ready,
                load=lambda: (self.pool.active, state.processed),
            )
            if self.events is not None and conf.worker_heartbeat > 0
            else None
        )
        self.gossip = (
            Gossip(
                self.hostname,
                app.connection,
                state.clock,
                drain_interval=conf.worker_drain_interval,
                consumer=consumer,
                max_backoff=conf.broker_connection_max_backoff,
            )
            if fanout and conf.worker_enable_gossip
            else None
        )

    def _build_metrics(self) -> WorkerMetrics | None:
        """Prometheus metrics at ``/metrics`` (``worker_metrics_port``), or None when off."""
        conf = self.app.conf
        if conf.worker_metrics_port is None:
            return None
        # ImproperlyConfigured without prometheus_client: only then is it needed
        from ..observe.metrics import WorkerMetrics

        return WorkerMetrics(
            hostname=self.hostname,
            tasks=self.app.tasks,
            stats=self.stats,
            state=self.state,
            eta_held=lambda: self.handler.eta_held,
            bind=conf.worker_metrics_bind,
            port=conf.worker_metrics_port,
        )

    def _build_control(self, fanout: bool) -> None:
        """What remote-control commands read and change, and the mailbox serving them."""
        app, conf, state, consumer = self.app, self.app.conf, self.state, self.consumer
        #: What remote-control commands read and change.
        self.control_target = ControlTarget(
            hostname=self.hostname,
            app_name=app.main,
            broker_url=app.broker_url,
            result_backend_url=app.result_backend_url,
            settings=conf,
            tasks=app.tasks,
            connect=app.connection,
            queue=app.queue,
            state=state,
            pool=self.pool,
            consumer=consumer,
            rate_limiter=self.rate_limiter,
            hub_blocks=self.watchdog.stats,
            prefetch_multiplier=self.prefetch_multiplier,
            revoke=self.revoke,
            request_stop=self.request_stop,
            describe_concurrency=self.describe_concurrency,
            autoscaler=self.autoscaler,
            events=self.events,
            heart=self.heart,
        )
        self.control = (
            RemoteControl(
                self.hostname,
                app.connection,
                self.control_target,
                allow=conf.worker_control_allow,
                drain_interval=conf.worker_drain_interval,
                consumer=consumer,
                max_backoff=conf.broker_connection_max_backoff,
            )
            if fanout and conf.worker_enable_remote_control
            else None
        )

    def __repr__(self) -> str:
        return f"<Worker {self.hostname} c={self.pool.size} queues={self.queues}>"

    # ------------------------------------------------------------ lifecycle

    def start(self, ready_timeout: float | None = 10.0) -> None:
        """Start in background greenlets and wait (up to ``ready_timeout``) until consuming.

        The process must already be monkeypatched; the worker never patches,
        installs signal handlers or configures logging here.
        """
        green.require_patched()
        if self._started:
            return
        if self.store is not None:
            self.store.open()  # StoreLocked / StoreError: nothing else has started yet
            assert self._saver is not None
            self._saver.load()
            self.watchdog.load_blockers()
        try:
            if self._beat_opener is not None:
                self.beat, self._beat_store = self._beat_opener(self.timer, self.store)
            if self.metrics is not None:
                self.metrics.serve()  # MetricsError (its port is taken): nothing runs yet
        except BaseException:
            for store in (self._beat_store, self.store):
                if store is not None:
                    store.close()
            raise
        self._started = True
        self.restart_reason = None
        self.fatal = None
        if self.limits is not None:
            self.limits.start()
        self.handler.accepting = True
        self._stopped.clear()
        if self.app.embedded:
            self.app.purge_expired_results()
        self.timer.start()
        self.watchdog.start()
        if self.autoscaler is not None:
            self.autoscaler.start()
        if self.stats_line is not None:
            self.stats_line.start()
        self.hooks.emit("worker_start", self)
        local_only = self.broker_scheme == "memory"  # no other process to ask
        if self.control is not None and self.app.conf.worker_enable_mingle and not local_only:
            # alongside the start, not before it: a revoke learned from the others applies
            # to every task that starts after the replies (execute() checks at start)
            self._background.append(green.spawn(self._mingle))
        else:
            self.mingled.set()
        self.consumer.start()  # first: the other connections are made while it consumes
        if self.control is not None:
            self.control.start()
        if self.events is not None:
            self.events.start()
        if self.heart is not None:
            self.heart.start()  # worker-online goes out in the background
        if self.gossip is not None:
            self.gossip.start()
        if self.beat is not None:
            self.beat.start()
        self._visibility = self.timer.call_repeatedly(
            self.consumer.visibility_refresh_interval(), self._refresh_visibility
        )
        if self.store is not None:
            self.timer.call_repeatedly(self.app.conf.worker_state_flush_interval, self.flush_state)
        for note in self._startup_notes():
            log.warning("%s", note)
        if ready_timeout:
            self.consumer.wait_ready(ready_timeout)
        # "ready" means consuming: without the broker it is said once it answers
        if self.consumer.ready:
            self._say_ready()
        else:
            self._background.append(green.spawn(self._say_ready_once_consuming))

    def _say_ready(self) -> None:
        log.info(
            "worker %s ready: concurrency %s, queues %s, hub %s",
            self.hostname,
            self.describe_concurrency(),
            ",".join(self.queues),
            green.hub_name(),
        )
        self.hooks.emit("worker_ready", self)

    def _say_ready_once_consuming(self) -> None:
        self.consumer.wait_ready(None)
        self._say_ready()

    def _waiting_for_broker(self) -> None:
        log.warning(
            "worker %s: waiting for the broker at %s; no task runs until it answers",
            self.hostname,
            maybe_sanitize_url(self.app.broker_url),
        )

    def _mingle(self) -> None:
        try:
            self.consumer.wait_ready(None)  # no one to ask before the broker answers
            with self.app.connection() as conn:
                mingle(
                    conn,
                    self.hostname,
                    self.state.revoked,
                    self.state.clock,
                    self.app.conf.worker_mingle_timeout,
                )
        finally:
            self.mingled.set()

    def _startup_notes(self) -> list[str]:
        """What this broker/backend combination cannot do, said once at startup."""
        from ..backends.base import DisabledBackend

        notes = []
        if isinstance(self.app.backend, DisabledBackend):
            notes.append("no result_backend: results, STARTED states and chords are not stored")
        if self.broker_scheme == "filesystem":
            notes.append(
                "kombu's filesystem transport: messages this worker holds are "
                "lost if it is killed -9; a warm shutdown returns them. Use Redis or "
                "RabbitMQ where that matters"
            )
            if self.app.conf.worker_enable_remote_control or self.app.conf.worker_send_task_events:
                notes.append(
                    "no remote control (inspect/control) or events over kombu's filesystem "
                    "transport"
                )
        return notes

    def stop(self, timeout: float | None = None) -> None:
        """Warm stop: stop consuming, let running tasks finish (up to ``timeout``), close.

        Tasks still running after the timeout are killed; messages received but
        not started are left unacked, so the broker delivers them again.
        """
        if not self._started:
            return
        if self._stopping:  # a stop is under way: a second one turns it cold
            log.warning("killing %d running task(s)", self.pool.active)
            self.pool.kill_all()
            return
        self._stopping = True
        timeout = self.app.conf.worker_shutdown_timeout if timeout is None else timeout
        self.handler.accepting = False
        for waiting in self._background:
            waiting.kill()
        self._background.clear()
        self.mingled.set()  # a mingle that never got to run (no broker) is over too
        if self.beat is not None:
            self.beat.stop()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        if self.stats_line is not None:
            self.stats_line.stop()
        self.consumer.stop_consuming()
        self.handler.drop_unstarted()
        if not self.pool.join(timeout):
            log.warning("killing %d task(s) still running after %.1fs", self.pool.active, timeout)
            self.pool.kill_all()
            self.pool.join(1.0)
        self.consumer.close()
        if self.heart is not None:
            self.heart.stop()  # worker-offline
        if self.events is not None:
            self.events.stop()
        if self.gossip is not None:
            self.gossip.stop()
        if self.control is not None:
            self.control.stop()
        self.watchdog.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.timer.stop()
        if self.limits is not None:
            self.limits.stop()
        self.handler.flush()
        if self.store is not None:
            self.flush_state()
            self.store.close()
        if self._beat_store is not None:
            self._beat_store.close()
            self._beat_store = None
        self.beat = None
        self._started = False
        self._stopping = False
        self.hooks.emit("worker_stop", self)
        self._stopped.set()
        log.info("worker %s stopped", self.hostname)

    def run(self) -> None:
        """Start and block until :meth:`stop` is called (from a signal handler or a task)."""
        self.start(ready_timeout=None)
        self._stopped.wait()

    def request_stop(self) -> None:
        """Ask for a warm stop from any greenlet; returns at once."""
        green.spawn(self.stop)

    def fatal_error(self, reason: str) -> None:
        """The worker cannot go on: log ``reason`` as one CRITICAL line, keep it in
        :attr:`fatal` and stop warm (from any greenlet; returns at once)."""
        log.critical("%s", reason)
        self.fatal = reason
        self.request_stop()

    def _limit_reached(self, reason: str) -> None:
        self.restart_reason = reason
        self.request_stop()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------ hand-off

    def _prefetch_count(self) -> int:
        return self.pool.size * max(self.prefetch_multiplier, 1) + self.handler.eta_held

    def _refresh_visibility(self) -> None:
        # Messages held here (ETA, rate limit, long tasks) stay invisible to other
        # workers' visibility-timeout sweeps for as long as this worker lives.
        held = [r.message for r in (*self.state.reserved.values(), *self.state.active.values())]
        self.consumer.refresh_visibility(held)

    # ------------------------------------------------------------ control

    def revoke(self, task_ids: str | Sequence[str], terminate: bool = False) -> list[str]:
        """Revoke tasks by id: never run them here; with ``terminate`` kill them if running.

        Returns the ids that were known to this worker (reserved or running).
        """
        return self.handler.revoke(task_ids, terminate)

    def flush_state(self) -> None:
        """Write counters and clock to the state store (batched: only when they changed)."""
        if self._saver is not None:
            self._saver.flush()

    def set_rate_limit(self, task_name: str, rate: str | float | None) -> None:
        """Change a task's rate limit while running (``None`` or 0 removes it)."""
        set_rate_limit(self.app.tasks, self.rate_limiter, task_name, rate)

    def set_time_limit(self, task_name: str, soft: float | None, hard: float | None) -> None:
        """Change a task's time limits for the runs that start from now on."""
        set_time_limit(self.app.tasks, task_name, soft, hard)

    # ------------------------------------------------------------ harness

    @property
    def errors(self) -> list[tuple[str, BaseException]]:
        """Recent task errors, oldest first: ``(task id, exception)``."""
        return list(self.executor.errors)

    def join(self, fail_fast: bool = True, timeout: float | None = 60.0) -> None:
        """Wait until the queues are empty and no task is reserved or running.

        With ``fail_fast`` the first task error is raised here as soon as it
        happens.  Meant for tests (typically on ``memory://``).
        """
        harness.join(
            state=self.state,
            pool=self.pool,
            consumer=self.consumer,
            errors=self.executor.errors,
            progress=self.handler.progress,
            fail_fast=fail_fast,
            timeout=timeout,
        )

    # ------------------------------------------------------------ info

    def describe_concurrency(self) -> str:
        """What runs: ``50``, or with autoscaling ``10 {min=3, max=10}`` (Celery's bounds)."""
        if self.autoscaler is None:
            return str(self.pool.size)
        bounds = f"{{min={self.autoscaler.minimum}, max={self.autoscaler.maximum}}}"
        return f"{self.pool.size} {bounds}"

    def stats(self) -> dict[str, Any]:
        """Pool, prefetch, counters, reconnects, hub blocks (what ``stats`` replies builds on)."""
        return summary(self.control_target)


def _pool_size(concurrency: int | None, autoscale: tuple[int, int] | None, default: int) -> int:
    if autoscale:
        return start_size(*autoscale, concurrency)  # MIN, as Celery's; -c is not used
    return concurrency or default
