"""The task consumer of the embedded default, on the broker store itself.

kombu's virtual transport (:mod:`.lmdb_transport` under it) builds a kombu
``Message`` per delivery, tracks it in its ``QoS`` and hands it through the
channel's callbacks: a dozen microseconds a task, more than the store's own
transaction.  This consumer takes messages straight from the
:class:`~.lmdb_store.BrokerStore` (a batch per write transaction, the acks made
since the last one in the same transaction) and delivers them as light
:class:`~.envelope.EnvelopeMessage` objects.

Everything else stays on kombu: the queues, exchanges and bindings are declared
through the ``lmdb://`` transport as for any broker, and producers, remote
control and events use it unchanged.  What a delivered message owes the store is
the same as through kombu: it stays in ``unacked`` under this process's owner
token until it is acked; requeued, or restored by a sweep once this process is
gone (or past the visibility timeout without renewal).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .. import green
from . import lmdb_store
from .envelope import EnvelopeMessage, loads_envelope
from .lmdb_transport import POLL_INTERVAL, TAKE_BATCH
from .native import NativeConsumer

if TYPE_CHECKING:
    from kombu.connection import Connection

    from ..client.app import App
    from .lmdb_store import BrokerStore

log = logging.getLogger("greenworker.consumer")


class LmdbMessage(EnvelopeMessage):
    """One task message from the embedded broker, and the queue it came from."""

    __slots__ = ("queue",)

    def __init__(self, consumer: NativeLmdbConsumer, item: lmdb_store.Taken) -> None:
        payload = loads_envelope(item.envelope)
        if not isinstance(payload, dict):
            raise ValueError("not a kombu message envelope")
        super().__init__(consumer, payload, item.tag)
        self.queue = item.queue
        if item.redelivered:
            self.delivery_info["redelivered"] = True


class NativeLmdbConsumer(NativeConsumer):
    """Consumes ``queues`` from the embedded broker's store; the interface of
    :class:`~.base.TaskConsumer`."""

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        on_message: Callable[[Any], None],
        prefetch_count: Callable[[], int],
    ) -> None:
        super().__init__(app, queues, on_message, prefetch_count)
        self.sweep_interval = float(app.conf.broker_transport_options.get("sweep_interval", 2.0))
        self._connection: Connection | None = None
        self._store: BrokerStore | None = None
        self._address: bytes | None = None
        self._socket: socket.socket | None = None
        self._waiting = False  # between takes: nothing taken is left to hand over
        self._turn = 0  # which queue is taken from first (they take turns)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopping = False
        self._greenlet = green.spawn(self._run)
        self._acker = green.spawn(self._ack_loop)

    def stop_consuming(self, timeout: float = 5.0) -> None:
        """Stop taking new messages; acks and requeues keep working."""
        self._stopping = True
        self._capacity.set()
        if self._greenlet is not None:
            # waiting for a wake-up it holds nothing it has not handed over: end it now
            if self._waiting or not self._greenlet.join(timeout):
                self._greenlet.kill()
            self._greenlet = None

    def close(self) -> None:
        """Settle the acks made, give back every message still held."""
        self._stopping = True
        if self._acker is not None:
            self._acker.kill()
            self._acker = None
        if not self._flush_acks():
            log.warning("%d ack(s) not written: redelivered later", len(self._pending_acks))
        store = self._store
        held = [tag for tag, message in self._held.items() if not message.acknowledged]
        self._held.clear()
        if store is not None and held:
            try:
                store.requeue(held)
            except Exception as exc:  # the next start's sweep gives them back
                log.warning("could not requeue %d message(s) at close: %s", len(held), exc)
        self._release()

    def _declare_added(self, name: str) -> None:
        if self._connection is not None:  # else _consume declares it with the others
            self._declare(self._connection, [name])

    # ------------------------------------------------------------ acks

    def _flush_acks(self) -> bool:
        store = self._store
        if not self._pending_acks or store is None:
            return not self._pending_acks
        tags, self._pending_acks = self._pending_acks, []
        try:
            store.ack(tags)
        except Exception as exc:
            self._pending_acks[:0] = tags
            log.warning("could not ack %d message(s) yet: %s", len(tags), exc)
            return False
        return True

    def settle(self, message: Any, *, requeue: bool) -> None:
        """Reject ``message``: back to its queue with ``requeue``, else forgotten."""
        tag = message.delivery_tag
        self._held.pop(tag, None)
        self._capacity.set()
        store = self._open_store()
        if requeue:
            store.requeue([tag])
        else:
            store.ack([tag])

    # ------------------------------------------------------------ visibility

    def refresh_visibility(self, messages: Sequence[Any]) -> int:
        tags = [m.delivery_tag for m in messages if m.channel is self and not m.acknowledged]
        if not tags:
            return 0
        try:
            return self._open_store().refresh(tags)
        except Exception as exc:
            log.warning("could not renew the visibility of %d message(s): %s", len(tags), exc)
            return 0

    def queue_sizes(self) -> dict[str, int]:
        store = self._open_store()
        return {name: store.size(name) for name in self.queue_names}

    # ------------------------------------------------------------ the loop

    def _open_store(self) -> BrokerStore:
        if self._store is None:
            raise ConnectionError("the embedded broker's store is not open")
        return self._store

    def _declare(self, connection: Connection, names: Sequence[str]) -> None:
        """Declare ``names`` (their exchanges and bindings) through kombu, as any
        consumer would: producers in other processes route by these bindings."""
        channel = connection.default_channel
        for name in names:
            self.app.queue(name)(channel).declare()

    def _release(self) -> None:
        store, address = self._store, self._address
        if store is not None and address is not None and self.queue_names:
            try:
                store.wake_up(self.queue_names, address)  # no longer waiting there
            except Exception as exc:
                log.debug("could not leave the wake-up list: %s", exc)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._address = None
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:
                log.debug("closing the broker connection failed: %s", exc)

    def _connection_lost(self) -> None:
        # what this process holds stays in unacked under its owner token: acks and
        # requeues of those messages work again once the store is open
        self._release()

    def _consume(self) -> None:
        connection = self.app.connection()
        connection.ensure_connection(max_retries=0)  # opens the store; restores the dead's
        self._connection = connection
        store: BrokerStore = connection.transport.store
        self._store = store
        self._declare(connection, self.queue_names)
        if lmdb_store.CAN_WAKE:
            self._address = store.new_address()
            self._socket = lmdb_store.wake_socket(self._address)
        self.connection_generation += 1
        log.info(
            "consuming from %s on %s (native embedded consumer)",
            ", ".join(self.queue_names),
            store.path,
        )
        self._ready.set()
        interval = self.app.conf.worker_drain_interval
        next_sweep = time.monotonic() + self.sweep_interval
        while not self._stopping:
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + self.sweep_interval
                store.sweep()
            wait = max(0.0, min(interval, next_sweep - now))
            prefetch = max(self._prefetch_count(), 1)
            self._applied_prefetch = prefetch
            room = prefetch - len(self._held)
            if room <= 0:
                self._capacity.clear()
                self._capacity.wait(wait)
                continue
            asked = min(room, TAKE_BATCH)
            if self._take(store, asked) == asked:
                continue  # maybe more: take again at once
            # the queues ran dry: let the tasks just handed over start before the wait
            green.sleep(0)
            self._wait(store, wait)

    def _take(self, store: BrokerStore, limit: int) -> int:
        """Take up to ``limit`` messages (settling the acks made since the last write in
        the same transaction) and hand each over; return how many were taken."""
        names = self.queue_names
        if len(names) > 1:  # each queue first in turn
            self._turn = (self._turn + 1) % len(names)
            names = names[self._turn :] + names[: self._turn]
        acks, self._pending_acks = self._pending_acks, []
        self.receiving = True  # taken but not handed over: join() must not call this idle
        try:
            try:
                taken = store.take(names, limit, self._address, acks)
            except BaseException:
                self._pending_acks[:0] = acks
                raise
            for item in taken:
                try:
                    message = LmdbMessage(self, item)
                except Exception as exc:
                    log.error(
                        "Rejected malformed message on %s (not kombu's JSON envelope): %s",
                        item.queue,
                        exc,
                    )
                    store.ack([item.tag])
                    continue
                self._held[item.tag] = message
                self._on_message(message)
        finally:
            self.receiving = False
        return len(taken)

    def _wait(self, store: BrokerStore, seconds: float) -> None:
        """Wait up to ``seconds`` for a publish to the consumed queues (at once if one
        has a message now)."""
        self._waiting = True
        try:
            sock, address = self._socket, self._address
            if sock is None or address is None:
                green.sleep(min(seconds, POLL_INTERVAL))
            elif store.sleep(self.queue_names, address):
                lmdb_store.wait_for_wake(sock, seconds)
        finally:
            self._waiting = False
