"""What the rest of the worker uses of a task consumer: :class:`TaskConsumer`.

Both consumers (:class:`~greenworker.transport.consumer.Consumer` on kombu,
:class:`~greenworker.transport.redis_consumer.NativeRedisConsumer`) have it;
the worker, remote control and events are typed by it, not by either class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class TaskConsumer(Protocol):
    """A broker connection that hands task messages over, reconnects by itself, and
    sends the acks and rejects of those messages."""

    #: The queues consumed, in order (changed by add_queue / cancel_queue).
    queue_names: list[str]
    #: Called (in the consumer greenlet) after the connection was lost, before the
    #: next attempt.
    on_connection_lost: Callable[[], None] | None
    #: Called once (in the consumer greenlet) when the first attempt to connect failed.
    on_unreachable: Callable[[], None] | None
    #: Called (in the consumer greenlet) with one line saying why, when the broker
    #: retry settings say to give up; the consumer has stopped consuming for good.
    on_gave_up: Callable[[str], None] | None

    @property
    def connection_generation(self) -> int:
        """Which connection is consuming: one more for each successful connect."""
        ...

    @property
    def reconnects(self) -> int:
        """Connection attempts that failed (each one retried)."""
        ...

    @property
    def receiving(self) -> bool:
        """True while messages taken from the broker are not yet handed over."""
        ...

    @property
    def prefetch(self) -> int | None:
        """The prefetch count applied on the broker (None before one is)."""
        ...

    @property
    def ready(self) -> bool:
        """Connected and consuming."""
        ...

    def start(self) -> None: ...

    def stop_consuming(self, timeout: float = 5.0) -> None:
        """Stop taking new messages; acks and rejects keep working."""
        ...

    def close(self) -> None:
        """Close the connection: what is not acked goes back to the broker."""
        ...

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait until consuming; False if ``timeout`` passed first."""
        ...

    def generation_alive(self, generation: int) -> bool:
        """Whether the connection of ``generation`` still consumes (its messages can
        still be acked)."""
        ...

    def ack(self, message: Any) -> bool: ...

    def reject(self, message: Any, requeue: bool) -> bool: ...

    def ack_pending(self, message: Any) -> bool:
        """True while ``message``'s ack is batched, not sent yet."""
        ...

    def update_prefetch(self) -> None:
        """Apply the current prefetch count (it is read from the worker's callable)."""
        ...

    def add_queue(self, name: str) -> None: ...

    def cancel_queue(self, name: str) -> None: ...

    def queue_sizes(self) -> dict[str, int]:
        """Messages waiting in each consumed queue."""
        ...

    def visibility_refresh_interval(self) -> float: ...

    def refresh_visibility(self, messages: Sequence[Any]) -> int:
        """Keep held messages from being restored by a visibility-timeout sweep."""
        ...
