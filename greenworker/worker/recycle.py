"""Celery's ``worker_max_tasks_per_child`` and ``worker_max_memory_per_child`` for a
worker that is one process: after that many tasks, or once a task leaves the
process's resident memory above that many KiB, the process is replaced.

The worker replaces nothing itself: :class:`ProcessLimits` says once why (one
WARNING line) and calls ``reached(reason)``; the worker then stops warm (running
tasks finish, unstarted messages go back to the broker) and keeps the reason in
``Worker.restart_reason``.  The ``greenworker`` command restarts the process in
place; a program that embeds a worker decides for itself.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .hooks import Middleware

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger("greenworker.worker")


class ResidentMemory:
    """This process's resident set size now, in KiB, from ``/proc/self/statm`` (kept
    open: one ``pread`` a reading); ``None`` where there is no such file."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._page_kib = resource.getpagesize() // 1024

    @property
    def available(self) -> bool:
        return self._fd is not None

    def kib(self) -> int | None:
        if self._fd is None:
            return None
        fields = os.pread(self._fd, 128, 0).split()
        return int(fields[1]) * self._page_kib  # the second field: resident pages

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ProcessLimits(Middleware):
    """Counts the tasks that end and reads the resident memory after each; calls
    ``reached(reason)`` once, when ``max_tasks`` have ended or the memory is above
    ``max_memory_kib``.  ``None`` or 0 is no limit (Celery's meaning)."""

    def __init__(
        self,
        *,
        max_tasks: int | None,
        max_memory_kib: int | None,
        reached: Callable[[str], None],
    ) -> None:
        for name, value in (
            ("worker_max_tasks_per_child", max_tasks),
            ("worker_max_memory_per_child", max_memory_kib),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        self.max_tasks = max_tasks or None
        self.max_memory_kib = max_memory_kib or None
        self._reached = reached
        self.memory: ResidentMemory | None = None
        self.tasks_done = 0
        self.reason: str | None = None

    def start(self) -> None:
        """Count from zero (a worker started again is a new run)."""
        self.tasks_done = 0
        self.reason = None
        if not self.max_memory_kib:
            return
        self.memory = ResidentMemory()
        if not self.memory.available:
            log.warning(
                "worker_max_memory_per_child: this system has no /proc/self/statm to read "
                "the resident memory from; the limit is not enforced"
            )

    def after_task(self, request: Request, state: str, result: Any) -> None:
        if self.reason is not None:
            return
        self.tasks_done += 1
        if self.max_tasks and self.tasks_done >= self.max_tasks:
            self._reach(
                f"{self.tasks_done} tasks done, worker_max_tasks_per_child is {self.max_tasks}"
            )
            return
        if self.max_memory_kib and self.memory is not None:
            used = self.memory.kib()
            if used is not None and used > self.max_memory_kib:
                self._reach(
                    f"resident memory {used} KiB, worker_max_memory_per_child is "
                    f"{self.max_memory_kib} KiB"
                )

    def _reach(self, reason: str) -> None:
        self.reason = reason
        log.warning("%s: stopping to restart", reason)
        self._reached(reason)

    def stop(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
