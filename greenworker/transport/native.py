"""What the native consumers (Redis, the embedded broker) share: the messages they
hold, the acks waiting for their write, the prefetch room, and the acks and rejects
made through the message (:class:`~.envelope.EnvelopeMessage`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kombu.serialization import prepare_accept_content

from .. import green
from .consumer import Reconnecting

if TYPE_CHECKING:
    from ..client.app import App

log = logging.getLogger("greenworker.consumer")


class NativeConsumer(Reconnecting):
    """The part of :class:`~.base.TaskConsumer` both native consumers have alike."""

    def __init__(
        self,
        app: App,
        queues: Sequence[str],
        on_message: Callable[[Any], None],
        prefetch_count: Callable[[], int],
    ) -> None:
        super().__init__(app, queues, on_message, prefetch_count)
        self.accept = prepare_accept_content(app.conf.accept_content)
        options = app.conf.broker_transport_options
        self.visibility_timeout = float(options.get("visibility_timeout", 3600))
        self._held: dict[str, Any] = {}  # delivered, not yet acked or rejected
        self._pending_acks: list[str] = []
        self._capacity = green.new_event()  # set when the prefetch window may have room

    #: Pending acks that are written at once rather than by the ack loop (None: always
    #: by the ack loop, or with the next take).
    ACK_BATCH: int | None = None

    def add_queue(self, name: str) -> None:
        if name in self.queue_names:
            return
        self._declare_added(name)
        self.queue_names.append(name)
        log.info("consuming from %s", name)

    def _declare_added(self, name: str) -> None:
        """Declare a queue added while consuming, where the broker needs it declared."""

    def ack_tag(self, tag: str) -> None:
        """Ack ``tag``: batched, written by the ack loop or the consumer's next write if
        that comes first (a full batch, at once)."""
        self._held.pop(tag, None)
        self._pending_acks.append(tag)
        self._capacity.set()
        if self.ACK_BATCH is not None and len(self._pending_acks) >= self.ACK_BATCH:
            self._flush_acks()
        else:
            self._ack_wake.set()

    def cancel_queue(self, name: str) -> None:
        if name in self.queue_names:
            self.queue_names.remove(name)
            log.info("cancelled queue %s", name)

    def update_prefetch(self) -> None:
        self._capacity.set()

    def ack(self, message: Any) -> bool:
        try:
            message.ack()
            return True
        except Exception as exc:
            log.warning("could not ack message %s: %s", message.delivery_tag, exc)
            return False

    def reject(self, message: Any, requeue: bool) -> bool:
        try:
            message.reject(requeue=requeue)
            return True
        except Exception as exc:
            log.warning("could not reject message %s: %s", message.delivery_tag, exc)
            return False

    def ack_pending(self, message: Any) -> bool:
        """True while ``message``'s ack waits in the batch (not written yet)."""
        return message.delivery_tag in self._pending_acks

    def visibility_refresh_interval(self) -> float:
        return max(0.25, self.visibility_timeout / 4)
