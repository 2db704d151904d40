"""kombu's transport for the embedded default: ``lmdb://`` on :mod:`.lmdb_store`.

Every kombu user in the process -- the task consumer, the publisher, the pidbox
mailbox of remote control, the event dispatcher and receivers -- goes through this
transport as through any broker.  Routing tables (direct, topic, fanout) live in the
store, so a publisher in one process reaches the queues another one bound.

Transport options (``broker_transport_options``):

``data_dir``            where the store lives (``<data_dir>/broker``); the app passes it.
``visibility_timeout``  seconds an unacked message stays with a consumer that does not
                        renew it before it goes back to its queue (3600).
``max_map_size``        bytes the store may grow to; past it a publish fails (no limit).
``sweep_interval``      seconds between checks for consumers that died (2).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterable
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from . import lmdb_store
from .envelope import loads_envelope
from .lmdb_store import BrokerStore, QueueInfo

log = logging.getLogger("greenworker.broker")

#: Messages taken in one transaction when the channel's prefetch sets no smaller limit.
TAKE_BATCH = 64
#: How long a consumer waits between polls where wake-up sockets do not exist.
POLL_INTERVAL = 0.05


def store_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "broker")


def _seconds(arguments: dict[str, Any], name: str) -> float | None:
    value = arguments.get(name)
    return float(value) / 1000.0 if value is not None else None


class QoS(virtual.QoS):
    """Acks made while the connection drains ride on its next take (one transaction for
    both); others, and rejects, go to the store at once.  Restore puts messages back
    where they were (kombu's default re-routes them, which would copy a fanout message)."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        self.channel.connection.ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.store.requeue([delivery_tag])
        else:
            self.channel.store.ack([delivery_tag])
        self._quick_ack(delivery_tag)
        self.channel.connection.interrupt()  # room in the prefetch window

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        try:
            self.channel.store.requeue(tags)
        except Exception as exc:  # the store is gone: the next sweep puts them back
            return [(exc, tag) for tag in tags]
        return []


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.store: BrokerStore = connection.store

    # ---- queues
    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        arguments = kwargs.get("arguments") or {}
        auto_delete = bool(kwargs.get("auto_delete"))
        if auto_delete:
            self.store.own()  # it lives as long as this process does
        info = QueueInfo(
            auto_delete=auto_delete,
            owner=self.store.token if auto_delete else "",
            message_ttl=_seconds(arguments, "x-message-ttl"),
            expires=_seconds(arguments, "x-expires"),
        )
        self.store.declare_queue(queue, info)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.has_queue(queue)

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        if if_empty and self._size(queue):
            return
        self.store.delete_queue(queue)

    # ---- exchanges and bindings (shared by every process)
    def exchange_declare(
        self,
        exchange: str | None = None,
        type: str = "direct",
        durable: bool = False,
        auto_delete: bool = False,
        arguments: Any = None,
        nowait: bool = False,
        passive: bool = False,
    ) -> None:
        if not exchange:
            return
        if passive:
            if self.store.exchange_type(exchange) is None:
                from amqp.exceptions import NotFound

                raise NotFound(
                    f"NOT_FOUND - no exchange {exchange!r}",
                    (50, 10),
                    "Channel.exchange_declare",
                    404,
                )
            return
        self.store.declare_exchange(exchange, type)

    def exchange_delete(self, exchange: str, if_unused: bool = False, nowait: bool = False) -> None:
        self.store.delete_exchange(exchange)

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        exchange = exchange or "amq.direct"
        row = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments)
        self.store.bind(exchange, queue, routing_key, row)

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        self.store.unbind(exchange or "amq.direct", queue, routing_key)

    def get_table(self, exchange: str) -> list[tuple[Any, ...]]:
        return self.store.table(exchange)

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        return self.exchange_types[self.store.exchange_type(exchange) or default]

    def get_exchanges(self) -> list[str]:
        return self.store.exchanges()

    def list_bindings(self) -> Iterable[tuple[str, str, str]]:
        return self.store.bindings()

    # ---- messages
    def basic_publish(
        self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any
    ) -> None:
        """One transaction for every queue the message goes to (fanout included)."""
        self._inplace_augment_message(message, exchange, routing_key)
        queues = self._lookup(exchange, routing_key) if exchange else [routing_key]
        self._store_put([q for q in queues if q], message)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._store_put([queue], message)

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        self._store_put(list(self._lookup(exchange, routing_key)), message)

    def _store_put(self, queues: list[str], message: dict[str, Any]) -> None:
        expiration = message.get("properties", {}).get("expiration")
        expires_at = time.time() + float(expiration) / 1000.0 if expiration else 0.0
        self.store.put(
            queues,
            kombu_dumps(message).encode(),
            self._get_message_priority(message),
            expires_at,
        )

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        taken = self.store.take([queue], 1)
        if not taken:
            raise Empty()
        return payload_of(taken[0])

    def _restore(self, message: Any) -> None:
        self.store.requeue([message.delivery_tag])

    def deliver_ready(self, address: bytes | None, acks: list[str]) -> int:
        """Settle ``acks`` and take what this channel's consumers may have now (one
        transaction), then hand it to their callbacks."""
        if not self._consumers or not self.qos.can_consume():
            self.store.ack(acks)
            return 0
        room = self.qos.can_consume_max_estimate()
        limit = min(room, TAKE_BATCH) if room else TAKE_BATCH
        queues = list(dict.fromkeys(self._active_queues))
        if len(queues) > 1:  # take from each queue first in turn
            self._active_queues.append(self._active_queues.pop(0))
        taken = self.store.take(queues, limit, address, acks)
        deliver = self.connection._deliver
        for item in taken:
            deliver(payload_of(item), item.queue)
        return len(taken)


