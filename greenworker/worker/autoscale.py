"""Autoscaling: resize the greenlet pool between a minimum and a maximum from load.

The pool starts at ``min`` (:func:`start_size`).  Every ``interval`` seconds the
autoscaler samples the pool and asks its policy
for a target size.  The default policy grows toward ``max`` as soon as tasks
wait for a slot, and shrinks toward ``min`` once no task has waited for
``keepalive`` seconds.  Shrinking never kills a running task (the pool only
starts no new one above its size).  A different policy is any object with a
``target(sample, minimum, maximum) -> int`` method.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .pool import GreenPool
    from .timer import Entry, Timer

log = logging.getLogger("greenworker.autoscale")


@dataclass(frozen=True)
class LoadSample:
    size: int  #: current pool size
    active: int  #: tasks running
    waiting: int  #: tasks accepted but waiting for a slot
    when: float  #: time.monotonic() of the sample


class ScalingPolicy(Protocol):
    def target(self, sample: LoadSample, minimum: int, maximum: int) -> int: ...


class PressurePolicy:
    """Grow by the number of waiting tasks; shrink to what is busy after ``keepalive``."""

    def __init__(self, keepalive: float = 30.0) -> None:
        self.keepalive = keepalive
        self._last_pressure = time.monotonic()

    def target(self, sample: LoadSample, minimum: int, maximum: int) -> int:
        if sample.waiting > 0:
            self._last_pressure = sample.when
            return min(maximum, sample.size + sample.waiting)
        if sample.when - self._last_pressure >= self.keepalive:
            return max(minimum, sample.active)
        return max(minimum, min(sample.size, maximum))


def start_size(maximum: int, minimum: int, concurrency: int | None = None) -> int:
    """The pool size an autoscaled worker starts at: ``minimum``, as Celery's (its pool
    starts with the minimum and the autoscaler grows it).  A ``concurrency`` given too
    (``-c``) is not used, and one INFO line says so."""
    if concurrency is not None:
        log.info(
            "autoscale sets the pool size: it starts at MIN %d greenlet(s) and follows the "
            "load up to MAX %d; concurrency %d (-c) is not used",
            minimum,
            maximum,
            concurrency,
        )
    return minimum


class Autoscaler:
    """Resizes ``pool`` between ``minimum`` and ``maximum`` every ``interval`` on ``timer``."""

    def __init__(
        self,
        pool: GreenPool,
        timer: Timer,
        maximum: int,
        minimum: int,
        *,
        policy: ScalingPolicy | None = None,
        interval: float = 1.0,
        keepalive: float = 30.0,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"autoscale needs 1 <= min <= max, got max={maximum} min={minimum}")
        self.pool = pool
        self.timer = timer
        self.maximum = maximum
        self.minimum = minimum
        self.policy = policy or PressurePolicy(keepalive)
        self.interval = interval
        #: (time, size) after each change, newest last, for stats and tests.
        self.history: deque[tuple[float, int]] = deque(maxlen=200)
        self._timer: Entry | None = None

    def start(self) -> None:
        pool = self.pool
        if not self.minimum <= pool.size <= self.maximum:
            pool.resize(max(self.minimum, min(pool.size, self.maximum)))
        self.history.append((time.time(), pool.size))
        self._timer = self.timer.call_repeatedly(self.interval, self.tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def update(self, maximum: int | None = None, minimum: int | None = None) -> None:
        """Change the bounds at run time (the ``autoscale`` remote command)."""
        new_max = self.maximum if maximum is None else int(maximum)
        new_min = self.minimum if minimum is None else int(minimum)
        if not 1 <= new_min <= new_max:
            raise ValueError(f"autoscale needs 1 <= min <= max, got max={new_max} min={new_min}")
        self.maximum, self.minimum = new_max, new_min
        self.tick()

    def tick(self) -> None:
        pool = self.pool
        sample = LoadSample(pool.size, pool.active, pool.waiting, time.monotonic())
        target = max(
            self.minimum, min(self.maximum, self.policy.target(sample, self.minimum, self.maximum))
        )
        if target != pool.size:
            log.debug(
                "autoscale: %d -> %d (active %d, waiting %d, bounds %d..%d)",
                pool.size,
                target,
                sample.active,
                sample.waiting,
                self.minimum,
                self.maximum,
            )
            pool.resize(target)
            self.history.append((time.time(), target))

    def info(self) -> dict[str, object]:
        return {
            "max": self.maximum,
            "min": self.minimum,
            "qty": self.pool.size,
            "history": [[round(t, 3), size] for t, size in self.history],
        }
