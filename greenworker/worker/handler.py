"""The strategy: a broker message becomes a validated request that runs now, later or never.

``MessageHandler.on_message`` decodes and validates; a bad message is
rejected with one log line.  A good one becomes a
:class:`~greenworker.worker.request.Request` that runs now (through the rate
limiter into the pool), later (held on the timer until its ETA) or never
(revoked, expired).  The handler also takes back what it handed out: revoked
requests, and the unstarted ones when the connection is lost or the worker
stops.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message

from .. import green
from ..backends.base import FAILURE, ResultBackend, build_meta, celery_exception
from ..observe import logs as task_log
from ..protocol import MalformedMessage, TaskMessage, decode_task_message, utcnow
from ..transport.reconnect import FailureBurst
from .ratelimit import RateLimiter
from .request import Request
from .watchdog import describe_blocker

if TYPE_CHECKING:
    from ..client.task import Task
    from ..config import Settings
    from ..transport.base import TaskConsumer
    from .executor import Executor
    from .hooks import Hooks
    from .pool import GreenPool
    from .state import WorkerState
    from .store import StateStore
    from .timer import Timer
    from .watchdog import Watchdog

log = logging.getLogger("greenworker.request")


class MessageHandler:
    """The strategy: message -> validated :class:`Request` -> pool, timer or reject."""

    def __init__(
        self,
        *,
        settings: Settings,
        tasks: Mapping[str, Task],
        backend: Callable[[], ResultBackend],
        state: WorkerState,
        timer: Timer,
        pool: GreenPool,
        watchdog: Watchdog,
        store: StateStore | None,
        broker_scheme: str,
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self._backend = backend  # the app's, opened on first use
        self.state = state
        self.timer = timer
        self.pool = pool
        self.watchdog = watchdog
        self.store = store
        self.broker_scheme = broker_scheme
        self.rate_limiter = RateLimiter(timer, self._submit, self._configured_rate)
        #: Requests held on the timer until their ETA (they raise the prefetch count).
        self.eta_held = 0
        #: False once the worker stops: a request that reaches its slot goes back.
        self.accepting = False
        #: Set each time a request ran (``Worker.join`` waits on it).
        self.progress = green.new_event()
        #: tasks not started because the connection they came on was gone by then
        self._stale_dropped = FailureBurst("start", "the broker delivers them again")
        # given by attach(), once they are built
        self.consumer: TaskConsumer
        self.executor: Executor
        self.hooks: Hooks
        #: kombu's consumer on a real broker: what a lost connection held comes back from
        #: the broker, and our copies cannot be acked (the native Redis consumer's can)
        self._lost_with_connection = False

    def attach(
        self,
        consumer: TaskConsumer,
        executor: Executor,
        hooks: Hooks,
        *,
        lost_with_connection: bool,
    ) -> None:
        """What the handler works with that is built after it: the consumer that calls
        :meth:`on_message`, the executor that acks through that consumer, and the hooks
        (task events among them need the consumer too)."""
        self.consumer = consumer
        self.executor = executor
        self.hooks = hooks
        self._lost_with_connection = lost_with_connection
        if lost_with_connection:
            # keeping our copies would run them twice
            consumer.on_connection_lost = self.forget_unstarted

    # ------------------------------------------------------------ arrival

    def on_message(self, message: Message) -> None:
        limit = self.settings.worker_max_message_size
        size = len(message.body or b"")
        if limit and size > limit:
            self._reject(message, f"body of {size} bytes is over worker_max_message_size ({limit})")
            return
        try:
            body = message.decode()
            msg = decode_task_message(body, message.headers, message.properties)
        except (ContentDisallowed, DecodeError, MalformedMessage, json.JSONDecodeError) as exc:
            self._reject(message, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # a decoder failing in an unexpected way
            self._reject(message, f"cannot decode: {type(exc).__name__}: {exc}")
            return
        blocker = self.state.hub_blockers.get(msg.id)
        if blocker is not None:
            self._refuse_blocker(message, msg, blocker)
            return
        task = self.tasks.get(msg.task)
        if task is None:
            self._unknown_task(message, msg)
            return
        # handed over while its connection delivers: the current generation is its own
        request = Request(msg, message, task, self.executor, self.consumer.connection_generation)
        task_log.task_received(msg.task, msg.id)
        self.state.task_received(request)
        self.hooks.emit("task_received", request)
        revocation = request.revocation()
        if revocation is not None:
            reason, stamp = revocation
            try:
                request.revoke(reason, stamp=stamp)
            finally:
                self.state.task_discarded(request)
            return
        if msg.eta is not None and msg.eta > utcnow():
            self._hold_until_eta(request)
            return
        self.rate_limiter.submit(request)

    def _rejected(self, message: Message, reason: str) -> None:
        self.state.rejected += 1
        self.hooks.emit("task_rejected", message, reason, False)

    def _store_quietly(self, task_id: str, meta: dict[str, Any], what: str) -> None:
        try:
            self._backend().store(task_id, meta)
        except Exception as exc:
            log.debug("could not store %s: %s", what, exc)

    def _reject(self, message: Message, reason: str) -> None:
        headers = message.headers or {}
        ident = headers.get("id") or message.properties.get("correlation_id") or "?"
        log.error(
            "Rejected malformed message %s (task %s, content type %s): %s",
            ident,
            headers.get("task", "?"),
            message.content_type,
            reason,
        )
        self._rejected(message, reason)
        if isinstance(ident, str) and ident != "?":
            # A client may be waiting on this id: tell it why instead of leaving it PENDING.
            failure = {
                "exc_type": "MalformedMessage",
                "exc_message": [reason],
                "exc_module": "greenworker.protocol",
            }
            self._store_quietly(
                ident, build_meta(ident, FAILURE, failure), f"the rejection of {ident}"
            )
        self.consumer.reject(message, requeue=False)

    def _refuse_blocker(self, message: Message, msg: TaskMessage, record: dict[str, Any]) -> None:
        """A task that blocked the hub past its hard limit (recorded by the watchdog
        before it ended the worker) is back: reject it rather than block again.  Its
        FAILURE was stored when this worker started (``Watchdog.load_blockers``)."""
        scheme = self.broker_scheme
        if scheme.startswith(("amqp", "pyamqp")):
            fate = "dead-lettered if its queue has a dead-letter exchange, else dropped"
        else:
            fate = f"dropped ({scheme} has no dead-letter queue)"
        reason = describe_blocker(record)
        log.error(
            "Rejected task %s[%s]: %s; not run again (worker_block_policy 'exit'): %s",
            msg.task,
            msg.id,
            reason,
            fate,
        )
        self._rejected(message, reason)
        self.consumer.reject(message, requeue=False)

    def _unknown_task(self, message: Message, msg: TaskMessage) -> None:
        reason = f"unregistered task {msg.task!r}"
        log.error("Rejected message %s: %s (is the module imported by the worker?)", msg.id, reason)
        self._rejected(message, reason)
        meta = build_meta(msg.id, FAILURE, celery_exception("NotRegistered", repr(msg.task)))
        self._store_quietly(msg.id, meta, f"NotRegistered for {msg.id}")
        self.consumer.reject(message, requeue=False)

    # ------------------------------------------------------------ later: ETA, rate limit

    def _hold_until_eta(self, request: Request) -> None:
        """Keep a future task on the timer; raise prefetch so it does not block others."""
        self.eta_held += 1
        self.consumer.update_prefetch()
        assert request.msg.eta is not None
        self.timer.call_at(request.msg.eta, self._release_eta, request)

    def _release_eta(self, request: Request) -> None:
        self.eta_held -= 1
        self.consumer.update_prefetch()
        if self.state.reserved.get(request.id) is request:  # not dropped meanwhile
            self.rate_limiter.submit(request)

    def _configured_rate(self, task_name: str) -> str | None:
        conf = self.settings
        if conf.worker_disable_rate_limits:
            return None
        task = self.tasks.get(task_name)
        return (task.rate_limit if task else None) or conf.task_default_rate_limit

    # ------------------------------------------------------------ now: the pool

    def _submit(self, request: Request) -> None:
        if self.watchdog.paused:
            self.watchdog.task_submitted()
        request.job_id = self.pool.submit(self._execute, request)

    def _execute(self, request: Request) -> None:
        if not self.accepting:  # stopping: give it back for redelivery
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
            self.progress.set()

    # ------------------------------------------------------------ never: taken back

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

    def forget_unstarted(self) -> None:
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

    def drop_unstarted(self) -> None:
        """Stopping: give received-but-unstarted messages back to the broker now (kombu's
        memory transport would drop them at close rather than requeue)."""
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

    def flush(self) -> None:
        """Say now what was counted and not said yet (the worker is stopping)."""
        self._stale_dropped.flush()
