"""What the worker holds now: reserved and active requests, counters, start time.

An object passed to those who need it (never a module global).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .request import Request


#: Celery's defaults for the revoked set (``CELERY_WORKER_REVOKES_MAX`` / ``_EXPIRES``).
REVOKES_MAX = 50_000
REVOKE_EXPIRES = 10_800.0
#: ``inspect memsample`` keeps at most this many samples (the oldest go first).
MEMORY_SAMPLES_MAX = 1_000


class RevokedSet:
    """Task ids revoked recently: each kept until it expires, at most ``maxlen`` of them.

    The oldest go first when full.  Lookups are O(1); expiry is swept lazily.
    """

    def __init__(self, maxlen: int = REVOKES_MAX, expires: float = REVOKE_EXPIRES) -> None:
        self.maxlen = maxlen
        self.expires = expires
        self._items: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, task_id: object) -> bool:
        stamp = self._items.get(task_id) if isinstance(task_id, str) else None
        if stamp is None:
            return False
        if stamp + self.expires < time.time():
            del self._items[task_id]  # type: ignore[arg-type]
            return False
        return True

    def __len__(self) -> int:
        self.purge()
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        self.purge()
        return iter(list(self._items))

    def add(self, task_id: str, when: float | None = None) -> None:
        self._items.pop(task_id, None)
        self._items[task_id] = time.time() if when is None else when
        while len(self._items) > self.maxlen:
            self._items.popitem(last=False)

    def update(self, items: dict[str, float]) -> None:
        for task_id, when in sorted(items.items(), key=lambda kv: kv[1]):
            self.add(task_id, when)

    def discard(self, task_id: str) -> None:
        self._items.pop(task_id, None)

    def purge(self) -> int:
        """Drop expired ids; return how many."""
        cutoff = time.time() - self.expires
        expired = [task_id for task_id, stamp in self._items.items() if stamp < cutoff]
        for task_id in expired:
            del self._items[task_id]
        return len(expired)

    def as_dict(self) -> dict[str, float]:
        self.purge()
        return dict(self._items)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


class RevokedStamps:
    """Stamp values revoked by ``revoke_by_stamped_headers``, by stamp header name.

    A task is revoked by stamp when one of its ``stamped_headers`` names a
    revoked header and its stamp value (or one of its values, for a list) is
    among the revoked values: Celery's rule.  Kept in memory only, as Celery does.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._values)

    def add(self, header: str, values: Any) -> None:
        known = self._values.setdefault(header, [])
        known.extend(v for v in _as_list(values) if v not in known)

    def match(self, headers: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first ``{header: value}`` of a task's stamps that is revoked, or None.

        ``headers`` are the task message's headers (``stamped_headers`` and ``stamps``).
        """
        if not self._values:
            return None
        for name, value in self.matches(headers):
            return {name: value}
        return None

    def matches(self, headers: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """Every ``(header, value)`` of a task's stamps that is revoked."""
        names = headers.get("stamped_headers")
        stamps = headers.get("stamps")
        if not self._values or not isinstance(names, list | tuple):
            return []
        if not isinstance(stamps, Mapping):
            return []
        found: list[tuple[str, Any]] = []
        for name in names:
            revoked = self._values.get(name) if isinstance(name, str) else None
            value = stamps.get(name)
            if revoked is None or value is None:
                continue
            found.extend((name, v) for v in _as_list(value) if v in revoked)
        return found


class LamportClock:
    """The logical clock Celery's events and mingle carry (forward on send, adjust on receive)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def forward(self) -> int:
        self.value += 1
        return self.value

    def adjust(self, other: int) -> int:
        self.value = max(self.value, other) + 1
        return self.value


class WorkerState:
    def __init__(self) -> None:
        self.started_at = time.time()
        self.revoked = RevokedSet()
        self.revoked_stamps = RevokedStamps()
        #: RSS samples in bytes taken by ``inspect memsample``, for ``memdump``.
        self.memory_samples: deque[int] = deque(maxlen=MEMORY_SAMPLES_MAX)
        self.clock = LamportClock()
        #: Received and not started yet (waiting for a slot or an ETA), by task id.
        self.reserved: dict[str, Request] = {}
        #: Running now, by task id.
        self.active: dict[str, Request] = {}
        #: Tasks finished, by task name (``stats()['total']`` in Celery).
        self.total: Counter[str] = Counter()
        self.succeeded = 0
        self.failed = 0
        self.rejected = 0
        self.revoked_count = 0
        self.retried = 0
        #: Tasks that blocked the hub past their hard time limit (the watchdog ended an
        #: earlier run of this worker for them), by task id: refused when they come back.
        self.hub_blockers: dict[str, dict[str, Any]] = {}

    @property
    def processed(self) -> int:
        return sum(self.total.values())

    @property
    def in_flight(self) -> int:
        return len(self.reserved) + len(self.active)

    def task_received(self, request: Request) -> None:
        self.reserved[request.id] = request

    def task_discarded(self, request: Request) -> None:
        self.reserved.pop(request.id, None)

    def task_started(self, request: Request) -> None:
        self.reserved.pop(request.id, None)
        self.active[request.id] = request

    def task_finished(self, request: Request) -> None:
        self.active.pop(request.id, None)
        self.total[request.msg.task] += 1
