"""Celery task message protocol: build version 2 messages, read version 2 and version 1.

Layout (Celery's "Message Protocol" docs, version 2)::

    properties = {correlation_id, content_type, content_encoding, reply_to}
    headers    = {lang, task, id, root_id, parent_id, group, eta, expires, retries,
                  timelimit, argsrepr, kwargsrepr, origin, shadow, ignore_result, ...}
    body       = (args, kwargs, {callbacks, errbacks, chain, chord})

A version 1 message has no ``task`` header; its body is a dict holding
everything.  It is converted to the version 2 form on receipt.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

EMPTY_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class MalformedMessage(ValueError):
    """A task message that cannot be run; the text says which field is wrong."""


@dataclass(slots=True)
class TaskMessage:
    """A decoded, validated task message (always in the version 2 shape)."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    embed: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_EMBED))
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    origin: str | None = None
    ignore_result: bool = False
    reply_to: str | None = None
    correlation_id: str | None = None
    protocol: int = 2
    headers: dict[str, Any] = field(default_factory=dict)


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


def build_task_message(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    task_id: str | None = None,
    countdown: float | None = None,
    eta: datetime | None = None,
    expires: float | datetime | None = None,
    retries: int = 0,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    group: str | None = None,
    group_index: int | None = None,
    origin: str | None = None,
    ignore_result: bool = False,
    reply_to: str | None = None,
    embed: Mapping[str, Any] | None = None,
) -> tuple[tuple[list[Any], dict[str, Any], dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Return ``(body, headers, properties)`` of a protocol version 2 task message."""
    task_id = task_id or new_id()
    now = utcnow()
    if countdown is not None and countdown < 0:
        raise ValueError(f"countdown must not be negative, got {countdown}")
    if countdown is not None:
        eta = now + timedelta(seconds=countdown)
    if isinstance(expires, int | float):
        expires = now + timedelta(seconds=expires)
    args_list = list(args)
    kwargs_dict = dict(kwargs or {})
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": _iso(eta),
        "expires": _iso(expires),
        "group": group,
        "group_index": group_index,
        "retries": retries,
        # Celery's order: [hard, soft] (its amqp module writes and its worker reads it so).
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": _short_repr(args_list),
        "kwargsrepr": _short_repr(kwargs_dict),
        "origin": origin,
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties: dict[str, Any] = {"correlation_id": task_id}
    if reply_to:
        properties["reply_to"] = reply_to
    body = (args_list, kwargs_dict, dict(embed) if embed else dict(EMPTY_EMBED))
    return body, headers, properties


def decode_task_message(
    body: Any,
    headers: Mapping[str, Any] | None,
    properties: Mapping[str, Any] | None = None,
) -> TaskMessage:
    """Validate a decoded message body and its headers; convert version 1 to version 2.

    Raises :class:`MalformedMessage` naming the first wrong field.
    """
    headers = dict(headers or {})
    properties = dict(properties or {})
    if "task" in headers:
        return _from_v2(body, headers, properties)
    if isinstance(body, Mapping) and "task" in body:
        return _from_v1(body, properties)
    raise MalformedMessage("no 'task' header (protocol 2) and no 'task' key in the body (1)")


def _from_v2(body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> TaskMessage:
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise MalformedMessage("body must be a list [args, kwargs, embed]")
    args, kwargs, embed = body
    hard, soft = _timelimit(headers.get("timelimit"))
    return TaskMessage(
        id=_required_str(headers, "id"),
        task=_required_str(headers, "task"),
        args=_args(args),
        kwargs=_kwargs(kwargs),
        embed=_embed(embed),
        retries=_retries(headers.get("retries")),
        eta=_datetime(headers, "eta"),
        expires=_datetime(headers, "expires"),
        soft_time_limit=soft,
        time_limit=hard,
        root_id=_optional_str(headers, "root_id"),
        parent_id=_optional_str(headers, "parent_id"),
        group=_optional_str(headers, "group"),
        group_index=_optional_index(headers.get("group_index")),
        origin=_optional_str(headers, "origin"),
        ignore_result=bool(headers.get("ignore_result") or False),
        reply_to=_optional_str(properties, "reply_to"),
        correlation_id=_optional_str(properties, "correlation_id"),
        protocol=2,
        headers=headers,
    )


def _from_v1(body: Mapping[str, Any], properties: dict[str, Any]) -> TaskMessage:
    fields = dict(body)
    hard, soft = _timelimit(fields.get("timelimit"))
    embed = {
        "callbacks": fields.get("callbacks"),
        "errbacks": fields.get("errbacks"),
        "chain": None,
        "chord": fields.get("chord"),
    }
    utc = fields.get("utc", True)
    msg = TaskMessage(
        id=_required_str(fields, "id"),
        task=_required_str(fields, "task"),
        args=_args(fields.get("args", [])),
        kwargs=_kwargs(fields.get("kwargs", {})),
        embed=_embed(embed),
        retries=_retries(fields.get("retries")),
        eta=_datetime(fields, "eta", assume_utc=bool(utc)),
        expires=_datetime(fields, "expires", assume_utc=bool(utc)),
        soft_time_limit=soft,
        time_limit=hard,
        group=_optional_str(fields, "taskset"),
        reply_to=_optional_str(properties, "reply_to"),
        correlation_id=_optional_str(properties, "correlation_id"),
        protocol=1,
    )
    msg.root_id = msg.id
    msg.headers = {
        "lang": "py",
        "task": msg.task,
        "id": msg.id,
        "eta": _iso(msg.eta),
        "expires": _iso(msg.expires),
        "group": msg.group,
        "retries": msg.retries,
        "timelimit": [hard, soft],
        "root_id": msg.id,
        "parent_id": None,
    }
    return msg


# ------------------------------------------------------------------ checks


def _required_str(src: Mapping[str, Any], key: str) -> str:
    value = src.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{key!r} must be a non-empty string, got {value!r:.80}")
    return value


def _optional_str(src: Mapping[str, Any], key: str) -> str | None:
    value = src.get(key)
    if value is None or isinstance(value, str):
        return value
    raise MalformedMessage(f"{key!r} must be a string or null, got {type(value).__name__}")


def _optional_index(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise MalformedMessage(f"group_index must be a non-negative integer, got {value!r:.40}")


def _args(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    raise MalformedMessage(f"args must be a list, got {type(value).__name__}")


def _kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise MalformedMessage(f"kwargs must be an object with string keys, got {type(value).__name__}")


def _embed(value: Any) -> dict[str, Any]:
    if value is None:
        return dict(EMPTY_EMBED)
    if isinstance(value, Mapping):
        return {**EMPTY_EMBED, **value}
    raise MalformedMessage(f"embed must be an object or null, got {type(value).__name__}")


def _retries(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise MalformedMessage(f"retries must be a non-negative integer, got {value!r:.40}")


def _timelimit(value: Any) -> tuple[float | None, float | None]:
    """``(hard, soft)`` from a ``timelimit`` field, in Celery's order (v1 and v2 alike)."""
    if value is None:
        return None, None
    if isinstance(value, list | tuple) and len(value) == 2:
        out: list[float | None] = []
        for part in value:
            if part is None:
                out.append(None)
            elif isinstance(part, int | float) and not isinstance(part, bool) and part >= 0:
                out.append(float(part))
            else:
                raise MalformedMessage(f"timelimit entries must be numbers or null: {value!r:.60}")
        return out[0], out[1]
    raise MalformedMessage(f"timelimit must be [hard, soft], got {value!r:.60}")


def _datetime(src: Mapping[str, Any], key: str, assume_utc: bool = True) -> datetime | None:
    value = src.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"{key!r} must be an ISO 8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedMessage(f"{key!r} is not an ISO 8601 date: {value!r:.60}") from None
    if parsed.tzinfo is None:
        # Celery writes naive times in UTC when enable_utc is on (the default).
        parsed = parsed.replace(tzinfo=UTC) if assume_utc else parsed.astimezone()
    return parsed


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _short_repr(value: Any, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
