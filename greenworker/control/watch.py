"""A live view of the workers: ``greenworker status --watch`` and ``greenworker top``.

Each refresh is one ``stats`` broadcast (processed, pool use, reserved), one
``active_queues`` broadcast only to the workers whose queues are not known yet
(new ones, and every :data:`QUEUES_EVERY` seconds all of them, to see
``add_consumer``/``cancel_consumer``), and one passive queue declare per consumed
queue for its depth, from the broker itself.  Tasks per second come from two
consecutive samples of a worker.  A worker that stops answering stays on the view,
marked gone, until it answers again.

On a terminal the view is redrawn in place (the terminal's alternate screen, as
``top`` uses, restored at exit); otherwise each refresh is a block of plain lines
with a timestamp, fit for a pipe or a log file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from kombu.exceptions import ChannelError

from .. import green
from .mailbox import control_client

if TYPE_CHECKING:
    from kombu.connection import Connection

#: Seconds between two ``active_queues`` broadcasts to every worker.
QUEUES_EVERY = 30.0

#: The escape sequences of the terminal mode (VT100/xterm; no curses needed).
ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"  # the alternate screen, the cursor hidden
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"  # the cursor shown, the user's screen back
HOME = "\x1b[H"
CLEAR_LINE_END = "\x1b[K"
CLEAR_SCREEN_END = "\x1b[J"


@dataclass
class Row:
    """One worker as the view shows it."""

    hostname: str
    processed: int | None = None
    #: Tasks per second since the previous sample of this worker (None: first sample).
    rate: float | None = None
    active: int | None = None
    pool: int | None = None
    #: None when the worker does not say (a Celery worker's ``stats`` has no count).
    reserved: int | None = None
    #: Consumed queue -> messages waiting in it (None: the broker did not say).
    queues: dict[str, int | None] = field(default_factory=dict)
    #: Wall-clock time of the last reply, when the worker did not answer this time.
    gone_since: float | None = None
    #: The worker's error reply to ``stats`` (e.g. refused by ``worker_control_allow``).
    error: str | None = None


@dataclass
class Snapshot:
    """What one refresh found."""

    at: float  # wall clock
    rows: list[Row]
    #: The broker could not be reached (the rows are the last ones known).
    broker_error: str | None = None


@dataclass
class _Seen:
    processed: int
    at: float  # monotonic
    last_reply: float  # wall clock
    queues: list[str] | None = None
    row: Row | None = None


class Sampler:
    """Takes :class:`Snapshot`\\ s over a connection of its own (from ``connect``).

    ``timeout`` is how long a broadcast waits for replies (kombu waits that long
    after the last one); ``destination`` limits the view to those workers.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        timeout: float,
        destination: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self.timeout = timeout
        self.destination = destination
        self._clock = clock
        self._conn: Connection | None = None
        self._box: Any = None
        self._channel: Any = None
        self._seen: dict[str, _Seen] = {}
        self._queues_asked = float("-inf")

    def sample(self) -> Snapshot:
        """One refresh; a lost broker raises the transport's connection error."""
        now, wall = self._clock(), time.time()
        stats = self._broadcast("stats", self.destination, None)
        answered = {host: reply for host, reply in stats.items() if isinstance(reply, dict)}
        self._learn_queues(answered, now)
        depths: dict[str, int | None] = {}
        for host in answered:
            for name in self._seen[host].queues or ():
                if name not in depths:
                    depths[name] = self._depth(name)
        rows = []
        for host, reply in answered.items():
            rows.append(self._row(host, reply, now, wall, depths))
        for host, seen in self._seen.items():
            if host not in answered and seen.row is not None:
                seen.row.gone_since = seen.last_reply
                seen.row.rate = None
                rows.append(seen.row)
        rows.sort(key=lambda row: row.hostname)
        return Snapshot(wall, rows)

    def lost(self, reason: BaseException) -> Snapshot:
        """The snapshot of a refresh that could not reach the broker: the known workers,
        not answering; the connection is made anew at the next :meth:`sample`."""
        self.close()
        rows = []
        for seen in self._seen.values():
            if seen.row is not None:
                if seen.row.gone_since is None:
                    seen.row.gone_since = seen.last_reply
                seen.row.rate = None
                rows.append(seen.row)
        rows.sort(key=lambda row: row.hostname)
        return Snapshot(time.time(), rows, broker_error=str(reason) or type(reason).__name__)

    def close(self) -> None:
        conn, self._conn, self._box, self._channel = self._conn, None, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # closing a connection already lost: nothing to keep
                pass

    # ------------------------------------------------------------ internals

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._connect()
            try:
                conn.ensure_connection(max_retries=1)
            except BaseException:
                conn.release()
                raise
            self._conn, self._box = conn, control_client(conn)
        return self._conn

    def _broadcast(
        self, name: str, destination: list[str] | None, limit: int | None
    ) -> dict[str, Any]:
        self._connection()
        replies = self._box._broadcast(name, {}, destination, True, self.timeout, limit)
        # replies to an earlier broadcast that came too late: never to be claimed
        self._box.unclaimed.clear()
        merged: dict[str, Any] = {}
        for reply in replies or ():
            if isinstance(reply, dict):
                merged.update(reply)
        return merged

    def _learn_queues(self, answered: dict[str, Any], now: float) -> None:
        for host in answered:
            self._seen.setdefault(host, _Seen(processed=0, at=now, last_reply=0.0))
        if now - self._queues_asked >= QUEUES_EVERY:
            ask = sorted(answered)
            self._queues_asked = now
        else:
            ask = sorted(host for host in answered if self._seen[host].queues is None)
        if not ask:
            return
        for host, reply in self._broadcast("active_queues", ask, len(ask)).items():
            if host in self._seen and isinstance(reply, list):
                names = [q.get("name") for q in reply if isinstance(q, dict)]
                self._seen[host].queues = [n for n in names if isinstance(n, str)]

    def _depth(self, name: str) -> int | None:
        conn = self._connection()
        if self._channel is None:
            self._channel = conn.channel()
        try:
            _, count, _ = self._channel.queue_declare(queue=name, passive=True)
        except ChannelError:
            # kombu's virtual transports (Redis, the embedded default): a queue with
            # no message has no key, and reads as not found
            return 0
        except conn.channel_errors:
            # AMQP: not found, and the channel is closed by the broker
            self._channel = None
            return None
        return int(count)

    def _row(
        self, host: str, reply: dict[str, Any], now: float, wall: float, depths: dict[str, Any]
    ) -> Row:
        seen = self._seen[host]
        queues = {name: depths.get(name) for name in seen.queues or ()}
        if "error" in reply:
            row = Row(host, queues=queues, error=str(reply["error"]))
        else:
            total = reply.get("total")
            counts = total.values() if isinstance(total, dict) else ()
            processed = sum(n for n in counts if isinstance(n, int))
            given = reply.get("pool")
            pool: dict[str, Any] = given if isinstance(given, dict) else {}
            rate = None
            if seen.row is not None and processed >= seen.processed and now > seen.at:
                rate = (processed - seen.processed) / (now - seen.at)
            reserved = reply.get("reserved")
            row = Row(
                host,
                processed=processed,
                rate=rate,
                active=_int(pool.get("running")),
                pool=_int(pool.get("max-concurrency")),
                reserved=reserved if isinstance(reserved, int) else None,
                queues=queues,
            )
            seen.processed, seen.at = processed, now
        seen.last_reply, seen.row = wall, row
        return row


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _shown(value: int | float | None, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(snapshot: Snapshot, *, broker: str, interval: float, timeout: float) -> list[str]:
    """The lines of one refresh: a title with the time, a column header, one line
    per worker (or one saying none answered)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.at))
    alive = sum(1 for row in snapshot.rows if row.gone_since is None)
    title = f"{when}  greenworker · {broker} · {alive} worker(s) · every {interval:g}s"
    lines = [title]
    if snapshot.broker_error is not None:
        lines.append(f"broker unreachable: {snapshot.broker_error} (retrying)")
    width = max([len("WORKER"), *(len(row.hostname) for row in snapshot.rows)])
    lines.append(
        f"{'WORKER':<{width}}  {'PROCESSED':>9}  {'TASKS/S':>8}  {'ACTIVE/POOL':>11}  "
        f"{'RESERVED':>8}  QUEUES (WAITING)"
    )
    for row in snapshot.rows:
        name = f"{row.hostname:<{width}}"
        if row.gone_since is not None:
            since = time.strftime("%H:%M:%S", time.localtime(row.gone_since))
            lines.append(f"{name}  gone: no reply since {since}")
            continue
        queues = " ".join(f"{q}={_shown(n)}" for q, n in row.queues.items()) or "-"
        if row.error is not None:
            lines.append(f"{name}  error: {row.error}  {queues}")
            continue
        use = f"{_shown(row.active)}/{_shown(row.pool)}"
        lines.append(
            f"{name}  {_shown(row.processed):>9}  {_shown(row.rate, '{:.1f}'):>8}  {use:>11}  "
            f"{_shown(row.reserved):>8}  {queues}"
        )
    if not alive and snapshot.broker_error is None:
        lines.append(f"no worker answered within {timeout:g}s (still watching; Ctrl-C to stop)")
    return lines


class Screen:
    """Where the view is drawn: in place on a terminal, as timestamped blocks otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.terminal = out.isatty()
        self._open = False

    def open(self) -> None:
        if self.terminal:
            self.out.write(ENTER_SCREEN)
            self.out.flush()
        self._open = True

    def draw(self, lines: list[str]) -> None:
        if not self.terminal:
            self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()
            return
        try:
            columns, rows = os.get_terminal_size(self.out.fileno())
        except OSError:
            columns, rows = 80, 24
        if len(lines) > rows - 1:  # never scroll: the view would no longer redraw in place
            hidden = len(lines) - (rows - 2)
            lines = [*lines[: rows - 2], f"... {hidden} more line(s)"]
        # a line one column short of the width: no wrap, and no scroll at the last row
        body = "".join(line[: columns - 1] + CLEAR_LINE_END + "\r\n" for line in lines)
        self.out.write(HOME + body + CLEAR_SCREEN_END)
        self.out.flush()

    def discard(self) -> None:
        """Write no more: the reader is gone (and Python's own flush at exit would
        fail on the closed pipe too)."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.out.fileno())
        finally:
            os.close(devnull)
        self._open = False

    def close(self) -> None:
        if self._open and self.terminal:
            self.out.write(LEAVE_SCREEN)
            self.out.flush()
        self._open = False


def run(
    sampler: Sampler,
    screen: Screen,
    *,
    interval: float,
    broker: str,
    connection_errors: tuple[type[BaseException], ...],
    stop: green.Event,
) -> None:
    """Refresh every ``interval`` seconds until ``stop`` is set (by a signal handler).

    A greenlet samples; this one draws, so a stop never cuts a refresh in half:
    the sampling greenlet is killed, whatever it waits for, and the screen restored.
    """
    latest: list[Snapshot] = []
    failure: list[BaseException] = []
    wake = green.new_event()

    def refresh() -> None:
        try:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    snapshot = sampler.sample()
                except connection_errors as exc:
                    snapshot = sampler.lost(exc)
                latest[:] = [snapshot]
                wake.set()
                stop.wait(max(0.0, interval - (time.monotonic() - began)))
        except Exception as exc:  # raised by run() once the terminal is restored
            failure.append(exc)
            stop.set()

    def wake_on_stop() -> None:
        stop.wait()
        wake.set()

    screen.open()
    sampling, waking = green.spawn(refresh), green.spawn(wake_on_stop)
    try:
        while True:
            wake.wait()
            wake.clear()
            if stop.is_set():
                break
            if latest:
                lines = render(
                    latest.pop(), broker=broker, interval=interval, timeout=sampler.timeout
                )
                screen.draw(lines)
    except BrokenPipeError:  # the reader went away (``| head``): stop, quietly
        screen.discard()
    finally:
        stop.set()
        sampling.kill()
        sampling.join(5.0)
        waking.join(1.0)
        screen.close()
        sampler.close()
    if failure:
        raise failure[0]
