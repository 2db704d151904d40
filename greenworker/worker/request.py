"""One received task: its message, its task, and where it is in its run.

A :class:`Request` is data plus the worker's :class:`~greenworker.worker.executor.Executor`,
which runs it (:meth:`Request.execute`) and ends it exactly once: result
stored, hooks called, message acked or rejected by the policy.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from kombu.message import Message

from ..client.task import Context, Task
from ..exceptions import Retry
from ..protocol import TaskMessage, utcnow

if TYPE_CHECKING:
    from .executor import Executor
    from .timer import Entry


class Request:
    """A validated task message bound to its task, run once by :meth:`execute`."""

    __slots__ = (
        "_hard_timer",
        "acked",
        "executor",
        "finished",
        "generation",
        "job_id",
        "message",
        "msg",
        "retry",
        "started_at",
        "task",
        "time_start",
    )

    def __init__(
        self, msg: TaskMessage, message: Message, task: Task, executor: Executor, generation: int
    ) -> None:
        self.msg = msg
        self.message = message
        self.task = task
        self.executor = executor
        #: The consumer connection it came on (see ``Reconnecting.generation_alive``).
        self.generation = generation
        self.job_id: int | None = None
        #: When the task body started, on the monotonic clock (for durations and limits).
        self.time_start: float | None = None
        #: The same moment in wall-clock epoch seconds, as Celery and Flower show it.
        self.started_at: float | None = None
        #: The :class:`Retry` being handled, while the ``task_retried`` hooks run.
        self.retry: Retry | None = None
        self.finished = False
        self.acked = False
        self._hard_timer: Entry | None = None

    def __repr__(self) -> str:
        return f"<Request {self.msg.task}[{self.msg.id}]>"

    @property
    def id(self) -> str:
        return self.msg.id

    @property
    def name(self) -> str:
        return self.msg.task

    @property
    def args(self) -> list[Any]:
        """The task's positional arguments (as Celery's worker Request has them)."""
        return self.msg.args

    @property
    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments."""
        return self.msg.kwargs

    # ------------------------------------------------------------ options

    def option(self, name: str) -> Any:
        """The task's option ``name``, else the worker's ``task_<name>`` setting."""
        value = getattr(self.task, name)
        return getattr(self.executor.settings, "task_" + name) if value is None else value

    @property
    def acks_late(self) -> bool:
        return bool(self.option("acks_late"))

    @property
    def time_limits(self) -> tuple[float | None, float | None]:
        """(soft, hard): the message's own, else the task's, else the worker's."""
        conf = self.executor.settings
        soft = self.msg.soft_time_limit or self.task.soft_time_limit or conf.task_soft_time_limit
        hard = self.msg.time_limit or self.task.time_limit or conf.task_time_limit
        return soft, hard

    def ignore_result(self) -> bool:
        if self.task.ignore_result is not None:
            return self.task.ignore_result
        return self.msg.ignore_result or self.executor.settings.task_ignore_result

    def store_errors(self) -> bool:
        """Whether a failure, retry or time limit of this task is stored."""
        return not self.ignore_result() or self.executor.settings.task_store_errors_even_if_ignored

    def expired(self) -> bool:
        return self.msg.expires is not None and self.msg.expires <= utcnow()

    def revocation(self) -> tuple[str, dict[str, Any] | None] | None:
        """Why this task must not run, if it must not: ``("revoked", stamp)`` when its id
        or one of its stamped headers (``stamp``, ``{header: value}``) was revoked,
        ``("expired", None)`` past its expiry; None when it may run."""
        state = self.executor.state
        if self.id in state.revoked:
            return "revoked", None
        stamp = state.revoked_stamps.match(self.msg.headers)  # at once while none is revoked
        if stamp is not None:
            return "revoked", stamp
        if self.expired():
            return "expired", None
        return None

    # ------------------------------------------------------------ views

    def describe(self) -> dict[str, Any]:
        """The request as ``inspect active/reserved`` reports it."""
        msg = self.msg
        return {
            "id": msg.id,
            "name": msg.task,
            "args": msg.args,
            "kwargs": msg.kwargs,
            "type": msg.task,
            "hostname": self.executor.hostname,
            "time_start": self.started_at,
            "acknowledged": self.acked,
            "delivery_info": dict(self.message.delivery_info or {}),
            "worker_pid": os.getpid(),
        }

    def context(self) -> Context:
        """What the task sees as ``self.request`` / ``current_request`` while it runs."""
        msg = self.msg
        return Context(
            id=msg.id,
            task=msg.task,
            args=msg.args,
            kwargs=msg.kwargs,
            retries=msg.retries,
            eta=msg.eta,
            expires=msg.expires,
            root_id=msg.root_id,
            parent_id=msg.parent_id,
            group=msg.group,
            group_index=msg.group_index,
            origin=msg.origin,
            hostname=self.executor.hostname,
            delivery_info=dict(self.message.delivery_info or {}),
            headers=msg.headers,
            embed=msg.embed,
            timelimit=(msg.time_limit, msg.soft_time_limit),
            called_directly=False,
        )

    # ------------------------------------------------------------ running

    def execute(self) -> None:
        """Run the task in the current (pool) greenlet, store the result, ack."""
        self.executor.execute(self)

    def revoke(self, reason: str, *, stamp: dict[str, Any] | None = None) -> None:
        """Do not run: store REVOKED with ``reason`` and ack the message."""
        self.executor.revoke(self, reason, stamp=stamp)

    def terminate(self) -> None:
        """Revoke with ``terminate=True``: kill the running task now."""
        self.executor.terminate(self)
