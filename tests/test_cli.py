"""The greenworker command, run as a subprocess."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import run_cli, start_cli


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 30.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(lines)}")


@pytest.fixture
def worker_proc(hub: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = start_cli("-A", "tests.cliapp", "-P", hub, "-c", "5", "--data-dir", str(tmp_path))
    _wait_for_line(proc, "ready")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.mark.timeout(60)
def test_worker_runs_a_task_and_exits_0_on_sigterm_within_1s(
    worker_proc: subprocess.Popen[str], tmp_path: Path
) -> None:
    done = run_cli(
        "-A",
        "tests.cliapp",
        "--data-dir",
        str(tmp_path),
        "call",
        "cliapp.add",
        "--args",
        "[1, 2]",
        "--wait",
        "--timeout",
        "20",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    failed = run_cli(
        "-A",
        "tests.cliapp",
        "--data-dir",
        str(tmp_path),
        "call",
        "cliapp.fail",
        "--wait",
        "--timeout",
        "20",
    )
    assert failed.returncode == 1
    assert "FAILURE" in failed.stderr and "failed on purpose" in failed.stderr
    time.sleep(0.3)  # let the worker go idle; what is measured is the idle shutdown
    started = time.monotonic()
    worker_proc.send_signal(signal.SIGTERM)
    code = worker_proc.wait(10)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 1.0, f"idle shutdown took {elapsed:.2f}s"


@pytest.mark.timeout(60)
def test_worker_on_redis_broker_and_sigint(hub: str, redis_url: str, queue_name: str) -> None:
    proc = start_cli(
        "-A",
        "tests.cliapp",
        "-P",
        hub,
        "-b",
        redis_url,
        "--result-backend",
        redis_url,
        "-Q",
        queue_name,
        "-c",
        "10",
    )
    try:
        _wait_for_line(proc, "ready")
        done = run_cli(
            "-A",
            "tests.cliapp",
            "-b",
            redis_url,
            "--result-backend",
            redis_url,
            "call",
            "cliapp.add",
            "--args",
            "[20, 22]",
            "-Q",
            queue_name,
            "--wait",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "42"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 1.0
    finally:
        if proc.poll() is None:
            proc.kill()
        run_cli("-A", "tests.cliapp", "-b", redis_url, "purge", "-Q", queue_name, "-f")


def test_call_without_wait_prints_the_id_and_purge_removes_it(tmp_path: Path) -> None:
    sent = run_cli(
        "-A", "tests.cliapp", "--data-dir", str(tmp_path), "call", "cliapp.add", "--args", "[1, 1]"
    )
    assert sent.returncode == 0, sent.stderr
    assert len(sent.stdout.strip()) == 36  # a uuid
    purged = run_cli("-A", "tests.cliapp", "--data-dir", str(tmp_path), "purge", "-f")
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 message" in purged.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--no-such-option"], "No such option"),
        (["-A", "tests.cliapp", "-c", "zero"], "Invalid value"),
        (["-A", "no_such_module_xyz"], "cannot import app module 'no_such_module_xyz'"),
        (["-A", "tests.cliapp:missing"], "has no greenworker App named 'missing'"),
        (["-c", "5"], "missing -A/--app"),
        (["-A", "tests.cliapp", "call", "cliapp.add", "--args", "[1"], "--args is not valid JSON"),
        (["-A", "tests.cliapp", "call", "cliapp.add", "--kwargs", "[1]"], "JSON object"),
        (["-A", "tests.raising_app"], "failed to import: RuntimeError: broken at import time"),
        (
            ["-A", "tests.cliapp", "--result-backend", "rpc://", "-c", "1"],
            "unsupported result backend 'rpc'",
        ),
        (
            ["-A", "tests.cliapp", "call", "cliapp.add", "--countdown", "-1"],
            "countdown must not be negative",
        ),
        (
            ["-A", "tests.cliapp", "-b", "memory://", "call", "cliapp.add", "--wait"],
            "cannot wait for it: no result backend",
        ),
    ],
)
def test_bad_usage_is_one_clear_error_and_exit_2(
    args: list[str], fragment: str, tmp_path: Path
) -> None:
    result = run_cli("--data-dir", str(tmp_path), *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_help_on_everything() -> None:
    for args in ([], ["call"], ["purge"]):
        result = run_cli(*args, "--help") if args else run_cli("--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
    assert "--concurrency" in run_cli("--help").stdout


@pytest.mark.timeout(60)
def test_worker_time_limit_options(hub: str, tmp_path: Path) -> None:
    proc = start_cli(
        "-A",
        "tests.cliapp",
        "-P",
        hub,
        "--data-dir",
        str(tmp_path),
        "--soft-time-limit",
        "0.2",
        "--time-limit",
        "0.4",
    )
    try:
        _wait_for_line(proc, "ready")
        done = run_cli(
            "-A",
            "tests.cliapp",
            "--data-dir",
            str(tmp_path),
            "call",
            "cliapp.nap",
            "--args",
            "[5]",
            "--wait",
            "--timeout",
            "20",
        )
        assert done.returncode == 1
        assert "SoftTimeLimitExceeded" in done.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
