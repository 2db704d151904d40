"""The worker's part of RabbitMQ's native delayed delivery: at each connection, the
``celery_delayed_*`` topology declared and the consumed queues bound to it, as Celery's
``DelayedDelivery`` bootstep does (the topology itself:
:mod:`greenworker.client.delayed_delivery`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kombu.entity import Queue
from kombu.utils.url import maybe_sanitize_url

from ..client.delayed_delivery import declare

if TYPE_CHECKING:
    from ..client.app import App

log = logging.getLogger("greenworker.consumer")


def set_up(app: App, queues: Sequence[Queue]) -> bool:
    """:func:`declare`, for the worker: a failure is one WARNING line and the worker
    consumes without it (delayed tasks on its queues then wait in the worker, or, sent
    by a Celery producer to a topology that is missing, fail to publish there)."""
    try:
        declare(app, queues)
    except Exception as exc:
        log.warning(
            "native delayed delivery is not set up on %s (%s): ETA and countdown tasks "
            "sent through it may not reach the queues %s",
            maybe_sanitize_url(app.broker_url),
            exc,
            ", ".join(q.name for q in queues),
        )
        return False
    log.debug("native delayed delivery set up for %s", ", ".join(q.name for q in queues))
    return True
