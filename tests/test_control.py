"""Remote control over the pidbox: Celery's own CLI and greenworker's against a greenworker."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from greenworker import App, Worker, green
from greenworker.control.mailbox import broadcast

from .conftest import ROOT, delete_queues_and_close, run_cli


@pytest.fixture(params=["redis", "amqp"])
def control_worker(
    request: pytest.FixtureRequest, redis_url: str, queue_name: str
) -> Iterator[tuple[Worker, str, str]]:
    broker = redis_url if request.param == "redis" else request.getfixturevalue("amqp_url")
    hostname = f"gw-{uuid.uuid4().hex[:8]}@test"
    app = App(
        "control", broker=broker, backend=redis_url, config={"task_default_queue": queue_name}
    )

    @app.task(name="control.sleep")
    def sleep(seconds: float) -> str:
        green.sleep(seconds)
        return "slept"

    @app.task(name="control.add")
    def add(x: int, y: int) -> int:
        return x + y

    worker = app.Worker(concurrency=4, hostname=hostname)
    worker.start()
    assert worker.control is not None and worker.control.wait_ready(10)
    yield worker, broker, hostname
    worker.stop(timeout=5)
    delete_queues_and_close(app, queue_name)


def _celery(broker: str, *args: str) -> dict[str, object]:
    """Run Celery's own CLI (no greenworker import) and parse its --json output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_side",
            *args,
            "--json",
            "--timeout",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "INTEROP_BROKER": broker},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    if isinstance(parsed, list):  # control prints a list of {host: reply}
        return {host: reply for item in parsed for host, reply in item.items()}
    return dict(parsed)


@pytest.mark.timeout(120)
def test_celery_inspect_against_greenworker(control_worker: tuple[Worker, str, str]) -> None:
    worker, broker, host = control_worker
    sleep = worker.app.tasks["control.sleep"]
    running = sleep.delay(10)  # outlasts the Celery CLI runs below, on a busy machine too
    for _ in range(100):  # until the task is running
        if worker.state.active:
            break
        green.sleep(0.02)
    assert _celery(broker, "inspect", "ping", "-d", host) == {host: {"ok": "pong"}}
    stats = _celery(broker, "inspect", "stats", "-d", host)[host]
    assert isinstance(stats, dict)
    assert stats["pool"]["max-concurrency"] == 4 and "rusage" in stats and "uptime" in stats
    assert "password" not in json.dumps(stats) and "guest:guest" not in json.dumps(stats)
    active = _celery(broker, "inspect", "active", "-d", host)[host]
    assert isinstance(active, list) and [a["id"] for a in active] == [running.id]
    registered = _celery(broker, "inspect", "registered", "-d", host)[host]
    assert registered == ["control.add", "control.sleep"]
    assert _celery(broker, "control", "revoke", "revoked-by-celery", "-d", host)[host] == {
        "ok": "tasks {'revoked-by-celery'} flagged as revoked"
    }
    revoked = _celery(broker, "inspect", "revoked", "-d", host)[host]
    assert isinstance(revoked, list) and "revoked-by-celery" in revoked
    reply = _celery(broker, "control", "rate_limit", "control.add", "10/s", "-d", host)[host]
    assert isinstance(reply, dict) and "ok" in reply
    assert worker.rate_limiter.rate_of("control.add") == 10
    _celery(broker, "control", "pool_grow", "3", "-d", host)
    assert worker.pool.size == 7
    running.get(timeout=30)


