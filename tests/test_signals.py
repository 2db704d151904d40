"""Signals and shutdown of a CLI worker: warm, cold, restart, stack dump, no task lost."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from greenworker import App

from .conftest import start_cli, wait_for_output


@pytest.fixture
def sig_env(redis_url: str, queue_name: str) -> Iterator[dict[str, str]]:
    key = f"sigruns:{queue_name}"
    env = {
        "SIGAPP_BROKER": redis_url,
        "SIGAPP_REDIS": redis_url,
        "SIGAPP_QUEUE": queue_name,
        "SIGAPP_KEY": key,
    }
    yield env
    client = redis.Redis.from_url(redis_url)
    client.delete(key, queue_name)


def _client(env: dict[str, str]) -> App:
    app = App(
        "sigapp",
        broker=env["SIGAPP_BROKER"],
        backend=env["SIGAPP_REDIS"],
        config={"task_default_queue": env["SIGAPP_QUEUE"]},
    )
    return app


def _worker(hub: str, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    proc = start_cli(
        "-A", "tests.sigapp", "-P", hub, "-l", "info", "--without-mingle", *extra, env=env
    )
    wait_for_output(proc, "ready")
    return proc


@pytest.mark.timeout(120)
def test_sigterm_mid_load_loses_nothing_and_runs_nothing_twice(
    hub: str, sig_env: dict[str, str]
) -> None:
    client = _client(sig_env)
    total = 300
    for n in range(total):
        client.send_task("sig.work", (n, 0.05 + (n % 5) * 0.03))
    proc = _worker(hub, sig_env, "-c", "40")
    runs = redis.Redis.from_url(sig_env["SIGAPP_REDIS"])
    while runs.hlen(sig_env["SIGAPP_KEY"]) < 60:  # mid-load
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    done_first = runs.hlen(sig_env["SIGAPP_KEY"])
    assert 60 <= done_first < total
    # the rest went back to the queue: a second worker finishes them
    second = _worker(hub, sig_env, "-c", "40")
    try:
        while runs.hlen(sig_env["SIGAPP_KEY"]) < total:
            time.sleep(0.05)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    counts = {int(k): int(v) for k, v in runs.hgetall(sig_env["SIGAPP_KEY"]).items()}
    assert sorted(counts) == list(range(total))  # every task done
    assert set(counts.values()) == {1}  # exactly once
    print(
        f"sent {total}, done before SIGTERM {done_first}, after restart {total - done_first}, "
        "lost 0, duplicated 0"
    )
    client.close()


@pytest.mark.timeout(60)
def test_idle_warm_shutdown_is_quick(hub: str, sig_env: dict[str, str]) -> None:
    proc = _worker(hub, sig_env)
    time.sleep(0.5)  # idle
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    elapsed = time.monotonic() - started
    print(f"idle shutdown took {elapsed:.3f}s")
    assert elapsed < 0.5, f"idle shutdown took {elapsed:.2f}s"


@pytest.mark.timeout(60)
def test_sigquit_is_cold_and_requeues_late_acks(hub: str, sig_env: dict[str, str]) -> None:
    client = _client(sig_env)
    proc = _worker(hub, sig_env)
    result = client.send_task("sig.work", (7, 30.0))
    time.sleep(0.5)  # it has started (the message is not in the queue any more)
    assert redis.Redis.from_url(sig_env["SIGAPP_REDIS"]).llen(sig_env["SIGAPP_QUEUE"]) == 0
    started = time.monotonic()
    proc.send_signal(signal.SIGQUIT)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 3.0
    runs = redis.Redis.from_url(sig_env["SIGAPP_REDIS"])
    assert runs.hlen(sig_env["SIGAPP_KEY"]) == 0  # killed before the end
    queued = runs.llen(sig_env["SIGAPP_QUEUE"])
    assert queued == 1, "the killed task's message went back to the queue"
    assert result.state == "PENDING"
    client.close()


@pytest.mark.timeout(60)
def test_sigusr1_dumps_stacks_and_sighup_restarts(
    hub: str, sig_env: dict[str, str], tmp_path: Path
) -> None:
    client = _client(sig_env)
    proc = _worker(hub, sig_env)
    try:
        client.send_task("sig.work", (1, 2.0))
        wait_for_output(proc, "] received")  # Celery's INFO line: the task is there
        proc.send_signal(signal.SIGUSR1)
        wait_for_output(proc, "greenlet stacks follow")
        dump = wait_for_output(proc, "sig.work[")  # the stack that runs it is named
        assert "Task sig.work" not in dump  # a stack line, not another task line
        pid = proc.pid
        proc.send_signal(signal.SIGHUP)
        wait_for_output(proc, "restarting")
        wait_for_output(proc, "ready")  # the same process, started again
        assert proc.pid == pid and proc.poll() is None
        runs = redis.Redis.from_url(sig_env["SIGAPP_REDIS"])
        assert runs.hget(sig_env["SIGAPP_KEY"], "1") == b"1"  # finished before the restart
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        client.close()


@pytest.mark.timeout(60)
def test_a_sigterm_during_a_restart_in_place_is_a_warm_shutdown(hub: str, tmp_path: Path) -> None:
    """The signal is held back from the restart's last step until the new process has
    started: then it stops warm, exit 0, its pid file removed (it was killed on the way,
    exit 143, the pid file left behind)."""
    pidfile = tmp_path / "w.pid"
    proc = start_cli(
        *("-A", "tests.cliapp", "--data-dir", str(tmp_path / "data"), "worker", "-P", hub),
        *("--pidfile", str(pidfile), "--without-mingle", "--without-gossip"),
    )
    try:
        wait_for_output(proc, "ready")
        proc.send_signal(signal.SIGHUP)
        wait_for_output(proc, "restarting")
        proc.send_signal(signal.SIGTERM)  # the new image starts: no handler of its own yet
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "SIGTERM: warm shutdown" in out and "stopped" in out, out
    assert not pidfile.exists()
