"""Result backends in Celery's format: :func:`backend_from_url` picks one by URL.

``base`` holds what every backend shares (states, the meta codec, exception
mapping, the :class:`~greenworker.backends.base.ResultBackend` protocol).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from ..exceptions import ImproperlyConfigured
from .base import DisabledBackend, ResultBackend, StoreRetry
from .lmdb import LMDBBackend
from .memory import MemoryBackend
from .redis import RedisBackend


def backend_from_url(
    url: str | None,
    *,
    expires: float | None,
    redis_tls: dict[str, Any] | None = None,
    transport_options: Mapping[str, Any] | None = None,
    retry: StoreRetry | None = None,
) -> ResultBackend:
    """The backend for ``url``; ``redis_tls``: redis-py's TLS options for a Redis one;
    ``transport_options``: ``master_name`` and the like for ``sentinel://``; ``retry``:
    how a Redis store is retried after a lost connection."""
    if not url:
        return DisabledBackend()
    scheme = urlparse(url.split(";", 1)[0]).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisBackend(url, expires, tls=redis_tls, retry=retry)
    if scheme == "sentinel":
        from .sentinel import sentinel_client  # needs redis-py: the redis extra

        client = sentinel_client(
            url,
            transport_options or {},
            what="result_backend",
            max_connections=64,
            tls=redis_tls,
            socket_keepalive=True,
        )
        return RedisBackend(url, expires, client=client, retry=retry)
    if scheme == "memory":
        return MemoryBackend(url)
    if scheme == "lmdb":
        path = url[len("lmdb://") :]
        if not path:
            raise ImproperlyConfigured("lmdb:// result backend needs a path: lmdb:///abs/dir")
        return LMDBBackend(os.path.abspath(path), expires)
    raise ImproperlyConfigured(
        f"unsupported result backend {scheme!r}: use redis://, sentinel://, lmdb:// or memory://"
    )
