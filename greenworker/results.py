"""Result backends in Celery's format, and :class:`AsyncResult`.

Every backend stores the same JSON document Celery's key/value backends store
under ``celery-task-meta-<task id>``::

    {"status": "SUCCESS", "result": 4, "traceback": null, "children": [],
     "date_done": "2026-11-24T10:00:00.000000+00:00", "task_id": "..."}

A failure's ``result`` is ``{"exc_type", "exc_message", "exc_module"}``, as
Celery's JSON result serializer writes it, so Celery's ``AsyncResult`` reads
greenworker's results and the other way round.

The JSON is kombu's (the codec Celery's ``json`` serializer uses): ``datetime``,
``date``, ``time``, ``Decimal``, ``UUID`` and ``bytes`` are stored as
``{"__type__": ..., "__value__": ...}`` and come back as the same type, on
either side.
"""

from __future__ import annotations

import builtins
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from kombu.utils import json as kombu_json

from .exceptions import ImproperlyConfigured, TaskError, TaskRevokedError, TimeoutError
from .lmdbenv import open_env, write

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
RETRY = "RETRY"
REVOKED = "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
EXCEPTION_STATES = frozenset({FAILURE, RETRY, REVOKED})

KEY_PREFIX = "celery-task-meta-"
GROUP_PREFIX = "celery-taskset-meta-"


def result_key(task_id: str) -> str:
    return KEY_PREFIX + task_id


