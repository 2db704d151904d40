"""Remote control: Celery's pidbox mailbox, served by a greenlet on the worker's hub.

The worker listens on ``<hostname>.celery.pidbox`` bound to the ``celery.pidbox``
fanout exchange and replies on ``reply.celery.pidbox``, through kombu's own
pidbox, so ``celery inspect``/``celery control`` and Flower talk to greenworker
unchanged.  The listener has its own connection and greenlet: a slow command
never holds up the task consumer.

Replies use Celery's shapes (``{"ok": "pong"}``, request dicts for
``active``...).  A command with bad arguments gets ``{"error": ...}`` and the
worker goes on.  ``worker_enable_remote_control`` turns the mailbox off and
``worker_control_allow`` limits the commands: any other is answered
``{"error": "... not allowed ..."}``, an unknown one ``{"error": "unknown
command ..."}``.  Replies never carry secrets.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.pidbox import Mailbox

from .. import green
from ..transport.reconnect import ConnectionRetry, retry_until_stopped
from .commands import HANDLERS, ControlTarget, Handler

if TYPE_CHECKING:
    from ..transport.base import TaskConsumer

log = logging.getLogger("greenworker.control")


class CommandTable(dict[str, Handler]):
    """The commands this worker answers, by name, as kombu's pidbox node looks them up.

    A name that is not in the table is still answered, with an error reply
    (kombu would otherwise reply ``KeyError('name')``): "not allowed" for a
    command ``worker_control_allow`` left out, "unknown command" otherwise.
    Arguments that do not fit a command get a one-line error reply too.
    """

    def __init__(self, allowed: Collection[str] | None = None) -> None:
        super().__init__(
            (name, _checked(name, fn))
            for name, fn in HANDLERS.items()
            if allowed is None or name in allowed
        )

    def __missing__(self, name: str) -> Handler:
        if name in HANDLERS:
            reason = f"command {name!r} is not allowed on this worker (worker_control_allow)"
        else:
            reason = f"unknown command {name!r}"

        def refuse(target: ControlTarget, **arguments: Any) -> dict[str, str]:
            log.warning("remote control: refused %s", reason)
            return {"error": reason}

        return refuse


def _checked(name: str, fn: Handler) -> Handler:
    """``fn`` answering arguments that do not fit it with an error reply, not a traceback."""
    signature = inspect.signature(fn)

    def handle(target: ControlTarget, **arguments: Any) -> Any:
        try:
            signature.bind(target, **arguments)
        except TypeError as exc:
            log.warning("remote control: %s: bad arguments: %s", name, exc)
            return {"error": f"{name}: {exc}"}
        try:
            return fn(target, **arguments)
        except (TypeError, ValueError) as exc:  # a value of the wrong kind, e.g. n="many"
            log.warning("remote control: %s failed: %r", name, exc)
            return {"error": f"{name}: {exc}"}

    handle.__name__ = handle.__qualname__ = name
    handle.__doc__ = fn.__doc__
    return handle


def mailbox(namespace: str = "celery") -> Mailbox:
    """The mailbox as Celery declares it (fanout, JSON, queues expire when unused)."""
    return Mailbox(
        namespace,
        type="fanout",
        accept=["json"],
        serializer="json",
        queue_ttl=300.0,
        queue_expires=10.0,
        queue_exclusive=False,
        reply_queue_ttl=300.0,
        reply_queue_expires=10.0,
    )


class RemoteControl:
    """Serves ``hostname``'s mailbox in a greenlet of its own, on a connection of its
    own (from ``connect``): each command gets ``target``.  ``allow`` limits the
    commands (``worker_control_allow``; None: all); the connection is retried as
    :class:`~greenworker.transport.reconnect.ConnectionRetry` says, beside ``consumer``."""

    def __init__(
        self,
        hostname: str,
        connect: Callable[[], Connection],
        target: ControlTarget,
        *,
        allow: Collection[str] | None,
        drain_interval: float,
        consumer: TaskConsumer,
        max_backoff: float,
    ) -> None:
        self.hostname = hostname
        self._connect = connect
        self.target = target
        self.handlers = CommandTable(allow)
        self.mailbox = mailbox()
        self._drain_interval = drain_interval
        self._greenlet: green.Greenlet | None = None
        self._stop = green.new_event()
        self._handling = False
        self._ready = green.new_event()
        self._retry = ConnectionRetry(
            "remote control", consumer, max_backoff, on_lost=self._ready.clear
        )

    def start(self) -> None:
        self._stop.clear()
        self._greenlet = green.spawn(self._run)

    def wait_ready(self, timeout: float | None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._greenlet is not None:
            # idle, the listener only waits in drain_events: end it now rather than
            # after the drain interval; a command being handled is let finish
            if not (self._handling and self._greenlet.join(2.0)):
                self._greenlet.kill()
            self._greenlet = None

    def _run(self) -> None:
        retry_until_stopped(self._serve, self._stop, self._retry)

    def _serve(self) -> None:
        conn: Connection = self._connect()
        try:
            conn.ensure_connection(max_retries=0)  # one attempt: _run paces retries
            box = self.mailbox(conn)
            node = box.Node(self.hostname, state=self.target, handlers=self.handlers)
            node.channel = conn.channel()

            def on_message(body: Any, message: Any) -> None:
                problem = _malformed(body)
                if problem:
                    log.error("ignored malformed control message: %s", problem)
                    return
                self._handling = True
                try:
                    node.handle_message(body, message)
                except Exception as exc:  # e.g. a reply that cannot be sent
                    log.error("control command %r failed: %s", body.get("method"), exc)
                finally:
                    self._handling = False

            node.listen(callback=on_message)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=self._drain_interval)
                except TimeoutError:
                    pass
        finally:
            try:
                conn.release()
            except Exception as exc:
                log.debug("closing the control connection failed: %s", exc)


def control_client(connection: Connection) -> Any:
    """A kombu mailbox bound to ``connection``, for sending commands."""
    return mailbox()(connection)


def broadcast(
    connection: Connection,
    command_name: str,
    arguments: dict[str, Any] | None = None,
    *,
    destination: list[str] | None = None,
    reply: bool = True,
    timeout: float = 1.0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Send a command to every worker (or ``destination``); return their replies."""
    box = control_client(connection)
    replies = box._broadcast(command_name, arguments or {}, destination, reply, timeout, limit)
    return list(replies or [])


# ------------------------------------------------------------------ inspect


def _malformed(body: Any) -> str | None:
    """Why a control message cannot be dispatched, or None."""
    if not isinstance(body, dict):
        return f"body is {type(body).__name__}, not an object"
    if not isinstance(body.get("method"), str):
        return "no method name"
    arguments = body.get("arguments")
    if arguments is not None and not (
        isinstance(arguments, dict) and all(isinstance(k, str) for k in arguments)
    ):
        return "arguments must be an object"
    destination = body.get("destination")
    if destination is not None and not isinstance(destination, list | tuple):
        return "destination must be a list"
    reply_to = body.get("reply_to")
    if reply_to is not None and not (
        isinstance(reply_to, dict) and {"exchange", "routing_key"} <= set(reply_to)
    ):
        return "reply_to must name an exchange and a routing key"
    return None
