"""Results in Redis, under Celery's keys (``redis://``, ``rediss://``, ``unix://``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..exceptions import ImproperlyConfigured
from .base import ChordPart, decode_meta, dumps, encode_meta, group_key, loads, result_key

if TYPE_CHECKING:
    pass

log = logging.getLogger("greenworker.results")


class RedisBackend:
    """Celery's Redis result backend layout: ``SETEX key`` then ``PUBLISH key``.

    The publish lets a Celery client that subscribed before sending (Celery
    does) see the result at once.
    """

    def __init__(
        self, url: str, expires: float | None, *, tls: dict[str, Any] | None = None
    ) -> None:
        try:
            import redis
        except ImportError as exc:
            raise ImproperlyConfigured(
                "the redis result backend needs redis: pip install 'greenworker[redis]'"
            ) from exc
        self.url = url
        self._expires = int(expires) if expires else None
        # A blocking pool: with hundreds of task greenlets storing at once, the
        # extra ones wait (cooperatively) for a connection instead of failing.
        if tls is not None and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://") :]  # the setting turns TLS on
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=30, **(tls or {})
        )
        self._client = redis.Redis(connection_pool=pool)

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        key = result_key(task_id)
        value = encode_meta(meta)
        pipe = self._client.pipeline(transaction=False)
        pipe.set(key, value, ex=self._expires)
        pipe.publish(key, value)
        pipe.execute()

    def get(self, task_id: str) -> dict[str, Any] | None:
        raw = self._client.get(result_key(task_id))
        return decode_meta(raw) if isinstance(raw, bytes | str) else None

    def set_chord_size(self, group_id: str, size: int) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(group_key(group_id, ".c"))
        pipe.set(group_key(group_id, ".s"), size, ex=self._expires)
        pipe.execute()

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        """Celery's Redis chord layout: the ``.j`` sorted set of ``[1, id, state, result]``
        scored by group index, the ``.s`` size and ``.t`` size change; ``.c`` is the
        claim that makes exactly one worker send the body."""
        jkey, skey, tkey, ckey = (group_key(group_id, x) for x in (".j", ".s", ".t", ".c"))
        member = dumps([1, task_id, state, result])
        pipe = self._client.pipeline(transaction=True)
        pipe.zadd(jkey, {member: "+inf" if index is None else index})
        pipe.zcard(jkey)
        pipe.get(tkey)
        pipe.get(skey)
        if self._expires:
            pipe.expire(jkey, self._expires)
        _, ready, diff, size = pipe.execute()[:4]
        if size is None or int(ready) != int(size) + int(diff or 0):
            return None
        if not self._client.set(ckey, task_id, nx=True, ex=max(self._expires or 0, 60)):
            return None  # another worker completed it first
        members: list[bytes] = list(self._client.zrange(jkey, 0, -1))  # type: ignore[arg-type]
        self._client.delete(jkey, skey, tkey)
        parts: list[ChordPart] = []
        for raw in members:
            _, part_id, part_state, value = loads(raw)
            parts.append((part_id, part_state, value))
        return parts

    def forget(self, task_id: str) -> None:
        self._client.delete(result_key(task_id))

    def close(self) -> None:
        self._client.close()
