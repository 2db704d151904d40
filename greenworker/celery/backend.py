"""A Celery app's result backend, seen through greenworker's :class:`ResultBackend` protocol.

Task endings go through Celery's tracer, which writes to the app's backend
itself.  What the worker writes on its own (a malformed message's FAILURE,
``NotRegistered``, a hub blocker refused after a restart) comes through
here as a result document and is handed to the same backend object, so
every Celery result backend (Redis, ``rpc://``, databases, caches, S3...)
receives it in its own format.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.backends.base import Backend

from ..backends.base import EXCEPTION_STATES, ChordPart

log = logging.getLogger("greenworker.results")

#: Seconds a task greenlet waits for a free connection of a Celery app's Redis result
#: backend before the write fails as Celery's retryable connection error.
POOL_TIMEOUT = 30.0


def fit_redis_pool(backend: Backend, greenlets: int) -> None:
    """Give Celery's Redis result backend a pool for ``greenlets`` task greenlets.

    The greenlets share one backend object (``result_backend_thread_safe``), so one
    redis-py pool, which raises ``MaxConnectionsError`` once its ``max_connections``
    (redis-py's 100 when Celery passes none) are in use: at ``-c 200`` results were
    lost.  Its pool becomes a ``BlockingConnectionPool``: a greenlet waits for a free
    connection (up to :data:`POOL_TIMEOUT`).  Its size is ``greenlets``, or the user's
    own (``redis_max_connections``, ``max_connections`` in the URL), which is kept.

    Left alone: another backend, Sentinel's (its pool is Sentinel's), a pool class of
    the user's, and a backend already connected."""
    from celery.backends.redis import RedisBackend, SentinelBackend

    if not isinstance(backend, RedisBackend) or isinstance(backend, SentinelBackend):
        return
    if backend._ConnectionPool is not None or "client" in vars(backend):
        return
    if not backend.connparams.get("max_connections"):
        backend.connparams["max_connections"] = greenlets
    backend._ConnectionPool = functools.partial(
        backend.redis.BlockingConnectionPool, timeout=POOL_TIMEOUT
    )


class CeleryResultBackend:
    """greenworker's view of ``celery_app.backend``."""

    def __init__(self, backend: Backend, url: str) -> None:
        self.backend = backend
        self.url = url

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        state = meta["status"]
        result = meta.get("result")
        if state in EXCEPTION_STATES:
            result = self.backend.exception_to_python(result)
        self.backend.store_result(task_id, result, state, traceback=meta.get("traceback"))

    def get(self, task_id: str) -> dict[str, Any] | None:
        meta: dict[str, Any] = self.backend.get_task_meta(task_id)
        return None if meta.get("status") == "PENDING" else meta

    def forget(self, task_id: str) -> None:
        self.backend.forget(task_id)

    def close(self) -> None:
        closing = getattr(self.backend, "close", None)
        if callable(closing):
            closing()

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Chords of a Celery app are counted by Celery's backend (``on_chord_part_return``)."""
        raise NotImplementedError("chords of a Celery app are counted by Celery's backend")

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        """Chords of a Celery app are counted by Celery's backend (``on_chord_part_return``)."""
        raise NotImplementedError("chords of a Celery app are counted by Celery's backend")
