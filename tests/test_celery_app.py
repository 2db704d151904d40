"""A Celery project run unchanged: ``greenworker -A proj`` with a ``celery.Celery`` app.

The project is ``examples/celery_project/proj`` (Celery's Django-guide layout,
settings read with ``namespace="CELERY"``, tasks found by autodiscover).  Tasks are
sent and their results read by Celery's own client; the worker runs each body
through Celery's tracer.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery, chord, signals
from celery import exceptions as celery_exceptions
from celery.app import trace
from kombu.message import Message

from greenworker import App, Worker, green
from greenworker.celery.app import CeleryApp
from greenworker.config import UNHONOURED, Settings
from greenworker.exceptions import ImproperlyConfigured
from greenworker.hooks import Middleware
from greenworker.loader import load_app

from .conftest import REDIS_URL, ROOT, _need_broker, run_cli, start_cli, wait_for_output

PROJECT = ROOT / "examples" / "celery_project"
QUEUE = f"proj-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def proj_tasks() -> Iterator[ModuleType]:
    """The project's tasks module, its app configured for this test run's Redis and queue."""
    _need_broker(6379, "Redis")
    os.environ.update(PROJ_BROKER_URL=REDIS_URL, PROJ_RESULT_BACKEND=REDIS_URL, PROJ_QUEUE=QUEUE)
    sys.path.insert(0, str(PROJECT))
    try:
        # imported by name: the project is an example, outside the type-checked tree
        tasks = importlib.import_module("proj.shop.tasks")
        yield tasks
        gc.collect()  # Celery's AsyncResult.__del__ unsubscribes: while the hub still runs
        tasks.add.app.close()
    finally:
        sys.path.remove(str(PROJECT))


@pytest.fixture
def proj_worker(proj_tasks: ModuleType, rejections: Rejections) -> Iterator[Worker]:
    app = load_app("proj")
    worker = app.Worker(concurrency=20, middleware=[rejections])
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        trace.reset_worker_optimizations(proj_tasks.add.app)


class Rejections(Middleware):
    """The ``task_rejected`` hook's calls: (task id, requeue)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, bool]] = []
        self._changed = green.new_event()

    def task_rejected(self, message: Message, reason: str, requeue: bool) -> None:
        self.seen.append(((message.headers or {}).get("id"), requeue))
        self._changed.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` calls were seen (the hook runs after the FAILURE is stored)."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            self._changed.clear()
            assert self._changed.wait(max(0.0, deadline - time.monotonic())), self.seen


@pytest.fixture
def rejections() -> Rejections:
    return Rejections()


class SeenIds:
    """The task ids a task signal was sent for (``task_postrun``: the run is over, every
    handler ran; ``task_prerun``: the body is about to start)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._changed = green.new_event()

    def __call__(self, task_id: str | None = None, **kwargs: Any) -> None:
        if task_id is not None:
            self.ids.add(task_id)
            self._changed.set()

    def wait(self, *ids: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not set(ids) <= self.ids:
            self._changed.clear()
            assert self._changed.wait(max(0.0, deadline - time.monotonic())), ids


def _seen_ids(signal: Any) -> Iterator[SeenIds]:
    recorder = SeenIds()
    signal.connect(recorder, weak=False)
    yield recorder
    signal.disconnect(recorder)


@pytest.fixture
def postrun() -> Iterator[SeenIds]:
    yield from _seen_ids(signals.task_postrun)


@pytest.fixture
def prerun() -> Iterator[SeenIds]:
    yield from _seen_ids(signals.task_prerun)


def test_loader_finds_a_celery_app_as_celery_does(proj_tasks: ModuleType) -> None:
    celery_app = proj_tasks.add.app
    sys.path.insert(0, str(PROJECT))
    try:
        for spec in ("proj", "proj.celery", "proj.celery:app", "proj.celery.app"):
            app = load_app(spec)
            assert isinstance(app, CeleryApp), spec
            assert app.celery is celery_app, spec
        with pytest.raises(ImproperlyConfigured, match="has no greenworker App or Celery app"):
            load_app("proj.settings")
        with pytest.raises(ImproperlyConfigured, match=r"'proj.settings:DEBUG' is a builtins.bool"):
            load_app("proj.settings:DEBUG")
    finally:
        sys.path.remove(str(PROJECT))


def test_settings_come_from_the_celery_namespace(proj_tasks: ModuleType) -> None:
    app = load_app("proj")
    assert app.conf.task_default_queue == QUEUE  # CELERY_TASK_DEFAULT_QUEUE
    assert app.broker_url == REDIS_URL.rstrip("/") or app.broker_url.startswith("redis://")
    assert app.result_backend_url == REDIS_URL
    # not set by the project: greenworker's at-least-once default
    assert app.conf.task_acks_late is True
    assert app.hostname.startswith("celery@")


def test_a_setting_the_user_wrote_wins_and_one_greenworker_cannot_honour_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    celery_app = Celery("own", broker="memory://", set_as_current=False)
    celery_app.conf.update(
        task_acks_late=False, worker_prefetch_multiplier=2, worker_pool_restarts=True
    )
    app = CeleryApp(celery_app)
    assert app.conf.task_acks_late is False  # Celery's ack-early, because the user said so
    assert app.conf.worker_prefetch_multiplier == 2
    with caplog.at_level(logging.WARNING, "greenworker.celery"):
        app.prepare_worker("own@test")
    assert "Celery setting worker_pool_restarts is not used by greenworker" in caplog.text


def _celery_settings(*namespaces: str) -> list[str]:
    """Celery's own setting names in ``namespaces``, from its defaults (not our list)."""
    from celery.app.defaults import NAMESPACES

    return sorted(f"{ns}_{key}" for ns in namespaces for key in NAMESPACES[ns])


def test_every_worker_control_and_event_setting_of_celery_is_implemented_or_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from greenworker.celery.settings import _NOT_MAPPED

    names = _celery_settings("worker", "control", "event")
    assert len(names) > 40, names  # Celery's defaults were read
    implemented = {field.name for field in dataclasses.fields(Settings)} - _NOT_MAPPED
    neither = [name for name in names if name not in implemented and name not in UNHONOURED]
    assert neither == [], "neither implemented nor warned about"
    assert [name for name in names if name in implemented and name in UNHONOURED] == []
    warned = [name for name in names if name in UNHONOURED]
    # and the warning is given, for a Celery app at startup...
    celery_app = Celery("every", broker="memory://", set_as_current=False)
    celery_app.conf.update({name: "set" for name in warned})
    app = CeleryApp(celery_app)
    with caplog.at_level(logging.WARNING, "greenworker.celery"):
        app.prepare_worker("every@test")
    said = caplog.text
    missing = [n for n in warned if f"Celery setting {n} is not used by greenworker: " not in said]
    assert missing == []
    # ...and for a greenworker App when its configuration is loaded, with the same reason
    caplog.clear()
    with caplog.at_level(logging.WARNING, "greenworker.config"):
        App("every", broker="memory://", config={n: "set" for n in warned}, set_as_current=False)
    said = caplog.text
    missing = [n for n in warned if f"setting {n} is not used by greenworker (a Celery" not in said]
    assert missing == []
    assert "setting worker_direct is not used by greenworker (a Celery setting: no per-" in said


def test_tasks_run_through_celerys_tracer(proj_worker: Worker, proj_tasks: ModuleType) -> None:
    tasks = proj_tasks
    assert tasks.add.delay(2, 3).get(timeout=10) == 5
    who = tasks.whoami.delay()
    seen = who.get(timeout=10)
    assert seen == {
        "id": who.id,
        "task": "proj.shop.tasks.whoami",
        "retries": 0,
        "hostname": proj_worker.hostname,
        "routing_key": QUEUE,
        "is_eager": False,
        "state": "STARTED",  # CELERY_TASK_TRACK_STARTED, stored by Celery's tracer
    }
    # result_extended: Celery's backend stores the task's name and arguments
    assert who.name == "proj.shop.tasks.whoami"
    assert tasks.typed.delay().get(timeout=10) == {
        "when": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
        "price": Decimal("9.99"),
    }
    assert tasks.progress.delay().get(timeout=10) == "PROGRESS"  # self.update_state


def test_retry_autoretry_and_failure(proj_worker: Worker, proj_tasks: ModuleType) -> None:
    tasks = proj_tasks
    assert tasks.flaky.delay(2).get(timeout=10) == 2
    down = tasks.always_down.delay()
    with pytest.raises(ConnectionError, match="the service is down"):
        down.get(timeout=10)
    with pytest.raises(ValueError, match="boom"):
        tasks.fail.delay("boom").get(timeout=10)
    assert proj_worker.state.retried >= 4  # two by flaky, two by always_down


def test_ignore_and_reject(
    proj_worker: Worker, proj_tasks: ModuleType, postrun: SeenIds, rejections: Rejections
) -> None:
    tasks = proj_tasks
    key = uuid.uuid4().hex
    requeued = tasks.reject_once.delay(key, True)
    assert requeued.get(timeout=10) == "run 2"  # requeued, ran again
    dropped = tasks.reject_once.delay(key + "-drop", False)
    with pytest.raises(celery_exceptions.Reject):
        dropped.get(timeout=10)  # Celery stores a final FAILURE for a message it drops
    # the hook (and so the task-rejected event) says what became of each message
    rejections.wait_for(2)
    assert rejections.seen == [(requeued.id, True), (dropped.id, False)]
    ignored = tasks.ignored.delay()
    postrun.wait(ignored.id)
    assert ignored.state == "STARTED"  # Ignore: nothing stored after STARTED, as in Celery
    assert proj_worker.consumer.ready


def test_a_base_class_gets_every_handler(
    proj_worker: Worker, proj_tasks: ModuleType, postrun: SeenIds
) -> None:
    tasks = proj_tasks
    ok = tasks.audited.delay("ok")
    assert ok.get(timeout=10) == "ok"
    retried = tasks.audited.delay("retry")
    assert retried.get(timeout=10) == "retry"
    failed = tasks.audited.delay("fail")
    with pytest.raises(KeyError):
        failed.get(timeout=10)
    postrun.wait(ok.id, retried.id, failed.id)  # results are stored before the handlers run
    seen: dict[str, list[tuple[str, Any]]] = {}
    for handler, task_id, detail in tasks.AUDIT:
        seen.setdefault(task_id, []).append((handler, detail))
    assert seen[ok.id] == [("on_success", "ok"), ("after_return", "SUCCESS")]
    assert seen[retried.id][0][0] == "on_retry"
    assert seen[retried.id][-1] == ("after_return", "SUCCESS")
    assert seen[failed.id] == [("on_failure", "KeyError"), ("after_return", "FAILURE")]


def test_links_and_chords(proj_worker: Worker, proj_tasks: ModuleType) -> None:
    tasks = proj_tasks
    parent = tasks.add.apply_async((2, 3), link=tasks.add.s(10))
    assert parent.get(timeout=10) == 5
    child = parent.children[0]
    assert child.get(timeout=10) == 15
    assert chord([tasks.add.s(i, i) for i in range(4)])(tasks.tsum.s()).get(timeout=10) == 12


def test_time_limits_in_greenlets(proj_worker: Worker, proj_tasks: ModuleType) -> None:
    tasks = proj_tasks
    # the soft limit raises Celery's SoftTimeLimitExceeded in the task (Celery's gevent
    # pool does not): the task cleans up and returns
    assert tasks.slow_but_polite.delay().get(timeout=10) == "cleaned up"
    stuck = tasks.stuck.delay()
    with pytest.raises(celery_exceptions.TimeLimitExceeded):
        stuck.get(timeout=10)
    # the hard limit frees the slot (the FAILURE is stored just before the greenlet is
    # killed, so wait for it), long before the task's own 10 s sleep would end
    assert proj_worker.pool.join(2.0)


def test_celery_signals_are_sent(proj_tasks: ModuleType, prerun: SeenIds) -> None:
    tasks = proj_tasks
    received: list[tuple[str, Any]] = []

    def recorder(name: str) -> Any:
        def record(sender: Any = None, **kwargs: Any) -> None:
            received.append((name, kwargs.get("task_id") or kwargs.get("id") or sender))

        return record

    names = (
        "celeryd_init",
        "worker_init",
        "worker_process_init",
        "celeryd_after_setup",
        "worker_ready",
        "worker_shutdown",
        "task_received",
        "task_prerun",
        "task_postrun",
        "task_success",
        "task_failure",
        "task_retry",
        "task_revoked",
        "task_unknown",
    )
    receivers = {name: recorder(name) for name in names}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver, weak=False)
    try:
        app = load_app("proj")
        worker = app.Worker(concurrency=5)
        worker.start()
        try:
            ok = tasks.add.delay(1, 1)
            assert ok.get(timeout=10) == 2
            with pytest.raises(ValueError):
                tasks.fail.delay("x").get(timeout=10)
            assert tasks.flaky.delay(1).get(timeout=10) == 1
            unknown = tasks.add.app.send_task("proj.nope", queue=QUEUE)
            with pytest.raises(celery_exceptions.NotRegistered):
                unknown.get(timeout=10)
            sleeper = tasks.sleep.delay(5)
            prerun.wait(sleeper.id)
            tasks.add.app.control.revoke(sleeper.id, terminate=True)
            with pytest.raises(celery_exceptions.TaskRevokedError):
                sleeper.get(timeout=10)
        finally:
            worker.stop()
            trace.reset_worker_optimizations(tasks.add.app)
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
    kinds = [name for name, _ in received]
    for name in names:
        assert name in kinds, name
    assert kinds.count("worker_process_init") == 1
    assert kinds.index("celeryd_init") < kinds.index("worker_init") < kinds.index("worker_ready")
    assert ("task_success", tasks.add) in received or ("task_prerun", ok.id) in received
    assert ("task_unknown", unknown.id) in received
    assert kinds[-1] == "worker_shutdown"


def _integration(hub: str, name: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "PROJ_BROKER_URL": REDIS_URL,
        "PROJ_RESULT_BACKEND": REDIS_URL,
        "PROJ_QUEUE": f"proj-{name}-{uuid.uuid4().hex[:8]}",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "celery_integrations.py"), hub, name],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_sentry_sdk_gets_a_failing_task_with_its_exception(hub: str) -> None:
    """sentry-sdk's Celery integration, set up as its guide says, sees the failure as an
    exception event (type, value, stack), recorded by a local ``before_send``."""
    _need_broker(6379, "Redis")
    seen = _integration(hub, "sentry")
    assert len(seen["events"]) == 1, seen
    (event,) = seen["events"]
    (exception,) = event["exception"]
    assert (exception["type"], exception["value"]) == ("ValueError", "boom")
    assert exception["mechanism"]["type"] == "celery"
    frames = exception["stacktrace"]["frames"]
    assert frames[-1]["function"] == "fail"
    assert frames[-1]["filename"].endswith("proj/shop/tasks.py")


def test_opentelemetry_traces_a_task_from_producer_to_worker(hub: str) -> None:
    """OpenTelemetry's Celery instrumentation, turned on in ``worker_process_init`` as its
    guide says, gives the run a span in the producer's trace."""
    _need_broker(6379, "Redis")
    seen = _integration(hub, "otel")
    spans = {span["name"]: span for span in seen["spans"]}
    sent, run = spans["apply_async/proj.shop.tasks.add"], spans["run/proj.shop.tasks.add"]
    assert run["trace_id"] == sent["trace_id"]
    assert run["parent"] == sent["span_id"]
    assert run["attributes"]["celery.state"] == "SUCCESS"
    assert run["attributes"]["messaging.message.id"] == seen["task_id"]


def test_a_django_project_runs_with_the_orm_and_celerys_fixup(tmp_path: Path) -> None:
    """A Django project (sqlite) run by ``greenworker -A djangoproj``: settings read from
    ``django.conf:settings``, tasks found in the installed apps, the ORM in a task, and
    Celery's Django fixup closing the task's connection after it."""
    _need_broker(6379, "Redis")
    project = ROOT / "tests" / "djangoproj"
    queue = f"django-{uuid.uuid4().hex[:8]}"
    env = {
        "DJANGOPROJ_DB": str(tmp_path / "db.sqlite3"),
        "DJANGOPROJ_BROKER_URL": REDIS_URL,
        "DJANGOPROJ_QUEUE": queue,
        "DJANGO_SETTINGS_MODULE": "djangoproj.settings",
        "PYTHONPATH": f"{project}{os.pathsep}{ROOT}",
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stderr
    worker = start_cli("-A", "djangoproj", "-c", "5", "-l", "info", cwd=project, env=env)
    client = Celery("client", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    try:
        first = client.send_task("notes.tasks.add_note", ["one"], queue=queue)
        assert first.get(timeout=20) == {"count": 1, "vendor": "sqlite"}
        second = client.send_task("notes.tasks.add_note", ["two"], queue=queue)
        assert second.get(timeout=10) == {"count": 2, "vendor": "sqlite"}
        closed = client.send_task("notes.tasks.closed_after", [first.id], queue=queue)
        assert closed.get(timeout=10) is True
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
        client.close()
    assert worker.returncode == 0, output
    assert "worker_shutting_down: SIGTERM Warm" in output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("acks_late", [None, False, True])
def test_the_apps_ack_setting_is_honoured_and_unset_means_at_least_once(
    acks_late: bool | None, redis_url: str, queue_name: str, prerun: SeenIds
) -> None:
    celery_app = Celery("acks", broker=redis_url, backend=redis_url, set_as_current=False)
    celery_app.conf.task_default_queue = queue_name
    if acks_late is not None:
        celery_app.conf.task_acks_late = acks_late
    release = green.new_event()

    @celery_app.task(name="acks.wait", shared=False)  # type: ignore[untyped-decorator]
    def wait() -> str:
        release.wait(10)
        return "done"

    app = CeleryApp(celery_app)
    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        sent = wait.delay()
        prerun.wait(sent.id)
        (running,) = worker.state.active.values()
        # unset: greenworker's default, acked once the task ended; set: as the app says
        assert running.acked is (acks_late is False)
        release.set()
        assert sent.get(timeout=10) == "done"
    finally:
        release.set()
        worker.stop()
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()


def test_eta_and_rate_limits_apply_to_celery_tasks(
    proj_worker: Worker, proj_tasks: ModuleType
) -> None:
    tasks = proj_tasks
    started = time.monotonic()
    later = tasks.add.apply_async((1, 2), countdown=0.4)
    assert later.get(timeout=10) == 3
    assert time.monotonic() - started >= 0.4
    replies = tasks.add.app.control.rate_limit(
        "proj.shop.tasks.noop", "5/s", destination=[proj_worker.hostname], reply=True
    )
    assert replies == [{proj_worker.hostname: {"ok": "new rate limit set successfully"}}]
    started = time.monotonic()
    results = [tasks.noop.delay() for _ in range(6)]
    for result in results:
        result.get(timeout=10)
    assert time.monotonic() - started >= 0.8  # 6 tasks at 5/s: the last one after 1 s


def test_greenworker_worker_command_runs_the_project(tmp_path: Path) -> None:
    """The command line of a Celery worker with one word changed, against the project's
    directory: the banner says what runs, Celery's client gets results, ``celery inspect``
    answers, SIGTERM ends it with status 0."""
    _need_broker(6379, "Redis")
    queue = f"proj-cli-{uuid.uuid4().hex[:8]}"
    env = {
        "PROJ_BROKER_URL": REDIS_URL,
        "PROJ_RESULT_BACKEND": REDIS_URL,
        "PROJ_QUEUE": queue,
        "PYTHONPATH": str(ROOT),
    }
    node = f"io-{uuid.uuid4().hex[:6]}@%h"
    worker = start_cli(
        *("-A", "proj", "worker", "-P", "gevent", "-c", "50", "-Q", queue, "-l", "info"),
        *("-n", node, "--pidfile", str(tmp_path / "%n.pid")),
        cwd=PROJECT,
        env=env,
    )
    client = Celery("client", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    try:
        sent = client.send_task("proj.shop.tasks.add", [20, 22], queue=queue)
        assert sent.get(timeout=20) == 42
        hostname = node.replace("%h", socket.gethostname())
        # the mailbox may start listening just after the first task ran: ask until it answers
        replies = None
        for _ in range(10):
            replies = client.control.inspect(destination=[hostname], timeout=1).ping()
            if replies:
                break
        assert replies == {hostname: {"ok": "pong"}}
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
        client.close()
    assert worker.returncode == 0, output
    assert "a Celery app: each task runs through Celery's tracer" in output
    assert "acks:        late, after the task ends (at-least-once); greenworker's default" in output
    assert "Task proj.shop.tasks.add[" in output and "succeeded in" in output  # Celery's line
    assert "Traceback" not in output, output


def test_a_module_with_no_app_is_one_line_and_exit_2() -> None:
    done = run_cli("-A", "proj.settings", "worker", cwd=PROJECT, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "has no greenworker App or Celery app" in lines[0]
    assert "found none of them" in lines[0]


def _outcomes(client: Celery, queue: str) -> dict[str, Any]:
    """What each of the project's behaviours gives, seen from Celery's client."""

    def send(name: str, *args: Any, **options: Any) -> Any:
        return client.send_task(f"proj.shop.tasks.{name}", list(args), queue=queue, **options)

    def outcome(result: Any) -> tuple[str, Any]:
        try:
            return ("ok", result.get(timeout=20))
        except Exception as exc:
            return ("error", type(exc).__name__)

    key = uuid.uuid4().hex
    seen: dict[str, Any] = {
        "add": outcome(send("add", 2, 3)),
        "typed": outcome(send("typed")),
        "flaky": outcome(send("flaky", 2)),
        "always_down": outcome(send("always_down")),
        "fail": outcome(send("fail", "boom")),
        "progress": outcome(send("progress")),
        "reject_drop": outcome(send("reject_once", key + "-drop", False)),
        "stuck": outcome(send("stuck")),
    }
    who = send("whoami")
    ok, fields = outcome(who)
    fields["routing_key"] = fields["routing_key"] == queue
    seen["whoami"] = (ok, {k: v for k, v in fields.items() if k not in ("id", "hostname")})
    link = client.signature("proj.shop.tasks.add", args=(10,), options={"queue": queue})
    parent = send("add", 2, 3, link=link)
    parent.get(timeout=20)
    seen["link"] = outcome(parent.children[0])
    header = [client.signature("proj.shop.tasks.add", (i, i), queue=queue) for i in range(4)]
    body = client.signature("proj.shop.tasks.tsum", queue=queue)
    seen["chord"] = outcome(chord(header)(body))
    return seen


def test_the_project_behaves_as_under_a_celery_gevent_worker(tmp_path: Path) -> None:
    """The same calls against ``greenworker -A proj worker`` and ``celery -A proj worker -P
    gevent``, each on its own queue, give the same results, states and exceptions.  Left out:
    the soft time limit (Celery's gevent pool does not enforce it) and ``Reject(requeue=True)``
    (Celery acks before the task by default, so there is nothing left to requeue)."""
    _need_broker(6379, "Redis")
    run = uuid.uuid4().hex[:8]
    queues = {"greenworker": f"proj-gw-{run}", "celery": f"proj-celery-{run}"}
    base_env = {
        "PROJ_BROKER_URL": REDIS_URL,
        "PROJ_RESULT_BACKEND": REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }
    common = ["-A", "proj", "worker", "-P", "gevent", "-c", "20", "--without-mingle"]
    workers = {
        "greenworker": start_cli(
            *common,
            "-Q",
            queues["greenworker"],
            "-n",
            f"gw-{run}@%h",
            cwd=PROJECT,
            env={**base_env, "PROJ_QUEUE": queues["greenworker"]},
        ),
        "celery": subprocess.Popen(
            [sys.executable, "-m", "celery", *common, "-Q", queues["celery"], "-n", f"c-{run}@%h"],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **base_env, "PROJ_QUEUE": queues["celery"]},
        ),
    }
    client = Celery("client", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    try:
        seen = {kind: _outcomes(client, queue) for kind, queue in queues.items()}
    finally:
        for process in workers.values():
            process.terminate()
        outputs = {kind: process.communicate(timeout=30)[0] for kind, process in workers.items()}
        client.close()
    assert seen["greenworker"] == seen["celery"], outputs
    assert seen["greenworker"]["stuck"] == ("error", "TimeLimitExceeded")
    assert seen["greenworker"]["chord"] == ("ok", 12)


# Celery's tracer warns of an exception outside the body before it reraises it
@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
def test_a_backend_that_cannot_store_is_logged_once_and_the_worker_goes_on(
    redis_url: str, queue_name: str, caplog: pytest.LogCaptureFixture, postrun: SeenIds
) -> None:
    celery_app = Celery(
        "nostore", broker=redis_url, backend="redis://127.0.0.1:1/0", set_as_current=False
    )
    celery_app.conf.update(
        task_default_queue=queue_name,
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    client = Celery("client", broker=redis_url, set_as_current=False)  # no backend to wait on

    @celery_app.task(name="nostore.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    app = CeleryApp(celery_app)
    worker = app.Worker(concurrency=2)
    worker.start()
    try:
        with caplog.at_level(logging.ERROR):
            ids = [client.send_task("nostore.add", (1, 2), queue=queue_name).id for _ in "ab"]
            postrun.wait(*ids)
            worker.join(fail_fast=False, timeout=10)  # both messages settled
    finally:
        worker.stop()
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()
        client.close()
    tracer_errors = [r for r in caplog.records if "Celery's tracer raised" in r.getMessage()]
    assert len(tracer_errors) == 2, caplog.text  # one line per task, with the traceback
    assert all(r.exc_info for r in tracer_errors)
    assert worker.state.failed == 2


@pytest.mark.parametrize("embedded", [True, False], ids=["worker -B", "beat"])
def test_celery_beat_runs_the_projects_schedule(embedded: bool, tmp_path: Path) -> None:
    """``-B`` (and ``greenworker -A proj beat`` beside a worker) send the project's
    ``beat_schedule`` through Celery's scheduler, last runs in an LMDB store."""
    _need_broker(6379, "Redis")
    queue = f"proj-beat-{uuid.uuid4().hex[:8]}"
    env = {
        "PROJ_BROKER_URL": REDIS_URL,
        "PROJ_RESULT_BACKEND": REDIS_URL,
        "PROJ_QUEUE": queue,
        "PROJ_BEAT_EVERY": "0.2",
        "PYTHONPATH": str(ROOT),
    }
    schedule = tmp_path / "schedule"
    worker_args = ["-A", "proj", "worker", "-c", "5", "-Q", queue, "-l", "info"]
    processes = []
    if embedded:
        processes.append(start_cli(*worker_args, "-B", "-s", str(schedule), cwd=PROJECT, env=env))
    else:
        processes.append(start_cli(*worker_args, cwd=PROJECT, env=env))
        processes.append(start_cli("-A", "proj", "beat", "-s", str(schedule), cwd=PROJECT, env=env))
    try:
        wait_for_output(processes[0], "Task proj.shop.tasks.add[", timeout=30)
    finally:
        for process in processes:
            process.terminate()
        outputs = [process.communicate(timeout=30)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    assert (schedule / "data.mdb").exists(), outputs
    assert not any("Traceback" in output for output in outputs), outputs


def test_worker_with_beat_on_a_schedule_in_use_exits_2_before_consuming(
    tmp_path: Path,
) -> None:
    """A second ``-B`` on a beat schedule another beat holds: one ``Error:`` line and exit
    2, as ``greenworker -A proj beat`` says it, not a hook traceback and a beat-less run."""
    from greenworker.celery.beat import open_schedule_store

    _need_broker(6379, "Redis")
    queue = f"proj-beat-{uuid.uuid4().hex[:8]}"
    env = {
        "PROJ_BROKER_URL": REDIS_URL,
        "PROJ_RESULT_BACKEND": REDIS_URL,
        "PROJ_QUEUE": queue,
        "PYTHONPATH": str(ROOT),
    }
    schedule = tmp_path / "schedule"
    other_beat = open_schedule_store(str(schedule))
    try:
        done = run_cli(
            *("-A", "proj", "worker", "-P", "gevent", "-Q", queue, "-B", "-s", str(schedule)),
            cwd=PROJECT,
            env=env,
        )
    finally:
        other_beat.close()
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last == (
        f"Error: the beat schedule {schedule} is in use by pid {os.getpid()} on "
        f"{socket.gethostname()}: only one beat may use a schedule; give this one another (-s)"
    )
    assert "Traceback" not in done.stderr and " ready:" not in done.stderr, done.stderr
    assert "consuming from" not in done.stderr


def test_git_ignores_the_schedule_the_examples_beat_leaves() -> None:
    """``-B`` without ``-s`` keeps Celery's default, ``celerybeat-schedule``: an LMDB
    directory in the project's directory, which a checkout must not show as untracked."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    store = PROJECT / "celerybeat-schedule" / "data.mdb"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(store.relative_to(ROOT))], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0


def test_a_retried_tasks_results_are_freed_while_the_hub_runs(proj_tasks: ModuleType) -> None:
    """``self.retry()`` sends the next run, and Celery keeps its AsyncResult in the task's
    request, which a reference cycle holds (the Retry's traceback); freed at interpreter exit
    its ``__del__`` fails (``greenlet is being finalized``).  The worker's stop frees it."""
    from celery.result import AsyncResult as CeleryAsyncResult

    app = load_app("proj")
    worker = app.Worker(concurrency=5)
    gc.collect()
    gc.disable()  # only the worker's own collection may free the cycle
    try:
        worker.start()
        try:
            result = proj_tasks.flaky.delay(1)
            assert result.get(timeout=10) == 1
        finally:
            worker.stop()
        left = [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, CeleryAsyncResult) and obj.id == result.id and obj is not result
        ]
    finally:
        gc.enable()
        trace.reset_worker_optimizations(proj_tasks.add.app)
    assert left == []


def test_sigterm_after_a_retry_is_quiet(hub: str, proj_tasks: ModuleType) -> None:
    """The user's report: ``flaky.delay(1).get()``, then SIGTERM: exit 0 and no
    ``Exception ignored in: <function AsyncResult.__del__>`` on stderr."""
    worker = start_cli(
        *("-A", "proj", "worker", "-P", hub, "-c", "5", "-Q", QUEUE, "-l", "info"),
        "--without-mingle",
        cwd=PROJECT,
        env={"PYTHONPATH": str(ROOT)},  # the broker, backend and queue: from proj_tasks
    )
    try:
        wait_for_output(worker, " ready: ")
        assert proj_tasks.flaky.delay(1).get(timeout=20) == 1
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    assert "retry: Retry in" in output  # it did retry
    assert "Exception ignored" not in output and "Traceback" not in output, output


def test_task_greenlets_share_one_result_backend(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery keeps a backend per thread and each task greenlet is one: unless the app
    says otherwise, the worker's greenlets share one backend (one connection pool)."""
    from celery.backends import base as celery_backends

    made = []
    original = celery_backends.Backend.__init__

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(celery_backends.Backend, "__init__", counted)
    celery_app = Celery("shared", broker=redis_url, backend=redis_url, set_as_current=False)
    celery_app.conf.task_default_queue = queue_name

    @celery_app.task(name="shared.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    worker = CeleryApp(celery_app).Worker(concurrency=20)
    worker.start()
    try:
        assert [r.get(timeout=10) for r in [add.delay(i, 1) for i in range(40)]] == [
            i + 1 for i in range(40)
        ]
    finally:
        worker.stop()
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()
    assert len(made) == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("user_size", [None, 20])
def test_a_celery_apps_redis_results_at_c_200_wait_for_a_free_connection(
    redis_url: str, queue_name: str, user_size: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """200 greenlets storing results at once on one backend: redis-py's pool (100
    connections) raised MaxConnectionsError and the tasks failed.  The backend's pool now
    blocks, sized for the greenlets, or as the user's ``redis_max_connections`` says."""
    import redis

    celery_app = Celery("c200", broker=redis_url, backend=redis_url, set_as_current=False)
    celery_app.conf.update(
        task_default_queue=queue_name, task_track_started=True, result_extended=True
    )
    if user_size is not None:
        celery_app.conf.redis_max_connections = user_size

    @celery_app.task(name=f"c200.nap.{user_size}")  # type: ignore[untyped-decorator]
    def nap(n: int) -> int:
        time.sleep(0.05)  # cooperative: 200 store STARTED, then their results, together
        return n

    worker = CeleryApp(celery_app).Worker(concurrency=200)  # before the client connects
    results = [nap.delay(n) for n in range(400)]  # queued first: 200 start at once
    caplog.set_level(logging.WARNING)
    worker.start()
    try:
        assert [r.get(timeout=30) for r in results] == list(range(400))
        pool = celery_app.backend.client.connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool)
        assert pool.max_connections == (user_size or 200)
    finally:
        worker.stop()
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, problems[:3]


@pytest.mark.parametrize("backend", ["rpc://", "cache+memory://"])
def test_other_celery_result_backends_through_the_apps_own_object(
    backend: str, amqp_url: str, queue_name: str
) -> None:
    """Results go through the Celery app's own backend object, whatever it is: ``rpc://``
    (results sent back to the caller's reply queue) and Celery's in-process cache."""
    celery_app = Celery("backends", broker=amqp_url, backend=backend, set_as_current=False)
    celery_app.conf.task_default_queue = queue_name

    @celery_app.task(name="backends.add", shared=False)  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    @celery_app.task(name="backends.fail", shared=False)  # type: ignore[untyped-decorator]
    def fail() -> None:
        raise KeyError("gone")

    worker = CeleryApp(celery_app).Worker(concurrency=5)
    worker.start()
    try:
        assert add.delay(40, 2).get(timeout=10) == 42
        with pytest.raises(KeyError):
            fail.delay().get(timeout=10)
    finally:
        worker.stop()
        trace.reset_worker_optimizations(celery_app)
        celery_app.close()


def test_celeryd_init_may_change_settings_and_the_environment_still_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GREENWORKER_WORKER_BLOCK_THRESHOLD", "5")
    celery_app = Celery("byname", broker="memory://", set_as_current=False)

    def per_worker(sender: str = "", conf: Any = None, **kwargs: Any) -> None:
        conf.task_default_rate_limit = "10/m"  # Celery's docs' example: settings by node name

    signals.celeryd_init.connect(per_worker, weak=False)
    try:
        app = CeleryApp(celery_app)
        app.Worker(concurrency=2)
    finally:
        signals.celeryd_init.disconnect(per_worker)
        trace.reset_worker_optimizations(celery_app)
    assert app.conf.task_default_rate_limit == "10/m"
    assert app.conf.worker_block_threshold == 5.0
