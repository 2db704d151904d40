"""Waiting for a worker to go idle: ``Worker.join()``, for tests and scripts on ``memory://``."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from .. import green

if TYPE_CHECKING:
    from ..transport.base import TaskConsumer
    from .pool import GreenPool
    from .state import WorkerState


def join(
    *,
    state: WorkerState,
    pool: GreenPool,
    consumer: TaskConsumer,
    errors: deque[tuple[str, BaseException]],
    progress: green.Event,
    fail_fast: bool = True,
    timeout: float | None = 60.0,
) -> None:
    """Wait until the queues are empty and no task is reserved or running.

    With ``fail_fast`` the first task error is raised here as soon as it happens.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    settled = 0
    while True:
        if fail_fast and errors:
            _, exc = errors.popleft()
            raise exc
        idle = state.in_flight == 0 and pool.active == 0 and not consumer.receiving
        if idle and not any(consumer.queue_sizes().values()):
            settled += 1
            if settled >= 3:  # three times in a row: nothing was between fetch and hand-off
                return
        else:
            settled = 0
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"join: still busy after {timeout}s ({state.in_flight} in flight)")
        progress.wait(0.02)
        progress.clear()
