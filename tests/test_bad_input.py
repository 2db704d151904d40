"""The bad-input matrix: each bad message gets one log line and a reject; nothing else is lost."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import greenlet
import pytest

from greenworker import App
from greenworker.client.result import AsyncResult

from .conftest import publish_raw


def _live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)


JSON = {"serializer": "json"}
RAW_JSON = {"content_type": "application/json", "content_encoding": "utf-8"}

CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any], str]] = {
    # name: (body, headers, publish options, fragment of the log line)
    "invalid-json": (b"{nope", {"task": "bad.ok", "id": "invalid-json"}, RAW_JSON, "Decode"),
    "wrong-shape": ({"a": 1}, {"task": "bad.ok", "id": "wrong-shape"}, JSON, "body must be"),
    "args-not-list": (["x", {}, {}], {"task": "bad.ok", "id": "args-not-list"}, JSON, "args"),
    "kwargs-not-dict": ([[], [1], {}], {"task": "bad.ok", "id": "kwargs-not-dict"}, JSON, "kwargs"),
    "missing-id": ([[], {}, {}], {"task": "bad.ok"}, JSON, "'id' must be"),
    "missing-task": ([[], {}, {}], {"id": "missing-task"}, JSON, "no 'task' header"),
    "unknown-task": (
        [[], {}, {}],
        {"task": "no.such", "id": "unknown-task"},
        JSON,
        "unregistered task",
    ),
    "pickle": (
        b"\x80\x04K\x01.",
        {"task": "bad.ok", "id": "pickle"},
        {"content_type": "application/x-python-serialize", "content_encoding": "binary"},
        "ContentDisallowed",
    ),
    "ten-mb": (
        [["x" * (10 * 1024 * 1024)], {}, {}],
        {"task": "bad.ok", "id": "ten-mb"},
        JSON,
        "worker_max_message_size",
    ),
    "bad-eta": (
        [[], {}, {}],
        {"task": "bad.ok", "id": "bad-eta", "eta": "next tuesday"},
        JSON,
        "'eta' is not an ISO 8601",
    ),
}


@pytest.mark.timeout(60)
def test_bad_input_matrix(any_app: App, caplog: pytest.LogCaptureFixture) -> None:
    # every broker: memory, Redis, RabbitMQ and the embedded default
    ran: list[int] = []

    @any_app.task(name="bad.ok")
    def ok(n: int = 0) -> int:
        ran.append(n)
        return n

    caplog.set_level(logging.ERROR, logger="greenworker")
    worker = any_app.Worker(concurrency=10)
    worker.start()
    try:
        assert ok.delay(-1).get(timeout=5) == -1  # warm up before counting greenlets
        baseline = _live_greenlets()
        goods: list[AsyncResult] = []
        for body, headers, options, _ in CASES.values():
            publish_raw(any_app, body, {"lang": "py", **headers}, **options)
            goods.append(ok.delay(len(goods)))  # a good message after every bad one
        # A v1 message and one whose eta is already past are fine: they run.
        publish_raw(
            any_app, {"task": "bad.ok", "id": "v1", "args": [100], "kwargs": {}}, {}, **JSON
        )
        past = datetime.now(UTC) - timedelta(seconds=30)
        late = ok.apply_async((200,), eta=past)
        worker.join()
        assert [g.get(timeout=5) for g in goods] == list(range(len(CASES)))
        assert any_app.AsyncResult("v1").get(timeout=5) == 100
        assert late.get(timeout=5) == 200
        assert worker.state.rejected == len(CASES)
        assert worker.pool.active == 0 and worker.state.in_flight == 0
        assert _live_greenlets() <= baseline + 2
    finally:
        worker.stop(timeout=5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(CASES), errors
    for name, (_, headers, _, fragment) in CASES.items():
        mine = [e for e in errors if fragment in e]
        assert mine, (name, fragment, errors)
        if "id" in headers:  # a client waiting on that id learns why
            assert any_app.AsyncResult(headers["id"]).state == "FAILURE", name


def test_negative_countdown_is_a_clear_client_error(memory_app: App) -> None:
    @memory_app.task
    def noop() -> None: ...

    with pytest.raises(ValueError, match="countdown must not be negative"):
        noop.apply_async(countdown=-5)


def test_decode_failures_never_reach_the_pool(memory_app: App) -> None:
    submitted: list[Callable[..., Any]] = []
    worker = memory_app.Worker(concurrency=2)
    original = worker.pool.submit

    def spy(fn: Callable[..., Any], *args: Any) -> int:
        submitted.append(fn)
        return original(fn, *args)

    worker.pool.submit = spy  # type: ignore[method-assign]
    worker.start()
    try:
        publish_raw(memory_app, b"{nope", {"task": "x", "id": "y"}, **RAW_JSON)
        worker.join()
    finally:
        worker.stop(timeout=5)
    assert submitted == [] and worker.state.rejected == 1