def payload_of(item: lmdb_store.Taken) -> dict[str, Any]:
    """kombu's message payload for a delivered message, with its delivery tag."""
    payload: dict[str, Any] = loads_envelope(item.envelope)
    payload["properties"]["delivery_tag"] = item.tag
    if item.redelivered:
        payload["redelivered"] = True
        payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
    return payload


class Transport(virtual.Transport):
    """The embedded default's broker: an LMDB store shared by the processes of one
    machine, with wake-ups over datagram sockets."""

    Channel = Channel
    default_port = None
    driver_type = "lmdb"
    driver_name = "lmdb"
    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic", "fanout"])
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options
        data_dir = options.get("data_dir") or client.virtual_host or ".greenworker"
        max_map = options.get("max_map_size")
        self.store = lmdb_store.open_store(
            store_path(data_dir) if options.get("data_dir") else os.path.abspath(data_dir),
            max_map_size=int(max_map) if max_map else None,
            visibility_timeout=float(options.get("visibility_timeout", 3600.0)),
        )
        if options.get("data_dir"):
            import_filesystem_queues(self.store, options["data_dir"])
        self.sweep_interval = float(options.get("sweep_interval", 2.0))
        self._next_sweep = 0.0
        self._address: bytes | None = None
        self._socket: socket.socket | None = None
        self._waiting = False
        self._woken = False
        self._draining = False
        self._acks: list[str] = []  # made while draining: settled by the next take
        self._asleep_on: list[str] = []

    def driver_version(self) -> str:
        import lmdb

        return str(lmdb.__version__)

    def establish_connection(self) -> Any:
        self.store.sweep()  # restore on start: what consumers that died held
        self._next_sweep = time.monotonic() + self.sweep_interval
        return super().establish_connection()

    def ack(self, tag: str) -> None:
        """Ack ``tag``: with the next take while this connection drains, else now."""
        if self._draining:
            self._acks.append(tag)
            self.interrupt()  # a consumer waiting for prefetch room
        else:
            self.store.ack([tag])

    def _pop_acks(self) -> list[str]:
        acks, self._acks = self._acks, []
        return acks

    def close_connection(self, connection: Any) -> None:
        self.store.ack(self._pop_acks())
        super().close_connection(connection)
        if self._asleep_on and self._address is not None:
            self.store.wake_up(self._asleep_on, self._address)
            self._asleep_on = []
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # ---- waiting
    def _wake_socket(self) -> socket.socket | None:
        if not lmdb_store.CAN_WAKE:
            return None
        if self._socket is None:
            self._address = self.store.new_address()
            self._socket = lmdb_store.wake_socket(self._address)
        return self._socket

    def wake_self(self) -> None:
        """End a wait of this connection's consumer (an ack made room, a stop):
        ``drain_events`` returns (as a timeout) unless there is a message to deliver."""
        self._woken = True
        self.interrupt()

    def interrupt(self) -> None:
        """End the current wait, if any, and look again (an ack made prefetch room)."""
        if self._waiting and self._address is not None:
            self.store.wake([self._address])

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> None:
        self._draining = True
        try:
            self._drain(None if timeout is None else time.monotonic() + timeout)
        finally:
            self._draining = False
            self.store.ack(self._pop_acks())

    def _drain(self, deadline: float | None) -> None:
        while True:
            sock = self._wake_socket()
            delivered = 0
            for channel in list(self.channels):
                delivered += channel.deliver_ready(self._address, self._pop_acks())
            self._asleep_on = [] if delivered else self._asleep_on
            if delivered:
                return
            if self._woken:
                self._woken = False
                raise TimeoutError()
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + self.sweep_interval
                self.store.sweep()
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            wait = min(remaining or self.sweep_interval, self._next_sweep - now)
            self._wait(sock, max(wait, 0.0))

    def _wait(self, sock: socket.socket | None, seconds: float) -> None:
        queues = [
            q
            for ch in self.channels
            if ch._consumers and ch.qos.can_consume()
            for q in ch._active_queues
        ]
        if sock is None or self._address is None:
            time.sleep(min(seconds, POLL_INTERVAL))
            return
        if queues:
            if not self.store.sleep(queues, self._address):
                return  # a message is there now
            self._asleep_on = queues
        self._waiting = True
        try:
            lmdb_store.wait_for_wake(sock, seconds)
        finally:
            self._waiting = False


