"""The greenworker command, run as a subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.connection import Connection
from kombu.messaging import Producer

from greenworker.cli import (
    NO_EVENTS,
    NO_REMOTE_CONTROL,
    CLIError,
    expand_node_name,
    expand_node_path,
)
from greenworker.control.events import event_exchange

from .conftest import ROOT, run_cli, start_cli, wait_for_output

DEAD_BROKER = "redis://127.0.0.1:6399/0"  # nothing listens there


@pytest.fixture
def worker_proc(hub: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = start_cli("-A", "tests.cliapp", "-P", hub, "-c", "5", "--data-dir", str(tmp_path))
    wait_for_output(proc, "ready")
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
    typed = run_cli(
        "-A", "tests.cliapp", "--data-dir", str(tmp_path), "call", "cliapp.typed", "--wait"
    )
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout.strip() == '["2026-01-02T03:04:05+00:00", "1.50"]'
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
        wait_for_output(proc, "ready")
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
        (["-A", "tests.cliapp:missing"], "has no attribute 'missing'"),
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
        (["-A", "tests.cliapp", "-n", "w1@%q", "-c", "1"], "-n/--hostname: unknown %q"),
        (["-A", "tests.cliapp", "--statedb", "st-%Z", "-c", "1"], "--statedb: unknown %Z"),
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
        wait_for_output(proc, "ready")
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


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("w1@%h", "w1@box.example.com"),
        ("%n@%d", "box@example.com"),
        ("w%i%I@%h", "w0@box.example.com"),  # one process: Celery's main-process index
        ("100%%@%n", "100%@box"),
        ("plain@host", "plain@host"),
    ],
)
def test_node_name_expands_celerys_percent_codes(template: str, expected: str) -> None:
    assert expand_node_name(template, host="box.example.com") == expected


def test_node_paths_expand_from_the_node_name() -> None:
    node = "w1@box.example.com"
    path = expand_node_path("/var/%n/%h/%d/%p%I-%i.%%", node, "--statedb")
    assert path == "/var/w1/box.example.com/example.com/w1@box.example.com-0.%"
    # a node name without "@" is all name, on this machine
    assert expand_node_path("%n-%h", "solo", "--statedb", host="here") == "solo-here"
    with pytest.raises(CLIError, match="unknown %x"):
        expand_node_path("%x", node, "--statedb")


@pytest.mark.timeout(60)
def test_worker_registers_the_expanded_name_and_state_db(
    hub: str, redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    host = socket.gethostname()
    expected = f"gwcli-{queue_name[-6:]}-0@{host}"
    proc = start_cli(
        "-A",
        "tests.cliapp",
        "-P",
        hub,
        "-b",
        redis_url,
        "-Q",
        queue_name,
        "-c",
        "2",
        "-n",
        f"gwcli-{queue_name[-6:]}-%i%I@%h",
        "--statedb",
        str(tmp_path / "state-%n@%h"),
    )
    try:
        banner = wait_for_output(proc, "ready")
        assert f"· {expected}" in banner, banner
        ping = run_cli(
            "-A",
            "tests.cliapp",
            "-b",
            redis_url,
            "inspect",
            "ping",
            "-d",
            expected,
            "-j",
            "-t",
            "5",
        )
        assert ping.returncode == 0, ping.stderr
        assert json.loads(ping.stdout) == {expected: {"ok": "pong"}}
        assert (tmp_path / f"state-gwcli-{queue_name[-6:]}-0@{host}").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(60)
def test_events_count_stops_inside_a_batch(redis_url: str) -> None:
    # a database of its own: events are fanned out per database, and workers of other
    # tests send heartbeats on database 0
    quiet_url = redis_url.rsplit("/", 1)[0] + "/14"
    proc = start_cli("-A", "tests.cliapp", "-b", quiet_url, "events", "--dump", "--count", "2")
    try:
        wait_for_output(proc, "listening for events")
        batch = [
            {"type": "task-succeeded", "uuid": f"id-{n}", "hostname": "fake@host", "timestamp": 0}
            for n in range(5)
        ]
        with Connection(quiet_url) as conn:
            exchange = event_exchange(conn)
            Producer(conn).publish(
                batch, exchange=exchange, routing_key="task.multi", declare=[exchange]
            )
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    printed = [json.loads(line)["uuid"] for line in out.splitlines() if line.startswith("{")]
    assert printed == ["id-0", "id-1"]


@pytest.mark.timeout(60)
def test_events_stops_cleanly_on_sigint(redis_url: str) -> None:
    quiet_url = redis_url.rsplit("/", 1)[0] + "/14"
    proc = start_cli("-A", "tests.cliapp", "-b", quiet_url, "events")
    try:
        wait_for_output(proc, "listening for events")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert out == ""  # no "KeyboardInterrupt", no "Aborted!"


CLIENT_COMMANDS = [
    ["inspect", "ping"],
    ["control", "heartbeat"],
    ["call", "cliapp.add", "--args", "[1, 2]"],
    ["call", "cliapp.add", "--wait", "--timeout", "1"],
    ["purge", "-f"],
    ["status"],
    ["events", "--count", "1"],
]


@pytest.mark.timeout(90)
def test_every_client_command_on_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    # all at once: each waits out kombu's connect retries (about 6 s)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "greenworker", "-A", "tests.cliapp", "-b", DEAD_BROKER, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in CLIENT_COMMANDS
    ]
    for args, proc in zip(CLIENT_COMMANDS, procs, strict=True):
        _out, err = proc.communicate(timeout=60)
        lines = err.splitlines()
        assert proc.returncode == 1, (args, err)
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith(f"Error: broker unreachable ({DEAD_BROKER}): "), (args, err)


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "no_such_command"],
        ["inspect", "ping", "-t", "0"],
        ["control", "pool_grow", "many"],
        ["control", "revoke", "--arg", "novalue"],
        ["call"],
        ["call", "cliapp.add", "--wait", "--timeout", "-1"],
        ["purge", "--no-such-option"],
        ["status", "-t", "-1"],
        ["events", "--count", "-1"],
        ["beat", "--max-interval", "0"],
        ["statedb", "/no/such/store", "show"],
    ],
)
def test_bad_usage_of_each_subcommand_exits_2_even_without_a_broker(args: list[str]) -> None:
    result = run_cli("-A", "tests.cliapp", "-b", DEAD_BROKER, *args, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Error" in result.stderr


def test_worker_hostname_setting_is_expanded_too(tmp_path: Path) -> None:
    env = {"GREENWORKER_WORKER_HOSTNAME": "w1@%q"}
    result = run_cli("-A", "tests.cliapp", "--data-dir", str(tmp_path), env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == "Error: worker_hostname: unknown %q in 'w1@%q' (known: %h, %n, %d, %i, %I, %%)\n"
    )


def test_worker_bad_usage_exits_2() -> None:
    result = run_cli("-A", "tests.cliapp", "-b", DEAD_BROKER, "--autoscale", "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr == "Error: Invalid value for '--autoscale': 0: needs MAX >= 1\n"


def test_call_wait_without_a_worker_names_the_queue(tmp_path: Path) -> None:
    result = run_cli(
        "-A",
        "tests.cliapp",
        "--data-dir",
        str(tmp_path),
        "call",
        "cliapp.add",
        "-Q",
        "nobody-reads-this",
        "--wait",
        "--timeout",
        "0.3",
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1
    assert "no result for " in result.stderr and "after 0.3s" in result.stderr
    assert "no worker may be consuming queue 'nobody-reads-this'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status"], NO_REMOTE_CONTROL),
        (["inspect", "ping"], NO_REMOTE_CONTROL),
        (["control", "heartbeat"], NO_REMOTE_CONTROL),
        (["events"], NO_EVENTS),
    ],
)
def test_remote_commands_refuse_kombus_filesystem_transport(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_cli("-A", "tests.cliapp", "-b", "filesystem://localhost/", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"Error: {message}\n"
