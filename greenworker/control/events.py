"""Events in Celery's format: the dispatcher, the task events, the event exchange.

Events go to the ``celeryev`` exchange (topic; fanout on Redis, as Celery
does) with Celery's names and fields, so ``celery events`` and Flower show
greenworker.  Task events are buffered and published together as one list
message (routing key ``task.multi``, which Celery's receiver expands), by a
timer on a connection of their own: the task path only appends a dict.

The heartbeat, gossip and mingle are in :mod:`greenworker.control.cluster`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from copy import copy
from traceback import format_exception
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Producer

from .. import green
from ..worker.hooks import Middleware

if TYPE_CHECKING:
    from kombu.message import Message

    from ..worker.request import Request
    from ..worker.state import LamportClock
    from ..worker.timer import Entry, Timer

log = logging.getLogger("greenworker.events")

EVENT_EXCHANGE = Exchange("celeryev", type="topic")


def event_exchange(connection: Connection) -> Exchange:
    """Celery's event exchange: a topic exchange, fanout on Redis (Celery does the same)."""
    exchange = copy(EVENT_EXCHANGE)
    if connection.transport.driver_type in ("redis",):
        exchange.type = "fanout"
    return exchange


def event_receiver_queue(connection: Connection, name: str, routing_key: str) -> Queue:
    """A transient queue bound to the event exchange, as Celery's event receivers
    declare theirs: gone with its consumer, and nothing kept longer than 10 s."""
    return Queue(
        f"celeryev.{name}.{uuid.uuid4()}",
        exchange=event_exchange(connection),
        routing_key=routing_key,
        auto_delete=True,
        durable=False,
        message_ttl=10.0,
        expires=60.0,
    )


def utcoffset() -> float:
    """Hours to add to local time to get UTC (Celery's sign: positive west of Greenwich)."""
    seconds = time.altzone if time.daylight and time.localtime().tm_isdst > 0 else time.timezone
    return seconds / 3600


class EventDispatcher:
    """Buffers task events and publishes each batch from a one-shot timer, on its own
    connection (from ``connect``); worker events go out at once.  Nothing is sent while
    ``broker_ready()`` says the broker is away."""

    def __init__(
        self,
        hostname: str,
        connect: Callable[[], Connection],
        clock: LamportClock,
        timer: Timer,
        *,
        task_events: bool,
        broker_ready: Callable[[], bool],
        flush_interval: float = 0.2,
        limit: int = 500,
    ) -> None:
        self.hostname = hostname
        self._connect = connect
        self._clock = clock
        self._timer = timer
        self._broker_ready = broker_ready
        self.pid = os.getpid()
        self.enabled = True
        self.task_events = task_events
        self._buffer: deque[dict[str, Any]] = deque()
        self._limit = limit
        self._flush_interval = flush_interval
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._exchange: Exchange | None = None
        self._lock = green.new_semaphore(1)
        self._pending_flush: Entry | None = None  # of the buffered batch
        self._started = False
        self.sent = 0

    def start(self) -> None:
        self._started = True
        if self._buffer and self._pending_flush is None:
            self._pending_flush = self._timer.call_after(self._flush_interval, self._flush_later)

    def _flush_later(self) -> None:
        self._pending_flush = None
        self.flush()

    def stop(self) -> None:
        self._started = False
        if self._pending_flush is not None:
            self._pending_flush.cancel()
            self._pending_flush = None
        self.flush()
        with self._lock:
            self._drop_connection()

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": type_,
            "timestamp": time.time(),
            "hostname": self.hostname,
            "utcoffset": utcoffset(),
            "pid": self.pid,
            "clock": self._clock.forward(),
            **fields,
        }

    @property
    def collecting(self) -> bool:
        """Task events are wanted now (``-E`` or ``enable_events``)."""
        return bool(self.enabled and self.task_events)

    def task(self, type_: str, **fields: Any) -> None:
        """Queue a task event (cheap: the timer publishes the batch)."""
        if self.collecting:
            self._buffer.append(self.event(type_, **fields))
            if len(self._buffer) >= self._limit:
                green.spawn(self.flush)
            elif self._pending_flush is None and self._started:
                # one timer per batch, not a repeating one: an idle worker never wakes
                self._pending_flush = self._timer.call_after(
                    self._flush_interval, self._flush_later
                )

    def send_now(self, type_: str, **fields: Any) -> None:
        """Publish one event at once (worker events)."""
        if self.enabled:
            event = self.event(type_, **fields)
            self._publish(event, type_.replace("-", "."))

    def flush(self) -> None:
        if not self._buffer:
            return
        batch = list(self._buffer)
        self._buffer.clear()
        self._publish(batch, "task.multi")

    def _publish(self, body: Any, routing_key: str) -> None:
        count = len(body) if isinstance(body, list) else 1
        if not self._broker_ready():
            # the broker is away (the consumer says so, once a retry): events are best
            # effort, and an attempt per event would only repeat its warning
            log.debug("broker away: %d event(s) not sent", count)
            return
        with self._lock:
            # a connection kept from before an outage fails on first use: one fresh try then
            attempts = (False, True) if self._producer is not None else (True,)
            for fresh in attempts:
                try:
                    self._send(body, routing_key)
                    self.sent += count
                    return
                except Exception as exc:  # events are best effort: never fail a task for one
                    self._drop_connection()
                    if fresh:
                        log.warning("could not send events: %s", exc)

    def _send(self, body: Any, routing_key: str) -> None:
        if self._producer is None:
            self._conn = self._connect()
            self._conn.ensure_connection(max_retries=0)  # best effort: no retries
            self._exchange = event_exchange(self._conn)
            self._producer = Producer(self._conn)
        assert self._exchange is not None
        self._producer.publish(
            body,
            exchange=self._exchange,
            routing_key=routing_key,
            declare=[self._exchange],
            serializer="json",
            headers={"hostname": self.hostname},
            delivery_mode=1,
            retry=False,
        )

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception as exc:
                log.debug("closing the event connection failed: %s", exc)
        self._conn = self._producer = None


