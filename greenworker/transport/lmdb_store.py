"""The embedded default's broker: queues, bindings and unacked messages in one LMDB
environment that every process on the machine opens (``<data_dir>/broker``).

What it keeps, each in its own database of the environment:

``messages``  ``queue \\0 (9 - priority) seq`` → flags, expiry, kombu's envelope (JSON).
              Keys sort by queue, then priority (highest first), then publish order.
``unacked``   ``tag`` → when it was delivered, the message's key and value.  A tag starts
              with its consumer's owner token, so one owner's messages are one key range.
``counts``    queue → messages waiting (kept in the same transactions as the messages).
``queues``    queue → how it was declared (auto-delete, TTLs) and by which owner.
``exchanges`` / ``bindings``  kombu's routing tables, shared by every process.
``owners``    token → pid: the processes that took messages.  Each holds an exclusive
              ``flock`` on ``owners/<token>.lock`` while it lives; a lock anyone can take
              is a dead owner, whose unacked messages go back to their queues.
``sleepers``  ``queue \\0 address`` → a consumer waiting for that queue.  A publisher
              reads them in the transaction that adds the message and sends each a
              one-byte datagram after the commit: wake-ups without polling.

At-least-once: a message leaves ``messages`` and enters ``unacked`` in one transaction
and leaves ``unacked`` only when acked.  A consumer killed -9 leaves its messages in
``unacked``; the next sweep (any consumer's, and every start) sees its lock free and
puts them back.  An unacked message older than ``visibility_timeout`` goes back too
(a consumer that hangs); holders renew theirs (:meth:`BrokerStore.refresh`).

Every write is one short transaction with no I/O or green switch inside, so the one
LMDB writer lock (a robust mutex: a holder that dies releases it) is never held across
a wait, in this process or any other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import socket
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb

from ..exceptions import GreenworkerError

log = logging.getLogger("greenworker.broker")

FORMAT_VERSION = b"1"
#: Address space reserved for the map at first; it grows (doubling) when full.
INITIAL_MAP_SIZE = 1 << 30
SEP = b"\x00"
_MESSAGE_HEADER = struct.Struct(">Bd")  # flags, expires at (0: never)
_UNACKED_HEADER = struct.Struct(">dI")  # delivered at, length of the message key
_COUNT = struct.Struct(">q")
_SEQ = struct.Struct(">Q")
REDELIVERED = 0x01
MAX_PRIORITY = 9
TOKEN_LENGTH = 16
#: Wake-up datagrams go to Linux abstract sockets (no files, no path-length limit);
#: elsewhere consumers poll.
CAN_WAKE = sys.platform.startswith("linux")

T = TypeVar("T")


class BrokerStoreError(GreenworkerError):
    """The embedded broker's store cannot be used (full, unreadable, a newer layout)."""


@dataclass(frozen=True)
class Taken:
    """One delivered message: its tag, queue, kombu envelope (JSON bytes) and whether it
    was delivered before."""

    tag: str
    queue: str
    envelope: bytes
    redelivered: bool


@dataclass(frozen=True)
class QueueInfo:
    """How a queue was declared."""

    auto_delete: bool = False
    owner: str = ""
    message_ttl: float | None = None  # seconds
    expires: float | None = None  # seconds

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "auto_delete": self.auto_delete,
                "owner": self.owner,
                "message_ttl": self.message_ttl,
                "expires": self.expires,
            }
        ).encode()

    @classmethod
    def loads(cls, raw: bytes) -> QueueInfo:
        data = json.loads(raw)
        return cls(
            auto_delete=bool(data.get("auto_delete")),
            owner=str(data.get("owner") or ""),
            message_ttl=data.get("message_ttl"),
            expires=data.get("expires"),
        )


def _queue_prefix(queue: str) -> bytes:
    return queue.encode() + SEP


def _message_key(queue: str, priority: int, seq: int) -> bytes:
    return _queue_prefix(queue) + bytes([MAX_PRIORITY - priority]) + _SEQ.pack(seq)


def _binding_key(exchange: str, queue: str, routing_key: str) -> bytes:
    return SEP.join(part.encode() for part in (exchange, queue, routing_key))


def _queue_of(key: bytes) -> str:
    return key.split(SEP, 1)[0].decode()


