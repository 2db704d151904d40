"""Embedding: a worker inside a program that patched itself, serving requests and tasks."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from greenworker import App, green

from .conftest import ROOT

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)


def _logging_state() -> list[Any]:
    state: list[Any] = []
    for name in ("", "greenworker", "greenworker.worker", "kombu"):
        logger = logging.getLogger(name)
        state.append((name, logger.level, list(logger.handlers), logger.propagate))
    return state


def test_an_embedded_worker_leaves_signals_logging_and_patching_alone(memory_app: App) -> None:
    signals_before = {s: signal.getsignal(s) for s in SIGNALS}
    logging_before = _logging_state()
    hub_before = green.patched_by()

    @memory_app.task(name="embed.double")
    def double(x: int) -> int:
        return 2 * x

    worker = memory_app.Worker(concurrency=5)
    worker.start()
    try:
        assert double.delay(21).get(timeout=10) == 42
        assert {s: signal.getsignal(s) for s in SIGNALS} == signals_before
        assert _logging_state() == logging_before
    finally:
        worker.stop(timeout=5)
    assert {s: signal.getsignal(s) for s in SIGNALS} == signals_before
    assert _logging_state() == logging_before
    assert green.patched_by() == hub_before


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.timeout(90)
def test_the_embedded_example_serves_requests_and_tasks_and_stops_on_its_own_signal(
    hub: str, tmp_path: Path
) -> None:
    data_dir = ("--data-dir", str(tmp_path / "data"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.embedded", "--hub", hub, "--port", "0", *data_dir],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        port = None
        for line in proc.stdout:
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the service did not start"
        base = f"http://127.0.0.1:{port}"
        ids = _get(f"{base}/enqueue?url={base}/healthz&n=20")["ids"]
        assert len(ids) == 20
        deadline = time.monotonic() + 30
        states: dict[str, Any] = {}
        while time.monotonic() < deadline:
            states = {i: _get(f"{base}/result?id={i}") for i in ids}
            if all(s["state"] == "SUCCESS" for s in states.values()):
                break
            time.sleep(0.1)
        assert all(s["state"] == "SUCCESS" for s in states.values()), states
        assert all(s["result"]["status"] == 200 for s in states.values())
        stats = _get(f"{base}/stats")
        assert stats["hub"] == hub
        assert stats["succeeded"] == 20
    finally:
        proc.send_signal(signal.SIGTERM)  # the program's own handler stops everything
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    # the worker logged through the program's own logging setup
    assert re.search(r"^service INFO greenworker\.worker: worker \S+ stopped", out, re.M), out
    assert "service INFO service: stopped; the worker ran 20 task(s)" in out
    assert "Traceback" not in out
