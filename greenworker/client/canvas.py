"""Canvas: signatures, chains, groups, chords and link callbacks, in Celery's wire form.

A signature travels as Celery's dict::

    {"task": name, "args": [...], "kwargs": {...}, "options": {...},
     "subtask_type": None, "immutable": False, "chord_size": None}

A chain puts the remaining steps, last first, in the message's ``embed.chain``;
links go in ``embed.callbacks`` / ``embed.errbacks``; a chord's header tasks
carry the body in ``embed.chord`` and share a group id, and the result backend
counts their results (Celery's ``celery-taskset-meta-<group>.j`` keys on Redis).
:class:`CanvasMiddleware` does the worker's part after each task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..protocol import new_id
from .result import AsyncResult

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("greenworker.canvas")


class Signature(dict[str, Any]):
    """A task call that can be sent later: ``add.s(2, 2)``, ``app.signature("name", ...)``."""

    app: App | None = None

    @classmethod
    def of(
        cls,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        app: App | None = None,
        immutable: bool = False,
        **options: Any,
    ) -> Signature:
        sig = cls(
            task=name,
            args=list(args),
            kwargs=dict(kwargs or {}),
            options=dict(options),
            subtask_type=None,
            immutable=immutable,
            chord_size=None,
        )
        sig.app = app
        return sig

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], app: App | None = None) -> Signature:
        if not isinstance(value, Mapping) or not isinstance(value.get("task"), str):
            raise ValueError(f"not a task signature: {value!r:.80}")
        sig = cls(value)
        sig.setdefault("args", [])
        sig.setdefault("kwargs", {})
        sig["options"] = dict(sig.get("options") or {})
        sig.setdefault("immutable", False)
        sig.app = app
        return sig

    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def id(self) -> str | None:
        task_id = self["options"].get("task_id")
        return str(task_id) if task_id else None

    def freeze(self) -> str:
        """Give the signature its task id now (so a result handle exists before sending)."""
        return str(self["options"].setdefault("task_id", new_id()))

    def set(self, **options: Any) -> Signature:
        self["options"].update(options)
        return self

    def link(self, callback: Signature) -> Signature:
        """Run ``callback`` with this task's result after it succeeds."""
        self["options"].setdefault("link", []).append(dict(callback))
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Run ``errback`` if this task fails."""
        self["options"].setdefault("link_error", []).append(dict(errback))
        return errback

    def __or__(self, other: Signature | Chain) -> Chain:  # type: ignore[override]
        tail = other.tasks if isinstance(other, Chain) else [other]
        return Chain([self, *tail], app=self.app)

    def _app(self) -> App:
        if self.app is None:
            raise RuntimeError(f"signature {self.name} is not bound to an app")
        return self.app

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        embed: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send it; ``args`` go before the signature's own (unless it is immutable)."""
        all_args, all_kwargs = self.merged(args, kwargs)
        opts = {**self["options"], **options}
        extra = dict(embed or {})
        if opts.get("link"):
            extra.setdefault("callbacks", opts["link"])
        if opts.get("link_error"):
            extra.setdefault("errbacks", opts["link_error"])
        return self._app().send_task(
            self.name,
            all_args,
            all_kwargs,
            task_id=opts.get("task_id"),
            queue=opts.get("queue"),
            exchange=opts.get("exchange"),
            routing_key=opts.get("routing_key"),
            priority=opts.get("priority"),
            serializer=opts.get("serializer"),
            countdown=opts.get("countdown"),
            expires=opts.get("expires"),
            soft_time_limit=opts.get("soft_time_limit"),
            time_limit=opts.get("time_limit"),
            parent_id=opts.get("parent_id"),
            root_id=opts.get("root_id"),
            group=opts.get("group_id"),
            group_index=opts.get("group_index"),
            embed=extra or None,
        )

    def merged(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        if self.get("immutable"):
            return list(self["args"]), dict(self["kwargs"])
        return [*args, *self["args"]], {**self["kwargs"], **(kwargs or {})}


class Chain:
    """Tasks run one after another, each getting the previous result first."""

    def __init__(self, tasks: Iterable[Signature], app: App | None = None) -> None:
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("a chain needs at least one task")
        self.app = app or self.tasks[0].app

    def __or__(self, other: Signature | Chain) -> Chain:
        tail = other.tasks if isinstance(other, Chain) else [other]
        return Chain([*self.tasks, *tail], app=self.app)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> AsyncResult:
        """Send the first task; the rest ride in its message.  Returns the last one's result."""
        for sig in self.tasks:
            sig.freeze()
        first, rest = self.tasks[0], self.tasks[1:]
        root = first.id
        steps = [dict(sig) for sig in reversed(rest)]
        for step in steps:
            step["options"] = {**step["options"], "root_id": root}
        first.apply_async(args, kwargs, embed={"chain": steps or None}, root_id=root)
        last = self.tasks[-1]
        return AsyncResult(str(last.id), self._app())

    def _app(self) -> App:
        if self.app is None:
            raise RuntimeError("chain is not bound to an app")
        return self.app


class GroupResult:
    """Results of a group, in order."""

    def __init__(self, group_id: str, results: list[AsyncResult]) -> None:
        self.id = group_id
        self.results = results

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        return [r.get(timeout=timeout, propagate=propagate) for r in self.results]

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def completed_count(self) -> int:
        return sum(r.successful() for r in self.results)


class Group:
    """Tasks run in parallel under one group id."""

    def __init__(self, tasks: Iterable[Signature], app: App | None = None) -> None:
        self.tasks = list(tasks)
        self.app = app or (self.tasks[0].app if self.tasks else None)

    def apply_async(self, *, group_id: str | None = None, **embed: Any) -> GroupResult:
        group_id = group_id or new_id()
        results = []
        for index, sig in enumerate(self.tasks):
            sig.freeze()
            results.append(
                sig.apply_async(embed=embed or None, group_id=group_id, group_index=index)
            )
        return GroupResult(group_id, results)

    def delay(self) -> GroupResult:
        return self.apply_async()


class Chord:
    """A group whose results, once all are in, go as one list to ``body``."""

    def __init__(self, header: Iterable[Signature], body: Signature) -> None:
        self.header = Group(header)
        self.body = body

    def apply_async(self) -> AsyncResult:
        app = self.body._app()
        group_id = new_id()
        self.body.freeze()
        app.backend.set_chord_size(group_id, len(self.header.tasks))
        self.header.apply_async(group_id=group_id, chord=dict(self.body))
        return AsyncResult(str(self.body.id), app)

    def delay(self) -> AsyncResult:
        return self.apply_async()


def chain(*tasks: Signature) -> Chain:
    return Chain(tasks)


def group(*tasks: Signature | Iterable[Signature]) -> Group:
    flat: list[Signature] = []
    for item in tasks:
        flat.extend([item] if isinstance(item, Signature) else item)
    return Group(flat)


def chord(header: Iterable[Signature], body: Signature | None = None) -> Any:
    """``chord(header, body)`` or Celery's ``chord(header)(body)``."""
    header = list(header)
    if body is None:
        return lambda b: Chord(header, b).apply_async()
    return Chord(header, body)
