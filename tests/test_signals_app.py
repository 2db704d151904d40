"""Celery's signals for a greenworker.App (greenworker.signals): the Signal class, and a
real worker sending each signal with Celery's arguments, from the greenlets Celery's
worker sends them from.  (tests/test_signals.py is about the worker's OS signals.)"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import greenlet
import pytest

from greenworker import App, Task, current_request, green
from greenworker import signals as gs
from greenworker.exceptions import NotRegistered, Retry, TimeLimitExceeded
from greenworker.worker.request import Request
from greenworker.worker.task_signals import AppSignals

from .conftest import delete_queues_and_close, publish_raw, run_python

Record = list[tuple[str, dict[str, Any]]]

# ------------------------------------------------------------------ the Signal class


def test_connect_as_call_decorator_and_decorator_with_sender() -> None:
    sig = gs.Signal("test_sig", ["x"])
    calls: list[tuple[str, Any, Any]] = []

    def plain(sender: Any = None, **kwargs: Any) -> str:
        calls.append(("plain", sender, kwargs["x"]))
        return "p"

    assert sig.connect(plain) is plain

    @sig.connect
    def decorated(sender: Any = None, **kwargs: Any) -> str:
        calls.append(("decorated", sender, kwargs["signal"]))
        return "d"

    @sig.connect(sender="proj.add")
    def only_add(sender: Any = None, **kwargs: Any) -> str:
        calls.append(("only_add", sender, kwargs["x"]))
        return "a"

    # a string sender matches by value, as a task name does under Celery
    responses = sig.send(sender="".join(["proj.", "add"]), x=1)
    assert responses == [(plain, "p"), (decorated, "d"), (only_add, "a")]
    assert calls == [
        ("plain", "proj.add", 1),
        ("decorated", "proj.add", sig),
        ("only_add", "proj.add", 1),
    ]
    calls.clear()
    assert [r for r, _ in sig.send(sender="proj.mul", x=2)] == [plain, decorated]
    assert sig.has_listeners("proj.add") and sig.has_listeners()
    assert sig.disconnect(only_add, sender="proj.add") is True
    assert sig.disconnect(only_add, sender="proj.add") is False
    assert sig.disconnect(plain) and sig.disconnect(decorated)
    assert not sig.receivers
    assert sig.send(sender=None, x=3) == []
    assert "test_sig" in repr(sig)


def test_weak_receivers_go_with_their_owner_strong_ones_stay() -> None:
    sig = gs.Signal("test_weak")
    got: list[str] = []

    class Listener:
        def on(self, **kwargs: Any) -> None:
            got.append("method")

    listener = Listener()
    sig.connect(listener.on)  # a bound method is held by its object, not by itself
    sig.connect(lambda **kwargs: got.append("weak lambda"))  # collected at once
    sig.connect(lambda **kwargs: got.append("strong lambda"), weak=False)
    gc.collect()
    sig.send(sender=None)
    assert got == ["method", "strong lambda"]
    del listener
    gc.collect()
    got.clear()
    sig.send(sender=None)
    assert got == ["strong lambda"]
    sig.connect(lambda **kwargs: None, weak=False)  # connecting prunes the dead ones
    assert len(sig.receivers) == 2


def test_a_receiver_is_added_once_and_dispatch_uid_replaces_identity() -> None:
    sig = gs.Signal("test_uid")

    def first(**kwargs: Any) -> int:
        return 1

    def second(**kwargs: Any) -> int:
        return 2

    sig.connect(first)
    sig.connect(first)
    assert len(sig.receivers) == 1
    sig.connect(second, dispatch_uid="mine")
    sig.connect(first, dispatch_uid="mine")  # the uid is taken: not added
    assert [response for _, response in sig.send(sender=None)] == [1, 2]
    assert sig.disconnect(dispatch_uid="mine")
    assert [response for _, response in sig.send(sender=None)] == [1]


def test_a_raising_receiver_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sig = gs.Signal("test_raise")
    ran: list[str] = []

    def bad(**kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    def good(**kwargs: Any) -> str:
        ran.append("good")
        return "fine"

    sig.connect(bad)
    sig.connect(good)
    with caplog.at_level(logging.ERROR, "greenworker.signals"):
        responses = sig.send(sender=None)
    assert ran == ["good"]
    assert isinstance(responses[0][1], RuntimeError) and responses[1] == (good, "fine")
    [record] = caplog.records
    assert "receiver broke" in record.getMessage() and record.exc_info is not None


def test_a_receiver_must_take_keyword_arguments() -> None:
    sig = gs.Signal("test_kwargs")

    def no_kwargs(sender: Any) -> None:
        return None

    with pytest.raises(ValueError, match=r"must accept keyword arguments \(\*\*kwargs\)"):
        sig.connect(no_kwargs)
    with pytest.raises(TypeError, match="must be callable"):
        sig.connect(42)  # type: ignore[call-overload]
    assert not sig.receivers


def test_exception_info_formats_lazily() -> None:
    try:
        raise KeyError("k")
    except KeyError:
        einfo = gs.ExceptionInfo()
    assert einfo.type is KeyError and isinstance(einfo.exception, KeyError)
    assert einfo.tb is not None and "KeyError: 'k'" in einfo.traceback
    assert einfo.exc_info == (KeyError, einfo.exception, einfo.tb)
    assert str(einfo) == einfo.traceback
    with pytest.raises(ValueError, match="outside an except block"):
        gs.ExceptionInfo()


# ------------------------------------------------------------------ a real worker

TASK_SIGNALS = (
    gs.task_received,
    gs.task_prerun,
    gs.task_postrun,
    gs.task_success,
    gs.task_failure,
    gs.task_retry,
    gs.task_revoked,
    gs.task_rejected,
    gs.task_unknown,
)
WORKER_SIGNALS = (
    gs.worker_init,
    gs.worker_process_init,
    gs.celeryd_after_setup,
    gs.worker_ready,
    gs.heartbeat_sent,
    gs.worker_shutdown,
    gs.worker_shutting_down,
)


@pytest.fixture
def listen() -> Iterator[Callable[..., Record]]:
    """``listen(*signals)``: record each send as ``(signal name, arguments)``, with the
    greenlet and the current request seen by the receiver; disconnected after."""
    connected: list[tuple[gs.Signal, Callable[..., None]]] = []

    def start(*signals: gs.Signal) -> Record:
        seen: Record = []
        for sig in signals:

            def receiver(signal: gs.Signal, **kwargs: Any) -> None:
                kwargs["greenlet"] = greenlet.getcurrent()
                kwargs["current"] = current_request.get()
                seen.append((signal.name, kwargs))

            sig.connect(receiver, weak=False)
            connected.append((sig, receiver))
        return seen

    yield start
    for sig, receiver in connected:
        sig.disconnect(receiver)


def named(seen: Record, name: str) -> list[dict[str, Any]]:
    return [kwargs for signal, kwargs in seen if signal == name]


def test_a_successful_run_sends_received_prerun_success_postrun_in_order(
    memory_app: App, listen: Callable[..., Record]
) -> None:
    seen = listen(*TASK_SIGNALS)
    task_greenlets: list[Any] = []

    @memory_app.task
    def add(x: int, y: int) -> int:
        task_greenlets.append(greenlet.getcurrent())
        return x + y

    worker = memory_app.Worker(concurrency=5)
    worker.start()
    try:
        result = add.delay(2, 3)
        assert result.get(timeout=5) == 5
        worker.join()
    finally:
        worker.stop(timeout=5)
    assert [name for name, _ in seen] == [
        "task_received",
        "task_prerun",
        "task_success",
        "task_postrun",
    ]
    received, prerun, success, postrun = (kwargs for _, kwargs in seen)
    assert received["sender"] is worker
    request = received["request"]
    assert isinstance(request, Request) and request.id == result.id
    assert (request.name, request.args, request.kwargs) == (add.name, [2, 3], {})
    assert received["greenlet"] is not task_greenlets[0]  # the consumer's
    for kwargs in (prerun, postrun):
        assert kwargs["sender"] is add and kwargs["task"] is add
        assert (kwargs["task_id"], kwargs["args"], kwargs["kwargs"]) == (result.id, [2, 3], {})
        # in the task's own greenlet, with its request visible (as Celery's)
        assert kwargs["greenlet"] is task_greenlets[0]
        assert kwargs["current"] is not None and kwargs["current"].id == result.id
    assert (postrun["retval"], postrun["state"]) == (5, "SUCCESS")
    assert success["sender"] is add and success["result"] == 5
    assert success["runtime"] >= 0
    assert set(prerun) - {"greenlet", "current"} == {"sender", "task_id", "task", "args", "kwargs"}


def test_failure_retry_and_their_postrun(memory_app: App, listen: Callable[..., Record]) -> None:
    seen = listen(gs.task_failure, gs.task_retry, gs.task_postrun)

    @memory_app.task
    def boom(n: int) -> None:
        raise ValueError(f"boom {n}")

    @memory_app.task(bind=True, max_retries=1)
    def flaky(self: Task) -> str:
        if self.request.retries == 0:
            raise self.retry(exc=ConnectionError("down"), countdown=0)
        return "second time"

    worker = memory_app.Worker(concurrency=5)
    worker.start()
    try:
        failed = boom.delay(7)
        retried = flaky.delay()
        assert retried.get(timeout=5) == "second time"
        worker.join(fail_fast=False)
    finally:
        worker.stop(timeout=5)
    [failure] = named(seen, "task_failure")
    assert failure["sender"] is boom and failure["task_id"] == failed.id
    assert (failure["args"], failure["kwargs"]) == ([7], {})
    exc = failure["exception"]
    assert isinstance(exc, ValueError) and str(exc) == "boom 7"
    assert failure["traceback"] is exc.__traceback__
    einfo = failure["einfo"]
    assert einfo.exception is exc and "ValueError: boom 7" in einfo.traceback
    [retry] = named(seen, "task_retry")
    assert retry["sender"] is flaky
    assert retry["request"].id == retried.id and retry["request"].retries == 0
    assert isinstance(retry["reason"], Retry) and isinstance(retry["reason"].exc, ConnectionError)
    assert retry["einfo"].exception is retry["reason"]
    states = sorted((p["task_id"] == failed.id, p["state"]) for p in named(seen, "task_postrun"))
    assert states == [(False, "RETRY"), (False, "SUCCESS"), (True, "FAILURE")]
    [postrun_failed] = [p for p in named(seen, "task_postrun") if p["task_id"] == failed.id]
    assert postrun_failed["retval"] is exc


def test_revoked_expired_and_terminated(memory_app: App, listen: Callable[..., Record]) -> None:
    seen = listen(gs.task_revoked, gs.task_prerun, gs.task_postrun)
    started = green.new_event()

    @memory_app.task
    def long() -> None:
        started.set()
        green.sleep(30)

    @memory_app.task
    def later() -> str:
        return "ran"

    worker = memory_app.Worker(concurrency=2)
    worker.start()
    try:
        worker.revoke("revoked-in-advance")
        revoked = later.apply_async(task_id="revoked-in-advance")
        expired = later.apply_async(expires=-1)
        for each in (revoked, expired):
            each.get(timeout=5, propagate=False)
        running = long.delay()
        assert started.wait(5)
        worker.revoke(running.id, terminate=True)
        running.get(timeout=5, propagate=False)
        assert worker.pool.join(5)
    finally:
        worker.stop(timeout=5)
    by_id = {kwargs["request"].id: kwargs for kwargs in named(seen, "task_revoked")}
    assert set(by_id) == {revoked.id, expired.id, running.id}
    for task_id, terminated, expired_ in (
        (revoked.id, False, False),
        (expired.id, False, True),
        (running.id, True, False),
    ):
        kwargs = by_id[task_id]
        assert kwargs["sender"] is (long if task_id == running.id else later)
        assert (kwargs["terminated"], kwargs["expired"], kwargs["signum"]) == (
            terminated,
            expired_,
            None,
        )
    # only the terminated one started; its process does not end it (Celery: no postrun)
    assert [p["task_id"] for p in named(seen, "task_prerun")] == [running.id]
    assert named(seen, "task_postrun") == []


def test_hard_time_limit_sends_failure_without_postrun(
    memory_app: App, listen: Callable[..., Record]
) -> None:
    seen = listen(gs.task_failure, gs.task_postrun, gs.task_prerun)

    @memory_app.task(time_limit=0.1)
    def stuck() -> None:
        green.sleep(30)

    worker = memory_app.Worker(concurrency=2)
    worker.start()
    try:
        result = stuck.delay()
        result.get(timeout=5, propagate=False)
        assert worker.pool.join(5)
    finally:
        worker.stop(timeout=5)
    [failure] = named(seen, "task_failure")
    assert failure["task_id"] == result.id and isinstance(failure["exception"], TimeLimitExceeded)
    assert len(named(seen, "task_prerun")) == 1
    assert named(seen, "task_postrun") == []


def test_unknown_and_malformed_messages(memory_app: App, listen: Callable[..., Record]) -> None:
    seen = listen(gs.task_unknown, gs.task_rejected)
    worker = memory_app.Worker(concurrency=2)
    worker.start()
    try:
        publish_raw(memory_app, [[], {}, {}], {"task": "no.such.task", "id": "unknown-1"})
        publish_raw(memory_app, "not a v2 body", {"task": 5, "id": "bad-1"})
        worker.join(fail_fast=False)
    finally:
        worker.stop(timeout=5)
    [unknown] = named(seen, "task_unknown")
    assert unknown["sender"] is worker
    assert (unknown["name"], unknown["id"]) == ("no.such.task", "unknown-1")
    assert isinstance(unknown["exc"], NotRegistered)
    assert unknown["message"].headers["id"] == "unknown-1"
    [rejected] = named(seen, "task_rejected")
    assert rejected["sender"] is worker and isinstance(rejected["exc"], ValueError)
    assert rejected["message"].headers["id"] == "bad-1"


def test_worker_signals_from_build_to_stop(memory_app: App, listen: Callable[..., Record]) -> None:
    memory_app.conf.worker_heartbeat = 0.1
    seen = listen(*WORKER_SIGNALS)
    beat = green.new_event()
    gs.heartbeat_sent.connect(lambda **kwargs: beat.set(), weak=False, dispatch_uid="test-beat")
    try:
        worker = memory_app.Worker(concurrency=2)
        assert [name for name, _ in seen] == ["worker_init"]
        worker.start()
        assert beat.wait(5)
        worker.stop(timeout=5)
        worker.start()  # a second start in the same process: no second process init
        worker.stop(timeout=5)
    finally:
        gs.heartbeat_sent.disconnect(dispatch_uid="test-beat")
    names = [name for name, _ in seen if name != "heartbeat_sent"]
    assert names == [
        "worker_init",
        "worker_process_init",
        "celeryd_after_setup",
        "worker_ready",
        "worker_shutdown",
        "celeryd_after_setup",
        "worker_ready",
        "worker_shutdown",
    ]
    hostname = worker.hostname
    assert named(seen, "worker_init")[0]["sender"] is worker
    assert named(seen, "worker_process_init")[0]["sender"] == hostname
    after_setup = named(seen, "celeryd_after_setup")[0]
    assert after_setup["sender"] == hostname
    assert after_setup["instance"] is worker and after_setup["conf"] is memory_app.conf
    assert named(seen, "heartbeat_sent")[0]["sender"] is worker
    for name in ("worker_ready", "worker_shutdown"):
        assert named(seen, name)[0]["sender"] is worker


def test_worker_shutting_down_for_the_cli(listen: Callable[..., Record]) -> None:
    from greenworker.cli import _shutdown_listener

    seen = listen(gs.worker_shutting_down)
    app = App("shutdown", broker="memory://", set_as_current=False)
    _shutdown_listener(app, "w1@host")("SIGTERM", "Warm")
    [(_, kwargs)] = seen
    assert (kwargs["sender"], kwargs["sig"], kwargs["how"], kwargs["exitcode"]) == (
        "w1@host",
        "SIGTERM",
        "Warm",
        0,
    )


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_publish_signals_and_a_header_added_before_publish(
    broker: str, listen: Callable[..., Record], request: pytest.FixtureRequest
) -> None:
    queue = f"gwtest.{uuid.uuid4().hex[:12]}"
    url = "memory://" if broker == "memory" else request.getfixturevalue("redis_url")
    app = App(
        "pubsig",
        broker=url,
        backend=url if broker == "redis" else f"memory://{uuid.uuid4().hex}",
        config={"task_default_queue": queue, "worker_hostname": f"{queue}@test"},
    )
    seen = listen(gs.before_task_publish, gs.after_task_publish)

    def stamp(headers: dict[str, Any], **kwargs: Any) -> None:
        headers["x_stamp"] = "from the receiver"

    gs.before_task_publish.connect(stamp)

    @app.task(bind=True)
    def echo(self: Task) -> Any:
        return self.request.headers.get("x_stamp")

    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        # twice: on Redis the second message goes through the native publisher
        assert [echo.delay().get(timeout=5) for _ in range(2)] == ["from the receiver"] * 2
    finally:
        gs.before_task_publish.disconnect(stamp)
        worker.stop(timeout=5)
        delete_queues_and_close(app, *([queue] if broker == "redis" else []))
    before = named(seen, "before_task_publish")
    after = named(seen, "after_task_publish")
    assert len(before) == len(after) == 2
    for kwargs in before:
        assert kwargs["sender"] == echo.name
        assert kwargs["headers"]["task"] == echo.name and isinstance(kwargs["body"], tuple)
        assert (kwargs["exchange"], kwargs["routing_key"]) == (queue, queue)
        assert [q.name for q in kwargs["declare"]] == [queue]
        assert kwargs["retry_policy"]["max_retries"] == 3
        assert isinstance(kwargs["properties"], dict)
    assert [a["headers"]["id"] for a in after] == [b["headers"]["id"] for b in before]
    assert set(after[0]) - {"greenlet", "current"} == {
        "sender",
        "body",
        "exchange",
        "routing_key",
        "headers",
    }


def test_without_receivers_nothing_is_sent(
    memory_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    for sig in (*TASK_SIGNALS, *WORKER_SIGNALS, gs.before_task_publish, gs.after_task_publish):
        assert not sig.receivers, f"{sig.name} has receivers left by another test"

    def refuse(self: gs.Signal, sender: Any, **named: Any) -> list[Any]:
        if self.name.startswith("task") or self.name.endswith("publish"):
            raise AssertionError(f"{self.name} was sent with nobody listening")
        return []

    monkeypatch.setattr(gs.Signal, "send", refuse)

    @memory_app.task
    def boom() -> None:
        raise ValueError("x")

    @memory_app.task
    def fine() -> int:
        return 1

    worker = memory_app.Worker(concurrency=2)
    worker.start()
    try:
        boom.delay()
        assert fine.delay().get(timeout=5) == 1
        worker.join(fail_fast=False)
    finally:
        worker.stop(timeout=5)
    assert worker.state.failed == 1 and worker.state.succeeded == 1


def test_only_a_greenworker_app_sends_greenworker_signals(memory_app: App) -> None:
    worker = memory_app.Worker(concurrency=1)
    assert sum(isinstance(m, AppSignals) for m in worker.hooks.middleware) == 1
    # a Celery app's worker sends Celery's own signals instead
    celery = pytest.importorskip("celery")
    from greenworker.celery.app import CeleryApp
    from greenworker.celery.signals import CelerySignals

    capp = celery.Celery("signalkind", broker="memory://", set_as_current=False)
    celery_worker = CeleryApp(capp).Worker(concurrency=1)
    kinds = [type(m) for m in celery_worker.hooks.middleware]
    assert CelerySignals in kinds and AppSignals not in kinds


def test_the_signals_and_an_apps_worker_never_import_celery() -> None:
    done = run_python(
        "import sys\n"
        "from greenworker import App, signals\n"
        "from greenworker.worker import task_signals\n"
        "App('nocelery', broker='memory://').Worker(concurrency=1)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'celery'))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
