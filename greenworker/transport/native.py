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