def build_meta(
    task_id: str,
    status: str,
    result: Any,
    traceback: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The document stored for a task, exactly as Celery lays it out."""
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": datetime.now(UTC).isoformat(),
        "task_id": task_id,
    }
    meta.update(extra)
    return meta


# greenworker's exceptions that mirror Celery's are stored under Celery's module,
# so a Celery client rebuilds its own class (and ours rebuilds ours).
_CELERY_NAMES = frozenset(
    {
        "SoftTimeLimitExceeded",
        "TimeLimitExceeded",
        "MaxRetriesExceededError",
        "Retry",
        "NotRegistered",
        "TaskRevokedError",
    }
)

#: Where a Celery worker's stored exceptions say they come from: its time limits are
#: billiard's classes (re-exported by ``celery.exceptions``).
_CELERY_CLASSES = frozenset(
    {("celery.exceptions", name) for name in _CELERY_NAMES}
    | {("billiard.exceptions", name) for name in ("SoftTimeLimitExceeded", "TimeLimitExceeded")}
)


def exception_to_meta(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    module = cls.__module__
    if module == "greenworker.exceptions" and cls.__name__ in _CELERY_NAMES:
        module = "celery.exceptions"
    return {
        "exc_type": cls.__qualname__,
        "exc_message": [_jsonable(a) for a in exc.args],
        "exc_module": module,
    }


def exception_from_meta(value: Any) -> BaseException:
    """Rebuild an exception from its stored form.

    Only classes from modules already imported here are used (a result never
    makes this process import code); others become a :class:`TaskError` subclass
    named after the original.
    """
    if isinstance(value, BaseException):
        return value
    if not isinstance(value, dict) or "exc_type" not in value:
        return TaskError(value)
    name = str(value.get("exc_type"))
    module_name = str(value.get("exc_module") or "builtins")
    raw_args = value.get("exc_message", [])
    args = tuple(raw_args) if isinstance(raw_args, list | tuple) else (raw_args,)
    if (module_name, name) in _CELERY_CLASSES:
        module_name = "greenworker.exceptions"  # Celery's names, greenworker's classes
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    cls: Any = module
    for part in name.split("."):
        cls = getattr(cls, part, None) if cls is not None else None
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            rebuilt: BaseException = cls(*args)
            return rebuilt
        except Exception:  # an exception class with another signature
            pass
    stand_in: type[TaskError] = type(
        name.rsplit(".", 1)[-1], (TaskError,), {"__module__": module_name}
    )
    return stand_in(*args)


def dumps(value: Any) -> str:
    """JSON text as Celery's ``json`` serializer writes it (kombu's typed JSON).

    Raises ``TypeError`` for a value that has no JSON form.
    """
    text: str = kombu_json.dumps(value)
    return text


def loads(raw: bytes | str) -> Any:
    """Read JSON written by :func:`dumps` (or by Celery): typed values come back typed."""
    return kombu_json.loads(raw)


def _jsonable(value: Any) -> Any:
    # An exception argument without a JSON form is kept as its repr (as Celery does).
    try:
        dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def encode_meta(meta: dict[str, Any]) -> bytes:
    return dumps(meta).encode()


def decode_meta(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = loads(raw)
    return value if isinstance(value, dict) else None


class ResultBackend(Protocol):
    """Where task results go.  All methods may be called from many greenlets."""

    url: str

    def store(self, task_id: str, meta: dict[str, Any]) -> None: ...

    def get(self, task_id: str) -> dict[str, Any] | None: ...

    def forget(self, task_id: str) -> None: ...

    def close(self) -> None: ...

    def set_chord_size(self, group_id: str, size: int) -> None: ...

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        """Count one finished header task; return all parts (in order) to the one caller
        that completed the chord, None to everyone else."""
        ...


#: (task id, state, result) of one finished chord header task.
ChordPart = tuple[str, str, Any]


def group_key(group_id: str, suffix: str = "") -> str:
    return GROUP_PREFIX + group_id + suffix


class _LocalChords:
    """Chord counting for backends whose data live in one process or one LMDB file."""

    def __init__(self) -> None:
        self._sizes: dict[str, int] = {}
        self._parts: dict[str, dict[str, tuple[float, ChordPart]]] = {}

    def set_chord_size(self, group_id: str, size: int) -> None:
        self._sizes[group_id] = size
        self._parts.pop(group_id, None)

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        parts = self._parts.setdefault(group_id, {})
        parts[task_id] = (float("inf") if index is None else index, (task_id, state, result))
        size = self._sizes.get(group_id)
        if size is None or len(parts) < size:
            return None
        del self._parts[group_id], self._sizes[group_id]
        return [part for _, part in sorted(parts.values(), key=lambda p: p[0])]


class DisabledBackend:
    """No result backend configured: storing is a no-op, reading is an error."""

    url = "disabled://"

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        return None

    def get(self, task_id: str) -> dict[str, Any] | None:
        raise ImproperlyConfigured("no result backend is configured (set result_backend)")

    def forget(self, task_id: str) -> None:
        return None

    def close(self) -> None:
        return None

    def set_chord_size(self, group_id: str, size: int) -> None:
        raise ImproperlyConfigured("chords need a result backend (set result_backend)")

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        log.error("chord %s: no result backend to count its parts", group_id)
        return None


class MemoryBackend:
    """Results in this process's memory (tests, the ``memory://`` harness)."""

    _shared: dict[str, dict[str, bytes]] = {}
    _chords: dict[str, _LocalChords] = {}

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._data = self._shared.setdefault(url, {})
        chords = self._chords.setdefault(url, _LocalChords())
        self.set_chord_size = chords.set_chord_size
        self.chord_part_return = chords.chord_part_return

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        self._data[task_id] = encode_meta(meta)

    def get(self, task_id: str) -> dict[str, Any] | None:
        return decode_meta(self._data.get(task_id))

    def forget(self, task_id: str) -> None:
        self._data.pop(task_id, None)

    def close(self) -> None:
        return None


class RedisBackend:
    """Celery's Redis result backend layout: ``SETEX key`` then ``PUBLISH key``.

    The publish lets a Celery client that subscribed before sending (Celery
    does) see the result at once.
    """

    def __init__(self, url: str, expires: float | None) -> None:
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
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=30)
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


