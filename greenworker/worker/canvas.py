"""What the worker does after a task of a canvas ends: links, errbacks, chord parts."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..backends.base import (
    EXCEPTION_STATES,
    FAILURE,
    SUCCESS,
    build_meta,
    celery_exception,
    exception_from_meta,
    exception_to_meta,
)
from ..client.canvas import Signature
from .hooks import Middleware

if TYPE_CHECKING:
    from ..client.app import App
    from .request import Request

log = logging.getLogger("greenworker.canvas")


class CanvasMiddleware(Middleware):
    """Runs what a finished task's message asks for next: chain, callbacks, errbacks, chord."""

    def __init__(self, app: App) -> None:
        self.app = app

    def after_task(self, request: Request, state: str, result: Any) -> None:
        embed = request.msg.embed
        if request.msg.group and embed.get("chord") and state in (SUCCESS, FAILURE):
            self._chord_part(request, state, result)
        if state == SUCCESS:
            for callback in embed.get("callbacks") or ():
                self._send(callback, (result,), request)
            steps = list(embed.get("chain") or ())
            if steps:
                step = steps.pop()
                self._send(step, (result,), request, chain=steps or None)
        elif state == FAILURE:
            exc = result if isinstance(result, BaseException) else Exception(str(result))
            for errback in embed.get("errbacks") or ():
                self._errback(errback, request, exc)
            for step in embed.get("chain") or ():  # Celery fails the rest of the chain too
                step_id = (step.get("options") or {}).get("task_id")
                if step_id:
                    meta = build_meta(step_id, FAILURE, exception_to_meta(exc))
                    self.app.backend.store(step_id, meta)

    def _send(
        self,
        raw: Mapping[str, Any],
        args: Sequence[Any],
        parent: Request,
        chain: list[Any] | None = None,
    ) -> None:
        try:
            sig = Signature.from_dict(raw, self.app)
        except ValueError as exc:
            log.error("Task %s[%s]: bad callback: %s", parent.name, parent.id, exc)
            return
        embed: dict[str, Any] = {"chain": chain} if chain else {}
        sig.apply_async(
            args,
            embed=embed,
            parent_id=parent.id,
            root_id=parent.msg.root_id or parent.id,
        )

    def _errback(self, raw: Mapping[str, Any], request: Request, exc: BaseException) -> None:
        try:
            sig = Signature.from_dict(raw, self.app)
        except ValueError as error:
            log.error("Task %s[%s]: bad errback: %s", request.name, request.id, error)
            return
        local = self.app.tasks.get(sig.name)
        if local is not None and _takes_request_exc_tb(local.fn, local.bind):
            # New-style errback: called here with (request, exc, traceback), as Celery does.
            try:
                args, kwargs = sig.merged()
                local(request._context(), exc, None, *args, **kwargs)
            except Exception:
                log.exception("errback %s of %s[%s] raised", sig.name, request.name, request.id)
            return
        sig.apply_async((request.id,), parent_id=request.id, root_id=request.msg.root_id)

    def _chord_part(self, request: Request, state: str, result: Any) -> None:
        msg = request.msg
        assert msg.group is not None
        stored = exception_to_meta(result) if state == FAILURE else result
        parts = self.app.backend.chord_part_return(
            msg.group, msg.id, msg.group_index, state, stored
        )
        if parts is None:
            return
        body = Signature.from_dict(msg.embed["chord"], self.app)
        values = []
        for task_id, part_state, value in parts:
            if part_state in EXCEPTION_STATES:
                error = exception_from_meta(value)
                reason = f"Dependency {task_id} raised {error!r}"
                log.error("Chord %s: %s", msg.group, reason)
                if body.id:
                    meta = build_meta(body.id, FAILURE, celery_exception("ChordError", reason))
                    self.app.backend.store(body.id, meta)
                return
            values.append(value)
        body.apply_async((values,), parent_id=request.id, root_id=msg.root_id)


def _takes_request_exc_tb(fn: Any, bound: bool) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if bound:
        params = params[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)