class TaskEvents(Middleware):
    """The task events of Celery's worker, from the worker's hooks."""

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.events = dispatcher

    def task_received(self, request: Request) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        msg = request.msg
        self.events.task(
            "task-received",
            uuid=msg.id,
            name=msg.task,
            args=msg.headers.get("argsrepr", repr(msg.args)),
            kwargs=msg.headers.get("kwargsrepr", repr(msg.kwargs)),
            root_id=msg.root_id,
            parent_id=msg.parent_id,
            retries=msg.retries,
            eta=msg.eta.isoformat() if msg.eta else None,
            expires=msg.expires.isoformat() if msg.expires else None,
        )

    def before_task(self, request: Request) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        self.events.task("task-started", uuid=request.id, pid=os.getpid())

    def task_succeeded(self, request: Request, result: Any, runtime: float) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        self.events.task(
            "task-succeeded", uuid=request.id, result=_safe_repr(result), runtime=runtime
        )

    def task_failed(self, request: Request, exc: BaseException, traceback: str | None) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        self.events.task(
            "task-failed", uuid=request.id, exception=_safe_repr(exc), traceback=traceback
        )

    def task_retried(self, request: Request, exc: BaseException | None, when: Any) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        # Celery's fields: the reason, and the traceback of the Retry as the task raised
        # it (which chains the reason's own traceback), so Flower shows where it retried
        retry = request.retry
        reason = _safe_repr(exc) if exc is not None or retry is None else str(retry)
        trace = "".join(format_exception(retry)) if retry is not None else None
        self.events.task("task-retried", uuid=request.id, exception=reason, traceback=trace)

    def task_revoked(self, request: Request, reason: str) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        self.events.task(
            "task-revoked",
            uuid=request.id,
            terminated=reason == "terminated",
            signum=None,
            expired=reason == "expired",
        )

    def task_rejected(self, message: Message, reason: str, requeue: bool) -> None:
        if not self.events.collecting:  # task events off: build nothing
            return
        task_id = (message.headers or {}).get("id")
        if isinstance(task_id, str):
            self.events.task("task-rejected", uuid=task_id, requeue=requeue)


def _safe_repr(value: Any, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
