"""RabbitMQ native delayed delivery: the topology Celery 5.5+ sends ETA and countdown
tasks through when a queue is a quorum queue, so that the broker, not the worker,
holds them until they are due.

kombu's :mod:`kombu.transport.native_delayed_delivery` builds it: 28 topic exchanges
and queues ``celery_delayed_27`` ... ``celery_delayed_0`` (queue *n* keeps a message
2**n seconds, then dead-letters it to level *n - 1*), chained by the bits of a routing
key that spells the delay in binary, ending in the ``celery_delayed_delivery``
exchange, to which each worker queue's exchange is bound with ``#.<routing key>``.
A producer publishes a task due in *n* seconds to ``celery_delayed_27`` with the
routing key of :func:`delayed_routing_key`; it reaches the task queue *n* seconds
later.

``broker_native_delayed_delivery_classic_queues`` (greenworker's own setting) uses
it for classic queues too.

The worker declares the topology and binds its queues when it connects
(:func:`greenworker.transport.delayed_delivery.set_up`, as Celery's
``DelayedDelivery`` bootstep at consumer start); greenworker's client does the
same before its first delayed message to a queue, so that what it sends is never
dropped for want of a binding.  Direct exchanges cannot be bound this way (their
routing key must match exactly): tasks sent to them are held by the worker as
before.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kombu.common import Broadcast
from kombu.entity import Exchange, Queue
from kombu.transport.native_delayed_delivery import (
    CELERY_DELAYED_DELIVERY_EXCHANGE,
    MAX_LEVEL,
    bind_queue_to_native_delayed_delivery_exchange,
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
    level_name,
)

if TYPE_CHECKING:
    from ..client.app import App

log = logging.getLogger("greenworker.consumer")

#: Where a delayed message is published (the longest level: it takes every delay).
ENTRY_EXCHANGE = level_name(MAX_LEVEL)

_TOPOLOGY_EXCHANGE = re.compile(rf"^(?:celery_delayed_\d+|{CELERY_DELAYED_DELIVERY_EXCHANGE})$")
_DELAY_PREFIX = re.compile(rf"^(?:[01]\.){{{MAX_LEVEL + 1}}}")


def wanted(app: App, queue_names: Iterable[str]) -> bool:
    """Whether native delayed delivery is used for ``queue_names``: on RabbitMQ when
    one of them is a quorum queue, as Celery's ``detect_quorum_queues`` decides it (the
    worker for the queues it consumes, a client for the queue it sends to), or for any
    queue with ``broker_native_delayed_delivery_classic_queues``."""
    if not app.conf.broker_native_delayed_delivery_classic_queues and not any(
        app.queue_type(name) == "quorum" for name in queue_names
    ):
        return False
    return bool(app.connection().transport.driver_type == "amqp")


def delayed_routing_key(delay: float, routing_key: str) -> str | None:
    """The routing key that delivers a message for ``routing_key`` ``delay`` seconds
    from now, or None when the delay is under a second (the worker holds it).

    The topology counts whole seconds.  Celery's producer rounds down, so its message
    arrives up to a second early and the worker holds it for the rest; this rounds up,
    so the message is never early and never held, at most a second late.
    """
    if delay < 1:
        return None
    key: str = calculate_routing_key(math.ceil(delay), routing_key)
    return key


def entry_exchange() -> Exchange:
    """The exchange delayed messages are published to, declared as kombu declares it."""
    return Exchange(ENTRY_EXCHANGE, type="topic")


def is_topology_exchange(name: str | None) -> bool:
    """Whether a message delivered by exchange ``name`` came through the delayed
    topology (its routing key then carries the delay in front of the original one)."""
    return bool(name) and _TOPOLOGY_EXCHANGE.match(name or "") is not None


def original_routing_key(routing_key: str) -> str:
    """``routing_key`` without the delay a delayed message carries in front of it."""
    return _DELAY_PREFIX.sub("", routing_key, count=1)


def declare(app: App, queues: Sequence[Queue]) -> None:
    """Declare the topology (its queues of type ``broker_native_delayed_delivery_queue_type``)
    and bind ``queues`` to it (declaring them first: a binding needs its queue), on a
    connection of its own.  Broadcast queues are left out, as Celery leaves them.

    Raises what the broker refused: PRECONDITION_FAILED when the ``celery_delayed_*``
    queues exist with another type, for one.
    """
    with app.connection() as conn:
        declare_native_delayed_delivery_exchanges_and_queues(
            conn, app.conf.broker_native_delayed_delivery_queue_type
        )
        for queue in queues:
            if isinstance(queue, Broadcast):
                continue
            queue(conn.default_channel).declare()
            # kombu skips (with a warning) a direct exchange: it cannot match "#.key"
            bind_queue_to_native_delayed_delivery_exchange(conn, queue)
