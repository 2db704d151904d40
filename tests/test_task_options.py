"""Celery's task options on greenworker's own App: base=, serializer=, priority=,
typing, the options accepted or refused by name, and shared_task / the current app."""

from __future__ import annotations

import logging
import uuid
from typing import Any, ClassVar

import pytest
from kombu.message import Message

from greenworker import App, Task, current_app, shared_task
from greenworker.client import shared
from greenworker.config import ConfigError

from .conftest import take


@pytest.fixture
def app(memory_app: App) -> App:
    return memory_app


@pytest.fixture(autouse=True)
def own_shared_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared tasks defined here stay here: the apps of other tests never get them."""
    monkeypatch.setattr(shared, "_definitions", [])
    monkeypatch.setattr(shared, "_current", None)


def sent(app: App) -> Message:
    message = take(app, app.conf.task_default_queue)
    assert message is not None
    return message


# ---------------------------------------------------------------- base=


class CountingTask(Task):
    """A base of the kind Celery projects write: defaults, and a __call__ around the body."""

    max_retries = 7
    priority = 2
    calls: ClassVar[list[str]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(self.name)
        return super().__call__(*args, **kwargs)


def test_base_is_the_class_of_the_task_and_gives_its_defaults(app: App) -> None:
    @app.task(name="opts.based", base=CountingTask)
    def based(x: int) -> int:
        return x * 2

    @app.task(name="opts.overridden", base=CountingTask, max_retries=1)
    def overridden() -> None: ...

    assert isinstance(based, CountingTask)
    assert (based.max_retries, overridden.max_retries) == (7, 1)
    based.delay(1)
    assert sent(app).properties["priority"] == 2
    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        CountingTask.calls.clear()
        assert based.delay(21).get(timeout=10) == 42
        assert CountingTask.calls == ["opts.based"]  # the worker runs the task's __call__
        assert based.run(2) == 4
    finally:
        worker.stop(timeout=5)


def test_a_base_that_is_not_a_greenworker_task_is_refused(app: App) -> None:
    from celery import Task as CeleryTask

    with pytest.raises(TypeError, match=r"base must be a subclass of greenworker.Task"):
        app.task(base=dict)(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"celery.Celery app's tasks run through greenworker"):
        app.task(base=CeleryTask)(lambda: None)


def test_hooks_of_a_base_greenworker_does_not_call_are_named(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    class WithHooks(Task):
        def on_failure(self, *args: Any) -> None: ...

        def after_return(self, *args: Any) -> None: ...

    with caplog.at_level(logging.WARNING, logger="greenworker.app"):
        app.task(base=WithHooks)(lambda: None)
    assert [r.getMessage() for r in caplog.records] == [
        "task base test_hooks_of_a_base_greenworker_does_not_call_are_named.<locals>."
        "WithHooks defines on_failure, after_return, which greenworker's worker does not call"
    ]


# ---------------------------------------------------------------- serializer=, priority=


def test_a_serializer_other_than_task_serializer_must_be_accepted(app: App) -> None:
    @app.task(name="opts.pickled", serializer="pickle")
    def pickled() -> None: ...

    with pytest.raises(ConfigError, match=r"serializer 'pickle' is not in accept_content"):
        pickled.delay()
    app.conf.accept_content = ["json", "pickle"]
    pickled.delay()
    assert sent(app).content_type == "application/x-python-serialize"
    app.send_task("opts.any", serializer="json")  # the task_serializer: always fine
    assert sent(app).content_type == "application/json"
    with pytest.raises(TypeError, match=r"serializer 'jsn' is not a kombu serializer"):
        app.task(serializer="jsn")(lambda: None)


def test_priority_and_delivery_mode_options(app: App) -> None:
    @app.task(name="opts.urgent", priority=9, delivery_mode="transient")
    def urgent() -> None: ...

    urgent.delay()
    message = sent(app)
    assert message.properties["priority"] == 9
    assert message.properties["delivery_mode"] == 1
    urgent.apply_async(priority=0)
    assert sent(app).properties["priority"] == 0
    with pytest.raises(ConfigError, match=r"task .*: priority must be an int from 0 to 255"):
        app.task(priority=-1)(lambda: None)
    with pytest.raises(TypeError, match=r"delivery_mode must be 1, 2, 'transient'"):
        app.task(delivery_mode="fast")(lambda: None)


# ---------------------------------------------------------------- typing


def test_arguments_are_checked_when_sent_unless_typing_is_off(app: App) -> None:
    @app.task(name="opts.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="opts.bound", bind=True)
    def bound(self: Task, x: int) -> int:
        return x

    @app.task(name="opts.untyped", typing=False)
    def untyped(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"task opts.add: missing a required argument: 'y'"):
        add.delay(1)
    with pytest.raises(TypeError, match=r"task opts.add: too many positional arguments"):
        add.apply_async((1, 2, 3))
    bound.delay(1)  # self is not an argument to pass
    with pytest.raises(TypeError, match=r"task opts.bound"):
        bound.delay(1, 2)
    untyped.delay(1, 2, 3)
    assert [sent(app).headers["task"] for _ in range(2)] == ["opts.bound", "opts.untyped"]


# ---------------------------------------------------------------- accepted, refused


def test_harmless_celery_options_are_accepted(app: App) -> None:
    @app.task(
        trail=False,
        lazy=True,
        send_events=True,
        reject_on_worker_lost=True,
        retry_on_worker_lost=False,
        throws=(),
        exchange="ex",
        routing_key="rk",
    )
    def accepted() -> None: ...

    assert (accepted.trail, accepted.exchange, accepted.routing_key) == (False, "ex", "rk")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "redis://"}, "option backend: a task's own result backend is not supported"),
        ({"compression": "zlib"}, "option compression: message compression is not supported"),
        ({"pydantic": True}, "option pydantic: pydantic argument conversion is not supported"),
        ({"acks_on_failure": False}, "option acks_on_failure: use acks_on_failure_or_timeout"),
        (
            {"store_errors_even_if_ignored": True},
            "set the task_store_errors_even_if_ignored setting",
        ),
        ({"throws": (KeyError,)}, r"throws=\(<class 'KeyError'>,\) is not supported"),
        ({"send_events": False}, "send_events=False is not supported by greenworker"),
        ({"reject_on_worker_lost": False}, "reject_on_worker_lost=False is not supported"),
        ({"retry_on_worker_lost": True}, "retry_on_worker_lost=True is not supported"),
        ({"colour": "blue"}, "unknown task option"),
        ({"queue": 5}, r"queue must be a name \(str\)"),
    ],
)
def test_other_options_are_refused_by_name(app: App, options: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        app.task(name="opts.refused", **options)(lambda: None)
    assert "opts.refused" not in app.tasks


# ---------------------------------------------------------------- shared tasks


def test_a_shared_task_is_registered_on_every_app_before_and_after(queue_name: str) -> None:
    before = App("before", broker="memory://", config={"task_default_queue": queue_name})

    @shared_task(name="shared.double")
    def double(x: int) -> int:
        return 2 * x

    after = App("after", broker="memory://", config={"task_default_queue": f"{queue_name}.b"})
    try:
        assert {"shared.double"} <= set(before.tasks) & set(after.tasks)
        assert before.tasks["shared.double"] is not after.tasks["shared.double"]
        assert double(4) == 8  # called: runs here
        assert current_app() is after  # the most recently created
        assert double.name == "shared.double"
        double.delay(1)
        assert take(after, f"{queue_name}.b") is not None
        before.set_current()
        double.delay(2)
        assert take(before, queue_name) is not None
        App("aside", broker="memory://", set_as_current=False)
        assert current_app() is before
    finally:
        before.close()
        after.close()


def test_a_shared_tasks_options_are_checked_when_defined() -> None:
    with pytest.raises(TypeError, match="unknown task option"):
        shared_task(colour="blue")(lambda: None)
    with pytest.raises(RuntimeError, match="no greenworker App exists"):
        current_app()


def test_a_shared_task_sent_from_a_task_goes_through_that_tasks_app(queue_name: str) -> None:
    """Inside a task body the current app is the task's, whichever app was made
    current last; elsewhere, the one whose worker was built last."""
    worker_app = App(
        "worker-side",
        broker="memory://",
        backend=f"memory://{uuid.uuid4().hex}",
        config={"task_default_queue": queue_name},
    )

    @shared_task(name="shared.inner")
    def inner(x: int) -> int:
        return x + 1

    @worker_app.task(name="shared.outer")
    def outer(x: int) -> str:
        return inner.delay(x).id

    worker = worker_app.Worker(concurrency=4)
    assert current_app() is worker_app  # building a worker makes its app current
    other = App("elsewhere", broker="memory://", config={"task_default_queue": "nobody"})
    assert current_app() is other
    worker.start()
    try:
        inner_id = outer.apply_async((1,)).get(timeout=10)
        # sent through worker_app: its worker ran it (on other's queue nobody would)
        assert worker_app.AsyncResult(inner_id).get(timeout=10) == 2
    finally:
        worker.stop(timeout=5)
        worker_app.close()
        other.close()


def test_app_task_shared_registers_on_the_other_apps(app: App) -> None:
    @app.task(name="shared.by_app", shared=True)
    def by_app() -> None: ...

    later = App("later", broker="memory://")
    try:
        assert app.tasks["shared.by_app"] is by_app
        assert "shared.by_app" in later.tasks
        assert later.tasks["shared.by_app"] is not by_app
    finally:
        later.close()
