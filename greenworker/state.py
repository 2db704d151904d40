"""What the worker holds now: reserved and active requests, counters, start time.

An object passed to those who need it (never a module global).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .request import Request


#: Celery's defaults for the revoked set (``CELERY_WORKER_REVOKES_MAX`` / ``_EXPIRES``).
REVOKES_MAX = 50_000
REVOKE_EXPIRES = 10_800.0


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
