"""The task consumer: one broker connection, QoS, delivery to a handler, safe broker writes.

Reading happens in the consumer greenlet only.  Acks and rejects come from
many task greenlets; they go through one lock so frames never interleave on
the shared connection.  Changes of QoS are applied by the consumer greenlet
itself, because on AMQP they wait for a reply that only the reader may read.

Quorum queues on RabbitMQ refuse a global QoS.  There the prefetch window is
per consumer (``basic.qos`` with ``global=False``), which RabbitMQ applies only
to consumers started after it: :class:`ConsumerCredit` makes a changed window
effective at once by starting or cancelling extra consumers on each queue.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.message import Message
from kombu.messaging import Consumer as KombuConsumer
from kombu.serialization import prepare_accept_content

from .. import green
from ..client.delayed_delivery import wanted
from ..config import POLLING_WAKE
from . import amqp_frames, amqp_lean, delayed_delivery
from .reconnect import Backoff, FailureBurst, retry_until_stopped

if TYPE_CHECKING:
    from ..client.app import App  # at run time the app imports the worker, which imports us

log = logging.getLogger("greenworker.consumer")


class Reconnecting:
    """What both consumers share: their state, the consumer loop (consume until
    stopped; after a lost connection log it once, back off with :class:`Backoff`
    and retry: :func:`~.reconnect.retry_until_stopped` with :class:`ConsumerRetry`),
    the connection generations, and the batched-ack loop.

    Each successful connection is a new ``connection_generation``; the messages of a
    generation can be acked only on that connection.  A generation is known gone
    (:meth:`generation_alive`) from the moment its loss is seen -- the consumer loop
    failing, or a write on it failing in another greenlet -- before the loop has
    cleaned up, so that nothing more is started from it.
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        on_message: Callable[[Any], None],
        prefetch_count: Callable[[], int],
    ) -> None:
        self.app = app
        self.queue_names = list(queues)
        self._on_message = on_message
        self._prefetch_count = prefetch_count
        self._ready = green.new_event()
        # set while stopping: a retry pause ends at once (see _stopping)
        self._stop_requested = green.new_event()
        self._applied_prefetch: int | None = None
        self._greenlet: green.Greenlet | None = None
        self._ack_wake = green.new_event()
        self._acker: green.Greenlet | None = None
        self.connection_generation = 0
        self._lost_through = 0  # generations up to this one are gone
        self.reconnects = 0
        #: Called (in the consumer greenlet) after the connection was lost, before the
        #: next attempt, where the broker redelivers what that connection held.
        self.on_connection_lost: Callable[[], None] | None = None
        #: Called once (in the consumer greenlet) when the first attempt to connect
        #: failed: the worker says it waits for the broker.
        self.on_unreachable: Callable[[], None] | None = None
        #: Called (in the consumer greenlet) with one line saying why, when the retry
        #: settings say to stop retrying; the consumer has stopped.  Unset: the line is
        #: logged as CRITICAL here.
        self.on_gave_up: Callable[[str], None] | None = None
        #: True while messages taken from the broker are not yet handed over (join()).
        self.receiving = False

    @property
    def _stopping(self) -> bool:
        """Stop was asked.  An event underneath, so that setting it also ends a
        retry pause at once: a worker stopped without its broker exits now."""
        return self._stop_requested.is_set()

    @_stopping.setter
    def _stopping(self, value: bool) -> None:
        if value:
            self._stop_requested.set()
        else:
            self._stop_requested.clear()

    def _consume(self) -> None:
        raise NotImplementedError

    def _connection_lost(self) -> None:
        raise NotImplementedError

    def _flush_acks(self) -> bool:
        """Send the acks due; False if they must be tried again later."""
        raise NotImplementedError

    @property
    def prefetch(self) -> int | None:
        return self._applied_prefetch

    def generation_alive(self, generation: int) -> bool:
        """Whether the connection of ``generation`` is still the one consuming (the
        messages it delivered can still be acked)."""
        return generation > self._lost_through

    def _mark_lost(self, generation: int) -> None:
        self._lost_through = max(self._lost_through, generation)

    def _ack_loop(self) -> None:
        while True:
            self._ack_wake.wait()
            self._ack_wake.clear()
            green.sleep(0.002)  # the acks of tasks that end together go in one batch
            if not self._flush_acks():
                green.sleep(0.5)  # the broker is away: try again, the consumer reconnects
                self._ack_wake.set()

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait until the consumer is consuming (connected, queues declared)."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        """Connected and consuming."""
        return self._ready.is_set()

    def _run(self) -> None:
        retry = ConsumerRetry(self, Backoff(self.app.conf.broker_connection_max_backoff))
        retry_until_stopped(self._consume, self._stop_requested, retry)


class ConsumerRetry:
    """The consumer's retry policy, with Celery's settings: the lost connection's
    generation is marked gone first of all; ``broker_connection_retry_on_startup``
    (before the first connection; None: ``broker_connection_retry`` decides) and
    ``broker_connection_retry`` (after it) say whether to retry at all, and
    ``broker_connection_max_retries`` how many failed attempts in a row; giving up
    is one line to ``on_gave_up``.  Otherwise the worker is told once that the broker
    is unreachable (``on_unreachable``), and each retry is one warning with its pause."""

    def __init__(self, consumer: Reconnecting, backoff: Backoff) -> None:
        self.consumer = consumer
        self.backoff = backoff
        #: Consumed at least once: later failures are losses, not the startup's.
        self.connected_once = False
        #: Failed connection attempts since the last connection (Celery's retry count).
        self.retries = 0
        self._lost_connection = False

    def before_attempt(self) -> None:
        pass

    def lost(self, exc: Exception, attempt_seconds: float) -> None:
        consumer = self.consumer
        # first of all: nothing more starts from the connection that is gone
        consumer._mark_lost(consumer.connection_generation)
        self._lost_connection = consumer._ready.is_set()
        if self._lost_connection:
            consumer._ready.clear()
            self.backoff.connected_for(attempt_seconds)
            self.connected_once = True
            self.retries = 0
        consumer._connection_lost()

    def pause(self, exc: Exception) -> float | None:
        consumer = self.consumer
        conf = consumer.app.conf
        reason = self._give_up(exc)
        if reason is not None:
            if consumer.on_gave_up is not None:
                consumer.on_gave_up(reason)
            else:
                log.critical("%s", reason)
            return None
        never_connected = consumer.connection_generation == 0 and consumer.reconnects == 0
        if never_connected and consumer.on_unreachable is not None:
            consumer.on_unreachable()
        consumer.reconnects += 1
        pause = self.backoff.next_pause()
        limit = conf.broker_connection_max_retries
        log.warning(
            "broker connection error: %s: %s; reconnecting in %.1fs%s",
            type(exc).__name__,
            exc,
            pause,
            f" ({self.retries}/{limit})" if limit and self.retries else "",
        )
        return pause

    def _give_up(self, exc: Exception) -> str | None:
        """Why the retry settings say to stop after ``exc``, or None to retry (counting
        a failed attempt; the loss of a connection that consumed is not one)."""
        conf = self.consumer.app.conf
        startup = not self.connected_once
        setting = "broker_connection_retry"
        if startup and conf.broker_connection_retry_on_startup is not None:
            setting = "broker_connection_retry_on_startup"
        retry = getattr(conf, setting)
        cannot = f"consumer: Cannot connect to {self._where()}: {str(exc).rstrip('.')}."
        if not retry:
            # Celery's words (celery.worker.consumer.Consumer.start)
            return (
                f"{cannot} Retrying to {'establish' if startup else 're-establish'} a "
                "connection to the message broker after a connection loss has been "
                f"disabled (app.conf.{setting}=False). Shutting down..."
            )
        if self._lost_connection:
            self._lost_connection = False
            return None
        self.retries += 1
        limit = conf.broker_connection_max_retries
        if limit and self.retries > limit:
            return (
                f"{cannot} Gave up after {limit} retries "
                f"(app.conf.broker_connection_max_retries={limit}). Shutting down..."
            )
        return None

    def _where(self) -> str:
        from kombu.utils.url import maybe_sanitize_url

        url: str = maybe_sanitize_url(self.consumer.app.broker_url)
        return url

    def paused(self, exc: Exception) -> None:
        pass


class Consumer(Reconnecting):
    """Consumes task messages from ``queues`` and hands each to ``on_message``."""

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        on_message: Callable[[Message], None],
        prefetch_count: Callable[[], int],
    ) -> None:
        super().__init__(app, queues, on_message, prefetch_count)
        self._write_lock = green.new_semaphore(1)
        self._qos_dirty = False
        self._delivering = False
        self._qos_global = False
        # quorum queues: the window is per consumer, kept by starting and cancelling them
        self._credit: ConsumerCredit | None = None
        self._queue_changes: list[tuple[str, str]] = []
        self._connection: Connection | None = None
        self._kombu_consumer: KombuConsumer | None = None
        self._lean: amqp_lean.LeanDelivery | None = None
        self._accept = prepare_accept_content(app.conf.accept_content)
        # AMQP ack batching: tags delivered on the current channel and not settled yet,
        # and tags whose ack waits for the next flush (see _flush_acks)
        self._batch_acks = False
        self._wakeable = False  # the transport's drain wait can be cut short (wake_self)
        self._ack_channel: Any = None
        self._unsettled: set[int] = set()
        self._acks_due: set[int] = set()
        self._ack_channel_generation = 0
        #: acks and rejects that failed because their connection is gone: one line a burst
        self.failed_writes = {
            action: FailureBurst(action, "their connection is gone: the broker delivers them again")
            for action in ("ack", "requeue", "reject")
        }

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopping = False
        self._greenlet = green.spawn(self._run)

    def stop_consuming(self, timeout: float = 5.0) -> None:
        """Stop taking new messages; the connection stays open for acks."""
        self._stopping = True
        if self._greenlet is not None:
            if self._batch_acks:
                self._cancel_on_broker()
            elif self._connection is not None and self._wakeable:
                self._connection.transport.wake_self()  # the embedded broker: end the wait
            # no connection: it only waits to reconnect, nothing is lost by ending it now
            if self._connection is None or not self._greenlet.join(timeout):
                self._greenlet.kill()
            self._greenlet = None

    def _cancel_on_broker(self) -> None:
        """AMQP: basic.cancel for our consumers.  The consumer greenlet reads the
        cancel-ok, which wakes it from its drain wait at once; deliveries that were
        already on the way arrive before it and are handled as usual."""
        channel = self._ack_channel
        if channel is None:
            return
        for tag in list(channel.callbacks):  # this channel carries only our consumers
            self._send_without_waiting("Cancel", "sb", (tag, False))

    def _send_without_waiting(self, method: str, argsig: str, args: tuple[Any, ...]) -> bool:
        """AMQP: send a ``basic.<method>`` on the consuming channel and leave its reply to
        the consumer greenlet, the channel's only reader (py-amqp ignores a reply nobody
        waits for).  False if it could not be sent: the connection is going, and the
        consumer loop ends or reconnects anyway."""
        from amqp import spec  # kombu's own AMQP client, there whenever the driver is amqp

        channel = self._ack_channel
        if channel is None:
            return False
        with self._write_lock:
            try:
                channel.send_method(getattr(spec.Basic, method), argsig, args)
                return True
            except Exception as exc:
                log.debug("basic.%s %s failed: %s", method.lower(), args, exc)
                return False

    def close(self) -> None:
        """Close the connection; the broker requeues every unacked message."""
        self._stopping = True
        self._flush_acks()
        if self._acker is not None:
            self._acker.kill()
            self._acker = None
        with self._write_lock:
            self._release_connection()
        for burst in self.failed_writes.values():
            burst.flush()

    def add_queue(self, name: str) -> None:
        """Start consuming ``name`` too (applied by the consumer greenlet)."""
        if name not in self.queue_names:
            self.queue_names.append(name)
            self._queue_changes.append(("add", name))

    def cancel_queue(self, name: str) -> None:
        """Stop consuming ``name`` (applied by the consumer greenlet)."""
        if name in self.queue_names:
            self.queue_names.remove(name)
            self._queue_changes.append(("cancel", name))

    def _apply_queue_changes(self, consumer: KombuConsumer) -> None:
        while self._queue_changes:
            action, name = self._queue_changes[0]
            quorum_on_global = self._batch_acks and self._credit is None
            if action == "add" and quorum_on_global and self._is_quorum(name):
                # the channel's global QoS would close it at basic.consume: consume all
                # queues again on a new connection, with per-consumer QoS (the broker
                # redelivers what this one held)
                raise ConnectionError(f"quorum queue {name} added: reconnecting without global QoS")
            self._queue_changes.pop(0)
            credit = self._credit
            with self._write_lock:
                if action == "add":
                    queue = consumer.add_queue(self.app.queue(name))
                    if credit is None:
                        consumer.consume()
                    else:
                        credit.start_queue(queue)
                elif credit is None:
                    consumer.cancel_by_queue(name)
                else:
                    consumer.queues = [q for q in consumer.queues or [] if q.name != name]
                    credit.cancel_queue(name)
            log.info("%s queue %s", "consuming from" if action == "add" else "cancelled", name)

    def _is_quorum(self, name: str) -> bool:
        """Whether the worker treats ``name`` as a quorum queue (``x-queue-type`` of its
        declaration), as Celery's ``worker_detect_quorum_queues`` does."""
        return bool(self.app.conf.worker_detect_quorum_queues) and (
            self.app.queue_type(name) == "quorum"
        )

    def update_prefetch(self) -> None:
        """Apply the current prefetch count: on AMQP at once when asked from outside a
        delivery (the pool grew), else when the consumer greenlet next wakes."""
        self._qos_dirty = True
        if self._batch_acks and not self._delivering:
            self._apply_qos()

    # ------------------------------------------------------------ broker writes

    def ack(self, message: Message) -> bool:
        return self._write(message, "ack")

    def reject(self, message: Message, requeue: bool) -> bool:
        return self._write(message, "requeue" if requeue else "reject")

    def _write(self, message: Message, action: str) -> bool:
        if self._batch_acks and message.channel is self._ack_channel:
            tag = message.delivery_tag
            if action == "ack" and tag in self._unsettled:
                # batched: one basic_ack(multiple=True) covers every contiguous ack
                self._unsettled.discard(tag)
                self._acks_due.add(tag)
                message._state = "ACK"  # kombu's own marker: message.acknowledged is True
                self._ack_wake.set()
                return True
            self._unsettled.discard(tag)
        with self._write_lock:
            if message.acknowledged:
                return True
            current = message.channel is self._ack_channel
            try:
                if action == "ack":
                    message.ack()
                elif action == "requeue":
                    message.reject(requeue=True)
                else:
                    message.reject(requeue=False)
                return True
            except Exception as exc:  # the connection it came on is gone: redelivered later
                if current and self._batch_acks:
                    # AMQP: one connection carries it all, so it is broken (or the broker
                    # closed the channel): start nothing more from it, the loop reconnects
                    self._mark_lost(self._ack_channel_generation)
                log.debug("could not %s message %s: %s", action, _tag(message), exc)
                self.failed_writes[action].add(exc)
                return False

    # ------------------------------------------------------------ batched acks (AMQP)

    def _receive(self, message: Message | amqp_lean.LeanMessage) -> None:
        if self._batch_acks:
            self._unsettled.add(message.delivery_tag)
        self._delivering = True  # a prefetch change asked from here waits for the loop
        try:
            self._on_message(message)
        finally:
            self._delivering = False

    def _flush_acks(self) -> bool:
        """Ack every due tag below the lowest unsettled one with one ``multiple`` ack
        (nothing still held is covered), and the others one by one.  Never retried:
        acks for a channel that is gone are void (the broker redelivers)."""
        if not self._acks_due:
            return True
        channel = self._ack_channel
        due, self._acks_due = self._acks_due, set()
        low = min(self._unsettled) if self._unsettled else None
        below = [t for t in due if low is None or t < low]
        above = [t for t in due if low is not None and t > low]
        with self._write_lock:
            if channel is None or channel is not self._ack_channel:
                # that channel is gone: the broker redelivers its messages
                self.failed_writes["ack"].add("connection lost", len(due))
                return True
            try:
                send_ack = amqp_lean.send_ack
                if below:
                    send_ack(channel, max(below), multiple=True)
                for tag in sorted(above):
                    send_ack(channel, tag)
            except Exception as exc:  # the connection it came on is gone: redelivered later
                self._mark_lost(self._ack_channel_generation)
                self.failed_writes["ack"].add(exc, len(due))
        return True

    # ------------------------------------------------------------ the loop

    def _connection_lost(self) -> None:
        with self._write_lock:
            self._release_connection()
        if self.on_connection_lost is not None:
            self.on_connection_lost()

    def _consume(self) -> None:
        conn = self.app.connection()
        conn.ensure_connection(max_retries=0)  # one attempt: the loop above paces retries
        self._connection = conn
        self.connection_generation += 1
        channel = conn.channel()
        self._batch_acks = conn.transport.driver_type == "amqp"
        self._lean = None
        if self._batch_acks:
            reader = amqp_frames.install(conn.connection)
            # the deliveries of this channel skip py-amqp's and kombu's message objects
            self._lean = amqp_lean.install(
                conn.connection, channel, self._receive, self._accept, self._write_lock, reader
            )
        # RabbitMQ applies a per-consumer (global=False) count only to consumers started
        # after it; per channel, as Celery does there, a change takes effect at once.
        # Quorum queues refuse a global count: per consumer there (ConsumerCredit).
        quorum = [n for n in self.queue_names if self._is_quorum(n)] if self._batch_acks else []
        self._qos_global = not conn.qos_semantics_matches_spec and not quorum
        self._credit = None
        if quorum:
            log.info(
                "quorum queue(s) %s: global QoS is disabled, the prefetch count is kept "
                "per consumer",
                ", ".join(quorum),
            )
        self._ack_channel = channel
        self._ack_channel_generation = self.connection_generation
        self._unsettled = set()
        self._acks_due = set()
        if self._batch_acks and (self._acker is None or self._acker.dead):
            self._acker = green.spawn(self._ack_loop)
        queues = [self.app.queue(name) for name in self.queue_names]
        consumer = KombuConsumer(
            channel,
            queues=queues,
            on_message=self._receive,
            accept=self.app.conf.accept_content,
            no_ack=False,
        )  # which declared the queues: the delayed topology binds them
        if self._batch_acks and wanted(self.app, self.queue_names):
            delayed_delivery.set_up(self.app, queues)
        if quorum:
            self._credit = ConsumerCredit(
                channel, consumer._receive_callback, self._write_lock
            )  # kombu's own hand-off of a raw delivery: decode, accept, on_message
            count = _prefetch_limit(self._prefetch_count())
            with self._write_lock:
                for queue in consumer.queues or []:
                    self._credit.start_queue(queue, count)
            self._applied_prefetch = count
        else:
            self._apply_qos(consumer)
            consumer.consume()
        self._kombu_consumer = consumer
        log.info(
            "consuming from %s on %s",
            ", ".join(self.queue_names),
            _where(conn),
        )
        self._ready.set()
        interval = self.app.conf.worker_drain_interval
        self._wakeable = hasattr(conn.transport, "wake_self")
        if not (self._batch_acks or self._wakeable):
            interval = min(interval, POLLING_WAKE)  # polling transports: stop cannot wake it
        self._queue_changes.clear()  # a fresh consumer already has the current queues
        generation = self.connection_generation
        while not self._stopping:
            if not self.generation_alive(generation):  # an ack on it failed meanwhile
                raise ConnectionError("a write on the broker connection failed")
            if self._qos_dirty:
                self._apply_qos(consumer)
            if self._queue_changes:
                self._apply_queue_changes(consumer)
            try:
                if self._lean is not None:
                    self._lean.drain(interval)
                else:
                    conn.drain_events(timeout=interval)
            except TimeoutError:  # socket.timeout: nothing arrived within the interval
                pass
        with self._write_lock:
            try:
                consumer.cancel()
                if self._credit is not None:
                    self._credit.cancel_all()
            except Exception as exc:
                log.debug("cancelling the consumer failed: %s", exc)
        self._kombu_consumer = None

    def _apply_qos(self, consumer: KombuConsumer | None = None) -> None:
        """Set the prefetch count if it changed.  On AMQP basic.qos goes out without
        waiting for qos-ok, so it also works from outside the consumer greenlet: with a
        full prefetch window the broker sends nothing until the count grows, and waiting
        for the next drain wake-up would hold up a pool that just grew."""
        self._qos_dirty = False
        count = _prefetch_limit(self._prefetch_count())
        credit = self._credit
        if credit is not None:
            if credit.resize(count):
                self._applied_prefetch = credit.window
            return
        if count == self._applied_prefetch:
            return
        if self._batch_acks:
            if not self._send_without_waiting("Qos", "lBb", (0, count, self._qos_global)):
                return
        elif consumer is not None:
            with self._write_lock:
                consumer.qos(prefetch_count=count, apply_global=self._qos_global)
        else:
            return
        self._applied_prefetch = count

    def _release_connection(self) -> None:
        self._ack_channel = None  # acks still due for it are void: the broker requeues
        if self._acks_due:
            self.failed_writes["ack"].add("connection lost", len(self._acks_due))
        self._acks_due = set()
        self._unsettled = set()
        conn, self._connection = self._connection, None
        self._kombu_consumer = None
        self._lean = None
        self._credit = None
        self._applied_prefetch = None
        if conn is not None:
            try:
                conn.release()
            except Exception as exc:
                log.debug("closing the broker connection failed: %s", exc)

    # ------------------------------------------------------------ visibility (Redis)

    def visibility_refresh_interval(self) -> float:
        """How often held messages' visibility is renewed: a quarter of the timeout."""
        timeout = self.app.conf.broker_transport_options.get("visibility_timeout", 3600)
        return max(0.25, float(timeout) / 4)

    def refresh_visibility(self, messages: Sequence[Message]) -> int:
        """Renew the delivery time of unacked messages on kombu's Redis transport.

        kombu restores an unacked message to its queue once it is older than
        ``visibility_timeout``, so an ETA task held longer (or a long task)
        would run twice.  Bumping its score in ``unacked_index`` while this
        worker holds it keeps it ours; if the worker dies, it becomes visible
        again after the timeout and is redelivered (at-least-once).
        """
        consumer = self._kombu_consumer
        channel = consumer.channel if consumer is not None else None
        if channel is None:
            return 0
        tags = [m.delivery_tag for m in messages if m.channel is channel and not m.acknowledged]
        store = getattr(channel, "store", None)  # the embedded broker: the same timeout
        if store is not None and tags:
            try:
                return int(store.refresh(tags))
            except Exception as exc:
                log.warning("could not renew the visibility of %d message(s): %s", len(tags), exc)
                return 0
        index_key = getattr(channel, "unacked_index_key", None)
        if index_key is None or not tags:
            return 0
        now = time.time()
        try:
            with channel.conn_or_acquire() as client:
                client.zadd(index_key, dict.fromkeys(tags, now), xx=True)
        except Exception as exc:
            log.warning("could not renew the visibility of %d message(s): %s", len(tags), exc)
            return 0
        return len(tags)

    def queue_sizes(self) -> dict[str, int]:
        """Messages waiting in each consumed queue (read on a separate connection)."""
        sizes: dict[str, int] = {}
        with self.app.connection() as conn:
            channel = conn.default_channel
            for name in self.queue_names:
                try:
                    _, count, _ = channel.queue_declare(queue=name, passive=True)
                except Exception:
                    count = 0
                sizes[name] = int(count)
        return sizes

    def ack_pending(self, message: Message) -> bool:
        """True while ``message``'s ack waits for the next batched ``basic_ack`` (AMQP);
        on kombu's other transports an ack is sent when it is made."""
        return message.delivery_tag in self._acks_due


