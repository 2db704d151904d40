"""The live view (``status --watch``, ``top``): driven in a pseudo-terminal and through a
pipe, against a real worker process on Redis and on the embedded default."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from greenworker import App
from greenworker.control.watch import ENTER_SCREEN, HOME, LEAVE_SCREEN

from .conftest import ROOT, delete_queues_and_close, run_cli, start_cli, wait_for_output
from .faults import TcpProxy

#: Makes the pseudo-terminal the controlling terminal of the (new session's) child, so
#: that Ctrl-C typed into it is a SIGINT from the terminal driver, then runs the CLI.
_ON_A_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'greenworker', *sys.argv[1:]])"
)
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Setup:
    """A worker process and what a client needs to reach it."""

    base: list[str]  # the global options of every command: app and broker
    app: App  # to send tasks with
    queue: str
    host: str
    worker: subprocess.Popen[str]


@contextmanager
def _running(kind: str, hub: str, queue: str, url: str, data_dir: Path) -> Iterator[Setup]:
    if kind == "redis":
        base = ["-A", "tests.cliapp", "-b", url, "--result-backend", url]
        app = App("watchtest", broker=url)
    else:
        base = ["-A", "tests.cliapp", "--data-dir", str(data_dir)]
        app = App("watchtest", data_dir=str(data_dir))
    host = f"{queue}@watch"
    worker = start_cli(*base, "-P", hub, "-c", "4", "-Q", queue, "-n", host)
    try:
        wait_for_output(worker, "ready", timeout=60)
        yield Setup(base, app, queue, host, worker)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        delete_queues_and_close(app, *([queue] if kind == "redis" else []))


@pytest.fixture(params=["redis", "embedded"])
def setup(
    request: pytest.FixtureRequest, hub: str, queue_name: str, tmp_path: Path
) -> Iterator[Setup]:
    """A worker process on Redis, or on the embedded default."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    with _running(request.param, hub, queue_name, url, tmp_path) as running:
        yield running


@pytest.fixture
def redis_setup(hub: str, queue_name: str, redis_url: str, tmp_path: Path) -> Iterator[Setup]:
    with _running("redis", hub, queue_name, redis_url, tmp_path) as running:
        yield running


def _send(setup: Setup, count: int) -> None:
    for n in range(count):
        setup.app.send_task("cliapp.add", args=(n, n), queue=setup.queue)


def _row(host: str) -> re.Pattern[str]:
    """A worker's line: processed, tasks/s, active/pool, reserved, queues."""
    return re.compile(
        rf"^{re.escape(host)}\s+(\d+)\s+(\S+)\s+(\d+)/(\d+)\s+(\d+)\s+(.*)$", re.MULTILINE
    )


class Terminal:
    """The CLI in a pseudo-terminal of 40 rows by 160 columns; what it wrote, read
    as it comes."""

    def __init__(self, *args: str) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ON_A_TERMINAL, *args],
            cwd=ROOT,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.output = ""

    def read_until(self, found: Callable[[str], bool], timeout: float = 30.0) -> str:
        """Read until ``found(everything read)`` holds; the output (an AssertionError
        with it if that does not happen within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not found(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not seen in time; the terminal showed:\n{self.output!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child is gone and the terminal closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed; it showed:\n{self.output!r}")
                self.output += chunk.decode("utf-8", "replace")
        return self.output

    def frames(self) -> list[str]:
        """Each redraw, as text: escape sequences removed, one line per screen line."""
        return [
            _ESCAPE.sub("", frame).replace("\r", "")
            for frame in self.output.split(HOME)[1:]
            if frame
        ]

    def read_rest(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], deadline - time.monotonic())
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk.decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


@pytest.mark.timeout(120)
def test_in_a_terminal_it_redraws_in_place_and_ctrl_c_restores_it(setup: Setup, hub: str) -> None:
    row = _row(setup.host)
    term = Terminal(
        *setup.base, "-P", hub, "status", "--watch", "--interval", "0.3", "-d", setup.host
    )
    try:

        def shows(processed: int) -> Callable[[str], bool]:
            def check(_output: str) -> bool:
                return any(
                    (m := row.search(frame)) is not None and int(m[1]) >= processed
                    for frame in term.frames()
                )

            return check

        term.read_until(shows(0))
        assert term.output.startswith(ENTER_SCREEN)
        _send(setup, 5)
        term.read_until(shows(5))
        counts = [int(m[1]) for f in term.frames() if (m := row.search(f)) is not None]
        assert counts[0] == 0 and counts[-1] == 5 and counts == sorted(counts), counts
        first_at_five = next(
            m for f in term.frames() if (m := row.search(f)) is not None and int(m[1]) == 5
        )
        assert float(first_at_five[2]) > 0, first_at_five[0]  # tasks/s, from two samples
        assert first_at_five[4] == "4"  # the pool
        assert f"{setup.queue}=" in first_at_five[6]
        header = next(f for f in term.frames() if "PROCESSED" in f)
        assert "TASKS/S" in header and "ACTIVE/POOL" in header and "RESERVED" in header
        os.write(term.master, b"\x03")  # Ctrl-C, through the terminal driver
        term.read_rest()
        assert term.proc.wait(20) == 0
        assert term.output.rstrip().endswith(LEAVE_SCREEN), term.output[-200:]
        assert "Traceback" not in term.output and "Aborted" not in term.output
    finally:
        term.close()


@contextmanager
def _watching(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``python -m greenworker ARGS`` (a watch) in the background, killed at the end if
    it is still running."""
    watch = start_cli(*args)
    try:
        yield watch
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)