@pytest.mark.timeout(60)
def test_greenworker_cli_inspect_control_status(
    control_worker: tuple[Worker, str, str], redis_url: str
) -> None:
    worker, broker, host = control_worker
    base = ["-A", "tests.cliapp", "-b", broker, "--result-backend", redis_url]
    ping = run_cli(*base, "inspect", "ping", "-d", host, "--json", "-t", "3")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout) == {host: {"ok": "pong"}}
    table = run_cli(*base, "inspect", "registered", "-d", host, "-t", "3")
    assert f"-> {host}: OK" in table.stdout and "* control.add" in table.stdout
    bad = run_cli(*base, "control", "time_limit", "no.such.task", "1", "-d", host, "--json")
    assert json.loads(bad.stdout)[host] == {"error": "unknown task 'no.such.task'"}
    revoke = run_cli(*base, "control", "revoke", "x1", "x2", "-d", host, "--json", "-t", "3")
    assert "x1" in worker.state.revoked and "x2" in worker.state.revoked, revoke.stdout
    stamped = run_cli(
        *base, "control", "revoke_by_stamped_headers", "mark=x", "-d", host, "--json", "-t", "3"
    )
    assert "ok" in json.loads(stamped.stdout)[host], stamped.stdout
    no_pairs = run_cli(*base, "control", "revoke_by_stamped_headers", "mark", "-d", host)
    assert no_pairs.returncode == 2 and "bad parameters" in no_pairs.stderr
    memory = run_cli(*base, "inspect", "memsample", "-d", host, "--json", "-t", "3")
    assert json.loads(memory.stdout)[host].endswith("MB"), memory.stdout
    status = run_cli(*base, "status", "-d", host, "-t", "3")
    assert status.returncode == 0 and f"{host}: OK" in status.stdout
    nobody = run_cli(*base, "status", "-d", "nobody@nowhere", "-t", "0.5")
    assert nobody.returncode == 1 and "no worker answered" in nobody.stderr


@pytest.mark.timeout(60)
def test_bad_arguments_and_allow_list(control_worker: tuple[Worker, str, str]) -> None:
    worker, _broker, host = control_worker
    with worker.app.connection() as conn:
        bad = broadcast(conn, "pool_grow", {"n": "many"}, destination=[host], timeout=3)
        assert "error" in bad[0][host]
        missing = broadcast(conn, "time_limit", {"nonsense": 1}, destination=[host], timeout=3)
        assert "error" in missing[0][host]
        assert broadcast(conn, "ping", {}, destination=[host], timeout=3) == [
            {host: {"ok": "pong"}}
        ]  # still serving
    assert worker.control is not None  # the fixture's broker has fanout
    worker.control.handlers.pop("shutdown")  # what worker_control_allow does at startup
    with worker.app.connection() as conn:
        refused = broadcast(conn, "shutdown", {}, destination=[host], timeout=3)
    assert "error" in refused[0][host] and worker.pool.size == 4


# ------------------------------------------------------------------ issue 13 items


@pytest.fixture
def celery_control(control_worker: tuple[Worker, str, str], redis_url: str) -> Iterator[Celery]:
    """A plain Celery client on the control worker's broker (Celery's own control API)."""
    _worker, broker, host = control_worker
    client = Celery("inspector", broker=broker, backend=redis_url)
    # On Redis the worker's pidbox subscribes on its first poll, a moment after
    # wait_ready(): a command published before that is not delivered (fanout is
    # pub/sub there), so wait until the worker answers.
    _wait_for(lambda: client.control.inspect(destination=[host], timeout=0.5).ping())
    yield client
    client.close()


def _wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        green.sleep(0.01)


@pytest.mark.timeout(60)
def test_allow_list_refuses_with_a_reason_not_a_key_error(redis_url: str, queue_name: str) -> None:
    app = App(
        "allow",
        broker=redis_url,
        config={"task_default_queue": queue_name, "worker_control_allow": ["ping"]},
    )
    host = f"allow-{uuid.uuid4().hex[:8]}@test"
    worker = app.Worker(concurrency=2, hostname=host)
    worker.start()
    try:
        assert worker.control is not None and worker.control.wait_ready(10)
        with app.connection() as conn:
            _wait_for(lambda: broadcast(conn, "ping", {}, destination=[host], timeout=0.5))
            refused = broadcast(conn, "shutdown", {}, destination=[host], timeout=3)
            unknown = broadcast(conn, "no_such_command", {}, destination=[host], timeout=3)
            pong = broadcast(conn, "ping", {}, destination=[host], timeout=3)
        not_allowed = "command 'shutdown' is not allowed on this worker (worker_control_allow)"
        assert refused == [{host: {"error": not_allowed}}]
        assert unknown == [{host: {"error": "unknown command 'no_such_command'"}}]
        assert pong == [{host: {"ok": "pong"}}]
        assert not worker.wait_stopped(0.2)  # the refused shutdown did nothing
    finally:
        worker.stop(timeout=5)
        app.close()