class ConsumerCredit:
    """The prefetch window of a channel with per-consumer QoS (quorum queues).

    RabbitMQ gives each consumer the ``basic.qos`` count in force when it started,
    and a later ``basic.qos`` changes nothing for it.  So each queue has one or
    more consumers, and the window of a queue is the sum of their counts: a larger
    window starts one more consumer with the difference, a smaller one cancels the
    newest consumers (their unacked messages stay ours until settled) and starts
    one for what is missing.  Each start is a replicated log entry on a quorum
    queue, so a growing window grows by at least a quarter and a shrinking one
    acts once it is a quarter too large: a flood of held ETA tasks costs a few
    consumers, not one per task.  Every frame goes out without waiting for its
    reply (the consumer greenlet reads those), so a change can be made from any
    greenlet and takes effect at once.

    Like Celery's per-consumer QoS, each consumed queue has the whole window.
    """

    def __init__(self, channel: Any, callback: Callable[[Any], None], lock: Any) -> None:
        self._channel = channel
        self._callback = callback
        self._lock = lock
        self._prefix = f"gw-{uuid.uuid4().hex[:12]}"
        self._serial = 0
        #: The consumers of each queue, oldest first: (bound queue, tag, count).
        self._consumers: dict[str, list[tuple[Any, str, int]]] = {}
        #: The window asked for last; each queue's consumers add up to about this.
        self.asked = 0

    @property
    def window(self) -> int:
        """The largest window of a queue: what the broker may deliver on one queue."""
        return max((sum(c for _, _, c in cs) for cs in self._consumers.values()), default=0)

    def start_queue(self, queue: Any, count: int | None = None) -> None:
        """Consume ``queue`` (bound to the channel) with the current window (the caller
        holds the write lock)."""
        if count is not None:
            self.asked = count
        self._consumers.setdefault(queue.name, [])
        self._start(queue, self.asked)

    def cancel_queue(self, name: str) -> None:
        """Stop consuming ``name`` (the caller holds the write lock)."""
        for _, tag, _ in self._consumers.pop(name, []):
            self._cancel(tag)

    def cancel_all(self) -> None:
        for name in list(self._consumers):
            self.cancel_queue(name)

    def resize(self, count: int) -> bool:
        """Make each queue's window ``count``, within the slack said above.  False if
        the frames could not be sent (the connection is going: it reconnects anyway)."""
        if count == self.asked:
            return True
        self.asked = count
        with self._lock:
            try:
                for consumers in self._consumers.values():
                    self._resize_queue(consumers, count)
            except Exception as exc:
                log.debug("changing the prefetch window to %d failed: %s", count, exc)
                return False
        return True

    def _resize_queue(self, consumers: list[tuple[Any, str, int]], count: int) -> None:
        if not consumers:
            return
        queue = consumers[0][0]
        window = sum(c for _, _, c in consumers)
        if window < count:
            self._start(queue, max(count - window, window // 4))
        elif window > count + count // 4:
            while consumers and window > count:
                _, tag, taken = consumers.pop()
                self._cancel(tag)
                window -= taken
            if window < count:
                self._start(queue, count - window)

    def _start(self, queue: Any, count: int) -> None:
        from amqp import spec  # kombu's own AMQP client, there whenever the driver is amqp

        self._serial += 1
        tag = f"{self._prefix}.{self._serial}"
        channel = self._channel
        channel.send_method(spec.Basic.Qos, "lBb", (0, count, False))
        # registered first: a delivery may follow the consume at once
        channel.callbacks[tag] = self._callback
        channel.send_method(
            spec.Basic.Consume,
            "BssbbbbF",
            (0, queue.name, tag, False, False, False, True, queue.consumer_arguments or {}),
        )
        self._consumers[queue.name].append((queue, tag, count))

    def _cancel(self, tag: str) -> None:
        from amqp import spec

        # cancel-ok is read by the consumer greenlet, which forgets the tag then: a
        # delivery already on its way still finds its callback
        self._channel.send_method(spec.Basic.Cancel, "sb", (tag, False))


def _where(conn: Connection) -> str:
    """The broker for the log: its URL with the password masked, or the embedded
    default's store."""
    store = getattr(conn.transport, "store", None)
    if store is not None:
        return f"the embedded broker in {store.path}"
    return str(conn.as_uri())  # as_uri() masks the password


def _tag(message: Message) -> Any:
    return (message.headers or {}).get("id") or message.delivery_tag


def _prefetch_limit(count: int) -> int:
    """AMQP's prefetch count is an unsigned short."""
    return min(max(count, 1), 65535)