class LMDBBackend:
    """Results in an LMDB environment on local disk (the embedded default).

    Many processes may open it at once (a worker and its clients).  Entries
    older than ``result_expires`` are purged when the worker opens it.
    """

    def __init__(self, path: str, expires: float | None) -> None:
        self.url = "lmdb://" + path
        self.path = path
        self._expires = expires
        self._env = open_env(path)
        self._db = self._env.open_db(b"results")
        self._chord_db = self._env.open_db(b"chords")

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        value = encode_meta(meta)
        write(self._env, self._db, lambda txn: txn.put(task_id.encode(), value))

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(task_id.encode())
            return decode_meta(bytes(raw)) if raw is not None else None

    def forget(self, task_id: str) -> None:
        write(self._env, self._db, lambda txn: txn.delete(task_id.encode()))

    def set_chord_size(self, group_id: str, size: int) -> None:
        value = dumps({"size": size, "parts": {}}).encode()
        write(self._env, self._chord_db, lambda txn: txn.put(group_id.encode(), value))

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        key = group_id.encode()

        def count(txn: Any) -> list[ChordPart] | None:
            raw = txn.get(key)
            if raw is None:
                return None
            chord = loads(bytes(raw))
            order = float("inf") if index is None else index
            chord["parts"][task_id] = [order, task_id, state, result]
            if len(chord["parts"]) < chord["size"]:
                txn.put(key, dumps(chord).encode())
                return None
            txn.delete(key)
            ordered = sorted(chord["parts"].values(), key=lambda p: p[0])
            return [(p[1], p[2], p[3]) for p in ordered]

        # One write transaction: LMDB serialises writers, even across processes.
        return write(self._env, self._chord_db, count)

    def purge_expired(self) -> int:
        """Delete results older than ``result_expires``; return how many."""
        if not self._expires:
            return 0
        cutoff = time.time() - self._expires
        stale: list[bytes] = []
        with self._env.begin(db=self._db) as txn:
            for key, raw in txn.cursor():
                meta = decode_meta(bytes(raw)) or {}
                try:
                    done = datetime.fromisoformat(str(meta.get("date_done"))).timestamp()
                except ValueError:
                    continue
                if done < cutoff:
                    stale.append(bytes(key))
        if stale:
            write(self._env, self._db, lambda txn: [txn.delete(key) for key in stale])
        return len(stale)

    def close(self) -> None:
        # The environment is shared within the process (see lmdbenv); it closes at exit.
        return None


def backend_from_url(url: str | None, *, expires: float | None) -> ResultBackend:
    if not url:
        return DisabledBackend()
    scheme = urlparse(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisBackend(url, expires)
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


class AsyncResult:
    """The outcome of a task that may not have finished yet."""

    def __init__(self, task_id: str, app: App) -> None:
        self.id = task_id
        self.app = app
        self._cache: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def _meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        meta = self.app.backend.get(self.id) or {"status": PENDING, "result": None}
        if meta.get("status") in READY_STATES:
            self._cache = meta
        return meta

    @property
    def state(self) -> str:
        return str(self._meta().get("status", PENDING))

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception instance if the task failed."""
        meta = self._meta()
        if meta.get("status") in EXCEPTION_STATES:
            return exception_from_meta(meta.get("result"))
        return meta.get("result")

    info = result

    @property
    def traceback(self) -> str | None:
        tb = self._meta().get("traceback")
        return str(tb) if tb is not None else None

    def ready(self) -> bool:
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == SUCCESS

    def failed(self) -> bool:
        return self.state == FAILURE

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.005,
        max_interval: float = 0.1,
    ) -> Any:
        """Wait for the result and return it; re-raise the task's exception if it failed.

        Raises :class:`greenworker.exceptions.TimeoutError` after ``timeout`` seconds.
        """
        meta = wait_for(self._meta, timeout, interval, max_interval, self.id)
        status = meta.get("status")
        if status == SUCCESS or not propagate:
            return self.result
        error = self.result
        if status == REVOKED and not isinstance(error, TaskRevokedError):
            error = TaskRevokedError(*getattr(error, "args", (error,)))
        # As Celery: the stored TaskRevokedError('revoked' / 'expired' / 'terminated').
        raise error

    def forget(self) -> None:
        self._cache = None
        self.app.backend.forget(self.id)


def wait_for(
    read: Callable[[], dict[str, Any]],
    timeout: float | None,
    interval: float,
    max_interval: float,
    task_id: str,
) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        meta = read()
        if meta.get("status") in READY_STATES:
            return meta
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"task {task_id} not ready after {timeout}s")
        # time.sleep is cooperative once the process is monkeypatched.
        pause = interval if deadline is None else min(interval, deadline - time.monotonic())
        time.sleep(max(pause, 0))
        interval = min(interval * 1.5, max_interval)
