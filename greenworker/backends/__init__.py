"""Result backends in Celery's format: :func:`backend_from_url` picks one by URL.

``base`` holds what every backend shares (states, the meta codec, exception
mapping, the :class:`~greenworker.backends.base.ResultBackend` protocol).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import ImproperlyConfigured
from .base import DisabledBackend, ResultBackend
from .lmdb import LMDBBackend
from .memory import MemoryBackend
from .redis import RedisBackend

#: The result backends greenworker's own App has, by URL scheme.
BACKEND_SCHEMES = ("redis", "rediss", "unix", "memory", "lmdb")


def check_backend_url(url: str) -> None:
    """Raise :class:`ImproperlyConfigured` for a scheme greenworker has no backend for,
    or :class:`ValueError` for a malformed URL (host or port); opens nothing."""
    parts = urlsplit(url)  # ValueError: unbalanced IPv6 brackets
    scheme = parts.scheme.lower()
    if scheme not in BACKEND_SCHEMES:
        raise ImproperlyConfigured(
            f"unsupported result backend {scheme!r}: use redis://, lmdb:// or memory://"
        )
    if scheme == "lmdb" and not url[len("lmdb://") :]:
        raise ImproperlyConfigured("lmdb:// result backend needs a path: lmdb:///abs/dir")
    parts.port  # noqa: B018  (ValueError: not a number, or out of range)


def backend_from_url(
    url: str | None, *, expires: float | None, redis_tls: dict[str, Any] | None = None
) -> ResultBackend:
    """The backend for ``url``; ``redis_tls``: redis-py's TLS options for a Redis one."""
    if not url:
        return DisabledBackend()
    check_backend_url(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisBackend(url, expires, tls=redis_tls)
    if scheme == "memory":
        return MemoryBackend(url)
    if scheme == "lmdb":
        return LMDBBackend(os.path.abspath(url[len("lmdb://") :]), expires)
    raise AssertionError(scheme)  # check_backend_url refused it