@pytest.mark.timeout(60)
def test_active_and_query_task_report_wall_clock_time_start(
    control_worker: tuple[Worker, str, str], celery_control: Celery
) -> None:
    worker, _broker, host = control_worker
    before = time.time()
    running = worker.app.tasks["control.sleep"].delay(3)
    _wait_for(lambda: running.id in worker.state.active)
    after = time.time()
    inspector = celery_control.control.inspect(destination=[host], timeout=3)
    active = inspector.active()
    assert active is not None
    [described] = active[host]
    assert before <= described["time_start"] <= after  # epoch seconds, not time.monotonic()
    queried = inspector.query_task(running.id)
    assert queried is not None
    kind, info = queried[host][running.id]
    assert kind == "active" and before <= info["time_start"] <= after
    running.get(timeout=10)


@pytest.mark.timeout(60)
def test_conf_and_ready_line_report_the_concurrency_that_runs(
    redis_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = App("conc", broker=redis_url, config={"task_default_queue": queue_name})
    fixed = app.Worker(concurrency=50, hostname=f"fixed-{uuid.uuid4().hex[:8]}@test")
    scaled = app.Worker(
        concurrency=200, autoscale=(10, 3), hostname=f"scaled-{uuid.uuid4().hex[:8]}@test"
    )
    caplog.set_level(logging.INFO, logger="greenworker.worker")
    fixed.start()
    scaled.start()
    try:
        assert fixed.control is not None and fixed.control.wait_ready(10)
        assert scaled.control is not None and scaled.control.wait_ready(10)
        with app.connection() as conn:
            for host in (fixed.hostname, scaled.hostname):
                _wait_for(lambda: broadcast(conn, "ping", {}, destination=[host], timeout=0.5))  # noqa: B023
            [conf_fixed] = broadcast(conn, "conf", {}, destination=[fixed.hostname], timeout=3)
            [conf_scaled] = broadcast(conn, "conf", {}, destination=[scaled.hostname], timeout=3)
        assert conf_fixed[fixed.hostname]["worker_concurrency"] == 50  # not the default 100
        assert scaled.pool.size == 3 and scaled.concurrency == 3  # MIN: -c 200 is not used
        assert conf_scaled[scaled.hostname]["worker_concurrency"] == 3
        ready = [r.getMessage() for r in caplog.records if " ready: " in r.getMessage()]
        assert any(f"{fixed.hostname} ready: concurrency 50," in line for line in ready), ready
        assert any(
            f"{scaled.hostname} ready: concurrency 3 {{min=3, max=10}}," in line for line in ready
        ), ready
    finally:
        scaled.stop(timeout=5)
        fixed.stop(timeout=5)
        delete_queues_and_close(app, queue_name)


@pytest.mark.timeout(60)
def test_revoke_and_terminate_reply_as_celery(
    control_worker: tuple[Worker, str, str], celery_control: Celery
) -> None:
    worker, _broker, host = control_worker
    control = celery_control.control
    assert control.revoke(["r-a", "r-b"], destination=[host], reply=True, timeout=3) == [
        {host: {"ok": "tasks {'r-a', 'r-b'} flagged as revoked"}}
    ]
    assert control.terminate("unknown-id", destination=[host], reply=True, timeout=3) == [
        {host: {"ok": "terminate: tasks unknown"}}
    ]
    running = worker.app.tasks["control.sleep"].delay(30)
    _wait_for(lambda: running.id in worker.state.active)
    assert control.terminate(running.id, destination=[host], reply=True, timeout=3) == [
        {host: {"ok": f"terminate: {running.id}"}}
    ]
    _wait_for(lambda: running.state == "REVOKED")


@pytest.mark.timeout(60)
def test_memsample_memdump_objgraph_answer_as_celery(
    control_worker: tuple[Worker, str, str],
    celery_control: Celery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _worker, _broker, host = control_worker
    inspector = celery_control.control.inspect(destination=[host], timeout=5)
    size = r"\d+(\.\d+)?(b|KB|MB|GB)"
    for _ in range(3):
        sample = inspector.memsample()
        assert sample is not None and re.fullmatch(size, sample[host]), sample
    dump = inspector.memdump(samples=2)
    assert dump is not None
    assert re.fullmatch(
        rf"- rss \(sample\):\n(-    > {size},\n){{2}}- rss \(end\): {size}\.\n", dump[host]
    ), dump
    again = inspector.memdump()  # the samples were consumed
    assert again is not None and re.fullmatch(rf"- rss \(end\): {size}\.\n", again[host]), again

    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: /proc/self/statm
    current = inspector.memdump()
    assert current is not None and re.fullmatch(rf"- rss \(end\): {size}\.\n", current[host])
    real_open = open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)  # no /proc either: the stdlib's peak RSS
    peak = inspector.memdump()
    monkeypatch.setattr("builtins.open", real_open)
    assert peak is not None and re.fullmatch(rf"- rss \(peak\): {size}\.\n", peak[host]), peak

    monkeypatch.setitem(sys.modules, "objgraph", None)
    assert inspector.objgraph() == {
        host: {"error": "objgraph needs the objgraph library: pip install objgraph"}
    }
    drawn: list[tuple[int, int, str]] = []

    def by_type(name: str) -> list[object]:
        return [object() for _ in range(5)] if name == "Request" else []

    def show_backrefs(objects: list[object], max_depth: int, highlight: Any, filename: str) -> None:
        drawn.append((len(objects), max_depth, filename))

    fake = types.ModuleType("objgraph")
    fake.by_type = by_type  # type: ignore[attr-defined]
    fake.show_backrefs = show_backrefs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "objgraph", fake)
    graph = inspector.objgraph(n=3, max_depth=4)
    assert graph is not None
    filename = graph[host]["filename"]
    try:
        assert drawn == [(3, 4, filename)] and filename.endswith(".png")
    finally:
        os.unlink(filename)


