"""The strategy: a broker message becomes a validated request that runs now, later or never."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message

from ..backends.base import (
    FAILURE,
    build_meta,
    celery_exception,
)
from ..protocol import MalformedMessage, TaskMessage, decode_task_message, utcnow
from .request import Request
from .watchdog import describe_blocker

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("greenworker.request")


class MessageHandler:
    """The strategy: message -> validated :class:`Request` -> pool, timer or reject."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def on_message(self, message: Message) -> None:
        limit = self.worker.app.conf.worker_max_message_size
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
        worker = self.worker
        blocker = worker.state.hub_blockers.get(msg.id)
        if blocker is not None:
            self._refuse_blocker(message, msg, blocker)
            return
        task = worker.app.tasks.get(msg.task)
        if task is None:
            self._unknown_task(message, msg)
            return
        request = Request(msg, message, task, worker)
        log.debug("Received task %s[%s]", msg.task, msg.id)
        worker.state.task_received(request)
        worker.hooks.emit("task_received", request)
        revocation = request.revocation()
        if revocation is not None:
            reason, stamp = revocation
            try:
                request.revoke(reason, stamp=stamp)
            finally:
                worker.state.task_discarded(request)
            return
        if msg.eta is not None and msg.eta > utcnow():
            worker.hold_until_eta(request)
            return
        worker.rate_limiter.submit(request)

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
        self.worker.state.rejected += 1
        self.worker.hooks.emit("task_rejected", message, reason)
        if isinstance(ident, str) and ident != "?":
            # A client may be waiting on this id: tell it why instead of leaving it PENDING.
            failure = {
                "exc_type": "MalformedMessage",
                "exc_message": [reason],
                "exc_module": "greenworker.protocol",
            }
            try:
                self.worker.app.backend.store(ident, build_meta(ident, FAILURE, failure))
            except Exception as exc:
                log.debug("could not store the rejection of %s: %s", ident, exc)
        self.worker.consumer.reject(message, requeue=False)

    def _refuse_blocker(self, message: Message, msg: TaskMessage, record: dict[str, Any]) -> None:
        """A task that blocked the hub past its hard limit (recorded by the watchdog
        before it ended the worker) is back: reject it rather than block again.  Its
        FAILURE was stored when this worker started (``Watchdog.load_blockers``)."""
        scheme = self.worker.broker_scheme
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
        self.worker.state.rejected += 1
        self.worker.hooks.emit("task_rejected", message, reason)
        self.worker.consumer.reject(message, requeue=False)

    def _unknown_task(self, message: Message, msg: TaskMessage) -> None:
        reason = f"unregistered task {msg.task!r}"
        log.error("Rejected message %s: %s (is the module imported by the worker?)", msg.id, reason)
        self.worker.state.rejected += 1
        self.worker.hooks.emit("task_rejected", message, reason)
        meta = build_meta(msg.id, FAILURE, celery_exception("NotRegistered", repr(msg.task)))
        try:
            self.worker.app.backend.store(msg.id, meta)
        except Exception as exc:
            log.debug("could not store NotRegistered for %s: %s", msg.id, exc)
        self.worker.consumer.reject(message, requeue=False)
