""":class:`AsyncResult`: the client's view of a task's outcome in the result backend."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..backends.base import (
    EXCEPTION_STATES,
    FAILURE,
    PENDING,
    READY_STATES,
    REVOKED,
    SUCCESS,
    exception_from_meta,
)
from ..exceptions import TaskRevokedError, TimeoutError

if TYPE_CHECKING:
    from .app import App


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
