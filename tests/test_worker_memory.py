"""The worker on the in-memory harness: kombu memory:// and worker.join()."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from greenworker import App, Task, Worker, current_request, green
from greenworker.exceptions import TaskRevokedError

from .conftest import publish_raw


def test_tasks_run_and_results_come_back(memory_app: App, worker: Worker) -> None:
    @memory_app.task
    def add(x: int, y: int) -> int:
        return x + y

    results = [add.delay(i, i) for i in range(200)]
    worker.join()
    assert [r.get(timeout=5) for r in results] == [2 * i for i in range(200)]
    assert results[0].state == "SUCCESS" and results[0].successful()
    assert worker.state.total[add.name] == 200


def test_default_task_name_and_explicit_name(memory_app: App) -> None:
    @memory_app.task
    def plain() -> None: ...

    @memory_app.task(name="custom.name")
    def named() -> None: ...

    assert plain.name == f"{__name__}.test_default_task_name_and_explicit_name.<locals>.plain"
    assert named.name == "custom.name"
    assert set(memory_app.tasks) >= {plain.name, "custom.name"}


def test_join_reraises_the_task_error_and_failure_is_stored(
    memory_app: App, worker: Worker
) -> None:
    @memory_app.task
    def boom(n: int) -> None:
        raise ValueError(f"bad {n}")

    result = boom.delay(7)
    with pytest.raises(ValueError, match="bad 7"):
        worker.join()
    assert result.get(timeout=5, propagate=False) is not None
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValueError) and result.result.args == ("bad 7",)
    assert result.traceback is not None and "ValueError: bad 7" in result.traceback
    with pytest.raises(ValueError, match="bad 7"):
        result.get(timeout=1)


def test_bound_task_sees_its_request_through_a_contextvar(memory_app: App, worker: Worker) -> None:
    seen: dict[str, Any] = {}

    @memory_app.task(bind=True)
    def whoami(self: Task, tag: str) -> str:
        mine = self.request.id
        ctx = current_request.get()
        assert ctx is not None and ctx.id == mine
        seen["called_directly"] = ctx.called_directly
        green.sleep(0.01)  # other tasks run meanwhile; the context stays ours
        assert self.request.id == mine
        seen.setdefault("ids", []).append(mine)
        return tag

    result = whoami.apply_async(("x",), task_id="fixed-id")
    others = [whoami.delay(str(i)) for i in range(20)]
    worker.join()
    assert result.get(timeout=5) == "x"
    assert [o.get(timeout=5) for o in others] == [str(i) for i in range(20)]
    assert seen["called_directly"] is False
    assert "fixed-id" in seen["ids"] and len(set(seen["ids"])) == 21
    assert current_request.get() is None
    assert whoami.request.called_directly

    @memory_app.task(bind=True)
    def direct(self: Task) -> bool:
        return self.request.called_directly

    assert direct() is True  # called directly: runs here, no message


def test_child_tasks_record_their_parent(memory_app: App, worker: Worker) -> None:
    parents: dict[str, str | None] = {}

    @memory_app.task(bind=True)
    def child(self: Task) -> None:
        parents["child"] = self.request.parent_id
        parents["root"] = self.request.root_id

    @memory_app.task(bind=True)
    def parent(self: Task) -> str:
        child.delay()
        return str(self.request.id)

    pid = parent.delay().id
    worker.join()
    assert parents == {"child": pid, "root": pid}


def test_countdown_runs_later_and_does_not_block_others(memory_app: App, worker: Worker) -> None:
    ran: dict[str, datetime] = {}

    @memory_app.task
    def stamp(name: str) -> None:
        ran[name] = datetime.now(UTC)

    sent = datetime.now(UTC)
    stamp.apply_async(("later",), countdown=0.3)
    stamp.delay("now")
    worker.join()
    assert ran["now"] < ran["later"]
    assert ran["later"] - sent >= timedelta(seconds=0.29)


def test_expired_task_is_revoked_not_run(memory_app: App, worker: Worker) -> None:
    ran: list[int] = []

    @memory_app.task
    def work() -> None:
        ran.append(1)

    result = work.apply_async(expires=datetime.now(UTC) - timedelta(seconds=1))
    worker.join()
    assert ran == []
    assert result.state == "REVOKED"
    with pytest.raises(TaskRevokedError, match=r"^expired$"):  # Celery's text
        result.get(timeout=1)


def test_early_ack_setting(memory_app: App, queue_name: str) -> None:
    memory_app.conf.task_acks_late = False
    acked_before_run: list[bool] = []
    holder: dict[str, Worker] = {}

    @memory_app.task
    def check() -> None:
        request = next(iter(holder["w"].state.active.values()))
        acked_before_run.append(request.message.acknowledged)

    worker = memory_app.Worker(concurrency=2)
    holder["w"] = worker
    worker.start()
    try:
        check.delay()
        worker.join()
    finally:
        worker.stop(timeout=5)
    assert acked_before_run == [True]


def test_ignore_result(memory_app: App, worker: Worker) -> None:
    @memory_app.task(ignore_result=True)
    def quiet() -> int:
        return 1

    result = quiet.delay()
    worker.join()
    assert result.state == "PENDING"


def test_unserialisable_result_is_a_failure(memory_app: App, worker: Worker) -> None:
    @memory_app.task
    def weird() -> object:
        return object()

    result = weird.delay()
    with pytest.raises(TypeError, match="not JSON serializable"):
        worker.join()
    assert result.state == "FAILURE"
    assert isinstance(result.result, TypeError)


def test_malformed_messages_are_rejected_with_one_line_and_worker_goes_on(
    memory_app: App, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    @memory_app.task(name="ok.task")
    def ok(x: int) -> int:
        return x

    caplog.set_level(logging.ERROR, logger="greenworker")
    good = {"task": "ok.task", "id": "id-0", "lang": "py"}
    # bad JSON
    publish_raw(
        memory_app,
        b"{not json",
        {**good, "id": "bad-json"},
        content_type="application/json",
        content_encoding="utf-8",
    )
    # no task header and not a v1 body
    publish_raw(memory_app, [[1], {}, {}], {"id": "no-headers"}, serializer="json")
    # args of the wrong type
    publish_raw(memory_app, ["oops", {}, {}], {**good, "id": "bad-args"}, serializer="json")
    # an unknown task
    publish_raw(
        memory_app, [[], {}, {}], {**good, "id": "unknown", "task": "no.such"}, serializer="json"
    )
    # a content type the worker does not accept (pickle is off by default)
    publish_raw(
        memory_app,
        b"\x80\x04K\x01.",
        {**good, "id": "pickled"},
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    result = ok.delay(41)
    worker.join()
    assert result.get(timeout=5) == 41
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 5, lines
    for ident in ("bad-json", "no-headers", "bad-args", "unknown", "pickled"):
        assert sum(ident in line for line in lines) == 1, (ident, lines)
    assert any("unregistered task 'no.such'" in line for line in lines)
    assert worker.state.rejected == 5
    unknown = memory_app.AsyncResult("unknown")
    assert unknown.state == "FAILURE"
    assert "NotRegistered" in type(unknown.result).__name__


def test_protocol_v1_message_runs(memory_app: App, worker: Worker) -> None:
    @memory_app.task(name="v1.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    body = {
        "task": "v1.mul",
        "id": "v1-task",
        "args": [6, 7],
        "kwargs": {},
        "retries": 0,
        "eta": None,
        "expires": None,
        "utc": True,
    }
    publish_raw(memory_app, body, {}, serializer="json")
    worker.join()
    assert memory_app.AsyncResult("v1-task").get(timeout=5) == 42


def test_pool_resize_while_busy_updates_prefetch(memory_app: App, worker: Worker) -> None:
    gate = green.new_event()

    @memory_app.task
    def wait() -> None:
        gate.wait(5)

    for _ in range(30):
        wait.delay()
    green.sleep(0.2)
    assert worker.pool.active == 20
    worker.pool.grow(10)
    green.sleep(0.3)
    assert worker.pool.active == 30
    assert worker.consumer.prefetch == 30 * worker.prefetch_multiplier
    worker.pool.shrink(25)
    assert worker.pool.active == 30  # nothing killed
    gate.set()
    worker.join()
    assert worker.state.total[wait.name] == 30


def test_stop_leaves_unstarted_messages_for_redelivery(memory_app: App) -> None:
    two_started = green.new_event()
    started: list[int] = []
    done: list[int] = []

    @memory_app.task
    def slow(n: int) -> None:
        started.append(n)
        if len(started) == 2:
            two_started.set()
        green.sleep(0.1)
        done.append(n)

    worker = memory_app.Worker(concurrency=2)
    worker.start()
    for n in range(10):
        slow.delay(n)
    assert two_started.wait(5)
    worker.stop(timeout=5)
    assert len(done) == 2
    second = memory_app.Worker(concurrency=10)
    second.start()
    try:
        second.join()
    finally:
        second.stop(timeout=5)
    assert sorted(done) == list(range(10))


def test_start_requires_patched_process_message() -> None:
    from greenworker.green import require_patched

    assert require_patched() in ("gevent", "eventlet")