@pytest.mark.timeout(90)
def test_revoke_by_stamped_headers_revokes_queued_and_terminates_running(
    control_worker: tuple[Worker, str, str], celery_control: Celery, queue_name: str
) -> None:
    worker, _broker, host = control_worker
    control = celery_control.control

    def send(name: str, args: tuple[Any, ...], stamp: Any, **options: Any) -> Any:
        return celery_control.send_task(
            name, args, queue=queue_name, stamped_headers=["mystamp"], mystamp=stamp, **options
        )

    running = send("control.sleep", (30,), "v1")
    waiting = send("control.add", (1, 2), "v1", countdown=30)  # held here until its ETA
    other = send("control.sleep", (0.2,), "v2")
    _wait_for(lambda: running.id in worker.state.active and waiting.id in worker.state.reserved)
    replies = control.revoke_by_stamped_headers(
        {"mystamp": "v1"}, destination=[host], terminate=True, reply=True, timeout=3
    )
    assert replies == [{host: {"ok": "headers {'mystamp': {'v1'}} revoked"}}]
    _wait_for(lambda: running.state == "REVOKED" and waiting.state == "REVOKED")
    assert waiting.id not in worker.state.reserved  # not left waiting for its ETA
    assert other.get(timeout=10) == "slept"
    late = send("control.add", (1, 2), ["v0", "v1"])  # one of its values is revoked
    _wait_for(lambda: late.state == "REVOKED")

    # without terminate (Celery's CLI form): running tasks go on, later ones are revoked
    going_on = send("control.sleep", (0.5,), "v9")
    _wait_for(lambda: going_on.id in worker.state.active)
    replies = control.revoke_by_stamped_headers(
        ["mystamp=v9"], destination=[host], reply=True, timeout=3
    )
    assert replies == [
        {host: {"ok": "headers {'mystamp': 'v9'} flagged as revoked, but not terminated"}}
    ]
    assert going_on.get(timeout=10) == "slept"
    after = send("control.add", (2, 2), "v9")
    _wait_for(lambda: after.state == "REVOKED")
    unstamped = worker.app.tasks["control.add"].delay(3, 4)
    assert unstamped.get(timeout=10) == 7


