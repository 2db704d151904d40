"""Result backends in Celery's format: :func:`backend_from_url` picks one by URL.

``base`` holds what every backend shares (states, the meta codec, exception
mapping, the :class:`~greenworker.backends.base.ResultBackend` protocol).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from ..exceptions import ImproperlyConfigured
from .base import DisabledBackend, ResultBackend
from .lmdb import LMDBBackend
from .memory import MemoryBackend
from .redis import RedisBackend


def backend_from_url(
    url: str | None, *, expires: float | None, redis_tls: dict[str, Any] | None = None
) -> ResultBackend:
    """The backend for ``url``; ``redis_tls``: redis-py's TLS options for a Redis one."""
    if not url:
        return DisabledBackend()
    scheme = urlparse(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisBackend(url, expires, tls=redis_tls)
    if scheme == "memory":
        return MemoryBackend(url)
    if scheme == "lmdb":
        path = url[len("lmdb://") :]
        if not path:
            raise ImproperlyConfigured("lmdb:// result backend needs a path: lmdb:///abs/dir")
        return LMDBBackend(os.path.abspath(path), expires)
    raise ImproperlyConfigured(
        f"unsupported result backend {scheme!r}: use redis://, lmdb:// or memory://"
    )
