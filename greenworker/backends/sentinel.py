"""Redis Sentinel as kombu and Celery read it, for the native broker paths and the
Redis result backend: ``sentinel://[:password@]host:port[/db];sentinel://host2:port``
with ``master_name`` (and ``sentinel_kwargs``, ``min_other_sentinels``) in the
transport options.

The client asks the sentinels for the master at each new connection, so after a
failover the next connect reaches the promoted replica.  Its pool blocks while every
connection is in use (hundreds of greenlets share one client), as the plain Redis
paths' pools do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.sentinel import (
    Sentinel,
    SentinelConnectionPoolProxy,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from ..exceptions import ImproperlyConfigured

#: kombu's port for a sentinel named without one.
SENTINEL_PORT = 26379


class BlockingSentinelPool(redis.BlockingConnectionPool):
    """redis-py's sentinel-managed connections in a pool that waits for a free one."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        tls = kwargs.pop("ssl", False)
        kwargs["connection_class"] = (
            SentinelManagedSSLConnection if tls else SentinelManagedConnection
        )
        self.is_master = True
        self.check_connection = False
        self.service_name = service_name
        self.sentinel_manager = sentinel_manager
        self.proxy = SentinelConnectionPoolProxy(
            connection_pool=self,
            is_master=True,
            check_connection=False,
            service_name=service_name,
            sentinel_manager=sentinel_manager,
        )
        super().__init__(**kwargs)
        self.connection_kwargs["connection_pool"] = self.proxy

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "proxy"):  # reset() runs inside the base __init__ too
            self.proxy.reset()


def sentinel_client(
    url: str,
    options: Mapping[str, Any],
    *,
    what: str,
    max_connections: int,
    tls: dict[str, Any] | None = None,
    **connection: Any,
) -> redis.Redis:
    """A client of the master that the sentinels in ``url`` name ``master_name``.
    ``what`` names the setting in the error for a missing master name."""
    sentinels: list[tuple[str, int]] = []
    first = None
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        if parsed.scheme != "sentinel":
            continue
        sentinels.append((parsed.hostname or "localhost", parsed.port or SENTINEL_PORT))
        first = first or parsed
    master_name = options.get("master_name")
    if first is None or not master_name:
        raise ImproperlyConfigured(
            f"{what}: a sentinel:// URL needs the transport option 'master_name' "
            "(the name the sentinels monitor the master under)"
        )
    path = first.path.strip("/")
    credentials = {
        "username": unquote(first.username) if first.username else None,
        "password": unquote(first.password) if first.password else None,
    }
    manager = Sentinel(
        sentinels,
        min_other_sentinels=int(options.get("min_other_sentinels", 0)),
        sentinel_kwargs=options.get("sentinel_kwargs"),
        **connection,
    )
    pool = BlockingSentinelPool(
        master_name,
        manager,
        db=int(path) if path.isdigit() else 0,
        max_connections=max_connections,
        timeout=30,
        ssl=tls is not None,
        **credentials,
        **connection,
        **(tls or {}),
    )
    return redis.Redis(connection_pool=pool)
