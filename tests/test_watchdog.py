"""The blocked-hub watchdog, with real blocking tasks."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from greenworker import App
from greenworker.watchdog import EXIT_HUB_BLOCKED, Watchdog

from .conftest import run_cli, start_cli


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


def test_bad_policy_is_refused(memory_app: App) -> None:
    with pytest.raises(ValueError, match="worker_block_policy"):
        Watchdog(memory_app.Worker(), 1.0, "ignore")


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
