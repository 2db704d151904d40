"""Typed extension hooks: subclass :class:`Middleware`, override what you need.

Canvas callbacks (:mod:`greenworker.worker.canvas`) and task events
(:mod:`greenworker.control.events`) are middleware too; the ``STARTED`` state
(``track_started``) is stored by the request itself, before ``before_task``.  A
hook that raises is logged and ignored: an extension never stops the worker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kombu.message import Message

    from .request import Request
    from .worker import Worker

log = logging.getLogger("greenworker.hooks")

HOOK_NAMES = (
    "worker_start",
    "worker_ready",
    "worker_stop",
    "task_received",
    "before_task",
    "after_task",
    "task_succeeded",
    "task_failed",
    "task_retried",
    "task_revoked",
    "task_rejected",
)


class Middleware:
    """Base class: every hook is a no-op.  Hooks run in the greenlet named in each docstring."""

    def worker_start(self, worker: Worker) -> None:
        """The worker started (the caller of ``worker.start()``)."""

    def worker_ready(self, worker: Worker) -> None:
        """The worker consumes: its "ready" line was logged (the greenlet that saw it)."""

    def worker_stop(self, worker: Worker) -> None:
        """The worker stopped: no task runs any more (the caller of ``worker.stop()``)."""

    def task_received(self, request: Request) -> None:
        """A valid message for a known task arrived (the consumer greenlet; keep it short)."""

    def before_task(self, request: Request) -> None:
        """The task is about to run (its own greenlet, its request current)."""

    def after_task(self, request: Request, state: str, result: Any) -> None:
        """The task ended in ``state`` and its result was stored (its own greenlet)."""

    def task_succeeded(self, request: Request, result: Any, runtime: float) -> None:
        """The task returned ``result`` after ``runtime`` seconds (its own greenlet)."""

    def task_failed(self, request: Request, exc: BaseException, traceback: str | None) -> None:
        """The task raised, or passed its hard time limit (its own greenlet or the timer's)."""

    def task_retried(self, request: Request, exc: BaseException | None, when: Any) -> None:
        """The task asked for a retry; the new message is already sent (its own greenlet)."""

    def task_revoked(self, request: Request, reason: str) -> None:
        """The task was revoked, terminated or expired."""

    def task_rejected(self, message: Message, reason: str, requeue: bool) -> None:
        """A message was rejected: malformed or for an unknown task (the consumer greenlet,
        never requeued), or by the task itself raising ``Reject`` (``requeue`` as it asked)."""


class Hooks:
    """Calls each hook on the middleware that overrides it, in order."""

    def __init__(self, middleware: list[Middleware]) -> None:
        self.middleware = list(middleware)
        self._bound: dict[str, list[Any]] = {}
        for name in HOOK_NAMES:
            base = getattr(Middleware, name)
            self._bound[name] = [
                getattr(m, name) for m in self.middleware if getattr(type(m), name) is not base
            ]

    def emit(self, name: str, *args: Any) -> None:
        for hook in self._bound[name]:
            try:
                hook(*args)
            except Exception:
                log.exception(
                    "middleware hook %s raised; ignored", getattr(hook, "__qualname__", hook)
                )
