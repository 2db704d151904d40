"""The worker's command line is Celery's: ``greenworker -A proj worker ...`` (and the same
without ``worker``), each flag with Celery's meaning; process-level flags (pid file,
log file, -D, --purge, restarts after a limit) run as real subprocesses."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from click.testing import CliRunner

from greenworker import App
from greenworker.celery.app import CeleryApp
from greenworker.cli import WorkerOptions, _plan, main, worker_command

from .conftest import ROOT, run_cli, start_cli, wait_for_output

HOST = socket.gethostname()
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}: [A-Z]+/[\w.]+\] ")


def _wait_for_file(path: Path, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in {path} after {timeout}s:\n{text}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def counters(redis_url: str, queue_name: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.delete(f"{queue_name}:runs", f"{queue_name}:boots", f"{queue_name}:pids", queue_name)
    client.close()


def _send_tallies(redis_url: str, queue: str, task: str, count: int, *extra: int) -> None:
    app = App("sender", broker=redis_url)
    try:
        for n in range(count):
            app.send_task(task, [redis_url, queue, n, *extra], queue=queue)
    finally:
        app.close()


def _wait_for_runs(client: redis.Redis, queue: str, count: int, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while client.hlen(f"{queue}:runs") < count:
        assert time.monotonic() < deadline, client.hgetall(f"{queue}:runs")
        time.sleep(0.05)


# ------------------------------------------------------------------ parsing


def _parse(*args: str) -> WorkerOptions:
    ctx = worker_command.make_context("worker", list(args))
    return WorkerOptions(**ctx.params)


def test_the_worker_command_and_the_form_without_it_take_the_same_options() -> None:
    ours = {p.name for p in worker_command.params if p.expose_value}
    assert ours <= {p.name for p in main.params}
    runner = CliRunner()
    for args in (["--help"], ["worker", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        for flag in ("--max-tasks-per-child", "--pidfile", "-X, --exclude-queues", "--purge"):
            assert flag in result.output
    assert "Daemonization Options:" in runner.invoke(main, ["worker", "--help"]).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["worker", "-P", "prefork"],
            "Invalid value for '-P' / '--pool': prefork: greenworker runs on gevent or "
            "eventlet only (green threads in one process); use -P gevent or -P eventlet",
        ),
        (["worker", "-P", "threads"], "greenworker runs on gevent or eventlet only"),
        (["-P", "solo"], "greenworker runs on gevent or eventlet only"),
        (["worker", "-c", "auto"], "greenworker runs on gevent or eventlet only"),
        (["worker", "-c", "1.5"], "a number of greenlets, such as -c 200"),
        (["worker", "--autoscale", "1,2,3"], "expected MAX,MIN (two integers) or MAX"),
        (["worker", "--umask", "9z"], "expected 022 (octal: a leading 0)"),
        (["worker", "-l", "chatty"], "'chatty' is not one of 'debug'"),
        (["worker", "-O", "fast"], "'fast' is not one of 'default', 'fair'"),
        (["worker", "-A", "proj"], "-A/--app is an option of greenworker itself: put it before"),
        (["worker", "-q"], "-q/--quiet is an option of greenworker itself"),
        (["-c", "5", "call", "x"], "-c/--concurrency is a worker option; call does not use it"),
        (["worker", "--no-such-flag"], "No such option '--no-such-flag'"),
    ],
)
def test_a_command_line_mistake_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and message in lines[0], result.output


def test_options_land_on_the_settings_with_celerys_meaning(tmp_path: Path) -> None:
    app = App("plan", broker="memory://")
    options = _parse(
        "-E",
        "--heartbeat-interval",
        "7",
        "--max-tasks-per-child",
        "10",
        "--max-memory-per-child",
        "200000",
        "-s",
        str(tmp_path / "beat"),
        "-B",
        "-n",
        "io@%h",
        "-S",
        str(tmp_path / "%n.state"),
        "--pidfile",
        str(tmp_path / "%n.pid"),
        "-f",
        str(tmp_path / "%n-%i.log"),
        "-Q",
        "a,b,c",
        "-X",
        "b",
        "--autoscale",
        "3,10",  # either order, as in Celery
        "--disable-prefetch",
        "-O",
        "fair",
        "--pool-start-method",
        "spawn",
    )
    plan = _plan(app, options)
    conf = app.conf
    assert conf.worker_send_task_events is True
    assert conf.worker_heartbeat == 7.0
    assert (conf.worker_max_tasks_per_child, conf.worker_max_memory_per_child) == (10, 200000)
    assert conf.beat_schedule_filename == str(tmp_path / "beat")
    assert plan.hostname == f"io@{HOST}"
    assert conf.worker_state_db == str(tmp_path / "io.state")
    assert plan.pidfile == str(tmp_path / "io.pid")
    assert plan.logfile == str(tmp_path / "io-0.log")
    assert plan.queues == ["a", "c"]
    assert plan.autoscale == (10, 3)
    assert plan.prefetch_multiplier == 1
    said = [line for _level, line in plan.notes]
    assert any(line.startswith("-O fair: greenworker always dispatches fairly") for line in said)
    assert any(line.startswith("--pool-start-method spawn: ignored") for line in said)
    app.close()


def test_celery_node_names_and_defaults() -> None:
    app = App("plan", broker="memory://")
    # -n without "@" is the host part, as in Celery (celery@NAME there)
    assert _plan(app, _parse("-n", "box")).hostname == "greenworker@box"
    assert _plan(app, _parse("-n", "w1@")).hostname == f"w1@{HOST}"  # Celery's default_nodename
    assert _plan(app, _parse("-n", "@box")).hostname == "greenworker@box"
    celery_app = CeleryApp(Celery("plan", broker="memory://", set_as_current=False))
    assert _plan(celery_app, _parse("-n", "box")).hostname == "celery@box"
    assert _plan(celery_app, _parse("-n", "io@%h")).hostname == f"io@{HOST}"
    assert _plan(celery_app, _parse()).hostname == f"celery@{HOST}"
    plan = _plan(
        app, _parse("--autoscale", "10", "--without-heartbeat", "--heartbeat-interval", "5")
    )
    assert plan.autoscale == (10, 1)  # Celery's MIN 0; one idle greenlet here, said once
    assert any("MIN 0 keeps 1 greenlet" in line for _level, line in plan.notes)
    assert app.conf.worker_heartbeat == 0  # --without-heartbeat wins
    said = [line for _level, line in _plan(app, _parse("-s", "x", "--executable", "/x")).notes]
    assert said == [
        "-s/--schedule: ignored without -B/--beat",
        "--executable: ignored without -D/--detach",
    ]
    assert _parse("-c", "0").concurrency is None  # worker_concurrency, as in Celery
    assert _parse("-l", "warning").loglevel == "WARNING"
    assert _parse("--umask", "022").umask == 0o22
    assert _parse("--umask", "18").umask == 18  # decimal without a leading 0, as in Celery
    app.close()


def test_exclude_queues_that_are_not_consumed_is_said(caplog: pytest.LogCaptureFixture) -> None:
    app = App("plan", broker="memory://")
    with caplog.at_level(logging.WARNING, "greenworker.cli"):
        assert _plan(app, _parse("-Q", "a,b", "-X", "z")).queues == ["a", "b"]
    assert "-X/--exclude-queues: z not consumed anyway (the queues: a, b)" in caplog.text
    app.close()


BAD_AFTER_LOADING = [
    (["-X", "celery"], "Error: -X/--exclude-queues leaves no queue to consume (of celery)"),
    (
        ["--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"],
        "Error: --scheduler needs a Celery app",
    ),
    (
        ["-I", "tests.no_such_module_xyz"],
        "Error: -I/--include: cannot import module 'tests.no_such_module_xyz': "
        "No module named 'tests.no_such_module_xyz'",
    ),
    (["--uid", "no-such-user-xyz"], "Error: --uid: no such user 'no-such-user-xyz'"),
    (
        ["--disable-prefetch", "--prefetch-multiplier", "4"],
        "Error: --disable-prefetch and --prefetch-multiplier 4 disagree",
    ),
    (["--pidfile", "/no/such/dir/w.pid"], "Error: --pidfile /no/such/dir/w.pid: cannot write"),
    (["-f", "/no/such/dir/w.log"], "Error: -f/--logfile /no/such/dir/w.log: cannot open it"),
]


@pytest.mark.timeout(60)
def test_mistakes_found_once_the_app_is_loaded_are_one_line_and_exit_2(
    hub: str, tmp_path: Path
) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "greenworker",
                "-A",
                "tests.cliapp",
                "--data-dir",
                str(tmp_path),
                "worker",
                "-P",
                hub,
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _message in BAD_AFTER_LOADING
    ]
    for (args, message), proc in zip(BAD_AFTER_LOADING, procs, strict=True):
        _out, err = proc.communicate(timeout=50)
        assert proc.returncode == 2, (args, err)
        assert err.splitlines()[-1].startswith(message), (args, err)
        assert "Traceback" not in err


# ------------------------------------------------------------------ real workers


@pytest.mark.timeout(60)
def test_celerys_worker_command_line_runs(hub: str, redis_url: str, queue_name: str) -> None:
    proc = start_cli(
        *("-A", "tests.cliapp", "-b", redis_url, "--result-backend", redis_url, "-q"),
        *("-c", "20", "-l", "DEBUG"),  # worker options before `worker`: those after win
        *("worker", "-P", hub, "-l", "INFO", "-E", "-O", "fair"),
        *("-Q", f"{queue_name},{queue_name}.other", "-X", f"{queue_name}.other"),
        *("-I", "tests.cliapp_extra", "--without-mingle", "--heartbeat-interval", "1"),
    )
    try:
        out = wait_for_output(proc, "ready")
        called = run_cli(
            *("-A", "tests.cliapp", "-b", redis_url, "--result-backend", redis_url),
            *("call", "cliapp.extra", "-Q", queue_name, "--wait", "--timeout", "20"),
        )
        assert called.returncode == 0, called.stderr
        assert called.stdout.strip() == '"included"'  # the -I module's task
        out += _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "greenworker 0.1.0 ·" not in out  # -q: no banner
    assert "-O fair: greenworker always dispatches fairly" in out
    # -c from before `worker`; -X took the other queue off
    assert f"concurrency 20, queues {queue_name}, hub {hub}" in out
    assert "DEBUG/" not in out  # -l INFO after `worker` won


@pytest.mark.timeout(60)
def test_n_without_at_is_the_host_of_the_apps_default_name_in_banner_and_ready_line(
    hub: str,
) -> None:
    env = {"RETRYAPP_BROKER": "memory://"}
    procs = {
        name: start_cli(
            *("-A", f"tests.retryapp:{kind}", "worker", "-P", hub, "-n", "box"),
            *("--without-mingle", "--without-gossip"),
            env=env,
        )
        for kind, name in (("celery_app", "celery@box"), ("gw_app", "greenworker@box"))
    }
    try:
        for name, proc in procs.items():
            out = wait_for_output(proc, f"worker {name} ready")
            assert f"greenworker 0.1.0 · {name}\n" in out, out  # the banner
            out += _stop(proc)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.timeout(60)
def test_logfile_pidfile_and_workdir(hub: str, tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "w7.pid"
    pidfile.write_text(f"{dead.pid}\n")  # a stale one: replaced, with a warning
    proc = start_cli(
        *("-A", "tests.cliapp", "--workdir", str(tmp_path), "--data-dir", "data"),
        *("worker", "-P", hub, "-n", "w7@%h", "--pidfile", "%n.pid", "-f", "%n.log"),
    )
    try:
        text = _wait_for_file(tmp_path / "w7.log", f"worker w7@{HOST} ready")
        assert pidfile.read_text() == f"{proc.pid}\n"
        assert (tmp_path / "data").is_dir()  # --data-dir is read in --workdir
        # a second worker on the same pid file: one line, exit 73 (EX_CANTCREAT, Celery's)
        second = run_cli(
            "-A",
            "tests.cliapp",
            "--workdir",
            str(tmp_path),
            "worker",
            "-P",
            hub,
            "--pidfile",
            "w7.pid",
            timeout=30,
        )
        assert second.returncode == 73, second.stderr
        assert second.stderr == (
            f"Error: pidfile {pidfile} already exists: seems we're already running "
            f"(pid {proc.pid})\n"
        )
        out = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = (tmp_path / "w7.log").read_text()
    assert f"stale pidfile {pidfile} (pid {dead.pid} is not running): removing it" in out
    assert f"worker w7@{HOST} stopped" in text
    assert "ready" not in out  # the log went to the file; the banner to stderr
    assert all(LOG_LINE.match(line) for line in text.splitlines()), text
    assert not pidfile.exists()  # removed at exit


@pytest.mark.timeout(60)
def test_detach_writes_its_pidfile_and_logfile(hub: str, tmp_path: Path) -> None:
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    started = run_cli(
        *("-A", "tests.cliapp", "--data-dir", str(tmp_path / "data"), "worker", "-P", hub),
        *("-D", "--pidfile", str(pidfile), "-f", str(logfile), "--umask", "077"),
        timeout=30,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout == started.stderr == ""
    _wait_for_file(logfile, "ready")
    pid = int(pidfile.read_text())
    try:
        # a session of its own, of which it is not the leader: it can get no terminal
        assert os.getsid(pid) not in (os.getsid(0), pid)
        assert os.readlink(f"/proc/{pid}/fd/1") == os.devnull
        assert os.stat(logfile).st_mode & 0o077 == 0  # --umask 077 (the file was new)
        os.kill(pid, signal.SIGTERM)
        _wait_for_file(logfile, "stopped")
        deadline = time.monotonic() + 10
        while pidfile.exists():
            assert time.monotonic() < deadline, "the pid file stayed"
            time.sleep(0.05)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(60)
def test_detach_with_a_pidfile_it_cannot_write_fails_before_forking(
    hub: str, tmp_path: Path
) -> None:
    """The daemon's stderr is /dev/null: a pid file it could not write made -D exit 0 and
    nothing ran.  Checked on the terminal first: one line, exit 2 (73 for a pid file a
    live worker holds), and no daemon (its log file is never opened)."""
    held = tmp_path / "held.pid"
    held.write_text(f"{os.getpid()}\n")  # this test's process: alive
    cases = [
        (tmp_path / "no-such-dir" / "d.pid", 2, "cannot write it: No such file or directory"),
        (held, 73, f"already exists: seems we're already running (pid {os.getpid()})"),
    ]
    for pidfile, status, says in cases:
        logfile = tmp_path / f"{pidfile.stem}.log"
        started = run_cli(
            *("-A", "tests.cliapp", "--data-dir", str(tmp_path / "data"), "worker", "-P", hub),
            *("-D", "--pidfile", str(pidfile), "-f", str(logfile)),
            timeout=30,
        )
        assert started.returncode == status, started.stderr
        assert len(started.stderr.splitlines()) == 1, started.stderr
        assert started.stderr.startswith("Error: ") and says in started.stderr
        assert str(pidfile) in started.stderr
        assert not logfile.exists()  # no daemon started
    assert held.read_text() == f"{os.getpid()}\n"  # left as it was


@pytest.mark.timeout(60)
def test_purge_before_starting(
    hub: str, redis_url: str, queue_name: str, counters: redis.Redis
) -> None:
    _send_tallies(redis_url, queue_name, "cliapp.tally", 3)
    proc = start_cli(
        "-A", "tests.cliapp", "-b", redis_url, "worker", "-P", hub, "-Q", queue_name, "--purge"
    )
    try:
        out = wait_for_output(proc, "ready")
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "purge: Erased 3 messages from the queue." in out
    assert counters.hlen(f"{queue_name}:runs") == 0  # none ran


def _boots(client: redis.Redis, queue: str) -> list[str]:
    by_task = client.hgetall(f"{queue}:boots")  # decode_responses: str to str
    return [str(by_task[str(n)]) for n in range(len(by_task))]


@pytest.mark.timeout(60)
def test_max_tasks_per_child_restarts_in_place(
    hub: str, redis_url: str, queue_name: str, counters: redis.Redis
) -> None:
    proc = start_cli(
        *("-A", "tests.cliapp", "-b", redis_url, "--workdir", "tests"),  # relative: re-read
        *("worker", "-P", hub, "-c", "1", "--prefetch-multiplier", "1", "-Q", queue_name),
        *("--max-tasks-per-child", "3", "--without-mingle", "--without-gossip"),
    )
    try:
        wait_for_output(proc, "ready")
        _send_tallies(redis_url, queue_name, "cliapp.tally", 7)
        _wait_for_runs(counters, queue_name, 7)
        out = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    runs = counters.hgetall(f"{queue_name}:runs")
    assert sorted(runs.values()) == ["1"] * 7  # each task ran exactly once
    boots = _boots(counters, queue_name)
    assert len(set(boots[0:3])) == len(set(boots[3:6])) == 1
    assert len({boots[0], boots[3], boots[6]}) == 3  # a new process image every 3 tasks
    # in place: the pid stays, as for SIGHUP (a supervisor and the pid file stay right)
    assert counters.smembers(f"{queue_name}:pids") == {str(proc.pid)}
    assert out.count("3 tasks done, worker_max_tasks_per_child is 3: stopping to restart") == 2


@pytest.mark.timeout(90)
def test_a_restart_for_a_limit_sends_every_ack_first(
    hub: str, redis_url: str, queue_name: str, counters: redis.Redis, tmp_path: Path
) -> None:
    """At -c 200, above the broker pool's 50 connections, the 200 greenlets that give
    their messages back at the stop wait for a connection (they failed with "Too many
    connections" and closed the client under the acks being sent): each of 600 tasks
    runs once, over several restarts, and no write fails."""
    total = 600
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "greenworker", "-A", "tests.cliapp", "-b", redis_url),
                *("worker", "-P", hub, "-c", "200", "-Q", queue_name),
                *("--max-tasks-per-child", "100", "--without-mingle", "--without-gossip"),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_file(log, "ready")
        _send_tallies(redis_url, queue_name, "cliapp.tally", total)
        _wait_for_runs(counters, queue_name, total, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out_text = log.read_text()
    runs = counters.hgetall(f"{queue_name}:runs")
    assert sorted(runs.values()) == ["1"] * total, out_text[-3000:]
    assert out_text.count("worker_max_tasks_per_child is 100: stopping to restart") >= 2
    assert "could not" not in out_text and "not sent" not in out_text, out_text[-3000:]


@pytest.mark.timeout(60)
def test_max_memory_per_child_restarts_after_the_task_that_crossed_it(
    hub: str, redis_url: str, queue_name: str, counters: redis.Redis
) -> None:
    limit = 300_000  # KiB: above a fresh worker's, below one that ran cliapp.hog
    proc = start_cli(
        *("-A", "tests.cliapp", "-b", redis_url, "worker", "-P", hub, "-c", "1"),
        *("--prefetch-multiplier", "1", "-Q", queue_name, "--max-memory-per-child", str(limit)),
        *("--without-mingle", "--without-gossip"),
    )
    try:
        wait_for_output(proc, "ready")
        _send_tallies(redis_url, queue_name, "cliapp.hog", 2, limit)
        out = wait_for_output(proc, "ready")  # after the first restart
        out += wait_for_output(proc, "ready")  # after the second
        _wait_for_runs(counters, queue_name, 2)
        out += _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert sorted(counters.hgetall(f"{queue_name}:runs").values()) == ["1", "1"]
    boots = _boots(counters, queue_name)
    assert boots[0] != boots[1]  # the task that crossed the limit was the last of its process
    assert counters.smembers(f"{queue_name}:pids") == {str(proc.pid)}
    assert re.search(
        rf"resident memory \d+ KiB, worker_max_memory_per_child is {limit} KiB", out
    ), out


def test_an_embedded_worker_stops_at_the_limit_and_leaves_the_restart_to_its_program(
    memory_app: App,
) -> None:
    memory_app.conf.worker_max_tasks_per_child = 2

    @memory_app.task(name="limits.ping")
    def ping() -> str:
        return "pong"

    worker = memory_app.Worker(concurrency=1)
    worker.start()
    try:
        for _ in range(3):
            ping.delay()
        assert worker.wait_stopped(10)
        assert worker.restart_reason == "2 tasks done, worker_max_tasks_per_child is 2"
        assert worker.state.processed == 2
    finally:
        worker.stop(timeout=5)
    # the program decides: starting it again counts from zero
    worker.start()
    try:
        worker.join(timeout=10)
        assert worker.restart_reason is None
        assert worker.state.processed == 3
    finally:
        worker.stop(timeout=5)


def test_a_shutdown_signal_wins_over_a_restart() -> None:
    from greenworker.worker.signals import SignalSupervisor

    calls: list[str] = []
    supervisor = SignalSupervisor(
        warm_stop=lambda: calls.append("warm"),
        cold_stop=lambda: calls.append("cold"),
        running_tasks=lambda: 0,
    )
    supervisor._act(signal.SIGHUP)
    assert (supervisor.restart, supervisor.shutdown) == (True, False)
    supervisor._act(signal.SIGTERM)  # during the stop for the restart: stop for good
    assert (supervisor.restart, supervisor.shutdown) == (False, True)
    assert calls[0] == "warm"
