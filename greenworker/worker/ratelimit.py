"""Per-task rate limits (``"10/s"``, ``"100/m"``, ``"1000/h"``), as Celery's worker applies them.

A request over its task's limit waits on the green timer until a token is
due; other task types are not held up, and nothing polls.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import parse_rate

if TYPE_CHECKING:
    from .request import Request
    from .timer import Timer


class TokenBucket:
    """``rate`` tokens a second, holding at most ``capacity``."""

    def __init__(self, rate: float, capacity: float = 1.0) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)


class RateLimiter:
    """Holds requests of rate-limited tasks and releases them at the allowed pace."""

    def __init__(
        self,
        timer: Timer,
        release: Callable[[Request], None],
        initial_rate: Callable[[str], str | float | None],
    ) -> None:
        self._timer = timer
        self._release = release
        self._initial_rate = initial_rate
        self._known: set[str] = set()
        self._buckets: dict[str, TokenBucket] = {}
        self._waiting: dict[str, deque[Request]] = {}
        self._scheduled: set[str] = set()

    def set_rate(self, task_name: str, rate: str | float | None) -> None:
        """Change a task's limit at run time (0/None removes it)."""
        per_second = parse_rate(rate)
        self._known.add(task_name)
        if per_second <= 0:
            self._buckets.pop(task_name, None)
            self._drain(task_name, unlimited=True)
        else:
            self._buckets[task_name] = TokenBucket(per_second)

    def rate_of(self, task_name: str) -> float:
        bucket = self._buckets.get(task_name)
        return bucket.rate if bucket else 0.0

    @property
    def held(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def submit(self, request: Request) -> None:
        """Release now if a token is free and nobody waits ahead, else hold."""
        name = request.msg.task
        if name not in self._known:  # first message of this task: take its configured rate
            self.set_rate(name, self._initial_rate(name))
        bucket = self._buckets.get(name)
        waiting = self._waiting.get(name)
        if bucket is None or (not waiting and bucket.take()):
            self._release(request)
            return
        self._waiting.setdefault(name, deque()).append(request)
        self._schedule(name)

    def drop(self, request: Request) -> bool:
        waiting = self._waiting.get(request.msg.task)
        if waiting and request in waiting:
            waiting.remove(request)
            return True
        return False

    def _schedule(self, name: str) -> None:
        bucket = self._buckets.get(name)
        if name in self._scheduled or bucket is None:
            return
        self._scheduled.add(name)
        self._timer.call_after(bucket.wait_time(), self._on_token, name)

    def _on_token(self, name: str) -> None:
        self._scheduled.discard(name)
        self._drain(name)

    def _drain(self, name: str, unlimited: bool = False) -> None:
        waiting = self._waiting.get(name)
        bucket = self._buckets.get(name)
        while waiting and (unlimited or bucket is None or bucket.take()):
            self._release(waiting.popleft())
        if waiting:
            self._schedule(name)
        else:
            self._waiting.pop(name, None)
