"""Remote control over the pidbox: Celery's own CLI and greenworker's against a greenworker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from greenworker import App, Worker, green
from greenworker.control import broadcast

from .conftest import ROOT, run_cli


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
    with app.connection() as conn:
        app.queue(queue_name)(conn.default_channel).delete()
    app.close()


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
    running = sleep.delay(3)
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
    assert "revoked-by-celery" in _celery(broker, "inspect", "revoked", "-d", host)[host]
    reply = _celery(broker, "control", "rate_limit", "control.add", "10/s", "-d", host)[host]
    assert isinstance(reply, dict) and "ok" in reply
    assert worker.rate_limiter.rate_of("control.add") == 10
    _celery(broker, "control", "pool_grow", "3", "-d", host)
    assert worker.pool.size == 7
    running.get(timeout=10)


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
    worker.control.handlers.pop("shutdown")  # what worker_control_allow does at startup
    with worker.app.connection() as conn:
        refused = broadcast(conn, "shutdown", {}, destination=[host], timeout=3)
    assert "error" in refused[0][host] and worker.pool.size == 4