def register() -> None:
    """Make ``lmdb://`` a kombu transport name."""
    TRANSPORT_ALIASES.setdefault("lmdb", "greenworker.transport.lmdb_transport:Transport")


register()


def import_filesystem_queues(store: BrokerStore, data_dir: str) -> int:
    """Move the messages a 0.1.0 embedded default left in kombu's filesystem queues
    (``<data_dir>/queues``) into ``store``, oldest first, then remove those folders.

    Each file is deleted only after its message is committed here (a crash between the
    two delivers it twice, never zero times); another process doing the same waits for
    the lock.  A file that cannot be read is moved to ``queues/unreadable`` and named in
    a warning."""
    folder = os.path.join(os.path.abspath(data_dir), "queues")
    messages = os.path.join(folder, "messages")
    if not os.path.isdir(messages):
        return 0
    moved = 0
    with open(os.path.join(folder, ".upgrade.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(messages):  # another process did it meanwhile
            return 0
        for name in sorted(os.listdir(messages)):  # names start with the publish time
            path = os.path.join(messages, name)
            queue = name.partition(".")[2].removesuffix(".msg")
            try:
                with open(path, "rb") as file:
                    raw = file.read()
                payload = kombu_loads(raw)
                priority = int(payload.get("properties", {}).get("priority") or 0)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                _set_aside(folder, path, name, exc)
                continue
            if not name.endswith(".msg") or not queue:
                _set_aside(folder, path, name, ValueError("not a kombu message file"))
                continue
            store.put([queue], raw, priority)
            os.unlink(path)
            moved += 1
        control = os.path.join(folder, "control")  # exchange tables: workers declare again
        if os.path.isdir(control):
            for name in os.listdir(control):
                os.unlink(os.path.join(control, name))
            os.rmdir(control)
        os.rmdir(messages)
    os.unlink(os.path.join(folder, ".upgrade.lock"))
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # kept when unreadable files were set aside
    log.warning(
        "moved %d message(s) from the 0.1.0 filesystem queues in %s into the embedded broker",
        moved,
        folder,
    )
    return moved


def _set_aside(folder: str, path: str, name: str, exc: BaseException) -> None:
    aside = os.path.join(folder, "unreadable")
    os.makedirs(aside, exist_ok=True)
    os.replace(path, os.path.join(aside, name))
    log.warning(
        "could not move %s of the 0.1.0 filesystem queues (%s: %s); it is in %s",
        name,
        type(exc).__name__,
        exc,
        aside,
    )
