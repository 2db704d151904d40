"""The blocked-hub watchdog, with real blocking tasks."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest

from greenworker import App
from greenworker.worker.pool import GreenPool
from greenworker.worker.timer import Timer
from greenworker.worker.watchdog import EXIT_HUB_BLOCKED, Watchdog

from .conftest import AMQP_URL, _port_open, run_cli, start_cli


def test_block_is_logged_with_the_task_and_counted(
    memory_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    memory_app.conf.worker_block_threshold = 0.2
    memory_app.conf.worker_block_policy = "log"

    @memory_app.task(name="wd.spin", time_limit=0.3)
    def spin(seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "spun"

    caplog.set_level(logging.WARNING, logger="greenworker.watchdog")
    worker = memory_app.Worker(concurrency=5)
    worker.start()
    try:
        result = spin.delay(0.8)
        # policy "log": the block is reported but the task finishes (past its hard
        # limit, which the blocked hub could not enforce, so it is recorded late)
        result.get(timeout=10, propagate=False)
        worker.join(fail_fast=False)
    finally:
        worker.stop(timeout=5)
    text = caplog.text
    assert "hub blocked for" in text and f"wd.spin[{result.id}]" in text
    assert "past its hard time limit" in text
    assert worker.watchdog.stats.count >= 1
    assert worker.stats()["hub_blocks"]["count"] >= 1


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="worker_block_policy"):
        Watchdog(
            Timer(),
            GreenPool(1),
            1.0,
            "ignore",
            hostname="wd@test",
            hub_blockers={},
            store=None,
            store_result=lambda task_id, meta: None,
            broker_scheme="memory",
            visibility_timeout=3600,
            ack_pending=lambda message: False,
        )


@pytest.mark.timeout(60)
def test_block_past_hard_limit_exits_with_distinct_status(hub: str, tmp_path: Path) -> None:
    proc = start_cli("-A", "tests.blockapp", "-P", hub, "--data-dir", str(tmp_path), "-c", "2")
    try:
        assert proc.stdout is not None
        while "ready" not in (proc.stdout.readline() or "ready"):
            pass
        sent = run_cli(
            "-A",
            "tests.blockapp",
            "--data-dir",
            str(tmp_path),
            "call",
            "block.spin",
            "--args",
            "[30]",
        )
        assert sent.returncode == 0, sent.stderr
        started = time.monotonic()
        code = proc.wait(30)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == EXIT_HUB_BLOCKED
    assert time.monotonic() - started < 10
    assert "blocks the hub" in output and "block.spin" in output
    assert "task task" not in output
    # the embedded broker keeps the unacked message for the next consumer
    assert "the embedded broker hands its unacked message to the next consumer" in output


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", ["redis", "amqp", "embedded"])
def test_a_task_that_ended_a_worker_is_refused_when_it_comes_back(
    hub: str, broker: str, scratch_redis: str, queue_name: str, tmp_path: Path
) -> None:
    """The watchdog records the blocker in the state store before exit 70; the next
    worker on that store stores its FAILURE, rejects its redelivered message with one
    line, and stays up to run the next task -- no restart loop."""
    worker_args = ["-A", "tests.blockapp", "-P", hub, "-c", "2"]
    if broker == "embedded":  # the broker and the results in the data directory
        worker_args += ["--data-dir", str(tmp_path / "data")]
        client = App("blockclient", data_dir=str(tmp_path / "data"))
    else:
        broker_url = scratch_redis if broker == "redis" else request_amqp_url()
        worker_args += ["-b", broker_url, "--result-backend", scratch_redis]
        client = App("blockclient", broker=broker_url, backend=scratch_redis)
    worker_args += ["--statedb", str(tmp_path / "state")]
    worker_args += ["-Q", queue_name, "--without-mingle", "--without-gossip"]
    env = {"GREENWORKER_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 1}'}
    try:
        first = start_cli(*worker_args, env=env)
        try:
            _wait_for_line(first, "ready")
            blocker = client.send_task("block.spin", (30,), queue=queue_name)
            assert first.wait(30) == EXIT_HUB_BLOCKED
            assert first.stdout is not None
            exit_line = _line_with(first.stdout.read(), "blocks the hub")
        finally:
            if first.poll() is None:
                first.kill()
        assert f"task block.spin[{blocker.id}] blocks the hub" in exit_line
        assert "task task" not in exit_line
        assert "recorded in the state store" in exit_line
        assert {
            "redis": "Redis gives its unacked message back after the visibility timeout",
            "amqp": "RabbitMQ delivers its unacked message again",
            "embedded": "the embedded broker hands its unacked message to the next consumer",
        }[broker] in exit_line

        second = start_cli(*worker_args, env=env)
        try:
            # the redelivered message may be refused before or after the ready line
            refused = _wait_for_line(second, "Rejected task")
            assert f"Rejected task block.spin[{blocker.id}]: it blocked the hub" in refused
            assert "past its hard time limit (0.5s)" in refused
            assert "not run again" in refused
            assert ("dead-lettered" in refused) is (broker == "amqp")
            assert client.send_task("block.ok", queue=queue_name).get(timeout=20) == "ok"
            assert blocker.state == "FAILURE"
            assert "TimeLimitExceeded" in str(blocker.traceback)
            assert second.poll() is None  # still up
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
        assert second.stdout is not None
        assert "Rejected task" not in second.stdout.read()  # refused once
    finally:
        if broker == "amqp":
            with client.connection() as conn:
                client.queue(queue_name)(conn.default_channel).delete()
        client.close()


def request_amqp_url() -> str:
    if not _port_open(5672):
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    return AMQP_URL


def _wait_for_line(proc: subprocess.Popen[str], text: str) -> str:
    """The worker's next output line that contains ``text`` (pytest-timeout bounds it)."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the worker exited ({proc.wait()}) before saying {text!r}")
        if text in line:
            return line


def _line_with(output: str, text: str) -> str:
    return next((line for line in output.splitlines() if text in line), "")


@pytest.mark.timeout(60)
def test_on_the_embedded_default_the_lost_blockers_failure_is_stored(
    hub: str, tmp_path: Path
) -> None:
    """The filesystem transport loses the blocker's message; the next worker on the data
    dir still stores its FAILURE, so the client gets an answer instead of PENDING."""
    worker_args = ["-A", "tests.blockapp", "-P", hub, "--data-dir", str(tmp_path), "-c", "2"]
    client = App("blockapp", data_dir=str(tmp_path))
    try:
        first = start_cli(*worker_args)
        try:
            _wait_for_line(first, "ready")
            blocker = client.send_task("block.spin", (30,))
            assert first.wait(30) == EXIT_HUB_BLOCKED
        finally:
            if first.poll() is None:
                first.kill()
        assert blocker.state == "PENDING"
        second = start_cli(*worker_args)
        try:
            noted = _wait_for_line(second, "blocked the hub past their hard time limit")
            assert f"block.spin[{blocker.id}]" in noted
            assert blocker.get(timeout=10, propagate=False) is not None
            assert blocker.state == "FAILURE"
            assert "TimeLimitExceeded" in str(blocker.traceback)
            assert client.send_task("block.ok").get(timeout=20) == "ok"
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
    finally:
        client.close()
