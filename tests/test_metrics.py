"""Prometheus metrics at /metrics: scraped with a plain HTTP client, read with
prometheus_client's own text parser, from embedded workers and from the command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from greenworker import App, Worker
from greenworker.exceptions import MetricsError
from greenworker.observe.metrics import UNREGISTERED

from .conftest import ROOT, keep_draining, publish_raw, run_cli, start_cli, wait_for_output

Samples = list[Sample]


def scrape(url: str) -> Samples:
    """GET ``url`` and parse it as Prometheus text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample named ``name`` with these labels (None: no such one)."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def task_names(samples: Samples) -> set[str]:
    return {s.labels["task"] for s in samples if "task" in s.labels}


@pytest.fixture
def metered(memory_app: App) -> Iterator[tuple[App, Worker]]:
    """A started worker (concurrency 20) with metrics on a free port, and tasks that
    succeed, fail, retry once and wait."""
    app = memory_app
    app.conf.update(worker_metrics_port=0)

    @app.task(name="m.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="m.fail")
    def fail() -> None:
        raise ValueError("failed on purpose")

    @app.task(name="m.flaky", bind=True)
    def flaky(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "second time"

    worker = app.Worker(concurrency=20)
    worker.start()
    yield app, worker
    worker.stop(timeout=5)


def url_of(worker: Worker) -> str:
    assert worker.metrics is not None
    return worker.metrics.server.url


@pytest.mark.timeout(30)
def test_tasks_by_name_and_final_state(metered: tuple[App, Worker]) -> None:
    app, worker = metered
    for n in range(3):
        app.send_task("m.add", (n, n))
    app.send_task("m.fail")
    app.send_task("m.flaky")
    worker.join(fail_fast=False, timeout=10)
    samples = scrape(url_of(worker))
    total = "greenworker_tasks_total"
    assert value(samples, total, task="m.add", state="succeeded") == 3
    assert value(samples, total, task="m.fail", state="failed") == 1
    assert value(samples, total, task="m.flaky", state="retried") == 1
    assert value(samples, total, task="m.flaky", state="succeeded") == 1
    assert value(samples, "greenworker_tasks_received_total", task="m.flaky") == 2
    runs = "greenworker_task_runtime_seconds_count"
    assert value(samples, runs, task="m.add") == 3
    assert value(samples, runs, task="m.flaky") == 2  # the retried run and the second
    assert value(samples, runs, task="m.fail") == 1
    # no id, no argument is a label: only task names (and states)
    assert task_names(samples) == {"m.add", "m.fail", "m.flaky"}
    assert value(samples, "greenworker_pool_size") == 20
    assert value(samples, "greenworker_tasks_active") == 0
    assert value(samples, "greenworker_tasks_reserved") == 0
    prefetch = value(samples, "greenworker_prefetch_count")
    assert prefetch is not None and prefetch >= 20 * 4
    assert value(samples, "greenworker_broker_reconnects_total") == 0
    assert value(samples, "greenworker_hub_blocks_total") == 0
    info = [s for s in samples if s.name == "greenworker_worker_info"]
    assert [s.labels["hostname"] for s in info] == [worker.hostname]


@pytest.mark.timeout(30)
def test_revoked_and_eta_held_and_queue_wait(metered: tuple[App, Worker]) -> None:
    """Queue wait: from the message's ``timestamp`` property when it has one, else from
    the ETA of a countdown task; a plain task is not observed."""
    app, worker = metered
    url = url_of(worker)
    app.send_task("m.add", (2, 2), countdown=0.2)
    worker.join(fail_fast=False, timeout=10)
    waits = "greenworker_task_queue_wait_seconds_count"
    assert value(scrape(url), waits, task="m.add") == 1  # the countdown task, from its ETA
    held = app.send_task("m.add", (1, 1), countdown=60)
    deadline = time.monotonic() + 10
    while value(samples := scrape(url), "greenworker_tasks_eta_held") != 1:
        assert time.monotonic() < deadline, "the ETA task is not held"
        time.sleep(0.02)
    assert value(samples, "greenworker_tasks_reserved") == 1
    worker.revoke(held.id)
    samples = scrape(url)
    assert value(samples, "greenworker_tasks_total", task="m.add", state="revoked") == 1
    assert value(samples, "greenworker_tasks_reserved") == 0
    assert value(samples, "greenworker_task_runtime_seconds_count", task="m.add") == 1

    # a message with a timestamp 5 s old: waited at least that long
    publish_raw(
        app,
        [[3, 3], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        {"lang": "py", "task": "m.add", "id": str(uuid.uuid4()), "retries": 0},
        timestamp=time.time() - 5,
    )
    plain = app.send_task("m.add", (4, 4))
    worker.join(fail_fast=False, timeout=10)
    plain.get(timeout=5)
    samples = scrape(url)
    assert value(samples, waits, task="m.add") == 2  # the plain task is not observed
    wait_sum = value(samples, "greenworker_task_queue_wait_seconds_sum", task="m.add")
    assert wait_sum is not None and 5.0 <= wait_sum < 30.0
    five = value(samples, "greenworker_task_queue_wait_seconds_bucket", task="m.add", le="5.0")
    assert five == 1  # the ETA one only


@pytest.mark.timeout(30)
def test_unregistered_task_names_collapse_to_one_label(metered: tuple[App, Worker]) -> None:
    app, worker = metered
    for n in range(20):
        publish_raw(
            app,
            [[], {}, {}],
            {"lang": "py", "task": f"junk.{n}", "id": str(uuid.uuid4()), "retries": 0},
        )
    publish_raw(app, b"not json", {"task": "junk.malformed"}, content_type="application/json")
    worker.join(fail_fast=False, timeout=10)
    samples = scrape(url_of(worker))
    assert value(samples, "greenworker_tasks_total", task=UNREGISTERED, state="rejected") == 21
    assert task_names(samples) == {UNREGISTERED}


@pytest.mark.timeout(30)
def test_two_embedded_workers_have_registries_of_their_own(memory_app: App) -> None:
    apps = [memory_app, App("second", broker="memory://", backend="memory://second")]
    apps[1].conf.update(task_default_queue=f"{memory_app.conf.task_default_queue}.2")
    workers = []
    try:
        for n, app in enumerate(apps):
            app.conf.update(worker_metrics_port=0)
            app.task(name=f"m.task{n}")(lambda: None)
            workers.append(app.Worker(concurrency=5, hostname=f"w{n}@{uuid.uuid4().hex}"))
            workers[-1].start()
        apps[0].send_task("m.task0")
        apps[0].send_task("m.task0")
        apps[1].send_task("m.task1")
        for worker in workers:
            worker.join(timeout=10)
        first, second = (scrape(url_of(w)) for w in workers)
        assert url_of(workers[0]) != url_of(workers[1])
        assert value(first, "greenworker_tasks_total", task="m.task0") == 2
        assert value(second, "greenworker_tasks_total", task="m.task1") == 1
        assert task_names(first) == {"m.task0"} and task_names(second) == {"m.task1"}
    finally:
        for worker in workers:
            worker.stop(timeout=5)
        apps[1].close()


@pytest.mark.timeout(30)
def test_a_task_blocking_the_hub_shows_in_blocks_and_lag(memory_app: App) -> None:
    memory_app.conf.update(
        worker_metrics_port=0, worker_block_threshold=0.2, worker_block_policy="log"
    )

    @memory_app.task(name="m.spin")
    def spin(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # never yields: the hub is blocked
            pass

    worker = memory_app.Worker(concurrency=2)
    worker.start()
    try:
        url = url_of(worker)
        memory_app.send_task("m.spin", (1.0,))
        worker.join(timeout=10)
        deadline = time.monotonic() + 10
        while True:  # the lag probe wakes late once the hub runs again
            samples = scrape(url)
            lag = "greenworker_hub_lag_seconds_bucket"
            late = (value(samples, lag, le="+Inf") or 0) - (value(samples, lag, le="0.25") or 0)
            if late >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert late >= 1, samples
        blocks = value(samples, "greenworker_hub_blocks_total")
        assert blocks is not None and blocks >= 1
        ran = value(samples, "greenworker_task_runtime_seconds_sum", task="m.spin")
        assert ran is not None and ran >= 1.0
    finally:
        worker.stop(timeout=5)


@pytest.mark.timeout(30)
def test_stop_frees_the_port_and_a_new_start_serves_it_again(
    memory_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    memory_app.conf.update(worker_metrics_port=0)
    memory_app.task(name="m.noop")(lambda: None)
    worker = memory_app.Worker(concurrency=2)
    worker.start()
    url = url_of(worker)
    memory_app.send_task("m.noop")
    worker.join(timeout=10)
    worker.stop(timeout=5)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    worker.start()
    try:
        assert url_of(worker) == url  # the port it took at first
        samples = scrape(url)
        assert value(samples, "greenworker_tasks_total", task="m.noop") == 1  # kept
    finally:
        worker.stop(timeout=5)
    assert not [r for r in caplog.records if r.name == "greenworker.metrics" and r.levelno > 20]


@pytest.mark.timeout(30)
def test_a_port_in_use_fails_the_start(memory_app: App) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        memory_app.conf.update(worker_metrics_port=port)
        worker = memory_app.Worker(concurrency=2)
        with pytest.raises(MetricsError, match=f"cannot listen on 127.0.0.1:{port}: "):
            worker.start()
        assert not worker.consumer.ready  # nothing else started


@pytest.mark.timeout(30)
def test_other_paths_and_methods(metered: tuple[App, Worker]) -> None:
    _, worker = metered
    base = url_of(worker).removesuffix("/metrics")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(base + "/metrics", data=b"x", timeout=10)
    assert posted.value.code == 405
    head = urllib.request.Request(base + "/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200 and response.read() == b""


# ------------------------------------------------------------------ the command


def worker_command(hub: str, tmp_path: Path, *args: str) -> list[str]:
    return [
        *("-A", "tests.metricsapp", "--data-dir", str(tmp_path), "-q", "worker", "-P", hub),
        *args,
    ]


@pytest.mark.timeout(120)
def test_scrape_during_a_full_load(hub: str, tmp_path: Path, scratch_redis: str) -> None:
    """2,000 tasks that sleep, at concurrency 200, on a worker process: each scrape
    answers while the pool is full (the figures are printed with ``-s``).  On a Redis of
    its own: another test's visibility sweep on the shared one could hand some of its
    messages back to its queue, and they would run twice."""
    redis_url = scratch_redis
    queue = f"gwmetrics.{uuid.uuid4().hex[:12]}"
    env = {"METRICSAPP_BROKER": redis_url}
    proc = start_cli(
        *worker_command(hub, tmp_path, "-c", "200", "-Q", queue, "--metrics-port", "0"),
        *("--without-mingle", "--without-gossip"),
        env=env,
    )
    client = App("metricsclient", broker=redis_url)
    try:
        said = wait_for_output(proc, "metrics at http://")
        url = said.rsplit("metrics at ", 1)[1].split()[0]
        wait_for_output(proc, " ready: ")
        keep_draining(proc)  # two task lines per task at INFO
        for n in range(2000):
            client.send_task("metricsapp.nap", (0.5 + (n % 5) * 0.1,), queue=queue)
        took: list[float] = []
        busiest = 0.0
        done = 0.0
        deadline = time.monotonic() + 60
        while done < 2000 and time.monotonic() < deadline:
            started = time.monotonic()
            samples = scrape(url)
            took.append(time.monotonic() - started)
            busiest = max(busiest, value(samples, "greenworker_tasks_active") or 0)
            done = value(samples, "greenworker_tasks_total", task="metricsapp.nap") or 0
            time.sleep(0.1)
        print(
            f"\n{hub}: {len(took)} scrapes during the load: median "
            f"{sorted(took)[len(took) // 2] * 1000:.1f} ms, max {max(took) * 1000:.1f} ms"
        )
        assert done == 2000
        assert busiest == 200  # scraped while the pool was full
        assert max(took) < 2.0  # served from the hub while it runs 200 tasks
        runtime = value(samples, "greenworker_task_runtime_seconds_count", task="metricsapp.nap")
        assert runtime == 2000
    finally:
        proc.terminate()
        proc.wait(timeout=30)  # its output is read by keep_draining
        with client.connection() as conn:
            client.queue(queue)(conn.default_channel).delete()
        client.close()


@pytest.mark.timeout(60)
def test_command_errors_are_one_line(hub: str, tmp_path: Path) -> None:
    """A port taken (also with -D), an address not of this machine, a bad port: one
    line, a status."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        cases = [
            (("--metrics-port", port), 1, f"Error: metrics: cannot listen on 127.0.0.1:{port}: "),
            (
                ("--metrics-port", "0", "--metrics-bind", "192.0.2.1"),
                1,
                "Error: metrics: cannot listen on 192.0.2.1:0: ",
            ),
            (("--metrics-port", "70000"), 2, "Error: Invalid value for '--metrics-port': "),
            # -D: on the terminal, before the fork (the daemon's stderr is /dev/null)
            (
                ("-D", "-f", str(tmp_path / "daemon.log"), "--metrics-port", port),
                1,
                f"Error: metrics: cannot listen on 127.0.0.1:{port}: ",
            ),
        ]
        for args, status, says in cases:
            result = run_cli(*worker_command(hub, tmp_path / "data", *args), timeout=40)
            assert result.returncode == status, (args, result.stderr)
            assert result.stderr.splitlines()[-1].startswith(says), (args, result.stderr)
            assert "Traceback" not in result.stderr
    assert not (tmp_path / "daemon.log").exists()  # no daemon started


@pytest.mark.timeout(60)
def test_without_prometheus_client_says_what_to_install(hub: str, tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    (hidden / "prometheus_client").mkdir(parents=True)
    (hidden / "prometheus_client" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'prometheus_client'\")\n"
    )
    command = [sys.executable, "-m", "greenworker", *worker_command(hub, tmp_path / "data")]
    result = subprocess.run(
        [*command, "--metrics-port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40,
        env={**os.environ, "PYTHONPATH": f"{hidden}:{ROOT}"},
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: metrics need prometheus_client")
    assert result.stderr.rstrip().endswith("pip install greenworker[metrics]")


@pytest.mark.timeout(60)
def test_a_celery_apps_tasks_are_counted(redis_url: str, queue_name: str) -> None:
    """Celery's tracer runs the task: the outcomes are counted the same way; the setting
    comes from the Celery app's own configuration."""
    from celery import Celery
    from celery.app import trace

    from greenworker.celery.app import CeleryApp

    celery_app = Celery("metered", broker=redis_url, backend=redis_url, set_as_current=False)
    celery_app.conf.update(task_default_queue=queue_name, worker_metrics_port=0)

    @celery_app.task(name="metered.add")  # type: ignore[untyped-decorator]
    def add(x: int, y: int) -> int:
        return x + y

    @celery_app.task(name="metered.flaky", bind=True)  # type: ignore[untyped-decorator]
    def flaky(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "second time"

    @celery_app.task(name="metered.fail")  # type: ignore[untyped-decorator]
    def fail() -> None:
        raise ValueError("failed on purpose")

    worker = CeleryApp(celery_app).Worker(concurrency=5)
    worker.start()
    try:
        assert add.delay(1, 2).get(timeout=10) == 3
        assert flaky.delay().get(timeout=10) == "second time"
        with pytest.raises(ValueError):
            fail.delay().get(timeout=10)
        samples = scrape(url_of(worker))
    finally:
        worker.stop()
        trace.reset_worker_optimizations(celery_app)
        with celery_app.connection_for_write() as conn:
            celery_app.amqp.queues[queue_name](conn.default_channel).delete()
        celery_app.close()
    total = "greenworker_tasks_total"
    assert value(samples, total, task="metered.add", state="succeeded") == 1
    assert value(samples, total, task="metered.flaky", state="retried") == 1
    assert value(samples, total, task="metered.flaky", state="succeeded") == 1
    assert value(samples, total, task="metered.fail", state="failed") == 1
    assert value(samples, "greenworker_task_runtime_seconds_count", task="metered.add") == 1
