"""The worker among its peers: the heartbeat, gossip and mingle.

* Heart: ``worker-online`` at start, ``worker-heartbeat`` every
  ``worker_heartbeat`` seconds, ``worker-offline`` at stop.
* Gossip: listens to other workers' events, keeps a table of peers (alive
  while their heartbeats keep coming) and merges their clocks.
* Mingle: at startup asks the cluster (pidbox ``hello``) for revoked ids and
  the clock, and merges them.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.messaging import Consumer

from .. import __version__, green
from ..transport.reconnect import ConnectionRetry, retry_until_stopped
from .events import EventDispatcher, event_receiver_queue
from .mailbox import broadcast

if TYPE_CHECKING:
    from kombu.message import Message

    from ..transport.base import TaskConsumer
    from ..worker.state import LamportClock, RevokedSet
    from ..worker.timer import Entry, Timer

log = logging.getLogger("greenworker.events")

#: A peer is gone when no heartbeat came for this many heartbeat intervals (Celery: 2).
HEARTBEAT_EXPIRE_WINDOW = 2.0


class Heart:
    """worker-online once consuming (``wait_ready``), worker-heartbeat every ``interval``
    seconds with ``load()`` (tasks active, tasks processed), worker-offline."""

    def __init__(
        self,
        dispatcher: EventDispatcher,
        timer: Timer,
        interval: float,
        *,
        wait_ready: Callable[[float | None], bool],
        load: Callable[[], tuple[int, int]],
    ) -> None:
        self.events = dispatcher
        self._timer = timer
        self.interval = interval
        self._wait_ready = wait_ready
        self._load = load
        self._beating: Entry | None = None
        self._stopped = False
        self._going_online: green.Greenlet | None = None
        #: Called after each worker-heartbeat is sent (Celery's ``heartbeat_sent`` signal).
        self.on_beat: Callable[[], object] | None = None

    def _fields(self) -> dict[str, Any]:
        return {
            "freq": self.interval,
            "sw_ident": "greenworker",
            "sw_ver": __version__,
            "sw_sys": platform.system(),
        }

    def start(self) -> None:
        """Send worker-online and start beating, in the background (returns at once)."""
        self._stopped = False
        self._going_online = green.spawn(self._go_online)

    def _go_online(self) -> None:
        self._wait_ready(None)  # online means consuming
        if self._stopped:
            return
        self.events.send_now("worker-online", **self._fields())
        if not self._stopped:  # a stop may have come while worker-online was sent
            self._beating = self._timer.call_repeatedly(self.interval, self.beat)

    def beat(self) -> None:
        active, processed = self._load()
        self.events.send_now(
            "worker-heartbeat",
            active=active,
            processed=processed,
            loadavg=[round(x, 2) for x in os.getloadavg()],
            **self._fields(),
        )
        if self.on_beat is not None:
            self.on_beat()

    def stop(self) -> None:
        self._stopped = True
        if self._going_online is not None:
            self._going_online.kill()  # still waiting for the broker: it never went online
            self._going_online = None
        if self._beating is not None:
            self._beating.cancel()
        self.events.send_now("worker-offline", **self._fields())


class Gossip:
    """Watches other workers' events: who is alive, and their clocks (merged into
    ``clock``).  Listens on a connection of its own (from ``connect``), retried as
    :class:`~greenworker.transport.reconnect.ConnectionRetry` says."""

    def __init__(
        self,
        hostname: str,
        connect: Callable[[], Connection],
        clock: LamportClock,
        *,
        drain_interval: float,
        consumer: TaskConsumer,
        max_backoff: float,
    ) -> None:
        self.hostname = hostname
        self._connect = connect
        self._clock = clock
        self._drain_interval = drain_interval
        self.peers: dict[str, dict[str, Any]] = {}
        self._greenlet: green.Greenlet | None = None
        # set by stop, cleared by start (a worker stopped and started again listens again)
        self._stop = green.new_event()
        self._ready = green.new_event()
        self._retry = ConnectionRetry("gossip", consumer, max_backoff, on_lost=self._ready.clear)

    def alive(self) -> list[str]:
        now = time.time()
        return sorted(
            host
            for host, info in self.peers.items()
            if info["online"] and now - info["seen"] < info["freq"] * HEARTBEAT_EXPIRE_WINDOW
        )

    def start(self) -> None:
        self._stop.clear()
        self._ready.clear()
        self._greenlet = green.spawn(self._run)

    def wait_ready(self, timeout: float | None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._greenlet is not None:
            # events are transient (no_ack): nothing is lost by not waiting for the drain
            self._greenlet.kill()
            self._greenlet = None

    def _run(self) -> None:
        retry_until_stopped(self._listen, self._stop, self._retry)

    def _listen(self) -> None:
        with self._connect() as conn:
            conn.ensure_connection(max_retries=0)  # one attempt: _run paces retries
            queue = event_receiver_queue(conn, "gossip", "worker.#")
            # no_ack: events are transient; unacked ones would pile up on Redis
            with Consumer(conn, [queue], callbacks=[self._on_event], accept=["json"], no_ack=True):
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        conn.drain_events(timeout=self._drain_interval)
                    except TimeoutError:
                        pass

    def _on_event(self, body: Any, message: Message) -> None:
        for event in body if isinstance(body, list) else [body]:
            if not isinstance(event, dict):
                continue
            host = event.get("hostname")
            kind = str(event.get("type", ""))
            if not isinstance(host, str) or host == self.hostname:
                continue
            clock = event.get("clock")
            if isinstance(clock, int):
                self._clock.adjust(clock)
            if kind.startswith("worker-"):
                freq = event.get("freq")
                self.peers[host] = {
                    "online": kind != "worker-offline",
                    "seen": time.time(),
                    "freq": float(freq) if isinstance(freq, int | float) else 2.0,
                    "sw": f"{event.get('sw_ident')} {event.get('sw_ver')}",
                }


def mingle(
    connection: Connection,
    hostname: str,
    revoked: RevokedSet,
    clock: LamportClock,
    timeout: float,
) -> int:
    """Ask the cluster over ``connection`` for revoked ids and the clock; merge them into
    ``revoked`` and ``clock``.  Returns how many nodes answered."""
    try:
        replies = broadcast(
            connection,
            "hello",
            {"from_node": hostname, "revoked": revoked.as_dict()},
            timeout=timeout,
        )
    except Exception as exc:
        log.warning("mingle: no answer from the cluster: %s", exc)
        return 0
    merged = 0
    for reply in replies:
        for host, value in reply.items():
            if host == hostname or not isinstance(value, dict):
                continue
            theirs = value.get("revoked")
            if isinstance(theirs, dict):
                revoked.update({k: float(v) for k, v in theirs.items()})
            their_clock = value.get("clock")
            if isinstance(their_clock, int):
                clock.adjust(their_clock)
            merged += 1
    if merged:
        log.info("mingle: synced with %d node(s)", merged)
    return merged
