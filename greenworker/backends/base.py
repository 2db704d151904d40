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
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from kombu.utils import json as kombu_json

from ..exceptions import ImproperlyConfigured, TaskError

if TYPE_CHECKING:
    pass

log = logging.getLogger("greenworker.results")

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


def celery_exception(name: str, *args: Any) -> dict[str, Any]:
    """A stored exception that Celery clients rebuild into their own class."""
    return {"exc_type": name, "exc_message": list(args), "exc_module": "celery.exceptions"}


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


@dataclass(frozen=True)
class StoreRetry:
    """Celery's ``result_backend_always_retry`` and its limits: a store that fails for
    a lost connection is tried again after an exponential, fully jittered pause."""

    always: bool = True
    max_retries: float = float("inf")
    base_sleep: float = 0.01
    max_sleep: float = 10.0

    def pause(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt`` + 1 (0 is the first retry)."""
        return random.uniform(0, min(self.max_sleep, self.base_sleep * 2**attempt))


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
