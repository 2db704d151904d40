"""Exceptions a greenworker user may catch (names follow Celery's where they overlap)."""

from __future__ import annotations

import builtins
from collections.abc import Callable


class GreenworkerError(Exception):
    """Base class of greenworker's own errors."""


class ImproperlyConfigured(GreenworkerError):
    """A setting or URL cannot be used."""


class BeatError(GreenworkerError):
    """Beat cannot start or went down; the one-line text says why (a schedule in use by
    another beat, a scheduler that cannot be loaded, a bad ``beat_schedule`` entry)."""


class MetricsError(GreenworkerError):
    """The metrics endpoint cannot be served: its port is taken, or its address is wrong."""


class NotRegistered(GreenworkerError, KeyError):
    """A message names a task this worker does not know."""


class TimeoutError(GreenworkerError, builtins.TimeoutError):
    """``AsyncResult.get()`` waited longer than its timeout."""


class TaskRevokedError(GreenworkerError):
    """The task was revoked (or expired) and did not run."""


class TaskError(GreenworkerError):
    """Stands for a task's exception whose class cannot be rebuilt here."""


class Retry(GreenworkerError):
    """Raised by ``task.retry()``: this run ends here and the task is sent again."""

    def __init__(
        self,
        message: str = "",
        exc: BaseException | None = None,
        when: float | str | None = None,
        send: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(message)
        self.exc = exc
        self.when = when
        #: Publishes the new message; the worker calls it after storing RETRY, so the
        #: next run's result can never be overwritten by this run's RETRY.
        self.send = send

    def __str__(self) -> str:
        reason = f": {self.exc!r}" if self.exc is not None else ""
        when = (
            f" in {self.when}s"
            if isinstance(self.when, int | float)
            else (f" at {self.when}" if self.when else "")
        )
        return f"Retry{when}{reason}"


class MaxRetriesExceededError(GreenworkerError):
    """``task.retry()`` was called more than ``max_retries`` times."""


class SoftTimeLimitExceeded(GreenworkerError):
    """Raised inside a task at its next cooperative point once its soft time limit passed.

    The task may catch it to clean up (the name Celery users already catch).
    """


class TimeLimitExceeded(GreenworkerError):
    """The task passed its hard time limit: its greenlet was killed (stored as the failure)."""


class Terminated(BaseException):
    """Thrown into a task greenlet that is revoked with ``terminate=True``.

    A ``BaseException`` so that a task's ``except Exception`` cannot swallow it.
    """


class HardTimeLimit(BaseException):
    """Thrown into a task greenlet past its hard time limit (see ``Terminated``)."""
