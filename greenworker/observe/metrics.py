"""Prometheus metrics of one worker, served as text at ``/metrics`` from its own hub.

Turned on by ``worker_metrics_port`` (``--metrics-port``); needs ``prometheus_client``
(``pip install greenworker[metrics]``): without it, importing this module raises
:class:`~greenworker.exceptions.ImproperlyConfigured` saying so.  Two parts:

* :class:`WorkerMetrics`, a :class:`~greenworker.worker.hooks.Middleware`: counts
  each task's final state and observes its run time and queue wait as it starts
  or ends, in plain numbers kept per task name (resolved once per name: a task
  costs a dictionary lookup and a few increments: about 2 us for its three hooks).  Only
  registered task names become label values; any other name (a flood of junk
  messages) is counted under :data:`UNREGISTERED`, so the series stay bounded.
* collectors turn those numbers into metric families, and read the worker's own
  state (``Worker.stats()``, the reserved and active requests, the held ETA
  tasks), when Prometheus scrapes: nothing is computed between scrapes.

Each worker has a registry of its own (never prometheus_client's global one), so
two workers embedded in one process do not clash.  :class:`MetricsServer` is a
small HTTP server on the patched ``socket`` module: it runs in greenlets of the
worker's hub, on gevent and eventlet alike, and answers while tasks run.

Queue wait (publish -> start) is measured from the message's ``timestamp``
property when it has one (AMQP's basic property, epoch seconds; neither Celery's
producer nor greenworker's set it, other producers may); else, for a task with
an ETA or countdown, from its ETA (how late it started); else it is not observed.
"""

from __future__ import annotations

import logging
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import __version__, green
from ..backends.base import FAILURE, RETRY, REVOKED, SUCCESS
from ..exceptions import ImproperlyConfigured, MetricsError
from ..worker.executor import IGNORED, REJECTED
from ..worker.hooks import Middleware

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError as exc:  # the optional extra is not installed
    raise ImproperlyConfigured(
        f"metrics need prometheus_client ({exc}): pip install greenworker[metrics]"
    ) from None

if TYPE_CHECKING:
    from kombu.message import Message

    from ..worker.request import Request
    from ..worker.state import WorkerState

log = logging.getLogger("greenworker.metrics")

#: The ``task`` label of a message whose task name is not registered in this worker.
UNREGISTERED = "<unregistered>"
#: The ``state`` label of each final state.
STATE_LABELS = {
    SUCCESS: "succeeded",
    FAILURE: "failed",
    RETRY: "retried",
    REVOKED: "revoked",
    IGNORED: "ignored",
    REJECTED: "rejected",
}
RUNTIME_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
WAIT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Seconds between two hub-lag probes (each a short sleep: how late it wakes is the lag).
LAG_INTERVAL = 0.5
#: Seconds a scrape connection may take to send its request.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192


def published_at(message: Message, eta: datetime | None) -> float | None:
    """When the task's queue wait began (epoch seconds): its message's ``timestamp``
    property (when it was published), else its ``eta`` (when it was due); None when
    it has neither."""
    stamp = (message.properties or {}).get("timestamp")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        return float(stamp)
    if isinstance(stamp, datetime):  # py-amqp decodes AMQP's timestamp as naive UTC
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    return eta.timestamp() if eta is not None else None


