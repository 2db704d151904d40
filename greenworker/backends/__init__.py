"""Result backends in Celery's format: :func:`backend_from_url` picks one by URL.

``base`` holds what every backend shares (states, the meta codec, exception
mapping, the :class:`~greenworker.backends.base.ResultBackend` protocol).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import ImproperlyConfigured
from .base import DisabledBackend, ResultBackend, StoreRetry
from .lmdb import LMDBBackend
from .memory import MemoryBackend
from .redis import RedisBackend

#: The result backends greenworker's own App has, by URL scheme.
BACKEND_SCHEMES = ("redis", "rediss", "unix", "sentinel", "memory", "lmdb")


def check_backend_url(url: str, transport_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ImproperlyConfigured` for a scheme greenworker has no backend for
    (or a ``sentinel://`` URL without ``master_name`` in ``transport_options``), or
    :class:`ValueError` for a malformed URL (host or port); opens nothing."""
    for part in url.split(";"):  # sentinel://a;sentinel://b
        parts = urlsplit(part.strip())  # ValueError: unbalanced IPv6 brackets
        parts.port  # noqa: B018  (ValueError: not a number, or out of range)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in BACKEND_SCHEMES:
        raise ImproperlyConfigured(
            f"unsupported result backend {scheme!r}: "
            "use redis://, sentinel://, lmdb:// or memory://"
        )
    if scheme == "lmdb" and not url[len("lmdb://") :]:
        raise ImproperlyConfigured("lmdb:// result backend needs a path: lmdb:///abs/dir")
    if scheme == "sentinel" and not (transport_options or {}).get("master_name"):
        raise ImproperlyConfigured(
            "a sentinel:// result backend needs the option 'master_name' "
            "(result_backend_transport_options = {'master_name': ...})"
        )


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
    check_backend_url(url, transport_options)
    scheme = urlsplit(url.split(";", 1)[0]).scheme.lower()
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
        return LMDBBackend(os.path.abspath(url[len("lmdb://") :]), expires)
    raise AssertionError(scheme)  # check_backend_url refused it