def _interrupt(watch: subprocess.Popen[str]) -> str:
    """Ctrl-C to ``watch``: what it wrote until it exited, which it did with status 0."""
    watch.send_signal(signal.SIGINT)
    rest = _rest(watch)
    assert watch.returncode == 0, rest
    return rest


def _rest(proc: subprocess.Popen[str]) -> str:
    """What ``proc`` writes until it exits (through the same buffered reader as the
    lines read before: ``communicate`` would skip what that buffer holds)."""
    assert proc.stdout is not None
    rest = proc.stdout.read()
    proc.wait(20)
    return rest


def _read_lines_until(proc: subprocess.Popen[str], pattern: re.Pattern[str]) -> str:
    """``wait_for_output`` for a pattern: the output read up to its first match."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if pattern.search(line):
            return seen
    raise AssertionError(f"{pattern.pattern!r} not seen; output:\n{seen}")


@pytest.mark.timeout(120)
def test_through_a_pipe_plain_blocks_and_a_stopped_worker_shown_gone(
    setup: Setup, hub: str
) -> None:
    row = _row(setup.host)
    with _watching(*setup.base, "-P", hub, "top", "--interval", "0.3", "-d", setup.host) as watch:
        seen = _read_lines_until(watch, row)
        _send(setup, 3)
        seen += _read_lines_until(watch, re.compile(rf"^{re.escape(setup.host)}\s+3\s"))
        setup.worker.send_signal(signal.SIGTERM)
        assert setup.worker.wait(20) == 0
        seen += _read_lines_until(
            watch, re.compile(rf"^{re.escape(setup.host)}\s+gone: no reply since \d\d:\d\d")
        )
        seen += _read_lines_until(watch, re.compile("0 worker"))
        rest = _interrupt(watch)
    output = seen + rest
    assert "\x1b" not in output  # no escape sequence into a pipe
    assert "Traceback" not in output
    # one block per refresh, each under a timestamped title
    titles = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  greenworker · ", output, re.MULTILINE)
    assert len(titles) >= 3
    assert len(re.findall(r"^WORKER\s+PROCESSED\s+TASKS/S", output, re.MULTILINE)) == len(titles)


@pytest.mark.timeout(60)
def test_no_worker_says_so_and_keeps_watching(hub: str, tmp_path: Path) -> None:
    with _watching(
        "-A",
        "tests.cliapp",
        "--data-dir",
        str(tmp_path),
        "-P",
        hub,
        "status",
        "--watch",
        "--interval",
        "0.2",
        "-t",
        "0.2",
    ) as watch:
        wait_for_output(watch, "no worker answered within 0.2s (still watching")
        wait_for_output(watch, "no worker answered")  # the next refresh: still there
        rest = _interrupt(watch)
    assert "Traceback" not in rest


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-A", "tests.cliapp", "status", "--watch", "--interval", "0"], "--interval"),
        (["-A", "tests.cliapp", "top", "--interval", "-1"], "--interval"),
        (["-A", "tests.cliapp", "status", "--interval", "2"], "add --watch"),
        (["status", "--watch"], "missing -A/--app"),
        (["top"], "missing -A/--app"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    result = run_cli("-b", "redis://127.0.0.1:6399/0", *args, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines


@pytest.mark.timeout(120)
def test_a_lost_broker_is_said_and_the_view_comes_back_with_it(
    redis_setup: Setup, hub: str, proxy: Callable[[int], TcpProxy]
) -> None:
    setup = redis_setup
    through = proxy(6379)
    through.start()
    url = f"redis://127.0.0.1:{through.port}/0"
    row = _row(setup.host)
    with _watching(
        "-A", "tests.cliapp", "-b", url, "-P", hub, "top", "--interval", "0.3", "-d", setup.host
    ) as watch:
        _read_lines_until(watch, row)
        through.cut()
        _read_lines_until(watch, re.compile(r"^broker unreachable: .* \(retrying\)$"))
        _read_lines_until(watch, re.compile(rf"^{re.escape(setup.host)}\s+gone: "))
        through.restore()
        _read_lines_until(watch, row)  # answering again, on a new connection
        rest = _interrupt(watch)
    assert "Traceback" not in rest


@pytest.mark.timeout(90)
@pytest.mark.parametrize("args", [["status", "--watch"], ["top"]])
def test_a_broker_that_cannot_be_reached_is_one_line_and_exit_1(args: list[str]) -> None:
    dead = "redis://127.0.0.1:6399/0"  # nothing listens there
    result = run_cli("-A", "tests.cliapp", "-b", dead, *args, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: broker unreachable ({dead}): "), lines
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_stats_counts_reserved_and_scheduled_without_the_lists(memory_app: App) -> None:
    from greenworker import green
    from greenworker.control.commands import stats

    release = green.new_event()

    @memory_app.task(name="watch.hold")
    def hold() -> None:
        release.wait(30)

    worker = memory_app.Worker(concurrency=1)
    worker.start()
    try:
        hold.delay()  # runs
        hold.delay()  # waits for the one greenlet
        hold.apply_async(countdown=60)  # held for its ETA
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            worker.state.active and len(worker.state.reserved) == 2
        ):
            green.sleep(0.01)
        reply = stats(worker.control_target)
        assert (reply["reserved"], reply["scheduled"], reply["pool"]["running"]) == (1, 1, 1)
    finally:
        release.set()
        worker.stop(timeout=5)


def test_render_shows_each_kind_of_row() -> None:
    from greenworker.control.watch import Row, Snapshot, render

    at = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    rows = [
        Row("a@h", processed=10, rate=2.5, active=1, pool=8, reserved=3, queues={"q": 7}),
        Row("b@h", processed=0, active=0, pool=4, queues={"q": 7, "gone.q": None}),
        Row("c@h", error="command 'stats' is not allowed", queues={}),
        Row("d@h", processed=5, gone_since=at),
    ]
    lines = render(Snapshot(at, rows), broker="redis://h/0", interval=1.0, timeout=1.0)
    assert lines[0] == "2026-01-02 03:04:05  greenworker · redis://h/0 · 3 worker(s) · every 1s"
    assert re.split(r"\s{2,}", lines[1]) == [
        *("WORKER", "PROCESSED", "TASKS/S", "ACTIVE/POOL", "RESERVED", "QUEUES (WAITING)")
    ]
    assert re.split(r"\s+", lines[2]) == ["a@h", "10", "2.5", "1/8", "3", "q=7"]
    assert re.split(r"\s+", lines[3]) == ["b@h", "0", "-", "0/4", "-", "q=7", "gone.q=-"]
    assert lines[4] == "c@h     error: command 'stats' is not allowed  -"
    assert lines[5] == "d@h     gone: no reply since 03:04:05"
    assert len(lines) == 6
    nobody = render(Snapshot(at, []), broker="redis://h/0", interval=0.5, timeout=0.5)
    assert nobody[-1] == "no worker answered within 0.5s (still watching; Ctrl-C to stop)"
    lost = render(
        Snapshot(at, rows[3:], broker_error="Connection refused"),
        broker="redis://h/0",
        interval=1.0,
        timeout=1.0,
    )
    assert lost[1] == "broker unreachable: Connection refused (retrying)"
    assert "no worker answered" not in "\n".join(lost)


@pytest.mark.parametrize("args", [["status", "--watch"], ["top"]])
def test_kombus_filesystem_transport_is_refused(args: list[str]) -> None:
    from greenworker.cli import NO_REMOTE_CONTROL

    result = run_cli("-A", "tests.cliapp", "-b", "filesystem://localhost/", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"Error: {NO_REMOTE_CONTROL}\n"
