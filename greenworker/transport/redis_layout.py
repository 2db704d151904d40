"""kombu's Redis key layout, shared by the native consumer and publisher: key
names, priority lists, the broker client.
"""

from __future__ import annotations

import bisect
import logging
import re
from typing import TYPE_CHECKING, Any

import redis

from ..backends.sentinel import sentinel_client
from ..config import redis_tls_options

if TYPE_CHECKING:
    from ..client.app import App

log = logging.getLogger("greenworker.consumer")


#: kombu's Redis defaults (``kombu.transport.redis``).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
BINDING_KEY = "_kombu.binding.{}"  # a set of "routing_key<sep>pattern<sep>queue"
# (kombu's separator between those fields is the same as its priority separator)
#: The first Redis with ``BLMOVE`` (and ``ZRANGE ... BYSCORE``, which kombu 5.7's own
#: visibility restore sends).
BLMOVE_SINCE = (6, 2)
#: How long a greenlet waits for a free connection of a broker client's pool before the
#: wait fails as a connection error.
POOL_TIMEOUT = 30.0


def broker_client(app: App) -> redis.Redis:
    """A redis-py client for the broker URL, with the app's connect timeout, pool size
    (the ``max_connections`` transport option, kombu's 50 by default) and TLS options
    (``broker_use_ssl``, as kombu's Redis transport takes them); ``sentinel://`` asks
    the sentinels for the master.

    The pool blocks (up to :data:`POOL_TIMEOUT`) when all its connections are in use:
    redis-py's plain pool raises "Too many connections" instead, which at a concurrency
    above the pool size (200 greenlets giving their messages back at a stop) failed the
    writes and closed the client under the acks being sent."""
    url = app.broker_url
    tls = redis_tls_options(app.conf.broker_use_ssl)
    max_connections = int(app.conf.broker_transport_options.get("max_connections", 50))
    if url.startswith("sentinel://"):
        return sentinel_client(
            url,
            app.conf.broker_transport_options,
            what="broker_url",
            max_connections=max_connections,
            tls=tls,
            socket_connect_timeout=app.conf.broker_connection_timeout,
            socket_keepalive=True,
        )
    if tls is not None and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]  # kombu: the setting turns TLS on
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT,
        socket_connect_timeout=app.conf.broker_connection_timeout,
        socket_keepalive=True,
        health_check_interval=0,
        **(tls or {}),
    )
    return redis.Redis.from_pool(pool)


def server_has_blmove(version: str) -> bool | None:
    """Whether a Redis reporting ``redis_version:<version>`` has ``BLMOVE`` (6.2 and
    later); ``None`` when the version cannot be read (a Redis-compatible server)."""
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    if found is None:
        return None
    return (int(found.group(1)), int(found.group(2))) >= BLMOVE_SINCE


def _priority_list(queue: str, payload: dict[str, Any]) -> str:
    """The list kombu puts ``payload`` on: its priority (0-9) rounded down to a step."""
    try:
        priority = max(min(int(payload["properties"]["priority"]), 9), 0)
    except (KeyError, TypeError, ValueError):
        priority = 0
    step = PRIORITY_STEPS[bisect.bisect(PRIORITY_STEPS, priority) - 1]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


def _priority_lists(queue: str) -> list[str]:
    """The lists kombu keeps for one queue, highest priority first."""
    return [f"{queue}{PRIORITY_SEP}{step}" if step else queue for step in PRIORITY_STEPS]
