"""The worker's periodic stats line (``worker_stats_interval``).

Every interval, one INFO line on ``greenworker.stats``::

    worker w1@box: processed 1200 (failed 3), 40.0 tasks/s, active 12/100, reserved 30,
    ETA held 2, broker reconnects 0

The rate is over the time since the previous line (since the start for the
first).  The numbers are the ones the worker already counts; this component
only reads them, from the timer's greenlet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..worker.pool import GreenPool
    from ..worker.state import WorkerState
    from ..worker.timer import Entry, Timer

log = logging.getLogger("greenworker.stats")

LOG_STATS = (
    "worker %s: processed %d (failed %d), %.1f tasks/s, active %d/%d, reserved %d, "
    "ETA held %d, broker reconnects %d"
)


class StatsLine:
    """Logs the stats line every ``interval`` seconds between :meth:`start` and :meth:`stop`.

    It reads ``state`` (tasks processed and failed; reserved: received, not started,
    waiting for a slot, a rate limit or an ETA), ``pool`` (active and size),
    ``eta_held`` (the reserved ones waiting for their ETA) and ``reconnects`` (the
    broker connection's).
    """

    def __init__(
        self,
        *,
        timer: Timer,
        interval: float,
        hostname: str,
        state: WorkerState,
        pool: GreenPool,
        eta_held: Callable[[], int],
        reconnects: Callable[[], int],
    ) -> None:
        if interval <= 0:
            raise ValueError("worker_stats_interval must be positive to log stats lines")
        self.timer = timer
        self.interval = interval
        self.hostname = hostname
        self.state = state
        self.pool = pool
        self._eta_held = eta_held
        self._reconnects = reconnects
        self._entry: Entry | None = None
        self._last = (0, 0.0)  # (processed, monotonic time) at the previous line

    def start(self) -> None:
        if self._entry is None:
            self._last = (self.state.processed, time.monotonic())
            self._entry = self.timer.call_repeatedly(self.interval, self.log_line)

    def stop(self) -> None:
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    def log_line(self) -> None:
        """Log the line now (the timer calls it every interval)."""
        state = self.state
        processed, now = state.processed, time.monotonic()
        before, then = self._last
        self._last = (processed, now)
        elapsed = now - then
        rate = (processed - before) / elapsed if elapsed > 0 else 0.0
        log.info(
            LOG_STATS,
            self.hostname,
            processed,
            state.failed,
            rate,
            self.pool.active,
            self.pool.size,
            len(state.reserved),
            self._eta_held(),
            self._reconnects(),
        )