class _Histogram:
    """Bucket counts and a sum, kept as plain numbers: every hook runs on the one hub, so
    no lock is needed (prometheus_client's own take one per observation, a green lock
    once the process is patched: a few microseconds a task)."""

    __slots__ = ("bounds", "counts", "les", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.les = [repr(float(bound)) for bound in bounds] + ["+Inf"]  # as Go writes them
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a bound counts its own value
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as the text format has them."""
        running, pairs = 0, []
        for le, count in zip(self.les, self.counts, strict=True):
            running += count
            pairs.append((le, float(running)))
        return pairs


class _TaskCounts:
    """What one task name has done since the worker started."""

    __slots__ = ("finished", "received", "runtime", "wait")

    def __init__(self) -> None:
        self.received = 0
        #: by state label
        self.finished: dict[str, int] = {}
        self.runtime = _Histogram(RUNTIME_BUCKETS)
        self.wait = _Histogram(WAIT_BUCKETS)


class WorkerMetrics(Middleware):
    """The metrics of one worker: hooks that count tasks, collectors that read its state.

    ``tasks`` is the app's task registry (which names become label values);
    ``stats`` the worker's ``stats()`` (pool, prefetch, reconnects, hub blocks);
    ``state`` its :class:`~greenworker.worker.state.WorkerState`; ``eta_held`` how
    many tasks wait on the timer for their ETA; ``bind`` and ``port`` where
    :meth:`serve` listens.
    """

    def __init__(
        self,
        *,
        hostname: str,
        tasks: Mapping[str, Any],
        stats: Callable[[], dict[str, Any]],
        state: WorkerState,
        eta_held: Callable[[], int],
        bind: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.tasks = tasks
        #: The endpoint (``port`` 0: any free port, known once :meth:`serve` bound it).
        self.server = MetricsServer(self.render, bind, port)
        #: By task label: registered names, and :data:`UNREGISTERED` for all others.
        self.counts: dict[str, _TaskCounts] = {}
        self.hub_lag = _Histogram(LAG_BUCKETS)
        #: This worker's own registry (never prometheus_client's global one).
        self.registry = CollectorRegistry()
        self.registry.register(_TaskCollector(self.counts, self.hub_lag))
        self.registry.register(_StateCollector(hostname, stats, state, eta_held))
        self._prober: green.Greenlet | None = None

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    def serve(self) -> None:
        """Take the port (:class:`MetricsError` if it cannot), then serve scrapes and
        probe the hub's lag in greenlets until :meth:`close`."""
        self.server.start()
        if self._prober is None:
            self._prober = green.spawn(self._probe)
        log.info("metrics at %s", self.server.url)

    def close(self) -> None:
        """Stop serving and probing (the counts are kept: :meth:`serve` may run again)."""
        if self._prober is not None:
            self._prober.kill()
            self._prober = None
        self.server.stop()

    def _of(self, name: Any) -> _TaskCounts:
        """The counts of task ``name``: resolved once per registered name; every other
        name shares the one :data:`UNREGISTERED` entry, so the series stay bounded."""
        counts = self.counts.get(name) if isinstance(name, str) else None
        if counts is None:
            label = name if isinstance(name, str) and name in self.tasks else UNREGISTERED
            counts = self.counts.get(label)
            if counts is None:
                counts = self.counts[label] = _TaskCounts()
        return counts

    # ------------------------------------------------------------ hooks

    def task_received(self, request: Request) -> None:
        self._of(request.name).received += 1

    def before_task(self, request: Request) -> None:
        published = published_at(request.message, request.msg.eta)
        if published is None:
            return
        started = request.started_at if request.started_at is not None else time.time()
        # max: the producer's clock may be ahead of ours
        self._of(request.name).wait.observe(max(started - published, 0.0))

    def after_task(self, request: Request, state: str, result: Any) -> None:
        if state == REJECTED:
            return  # counted by task_rejected, which also sees the consumer's rejections
        counts = self._of(request.name)
        label = STATE_LABELS.get(state) or state.lower()
        counts.finished[label] = counts.finished.get(label, 0) + 1
        if request.time_start is not None:
            counts.runtime.observe(time.monotonic() - request.time_start)

    def task_rejected(self, message: Message, reason: str, requeue: bool) -> None:
        counts = self._of((message.headers or {}).get("task"))
        counts.finished["rejected"] = counts.finished.get("rejected", 0) + 1

    # ------------------------------------------------------------ hub lag

    def _probe(self) -> None:
        while True:
            asleep = time.monotonic()
            green.sleep(LAG_INTERVAL)
            self.hub_lag.observe(max(time.monotonic() - asleep - LAG_INTERVAL, 0.0))


class _TaskCollector:
    """The task counters and histograms, as metric families at scrape time."""

    def __init__(self, counts: dict[str, _TaskCounts], hub_lag: _Histogram) -> None:
        self.counts = counts
        self.hub_lag = hub_lag

    def collect(self) -> Iterator[Metric]:
        finished = CounterMetricFamily(
            "greenworker_tasks",
            "Tasks that ended, by task name and final state.",
            labels=["task", "state"],
        )
        received = CounterMetricFamily(
            "greenworker_tasks_received",
            "Valid task messages received, by task name.",
            labels=["task"],
        )
        runtime = HistogramMetricFamily(
            "greenworker_task_runtime_seconds",
            "Seconds from a task body's start to its end, by task name.",
            labels=["task"],
        )
        wait = HistogramMetricFamily(
            "greenworker_task_queue_wait_seconds",
            "Seconds from publish (the message's timestamp, else its ETA) to start.",
            labels=["task"],
        )
        for name, counts in sorted(self.counts.items()):
            for state, count in sorted(counts.finished.items()):
                finished.add_metric([name, state], count)
            if counts.received:
                received.add_metric([name], counts.received)
            for family, histogram in ((runtime, counts.runtime), (wait, counts.wait)):
                if any(histogram.counts):
                    family.add_metric([name], histogram.buckets(), histogram.total)
        yield from (finished, received, runtime, wait)
        lag = HistogramMetricFamily(
            "greenworker_hub_lag_seconds",
            f"How late the hub wakes a greenlet from a {LAG_INTERVAL}s sleep.",
        )
        lag.add_metric([], self.hub_lag.buckets(), self.hub_lag.total)
        yield lag


class _StateCollector:
    """The gauges and counters read from the worker's state at scrape time."""

    def __init__(
        self,
        hostname: str,
        stats: Callable[[], dict[str, Any]],
        state: WorkerState,
        eta_held: Callable[[], int],
    ) -> None:
        self.hostname = hostname
        self.stats = stats
        self.state = state
        self.eta_held = eta_held

    def collect(self) -> Iterator[Metric]:
        stats, state = self.stats(), self.state
        pool = stats["pool"]
        info = GaugeMetricFamily(
            "greenworker_worker_info",
            "This worker: its node name, hub and greenworker version (always 1).",
            labels=["hostname", "hub", "version"],
        )
        info.add_metric([self.hostname, str(stats["hub"]), __version__], 1)
        yield info
        yield _gauge(
            "greenworker_worker_start_time_seconds",
            "When the worker's state began, in epoch seconds.",
            state.started_at,
        )
        yield _gauge("greenworker_tasks_active", "Tasks running now.", len(state.active))
        yield _gauge(
            "greenworker_tasks_reserved",
            "Tasks received and not started (waiting for a greenlet, a rate limit or an ETA).",
            len(state.reserved),
        )
        yield _gauge(
            "greenworker_tasks_eta_held",
            "Tasks held on the timer until their ETA (part of the reserved ones).",
            self.eta_held(),
        )
        yield _gauge(
            "greenworker_pool_size", "Greenlets the pool may run at once.", pool["max-concurrency"]
        )
        yield _gauge(
            "greenworker_pool_waiting", "Tasks waiting for a free greenlet.", pool["waiting"]
        )
        prefetch = stats["prefetch_count"]
        yield _gauge(
            "greenworker_prefetch_count",
            "The prefetch count applied on the broker (0 before one is).",
            prefetch or 0,
        )
        yield _counter(
            "greenworker_broker_reconnects",
            "Times the consumer reconnected to the broker.",
            stats["broker_reconnects"],
        )
        blocks = stats["hub_blocks"]
        yield _counter(
            "greenworker_hub_blocks",
            "Times the watchdog caught a task blocking the hub (worker_block_threshold).",
            blocks["count"],
        )
        yield _counter(
            "greenworker_hub_blocked_seconds",
            "Seconds the hub was blocked, in the blocks the watchdog saw end.",
            blocks["total_s"],
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def check_port(host: str, port: int) -> None:
    """Raise :class:`MetricsError` now if ``host:port`` cannot be listened on (before
    ``-D`` forks: the daemon's error would reach only its log)."""
    server = MetricsServer(bytes, host, port)
    server.bind()
    server.stop()


class MetricsServer:
    """Serves ``render()`` at ``GET /metrics`` over HTTP/1.0-style one-shot connections,
    in greenlets of the current hub (the process is monkeypatched: ``socket`` is green)."""

    def __init__(self, render: Callable[[], bytes], host: str, port: int) -> None:
        self.render = render
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._acceptor: green.Greenlet | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def bind(self) -> None:
        """Take the port now (0: any free one, then :attr:`port` says which); raises
        :class:`MetricsError` with one line when it is taken or the address is wrong."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            listener = socket.socket(family, kind, proto)
        except OSError as exc:
            raise MetricsError(f"metrics: cannot use address {self.host!r}: {_why(exc)}") from None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            where = f"{self.host}:{self.port}"
            raise MetricsError(f"metrics: cannot listen on {where}: {_why(exc)}") from None
        self.port = listener.getsockname()[1]
        self._listener = listener

    def start(self) -> None:
        """Accept scrapes in a greenlet (after :meth:`bind`)."""
        if self._listener is None:
            self.bind()
        if self._acceptor is None:
            self._acceptor = green.spawn(self._accept)

    def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.kill()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._listener is not listener:
                    return  # closed by stop()
                log.warning("metrics: accept failed: %s", _why(exc))
                green.sleep(0.1)  # out of file descriptors, say: do not spin
                continue
            green.spawn(self._answer, conn)

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            head = b""
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
                if len(head) > MAX_REQUEST:
                    conn.sendall(_response(431, b"request header too large\n"))
                    return
            conn.sendall(self._respond(head.split(b"\n", 1)[0]))
        except OSError:
            return  # the scraper went away, or was too slow: nothing to tell it
        finally:
            conn.close()

    def _respond(self, request_line: bytes) -> bytes:
        parts = request_line.decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return _response(405, b"only GET /metrics\n")
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            body = self.render()
            return _response(200, body, CONTENT_TYPE_LATEST, head_only=parts[0] == "HEAD")
        if path == "/":
            return _response(200, b"greenworker: metrics at /metrics\n")
        return _response(404, b"not found: metrics at /metrics\n")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