@pytest.mark.timeout(120)
def test_replies_match_a_celery_gevent_worker(
    control_worker: tuple[Worker, str, str], celery_control: Celery, queue_name: str
) -> None:
    _worker, broker, gw_host = control_worker
    celery_host = f"cel-{uuid.uuid4().hex[:6]}@test"
    celery_worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "tests.celery_side", "worker"),
            *("-P", "gevent", "-c", "2", "-Q", f"{queue_name}.celery", "-n", celery_host),
            *("--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "warning"),
        ],
        cwd=ROOT,
        env={**os.environ, "INTEROP_BROKER": broker},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    control = celery_control.control
    size = re.compile(r"\d+(\.\d+)?(b|KB|MB|GB)")

    def answers(host: str) -> list[Any]:
        inspector = control.inspect(destination=[host], timeout=5)
        sample = inspector.memsample()
        dump = inspector.memdump()
        replies: list[Any] = [
            size.sub("N", sample[host]) if sample else None,
            size.sub("N", dump[host]) if dump else None,
            sorted((inspector.objgraph() or {}).get(host, {})),  # {"error": ...} on both
        ]
        for command, arguments in (
            ("revoke", {"task_id": ["r-a"]}),  # one id: Celery's set prints in hash order
            ("revoke", {"task_id": "nobody", "terminate": True, "signal": "SIGTERM"}),
            ("revoke_by_stamped_headers", {"headers": {"mystamp": "v1"}}),
            ("revoke_by_stamped_headers", {"headers": ["mystamp=v2"], "terminate": True}),
        ):
            reply = control.broadcast(command, arguments, destination=[host], reply=True, timeout=5)
            replies.append([next(iter(item.values())) for item in reply])
        return replies

    try:
        _wait_for(lambda: control.inspect(destination=[celery_host], timeout=0.5).ping(), 60)
        by_celery = answers(celery_host)
    finally:
        celery_worker.terminate()
        celery_worker.wait(30)
        with _worker.app.connection() as conn:
            _worker.app.queue(f"{queue_name}.celery")(conn.default_channel).delete()
    by_greenworker = answers(gw_host)
    assert by_greenworker == by_celery
    assert by_greenworker == [
        "N",
        "- rss (sample):\n-    > N,\n- rss (end): N.\n",
        ["error"],
        [{"ok": "tasks {'r-a'} flagged as revoked"}],
        [{"ok": "terminate: tasks unknown"}],
        [{"ok": "headers {'mystamp': 'v1'} flagged as revoked, but not terminated"}],
        [{"ok": "headers {'mystamp': 'v2'} were not terminated"}],
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker_kind", ["redis", "amqp"])
def test_control_answers_the_moment_it_says_ready(
    broker_kind: str, redis_url: str, queue_name: str, request: pytest.FixtureRequest
) -> None:
    """wait_ready() means listening: on Redis the fanout subscription is in place."""
    broker = redis_url if broker_kind == "redis" else request.getfixturevalue("amqp_url")
    config = {"task_default_queue": queue_name, "worker_enable_mingle": False}
    app = App("control", broker=broker, config=config)
    try:
        for _ in range(5):
            hostname = f"gw-{uuid.uuid4().hex[:8]}@test"
            worker = app.Worker(concurrency=1, hostname=hostname)
            worker.start()
            try:
                assert worker.control is not None and worker.control.wait_ready(10)
                with app.connection() as conn:
                    replies = broadcast(conn, "ping", destination=[hostname], timeout=2)
                assert replies == [{hostname: {"ok": "pong"}}]
            finally:
                worker.stop(timeout=5)
    finally:
        app.close()
