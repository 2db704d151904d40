"""The worker: builds its components in order, starts them, stops them in reverse.

Components (each knows only what it is given):

1. ``timer``    - green timers (ETA)
2. ``pool``     - the resizable greenlet pool that runs requests
3. ``consumer`` - the broker connection feeding :class:`~greenworker.worker.handler.MessageHandler`

``start()`` returns at once with everything running in background greenlets,
so a program that already monkeypatched can embed a worker.  ``run()`` is the
blocking form the CLI uses.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kombu.utils.url import maybe_sanitize_url

from .. import green
from ..beat import Beat, beat_store_path
from ..client.app import App
from ..control.events import EventDispatcher, Gossip, Heart, TaskEvents, mingle
from ..control.mailbox import RemoteControl
from ..transport.consumer import Consumer
from ..transport.reconnect import FailureBurst
from .autoscale import Autoscaler, ScalingPolicy
from .canvas import CanvasMiddleware
from .handler import MessageHandler
from .hooks import Hooks, Middleware
from .pool import GreenPool
from .ratelimit import RateLimiter
from .request import Request
from .state import RevokedSet, WorkerState
from .store import StateStore
from .timer import Timer
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..transport.redis_consumer import NativeRedisConsumer

log = logging.getLogger("greenworker.worker")


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
    ) -> None:
        self.app = app
        conf = app.conf
        self.broker_scheme = app.broker_url.split("://", 1)[0]
        if autoscale:
            # the pool starts at the minimum (or -c, kept within the bounds) and follows load
            maximum, minimum = autoscale
            self.concurrency = max(minimum, min(concurrency or minimum, maximum))
        else:
            self.concurrency = concurrency or conf.worker_concurrency
        self.queues = list(queues or [conf.task_default_queue])
        self.hostname = hostname or app.hostname
        self.prefetch_multiplier = (
            prefetch_multiplier
            if prefetch_multiplier is not None
            else conf.worker_prefetch_multiplier
        )
        self.state = WorkerState()
        self.state.revoked = RevokedSet(conf.worker_revokes_max, conf.worker_revoke_expires)
        # Remote control and events need fanout between processes: not on the
        # filesystem transport of the embedded default.
        fanout = self.broker_scheme != "filesystem"
        self.events = EventDispatcher(self) if fanout else None
        builtin: list[Middleware] = [CanvasMiddleware(app)]
        if self.events is not None:
            builtin.append(TaskEvents(self.events))
        self.hooks = Hooks([*builtin, *app.middleware, *middleware])
        self.heart = (
            Heart(self, self.events, conf.worker_heartbeat)
            if self.events is not None and conf.worker_heartbeat > 0
            else None
        )
        self.gossip = Gossip(self) if fanout and conf.worker_enable_gossip else None
        self.timer = Timer()
        self.pool = GreenPool(self.concurrency)
        self._eta_held = 0
        self.rate_limiter = RateLimiter(self.timer, self._submit, self._configured_rate)
        self.control = RemoteControl(self) if fanout and conf.worker_enable_remote_control else None
        path = app.state_db_path
        self.store = StateStore(path) if path else None
        self._flushed_processed = -1
        self.handler = MessageHandler(self)
        consumer_class: type[Consumer] | type[NativeRedisConsumer] = Consumer
        if app.native_redis:
            from ..transport.redis_consumer import (
                NativeRedisConsumer,  # needs redis-py: the redis extra
            )

            consumer_class = NativeRedisConsumer
        self.consumer = consumer_class(
            app, self.queues, self.handler.on_message, self._prefetch_count
        )
        self.pool.on_resize(self.consumer.update_prefetch)
        self.watchdog = Watchdog(
            self.timer,
            self.pool,
            conf.worker_block_threshold,
            conf.worker_block_policy,
            hostname=self.hostname,
            hub_blockers=self.state.hub_blockers,
            store=self.store,
            store_result=lambda task_id, meta: app.backend.store(task_id, meta),  # lazy backend
            broker_scheme=self.broker_scheme,
            visibility_timeout=conf.broker_transport_options.get("visibility_timeout", 3600),
            ack_pending=self.consumer.ack_pending,
        )
        self.consumer.on_unreachable = self._waiting_for_broker
        #: tasks not started because the connection they came on was gone by then
        self._stale_dropped = FailureBurst("start", "the broker delivers them again")
        self._background: list[green.Greenlet] = []  # waiting for the broker; ended by stop
        #: kombu's consumer on these brokers: what a lost connection held comes back from
        #: the broker, and our copies cannot be acked (the native Redis consumer's can)
        self._lost_with_connection = isinstance(
            self.consumer, Consumer
        ) and self.broker_scheme not in ("filesystem", "memory")
        if self._lost_with_connection:
            # keeping our copies would run them twice
            self.consumer.on_connection_lost = self._forget_unstarted
        self.autoscaler = (
            Autoscaler(
                self.pool,
                self.timer,
                autoscale[0],
                autoscale[1],
                policy=autoscale_policy,
                interval=conf.worker_autoscale_interval,
                keepalive=conf.worker_autoscale_keepalive,
            )
            if autoscale
            else None
        )
        #: Embedded beat (``-B``): sends the app's periodic tasks from this process.
        self.beat: Beat | None = None
        self._beat_wanted = beat
        self._beat_store: StateStore | None = None
        self._errors: deque[tuple[str, BaseException]] = deque(maxlen=100)
        self._progress = green.new_event()
        self._stopped = green.new_event()
        #: Set once mingle has merged the other workers' revoked ids (or was skipped).
        self.mingled = green.new_event()
        self._started = False
        self._stopping = False
        self._accepting = False

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
            self._load_state(self.store)
            self.watchdog.load_blockers()
        if self._beat_wanted:
            self._open_beat()
        self._started = True
        self._accepting = True
        self._stopped.clear()
        if self.app.embedded:
            self.app.purge_expired_results()
        self.timer.start()
        self.watchdog.start()
        if self.autoscaler is not None:
            self.autoscaler.start()
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

    def _say_ready_once_consuming(self) -> None:
        self.consumer.wait_ready(None)
        self._say_ready()

    def _waiting_for_broker(self) -> None:
        log.warning(
            "worker %s: waiting for the broker at %s; no task runs until it answers",
            self.hostname,
            maybe_sanitize_url(self.app.broker_url),
        )

    def _open_beat(self) -> None:
        """Beat's store: the worker's own when the paths agree, else its own (locked).
        A locked store or a bad beat_schedule fails here, before anything runs."""
        path = beat_store_path(self.app)
        try:
            if self.store is not None and self.store.path == path:
                store = self.store
            else:
                store = self._beat_store = StateStore(path).open()
            beat = Beat(self.app, store, self.timer)
            beat.load_entries()
        except BaseException:
            for opened in (self._beat_store, self.store):
                if opened is not None:
                    opened.close()
            self._beat_store = None
            raise
        self.beat = beat

    def _mingle(self) -> None:
        try:
            self.consumer.wait_ready(None)  # no one to ask before the broker answers
            mingle(self)
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
                "embedded default (filesystem transport): messages this worker holds are "
                "lost if it is killed -9; a warm shutdown returns them. Use Redis or "
                "RabbitMQ where that matters"
            )
            if self.app.conf.worker_enable_remote_control or self.app.conf.worker_send_task_events:
                notes.append(
                    "embedded default: no remote control (inspect/control) or events over "
                    "the filesystem transport"
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
        self._accepting = False
        for waiting in self._background:
            waiting.kill()
        self._background.clear()
        self.mingled.set()  # a mingle that never got to run (no broker) is over too
        if self.beat is not None:
            self.beat.stop()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        self.consumer.stop_consuming()
        self._drop_unstarted()
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
        self.timer.stop()
        self._stale_dropped.flush()
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

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------ hand-off

    def _prefetch_count(self) -> int:
        return self.pool.size * max(self.prefetch_multiplier, 1) + self._eta_held

    def _submit(self, request: Request) -> None:
        if self.watchdog.paused:
            self.watchdog.task_submitted()
        request.job_id = self.pool.submit(self._execute, request)

    def _execute(self, request: Request) -> None:
        if not self._accepting:  # stopping: give it back for redelivery
            self.state.task_discarded(request)
            self.consumer.reject(request.message, requeue=True)
            return
        if self._lost_with_connection and not self.consumer.generation_alive(request.generation):
            # its connection is gone (maybe before the consumer loop noticed): the broker
            # delivers it again, and its ack could not be sent anyway
            if self.state.reserved.get(request.id) is request:  # not a redelivered copy
                self.state.task_discarded(request)
            self._stale_dropped.add("their connection was lost")
            return
        try:
            request.execute()
        finally:
            self._progress.set()

    def hold_until_eta(self, request: Request) -> None:
        """Keep a future task on the timer; raise prefetch so it does not block others."""
        self._eta_held += 1
        self.consumer.update_prefetch()
        assert request.msg.eta is not None
        self.timer.call_at(request.msg.eta, self._release_eta, request)

    def _release_eta(self, request: Request) -> None:
        self._eta_held -= 1
        self.consumer.update_prefetch()
        if self.state.reserved.get(request.id) is request:  # not dropped meanwhile
            self.rate_limiter.submit(request)

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
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        now = time.time()
        for task_id in ids:
            self.state.revoked.add(task_id, now)
        if self.store is not None and self.store.env is not None:
            self.store.add_revoked(dict.fromkeys(ids, now))  # durable before we answer
        known: list[str] = []
        for task_id in ids:
            waiting = self.state.reserved.get(task_id)
            if waiting is not None:
                known.append(task_id)
                self.rate_limiter.drop(waiting)
                if waiting.job_id is not None:
                    self.pool.kill(waiting.job_id)
                self.state.task_discarded(waiting)
                waiting.revoke("revoked")
            running = self.state.active.get(task_id)
            if running is not None:
                known.append(task_id)
                if terminate:
                    running.terminate()
        return known

    def _configured_rate(self, task_name: str) -> str | None:
        conf = self.app.conf
        if conf.worker_disable_rate_limits:
            return None
        task = self.app.tasks.get(task_name)
        return (task.rate_limit if task else None) or conf.task_default_rate_limit

    # ------------------------------------------------------------ state store

    def _load_state(self, store: StateStore) -> None:
        revoked = store.revoked(self.state.revoked.expires)
        self.state.revoked.update(revoked)
        store.trim_revoked(set(self.state.revoked.as_dict()))  # over the maximum: oldest go
        self.state.total.update(store.counters())
        self.state.clock.adjust(store.clock())
        log.info(
            "state store %s: %d revoked ids, %d tasks counted, clock %d",
            store.path,
            len(revoked),
            self.state.processed,
            self.state.clock.value,
        )

    def flush_state(self) -> None:
        """Write counters and clock to the state store (batched: only when they changed)."""
        if self.store is None or self.store.env is None:
            return
        processed = self.state.processed
        if processed == self._flushed_processed:
            return
        self.store.save_counters(dict(self.state.total), self.state.clock.value)
        self._flushed_processed = processed

    def set_rate_limit(self, task_name: str, rate: str | float | None) -> None:
        """Change a task's rate limit while running (``None`` or 0 removes it)."""
        task = self.app.tasks[task_name]
        task.rate_limit = str(rate) if rate else None
        self.rate_limiter.set_rate(task_name, rate)

    def set_time_limit(self, task_name: str, soft: float | None, hard: float | None) -> None:
        """Change a task's time limits for the runs that start from now on."""
        task = self.app.tasks[task_name]
        task.soft_time_limit, task.time_limit = soft, hard

    def _forget_unstarted(self) -> None:
        """The connection is gone: the broker redelivers every message it held, so the
        requests not started yet are dropped here (their acks could not be sent anyway)."""
        dropped = 0
        for request in list(self.state.reserved.values()):
            if self._unreserve(request):
                dropped += 1
        if dropped:
            log.warning(
                "connection lost: %d received task(s) not started are left to the broker "
                "to deliver again; %d running task(s) carry on",
                dropped,
                self.pool.active,
            )

    def _drop_unstarted(self) -> None:
        # Give received-but-unstarted messages back to the broker now (kombu's
        # memory transport would drop them at close rather than requeue).
        for request in list(self.state.reserved.values()):
            if self._unreserve(request):
                self.consumer.reject(request.message, requeue=True)

    def _unreserve(self, request: Request) -> bool:
        """Take a request that has not started out of the worker; False if it started
        meanwhile (the loop that calls this yields on broker writes)."""
        if self.state.reserved.get(request.id) is not request:
            return False
        if request.job_id is not None and not self.pool.cancel(request.job_id):
            return False  # its greenlet runs already: _execute hands it back itself
        self.rate_limiter.drop(request)
        self.state.task_discarded(request)
        return True

    # ------------------------------------------------------------ harness

    def record_error(self, task_id: str, exc: BaseException) -> None:
        self._errors.append((task_id, exc))

    @property
    def errors(self) -> list[tuple[str, BaseException]]:
        """Recent task errors, oldest first: ``(task id, exception)``."""
        return list(self._errors)

    def join(self, fail_fast: bool = True, timeout: float | None = 60.0) -> None:
        """Wait until the queues are empty and no task is reserved or running.

        With ``fail_fast`` the first task error is raised here as soon as it
        happens.  Meant for tests (typically on ``memory://``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        settled = 0
        while True:
            if fail_fast and self._errors:
                _, exc = self._errors.popleft()
                raise exc
            idle = (
                self.state.in_flight == 0 and self.pool.active == 0 and not self.consumer.receiving
            )
            if idle and not any(self.consumer.queue_sizes().values()):
                settled += 1
                if settled >= 3:  # three times in a row: nothing was between fetch and hand-off
                    return
            else:
                settled = 0
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"join: still busy after {timeout}s ({self.state.in_flight} in flight)"
                )
            self._progress.wait(0.02)
            self._progress.clear()

    # ------------------------------------------------------------ info

    def describe_concurrency(self) -> str:
        """What runs: ``50``, or with autoscaling ``10 {min=3, max=10}`` (Celery's bounds)."""
        if self.autoscaler is None:
            return str(self.pool.size)
        bounds = f"{{min={self.autoscaler.minimum}, max={self.autoscaler.maximum}}}"
        return f"{self.pool.size} {bounds}"

    def stats(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname,
            "hub": green.hub_name(),
            "pool": {
                "max-concurrency": self.pool.size,
                "active": self.pool.active,
                "waiting": self.pool.waiting,
            },
            "prefetch_count": self.consumer.prefetch,
            "autoscaler": self.autoscaler.info() if self.autoscaler is not None else None,
            "total": dict(self.state.total),
            "succeeded": self.state.succeeded,
            "failed": self.state.failed,
            "retried": self.state.retried,
            "revoked": self.state.revoked_count,
            "rejected": self.state.rejected,
            "uptime": int(time.time() - self.state.started_at),
            "broker_reconnects": self.consumer.reconnects,
            "hub_blocks": {
                "count": self.watchdog.stats.count,
                "longest_s": round(self.watchdog.stats.longest, 3),
                "total_s": round(self.watchdog.stats.total, 3),
            },
        }
