"""Celery's signals for :class:`greenworker.App`, with Celery's names and arguments.

An integration written against Celery's signal API hooks greenworker's own
tasks by importing its signals from here instead of ``celery.signals``::

    from greenworker.signals import task_failure

    @task_failure.connect
    def report(sender=None, task_id=None, exception=None, **kwargs):
        ...

Each signal is sent with the arguments Celery sends it with (listed on each
one below); every receiver gets ``signal`` and ``sender`` too, and must take
``**kwargs``, as under Celery.  A receiver that raises is logged, and the
others still run.  Nothing is done for a signal nobody listens to.

These are greenworker's own objects: Celery is never imported.  A Celery app
run by greenworker sends Celery's own signals (``celery.signals``), not these;
the typed middleware hooks (:mod:`greenworker.hooks`) remain the fast path.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Hashable, Iterable
from types import TracebackType
from typing import Any, overload

__all__ = [
    "ExceptionInfo",
    "Signal",
    "after_task_publish",
    "before_task_publish",
    "celeryd_after_setup",
    "heartbeat_sent",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_received",
    "task_rejected",
    "task_retry",
    "task_revoked",
    "task_success",
    "task_unknown",
    "worker_init",
    "worker_process_init",
    "worker_ready",
    "worker_shutdown",
    "worker_shutting_down",
]

log = logging.getLogger("greenworker.signals")

Receiver = Callable[..., Any]
#: A receiver as it is kept: itself, or a weak reference to it.
_Held = Callable[[], Receiver | None] | Receiver
_Key = tuple[Hashable, Hashable]


def _identity(target: Any) -> Hashable:
    """What tells receivers and senders apart: a string by its value (a task name as
    sender), a bound method by its object and function, anything else by identity."""
    if isinstance(target, str | bytes):
        return target
    func = getattr(target, "__func__", None)
    if func is not None:  # bound methods are new objects each time they are read
        return (id(getattr(target, "__self__", None)), id(func))
    return id(target)


_ANY_SENDER = _identity(None)


def _takes_keywords(fn: Receiver) -> bool:
    """Whether ``fn`` accepts arbitrary keyword arguments (``**kwargs``)."""
    code = getattr(fn, "__code__", None)
    if code is not None:  # the flag, not inspect.signature: no annotation is evaluated
        return bool(code.co_flags & 0x08)  # CO_VARKEYWORDS
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


class Signal:
    """A signal: receivers connect to it and are called, in order, by :meth:`send`.

    ``name`` is for messages; ``providing_args`` names the arguments it is sent
    with (documentation only, as in Celery).
    """

    def __init__(self, name: str, providing_args: Iterable[str] = ()) -> None:
        self.name = name
        self.providing_args = frozenset(providing_args)
        #: ``[(key, receiver or weak reference), ...]``: empty (false) while nobody
        #: listens, so a sender can skip building its arguments.
        self.receivers: list[tuple[_Key, _Held]] = []
        self._lock = threading.Lock()
        self._dead = False  # a weakly held receiver was collected: prune at the next change

    def __repr__(self) -> str:
        return f"<Signal: {self.name} providing_args={sorted(self.providing_args)!r}>"

    @overload
    def connect(
        self,
        receiver: Receiver,
        *,
        sender: Any = None,
        weak: bool = True,
        dispatch_uid: Hashable | None = None,
    ) -> Receiver: ...

    @overload
    def connect(
        self,
        receiver: None = None,
        *,
        sender: Any = None,
        weak: bool = True,
        dispatch_uid: Hashable | None = None,
    ) -> Callable[[Receiver], Receiver]: ...

    def connect(
        self,
        receiver: Receiver | None = None,
        *,
        sender: Any = None,
        weak: bool = True,
        dispatch_uid: Hashable | None = None,
    ) -> Receiver | Callable[[Receiver], Receiver]:
        """Call ``receiver(signal=..., sender=..., **arguments)`` on every :meth:`send`, or
        only those from ``sender`` (compared by value for a string, such as a task
        name, else by identity).  Returns ``receiver``; without one, a decorator:
        ``@sig.connect`` and ``@sig.connect(sender=...)`` both work.

        ``weak`` (the default) holds the receiver by a weak reference: it is dropped
        when nothing else holds it (a lambda or a nested function passed here alone
        is, at once; pass ``weak=False`` for those).  A receiver connected twice, or a
        second one with the same ``dispatch_uid`` for the same sender, is not added
        again.
        """
        if receiver is None:

            def decorate(fn: Receiver) -> Receiver:
                return self.connect(fn, sender=sender, weak=weak, dispatch_uid=dispatch_uid)

            return decorate
        if not callable(receiver):
            raise TypeError(f"{self.name}: a signal receiver must be callable: {receiver!r}")
        if not _takes_keywords(receiver):
            raise ValueError(
                f"{self.name}: signal receiver {receiver!r} must accept keyword arguments "
                "(**kwargs)"
            )
        key = (dispatch_uid if dispatch_uid else _identity(receiver), _identity(sender))
        held: _Held = receiver
        if weak:
            owner = getattr(receiver, "__self__", None)
            if owner is not None and getattr(receiver, "__func__", None) is not None:
                held = weakref.WeakMethod(receiver)
            else:
                owner = receiver
                held = weakref.ref(receiver)
            weakref.finalize(owner, self._mark_dead)
        with self._lock:
            self._prune()
            if all(existing != key for existing, _ in self.receivers):
                self.receivers.append((key, held))
        return receiver

    def disconnect(
        self,
        receiver: Receiver | None = None,
        *,
        sender: Any = None,
        dispatch_uid: Hashable | None = None,
    ) -> bool:
        """Stop calling ``receiver`` (as connected for ``sender``), or the receiver
        connected with ``dispatch_uid``; True if one was connected."""
        key = (dispatch_uid if dispatch_uid else _identity(receiver), _identity(sender))
        with self._lock:
            self._prune()
            for index, (existing, _) in enumerate(self.receivers):
                if existing == key:
                    del self.receivers[index]
                    return True
        return False

    def has_listeners(self, sender: Any = None) -> bool:
        """Whether a :meth:`send` from ``sender`` would call anyone."""
        return bool(self._live(sender))

    def send(self, sender: Any, **named: Any) -> list[tuple[Receiver, Any]]:
        """Call each receiver for ``sender`` with ``signal``, ``sender`` and ``named``;
        return ``[(receiver, what it returned), ...]``.  A receiver that raises is
        logged with its traceback and its exception is its response: the others
        still run (Celery's ``send``, and Django's ``send_robust``)."""
        if not self.receivers:
            return []
        responses: list[tuple[Receiver, Any]] = []
        for receiver in self._live(sender):
            try:
                response = receiver(signal=self, sender=sender, **named)
            except Exception as exc:
                log.exception("Signal handler %r raised: %r", receiver, exc)
                responses.append((receiver, exc))
            else:
                responses.append((receiver, response))
        return responses

    send_robust = send  # Django's name

    def _live(self, sender: Any) -> list[Receiver]:
        """The receivers for ``sender`` still alive, in the order they connected."""
        wanted = _identity(sender)
        found: list[Receiver] = []
        for (_, their_sender), held in list(self.receivers):  # a copy: one may disconnect
            if their_sender != _ANY_SENDER and their_sender != wanted:
                continue
            if isinstance(held, weakref.ReferenceType):  # WeakMethod is one too
                target = held()
                if target is None:
                    continue
                found.append(target)
            else:
                found.append(held)
        return found

    def _mark_dead(self) -> None:
        # called by the garbage collector, possibly while the lock is held: only flag
        self._dead = True

    def _prune(self) -> None:
        """Drop the collected weak receivers (the caller holds the lock)."""
        if not self._dead:
            return
        self._dead = False
        self.receivers[:] = [
            (key, held)
            for key, held in self.receivers
            if not (isinstance(held, weakref.ReferenceType) and held() is None)
        ]


class ExceptionInfo:
    """An exception and its traceback, as Celery's signals pass them (``einfo``):
    ``type``, ``exception``, ``tb`` (the traceback object) and ``traceback`` (text)."""

    internal = False

    def __init__(
        self,
        exc: BaseException | None = None,
        traceback_text: str | None = None,
    ) -> None:
        """``exc``: the exception (default: the one being handled); ``traceback_text``:
        its traceback already formatted, if it is."""
        if exc is None:
            exc = sys.exc_info()[1]
            if exc is None:
                raise ValueError("ExceptionInfo() outside an except block needs an exception")
        self.type: type[BaseException] = type(exc)
        self.exception: BaseException = exc
        self.tb: TracebackType | None = exc.__traceback__
        self._text = traceback_text

    @property
    def traceback(self) -> str:
        """The formatted traceback (formatted when first read)."""
        if self._text is None:
            self._text = "".join(traceback.format_exception(self.exception))
        return self._text

    @property
    def exc_info(self) -> tuple[type[BaseException], BaseException, TracebackType | None]:
        return self.type, self.exception, self.tb

    def __str__(self) -> str:
        return self.traceback

    def __repr__(self) -> str:
        return f"<ExceptionInfo: {self.exception!r}>"


# ------------------------------------------------------------------ the client side

#: Before a task message is published (sender: the task name).  ``headers`` may be
#: changed here: what a receiver adds is sent (tracing context, for instance).
before_task_publish = Signal(
    "before_task_publish",
    ["body", "exchange", "routing_key", "headers", "properties", "declare", "retry_policy"],
)
#: A task message was published (sender: the task name).
after_task_publish = Signal("after_task_publish", ["body", "exchange", "routing_key", "headers"])

# ------------------------------------------------------------------ tasks, in the worker

#: A valid message for a known task arrived (sender: the worker; ``request``: the
#: worker's :class:`~greenworker.worker.request.Request`), in the consumer greenlet.
task_received = Signal("task_received", ["request"])
#: The task is about to run, in its own greenlet (sender: the task).
task_prerun = Signal("task_prerun", ["task_id", "task", "args", "kwargs"])
#: The task ended (``state``: SUCCESS, FAILURE, RETRY, IGNORED, REJECTED or REVOKED),
#: in its own greenlet (sender: the task).  Not sent when the task was killed by a
#: hard time limit or terminated (as under Celery, where its process dies).
task_postrun = Signal("task_postrun", ["task_id", "task", "args", "kwargs", "retval", "state"])
#: The task returned ``result`` after ``runtime`` seconds (sender: the task).
task_success = Signal("task_success", ["result", "runtime"])
#: The task asked for a retry (sender: the task; ``request``: its context,
#: ``self.request``; ``reason``: the :class:`~greenworker.exceptions.Retry`).
task_retry = Signal("task_retry", ["request", "reason", "einfo"])
#: The task raised, or passed its hard time limit (sender: the task).
task_failure = Signal(
    "task_failure", ["task_id", "exception", "args", "kwargs", "traceback", "einfo"]
)
#: The task was revoked, expired or terminated (sender: the task; ``request``: its
#: context).  ``signum`` is None: a greenlet is killed, no process signalled.
task_revoked = Signal("task_revoked", ["request", "terminated", "signum", "expired"])
#: A malformed message was rejected (sender: the worker; ``exc``: a ValueError saying why).
task_rejected = Signal("task_rejected", ["message", "exc"])
#: A message named a task the worker does not know (sender: the worker).
task_unknown = Signal("task_unknown", ["message", "exc", "name", "id"])

# ------------------------------------------------------------------ the worker

#: ``app.Worker()`` built a worker (sender: the :class:`~greenworker.Worker`).
worker_init = Signal("worker_init")
#: The worker is starting (sender: its node name; ``instance``: the worker, ``conf``:
#: the app's settings), after ``worker_process_init``.
celeryd_after_setup = Signal("celeryd_after_setup", ["instance", "conf"])
#: Sent once, at the worker's first start (sender: the node name): the worker is one
#: process, where Celery sends it in each of its pool processes.
worker_process_init = Signal("worker_process_init")
#: The worker consumes (sender: the worker).
worker_ready = Signal("worker_ready")
#: A heartbeat event was sent (sender: the worker).
heartbeat_sent = Signal("heartbeat_sent")
#: A signal started a shutdown of the ``greenworker`` command's worker (sender: its
#: node name; ``how``: "Warm" or "Cold").
worker_shutting_down = Signal("worker_shutting_down", ["sig", "how", "exitcode"])
#: The worker stopped: no task runs any more (sender: the worker).
worker_shutdown = Signal("worker_shutdown")