class BrokerStore:
    """One process's handle on the broker environment at ``path``.  Use
    :func:`open_store`: LMDB allows one handle per environment per process."""

    def __init__(
        self,
        path: str,
        *,
        max_map_size: int | None = None,
        visibility_timeout: float = 3600.0,
    ) -> None:
        self.path = path
        self.max_map_size = max_map_size
        self.visibility_timeout = visibility_timeout
        self.pid = os.getpid()
        os.makedirs(os.path.join(path, "owners"), exist_ok=True)
        try:
            self.env = lmdb.open(
                path,
                map_size=min(INITIAL_MAP_SIZE, max_map_size or INITIAL_MAP_SIZE),
                max_dbs=10,
                sync=False,
                metasync=False,
                max_readers=1024,
            )
        except lmdb.Error as exc:
            raise BrokerStoreError(f"cannot open the broker store at {path}: {exc}") from None
        self._dbs = {
            name: self.env.open_db(name.encode())
            for name in (
                "meta",
                "messages",
                "unacked",
                "counts",
                "queues",
                "exchanges",
                "bindings",
                "owners",
                "sleepers",
            )
        }
        self._check_version()
        self.token = uuid.uuid4().hex[:TOKEN_LENGTH]
        self._tags = itertools.count(1)
        self._lock_fd: int | None = None  # held while this process owns unacked messages
        self._wake_sender: socket.socket | None = None
        self._addresses = itertools.count(1)

    # ------------------------------------------------------------ transactions

    def _write(self, action: Callable[[Any], T]) -> T:
        """Run ``action(txn)`` in one write transaction: grow a full map (up to
        ``max_map_size``), adopt a map another process grew, fail loudly on a full disk."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return action(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew it: adopt its size
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                limit = self.max_map_size
                if limit is not None and size >= limit:
                    raise BrokerStoreError(
                        f"the broker store at {self.path} is full ({size} bytes, "
                        f"max_map_size {limit}): nothing was written"
                    ) from None
                # a remap (well under 1 ms): done here, not in a thread, as no other
                # transaction of this process may be open while it runs
                self.env.set_mapsize(min(size * 2, limit) if limit is not None else size * 2)
            except lmdb.Error as exc:
                if getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc):
                    raise BrokerStoreError(
                        f"the disk of the broker store at {self.path} is full: nothing was written"
                    ) from None
                raise

    def _read(self, action: Callable[[Any], T]) -> T:
        while True:
            try:
                with self.env.begin() as txn:
                    return action(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

    def _check_version(self) -> None:
        def check(txn: Any) -> bytes:
            meta = self._dbs["meta"]
            version: bytes | None = txn.get(b"version", db=meta)
            if version is None:
                txn.put(b"version", FORMAT_VERSION, db=meta)
                return FORMAT_VERSION
            return version

        version = self._write(check)
        if version != FORMAT_VERSION:
            raise BrokerStoreError(
                f"the broker store at {self.path} has layout {version.decode()!r}, this "
                f"greenworker reads {FORMAT_VERSION.decode()!r}: use the greenworker that "
                "wrote it, or move the directory away"
            )

    # ------------------------------------------------------------ queues

    def declare_queue(self, name: str, info: QueueInfo) -> None:
        def declare(txn: Any) -> None:
            txn.put(name.encode(), info.dumps(), db=self._dbs["queues"])
            txn.put(name.encode(), _COUNT.pack(self._count(txn, name)), db=self._dbs["counts"])

        self._write(declare)

    def has_queue(self, name: str) -> bool:
        return self._read(lambda txn: txn.get(name.encode(), db=self._dbs["queues"]) is not None)

    def queue_info(self, name: str) -> QueueInfo | None:
        raw = self._read(lambda txn: txn.get(name.encode(), db=self._dbs["queues"]))
        return QueueInfo.loads(raw) if raw is not None else None

    def queues(self) -> dict[str, QueueInfo]:
        def read(txn: Any) -> dict[str, QueueInfo]:
            with txn.cursor(db=self._dbs["queues"]) as cursor:
                return {key.decode(): QueueInfo.loads(value) for key, value in cursor}

        return self._read(read)

    def size(self, name: str) -> int:
        return self._read(lambda txn: self._count(txn, name))

    def _count(self, txn: Any, name: str) -> int:
        raw = txn.get(name.encode(), db=self._dbs["counts"])
        return _COUNT.unpack(raw)[0] if raw is not None else 0

    def _add_count(self, txn: Any, name: str, delta: int) -> None:
        txn.put(name.encode(), _COUNT.pack(self._count(txn, name) + delta), db=self._dbs["counts"])

    def purge(self, name: str) -> int:
        """Delete the waiting messages of ``name`` (not those delivered and unacked)."""
        return self._write(lambda txn: self._purge(txn, name))

    def _purge(self, txn: Any, name: str) -> int:
        prefix = _queue_prefix(name)
        removed = 0
        with txn.cursor(db=self._dbs["messages"]) as cursor:
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    if not cursor.delete():
                        break
                    removed += 1
        if txn.get(name.encode(), db=self._dbs["counts"]) is not None:
            txn.put(name.encode(), _COUNT.pack(0), db=self._dbs["counts"])
        return removed

    def delete_queue(self, name: str) -> None:
        """Delete a queue, its waiting messages and its bindings."""
        self._write(lambda txn: self._delete_queue(txn, name))

    def _delete_queue(self, txn: Any, name: str) -> None:
        self._purge(txn, name)
        txn.delete(name.encode(), db=self._dbs["queues"])
        txn.delete(name.encode(), db=self._dbs["counts"])
        bindings = self._dbs["bindings"]
        with txn.cursor(db=bindings) as cursor:
            doomed = [key for key, value in cursor if json.loads(value)[2] == name]
        for key in doomed:
            txn.delete(key, db=bindings)
        self._delete_sleepers(txn, lambda queue, address: queue == name)

    # ------------------------------------------------------------ exchanges

    def declare_exchange(self, name: str, type_: str) -> None:
        self._write(lambda txn: txn.put(name.encode(), type_.encode(), db=self._dbs["exchanges"]))

    def exchange_type(self, name: str) -> str | None:
        raw = self._read(lambda txn: txn.get(name.encode(), db=self._dbs["exchanges"]))
        return raw.decode() if raw is not None else None

    def exchanges(self) -> list[str]:
        def read(txn: Any) -> list[str]:
            with txn.cursor(db=self._dbs["exchanges"]) as cursor:
                return [key.decode() for key in cursor.iternext(values=False)]

        return self._read(read)

    def delete_exchange(self, name: str) -> None:
        def delete(txn: Any) -> None:
            txn.delete(name.encode(), db=self._dbs["exchanges"])
            self._unbind_matching(txn, _queue_prefix(name), lambda row: True)

        self._write(delete)

    def bind(self, exchange: str, queue: str, routing_key: str, row: Sequence[Any]) -> None:
        """Record kombu's routing-table ``row`` (routing key, pattern, queue) of a binding."""
        key = _binding_key(exchange, queue, routing_key)
        self._write(
            lambda txn: txn.put(key, json.dumps(list(row)).encode(), db=self._dbs["bindings"])
        )

    def unbind(self, exchange: str, queue: str, routing_key: str) -> None:
        key = _binding_key(exchange, queue, routing_key)
        self._write(lambda txn: txn.delete(key, db=self._dbs["bindings"]))

    def _unbind_matching(self, txn: Any, prefix: bytes, match: Callable[[list[Any]], bool]) -> None:
        bindings = self._dbs["bindings"]
        doomed = []
        with txn.cursor(db=bindings) as cursor:
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    if match(json.loads(value)):
                        doomed.append(key)
        for key in doomed:
            txn.delete(key, db=bindings)

    def table(self, exchange: str) -> list[tuple[Any, ...]]:
        """kombu's routing table of ``exchange``: (routing key, pattern, queue) rows."""
        prefix = _queue_prefix(exchange)

        def read(txn: Any) -> list[tuple[Any, ...]]:
            rows = []
            with txn.cursor(db=self._dbs["bindings"]) as cursor:
                if cursor.set_range(prefix):
                    for key, value in cursor:
                        if not key.startswith(prefix):
                            break
                        rows.append(tuple(json.loads(value)))
            return rows

        return self._read(read)

    def bindings(self) -> list[tuple[str, str, str]]:
        """Every binding: (queue, exchange, routing key)."""

        def read(txn: Any) -> list[tuple[str, str, str]]:
            with txn.cursor(db=self._dbs["bindings"]) as cursor:
                out = []
                for key in cursor.iternext(values=False):
                    exchange, queue, routing_key = (p.decode() for p in key.split(SEP, 2))
                    out.append((queue, exchange, routing_key))
                return out

        return self._read(read)

    # ------------------------------------------------------------ messages

    def put(
        self, queues: Sequence[str], envelope: bytes, priority: int, expires_at: float = 0.0
    ) -> None:
        """Add one message to each of ``queues`` (committed when this returns), then wake
        the consumers that wait for them.  A queue declared with a message TTL gets that
        expiry (the earlier of it and ``expires_at``)."""
        if not queues:
            return
        self._check_room()
        priority = max(0, min(MAX_PRIORITY, priority))

        def put(txn: Any) -> list[bytes]:
            seq = self._next_seq(txn)
            messages = self._dbs["messages"]
            wake: list[bytes] = []
            now = time.time()
            for queue in queues:
                info = self._queue_info(txn, queue)
                if info is None:  # published before any declare: a plain durable queue
                    txn.put(queue.encode(), QueueInfo().dumps(), db=self._dbs["queues"])
                expiry = expires_at
                if info is not None and info.message_ttl is not None:
                    ttl_expiry = now + info.message_ttl
                    expiry = min(expiry, ttl_expiry) if expiry else ttl_expiry
                key = _message_key(queue, priority, seq)
                txn.put(key, _MESSAGE_HEADER.pack(0, expiry) + envelope, db=messages)
                self._add_count(txn, queue, 1)
                wake.extend(self._sleepers_of(txn, queue))
            return wake

        self.wake(self._write(put))

    def _check_room(self) -> None:
        """Refuse a publish once the store uses 3/4 of ``max_map_size``: the rest is
        the room consumers need to take and ack what is there (every LMDB write, a
        delete too, needs free pages)."""
        if self.max_map_size is None:
            return

        def pages(txn: Any) -> int:
            stats = [txn.stat(db) for db in self._dbs.values()] + [self.env.stat()]
            return sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)

        used = self._read(pages) * self.env.stat()["psize"]
        if used > self.max_map_size * 3 // 4:
            raise BrokerStoreError(
                f"the broker store at {self.path} is full ({used} of max_map_size "
                f"{self.max_map_size} bytes in use; the rest is kept for consumers): "
                "nothing was written"
            )

    def _next_seq(self, txn: Any) -> int:
        raw = txn.get(b"seq", db=self._dbs["meta"])
        seq = (_SEQ.unpack(raw)[0] if raw is not None else 0) + 1
        txn.put(b"seq", _SEQ.pack(seq), db=self._dbs["meta"])
        return seq

    def _queue_info(self, txn: Any, queue: str) -> QueueInfo | None:
        raw = txn.get(queue.encode(), db=self._dbs["queues"])
        return QueueInfo.loads(raw) if raw is not None else None

    def take(
        self,
        queues: Sequence[str],
        limit: int,
        address: bytes | None = None,
        acks: Sequence[str] = (),
    ) -> list[Taken]:
        """Deliver up to ``limit`` messages from ``queues`` (in that order; highest
        priority first within a queue) into ``unacked``, in one transaction.  Expired
        messages are dropped on the way.  ``address``: the consumer stops waiting there;
        ``acks``: tags acked in the same transaction."""
        if limit <= 0 or not queues:
            self.ack(acks)
            return []
        self.own()
        now = time.time()

        def take(txn: Any) -> list[Taken]:
            messages, unacked = self._dbs["messages"], self._dbs["unacked"]
            for tag in acks:
                txn.delete(tag.encode(), db=unacked)
            out: list[Taken] = []
            with txn.cursor(db=messages) as cursor:
                for queue in queues:
                    prefix = _queue_prefix(queue)
                    taken_here = 0
                    if not cursor.set_range(prefix):
                        continue
                    while len(out) < limit:
                        key = cursor.key()
                        if not key.startswith(prefix):
                            break
                        value = cursor.value()
                        flags, expiry = _MESSAGE_HEADER.unpack_from(value)
                        cursor.delete()
                        taken_here += 1
                        if expiry and expiry < now:
                            continue  # expired: dropped, as RabbitMQ drops it
                        tag = f"{self.token}.{next(self._tags):x}"
                        record = _UNACKED_HEADER.pack(now, len(key)) + key + value
                        txn.put(tag.encode(), record, db=unacked)
                        envelope = value[_MESSAGE_HEADER.size :]
                        out.append(Taken(tag, queue, envelope, bool(flags & REDELIVERED)))
                    if taken_here:
                        self._add_count(txn, queue, -taken_here)
                    if len(out) >= limit:
                        break
            if address is not None:
                self._delete_sleepers(txn, lambda queue, addr: addr == address, queues)
            return out

        return self._write(take)

    def ack(self, tags: Iterable[str]) -> None:
        """Forget delivered messages (acked, or rejected without requeue)."""
        keys = [tag.encode() for tag in tags]
        if not keys:
            return

        def ack(txn: Any) -> None:
            unacked = self._dbs["unacked"]
            for key in keys:
                txn.delete(key, db=unacked)

        self._write(ack)

    def requeue(self, tags: Iterable[str]) -> int:
        """Put delivered messages back where they were in their queues, marked
        redelivered (a queue deleted meanwhile drops them)."""
        keys = [tag.encode() for tag in tags]
        if not keys:
            return 0

        def requeue(txn: Any) -> tuple[int, list[bytes]]:
            wake: list[bytes] = []
            restored = sum(self._restore(txn, key, wake) for key in keys)
            return restored, wake

        restored, wake = self._write(requeue)
        self.wake(wake)
        return restored

    def _restore(self, txn: Any, tag_key: bytes, wake: list[bytes]) -> bool:
        unacked = self._dbs["unacked"]
        record = txn.pop(tag_key, db=unacked)
        if record is None:
            return False
        _, key_length = _UNACKED_HEADER.unpack_from(record)
        start = _UNACKED_HEADER.size
        key = record[start : start + key_length]
        value = bytearray(record[start + key_length :])
        queue = _queue_of(key)
        if txn.get(queue.encode(), db=self._dbs["queues"]) is None:
            return False  # its queue is gone
        value[0] |= REDELIVERED
        txn.put(key, bytes(value), db=self._dbs["messages"])
        self._add_count(txn, queue, 1)
        wake.extend(self._sleepers_of(txn, queue))
        return True

    def refresh(self, tags: Iterable[str]) -> int:
        """Renew the delivery time of held messages, so the visibility timeout does not
        hand them to another consumer while this one holds them (ETA tasks)."""
        keys = [tag.encode() for tag in tags]
        now = _UNACKED_HEADER.pack(time.time(), 0)[:8]

        def refresh(txn: Any) -> int:
            unacked = self._dbs["unacked"]
            renewed = 0
            for key in keys:
                record = txn.get(key, db=unacked)
                if record is not None:
                    txn.put(key, now + record[8:], db=unacked)
                    renewed += 1
            return renewed

        return self._write(refresh) if keys else 0

    def unacked_count(self) -> int:
        return int(self._read(lambda txn: txn.stat(self._dbs["unacked"])["entries"]))

    # ------------------------------------------------------------ owners and sweeps

    def own(self) -> None:
        """Register this process as an owner (of unacked messages, of auto-delete
        queues), once: its lock is what tells the others it lives."""
        if self._lock_fd is not None:
            return
        lock_path = os.path.join(self.path, "owners", f"{self.token}.lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file only this process knows: never waits
        self._lock_fd = fd
        record = json.dumps({"pid": os.getpid(), "since": time.time()}).encode()
        self._write(lambda txn: txn.put(self.token.encode(), record, db=self._dbs["owners"]))

    def _owner_alive(self, token: str) -> bool:
        lock_path = os.path.join(self.path, "owners", f"{token}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def _other_owners(self) -> list[str]:
        def read(txn: Any) -> list[str]:
            with txn.cursor(db=self._dbs["owners"]) as cursor:
                return [key.decode() for key in cursor.iternext(values=False)]

        return [token for token in self._read(read) if token != self.token]

    def dead_owners(self) -> list[str]:
        return [token for token in self._other_owners() if not self._owner_alive(token)]

    def sweep(self, *, visibility: bool = True) -> int:
        """Hand back what dead owners held (their unacked messages, their auto-delete
        queues deleted) and, with ``visibility``, every message unacked for longer than
        the visibility timeout.  Returns the number of messages put back."""
        dead = self.dead_owners()
        deadline = time.time() - self.visibility_timeout

        def sweep(txn: Any) -> tuple[int, list[bytes]]:
            unacked = self._dbs["unacked"]
            wake: list[bytes] = []
            doomed: list[bytes] = []
            with txn.cursor(db=unacked) as cursor:
                for token in dead:
                    prefix = token.encode() + b"."
                    if cursor.set_range(prefix):
                        for key in cursor.iternext(values=False):
                            if not key.startswith(prefix):
                                break
                            doomed.append(key)
                if visibility:
                    for key, record in cursor.iternext() if cursor.first() else ():
                        if _UNACKED_HEADER.unpack_from(record)[0] < deadline:
                            doomed.append(key)
            restored = sum(self._restore(txn, key, wake) for key in dict.fromkeys(doomed))
            for token in dead:
                self._forget_owner(txn, token)
            return restored, wake

        restored, wake = self._write(sweep) if dead or visibility else (0, [])
        for token in dead:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, "owners", f"{token}.lock"))
        self.wake(wake)
        if restored:
            log.warning(
                "restored %d unacked message(s) of %s to their queues",
                restored,
                f"{len(dead)} consumer(s) that died"
                if dead
                else "consumers past the visibility timeout",
            )
        return restored

    def _forget_owner(self, txn: Any, token: str) -> None:
        txn.delete(token.encode(), db=self._dbs["owners"])
        marker = token.encode()
        self._delete_sleepers(txn, lambda queue, address: marker in address)
        with txn.cursor(db=self._dbs["queues"]) as cursor:
            infos = ((key.decode(), QueueInfo.loads(value)) for key, value in cursor)
            owned = [name for name, info in infos if info.auto_delete and info.owner == token]
        for queue in owned:
            self._delete_queue(txn, queue)

    # ------------------------------------------------------------ wake-ups

    def new_address(self) -> bytes:
        """A wake-up address of this process (an abstract socket name)."""
        return f"\0greenworker-{self.token}-{os.getpid()}-{next(self._addresses)}".encode()

    def sleep(self, queues: Sequence[str], address: bytes) -> bool:
        """Register ``address`` as waiting for ``queues`` unless one has a message: True
        if registered (wait for a datagram), False if there is something to take now.
        One transaction, so a publisher either sees the registration or its message is
        seen here."""

        def sleep(txn: Any) -> bool:
            messages = self._dbs["messages"]
            with txn.cursor(db=messages) as cursor:
                for queue in queues:
                    prefix = _queue_prefix(queue)
                    if cursor.set_range(prefix) and cursor.key().startswith(prefix):
                        return False
            for queue in queues:
                txn.put(_queue_prefix(queue) + address, b"", db=self._dbs["sleepers"])
            return True

        return self._write(sleep)

    def wake_up(self, queues: Sequence[str], address: bytes) -> None:
        """Stop waiting at ``address`` (no message came)."""
        self._write(lambda txn: self._delete_sleepers(txn, lambda q, a: a == address, queues))

    def _sleepers_of(self, txn: Any, queue: str) -> list[bytes]:
        prefix = _queue_prefix(queue)
        with txn.cursor(db=self._dbs["sleepers"]) as cursor:
            if not cursor.set_range(prefix):
                return []
            out = []
            for key in cursor.iternext(values=False):
                if not key.startswith(prefix):
                    break
                out.append(key[len(prefix) :])
            return out

    def _delete_sleepers(
        self,
        txn: Any,
        match: Callable[[str, bytes], bool],
        queues: Sequence[str] | None = None,
    ) -> None:
        sleepers = self._dbs["sleepers"]
        doomed = []
        with txn.cursor(db=sleepers) as cursor:
            if queues is None:
                rows: Iterator[bytes] = cursor.iternext(values=False)
                for key in rows:
                    name, _, address = key.partition(SEP)
                    if match(name.decode(), address):
                        doomed.append(key)
            else:
                for queue in queues:
                    prefix = _queue_prefix(queue)
                    if not cursor.set_range(prefix):
                        continue
                    for key in cursor.iternext(values=False):
                        if not key.startswith(prefix):
                            break
                        if match(queue, key[len(prefix) :]):
                            doomed.append(key)
        for key in doomed:
            txn.delete(key, db=sleepers)

    def wake(self, addresses: Iterable[bytes]) -> None:
        """Send each waiting consumer at ``addresses`` its wake-up datagram."""
        if not CAN_WAKE:
            return
        for address in dict.fromkeys(addresses):
            if self._wake_sender is None:
                self._wake_sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._wake_sender.setblocking(False)
            try:
                self._wake_sender.sendto(b"!", address)
            except OSError:
                pass  # full (it is awake anyway) or gone (the sweep forgets it)

    # ------------------------------------------------------------ maintenance

    def summary(self) -> dict[str, Any]:
        """Queues with their waiting counts, unacked messages, owners, file size."""
        queues = self.queues()
        info = self.env.info()
        return {
            "path": self.path,
            "queues": {name: self.size(name) for name in sorted(queues)},
            "unacked": self.unacked_count(),
            "consumers_alive": len(self.live_owners()),
            "map_size": info["map_size"],
            "file_size": os.path.getsize(os.path.join(self.path, "data.mdb")),
        }

    def live_owners(self) -> list[str]:
        """The processes (other than this one) that hold messages or queues now."""
        return [token for token in self._other_owners() if self._owner_alive(token)]

    def compact(self) -> tuple[int, int]:
        """Rewrite the data file without its free pages; return (bytes before, after).
        Refused while a consumer lives; producers must be stopped too (a process that
        has the old file open would go on writing to it).  The store is closed after."""
        alive = self.live_owners()
        if alive:
            raise BrokerStoreError(
                f"the broker store at {self.path} is in use by {len(alive)} consumer "
                "process(es): stop the workers (and the programs that publish) first"
            )
        data = os.path.join(self.path, "data.mdb")
        before = os.path.getsize(data)
        tmp = self.path + ".compact"
        os.makedirs(tmp, exist_ok=True)
        self.env.copy(tmp, compact=True)
        self.env.close()
        os.replace(os.path.join(tmp, "data.mdb"), data)
        os.rmdir(tmp)
        _stores.pop((os.getpid(), self.path), None)
        return before, os.path.getsize(data)

    def release(self) -> None:
        """Drop this process's ownership at exit: what it still holds unacked goes back
        to its queues, its auto-delete queues are deleted."""
        if self._lock_fd is None:
            return

        def release(txn: Any) -> list[bytes]:
            wake: list[bytes] = []
            prefix = self.token.encode() + b"."
            with txn.cursor(db=self._dbs["unacked"]) as cursor:
                held = []
                if cursor.set_range(prefix):
                    for key in cursor.iternext(values=False):
                        if not key.startswith(prefix):
                            break
                        held.append(key)
            for key in held:
                self._restore(txn, key, wake)
            self._forget_owner(txn, self.token)
            return wake

        self.wake(self._write(release))
        if self._wake_sender is not None:
            self._wake_sender.close()
            self._wake_sender = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, "owners", f"{self.token}.lock"))
        os.close(self._lock_fd)
        self._lock_fd = None


def wake_socket(address: bytes) -> socket.socket:
    """A datagram socket bound to the wake-up ``address`` (see :meth:`BrokerStore.sleep`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


def wait_for_wake(sock: socket.socket, seconds: float) -> bool:
    """Wait up to ``seconds`` for a wake-up datagram on ``sock``: True if one came.
    Every datagram sent meanwhile is read too (one wake-up is enough)."""
    sock.settimeout(seconds)
    try:
        sock.recv(16)
    except (TimeoutError, BlockingIOError):
        return False
    sock.setblocking(False)
    try:
        while sock.recv(16):
            pass
    except (BlockingIOError, InterruptedError):
        pass
    return True


_stores: dict[tuple[int, str], BrokerStore] = {}


def open_store(
    path: str, *, max_map_size: int | None = None, visibility_timeout: float = 3600.0
) -> BrokerStore:
    """The process's one :class:`BrokerStore` for ``path`` (a child after ``fork``
    opens its own)."""
    key = (os.getpid(), os.path.realpath(path))
    store = _stores.get(key)
    if store is None:
        store = BrokerStore(
            key[1], max_map_size=max_map_size, visibility_timeout=visibility_timeout
        )
        _stores[key] = store
    return store
