"""The worker's log: Celery's task lines, JSON lines, the root logger left alone unless told,
the stats line, and a failing task reaching sentry-sdk with its exception."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.app import trace as celery_trace

from greenworker import App, green
from greenworker.config import UNHONOURED, ConfigError, Settings
from greenworker.exceptions import Retry
from greenworker.observe import logs

from .conftest import REDIS_URL, ROOT, _need_broker, start_cli, wait_for_output

PROJECT = ROOT / "examples" / "celery_project"
ID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class Records(logging.Handler):
    """Keeps the records of one logger; ``wait`` until one whose message has ``needle``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._arrived = green.new_event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()

    def wait(self, needle: str, timeout: float = 10.0) -> logging.LogRecord:
        while True:
            for record in self.records:
                if needle in record.getMessage():
                    return record
            self._arrived.clear()
            assert self._arrived.wait(timeout), (needle, [r.getMessage() for r in self.records])

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


def _listen(name: str) -> Iterator[Records]:
    logger = logging.getLogger(name)
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def trace_lines() -> Iterator[Records]:
    yield from _listen("greenworker.trace")


@pytest.fixture
def stats_lines() -> Iterator[Records]:
    yield from _listen("greenworker.stats")


def _celery(fmt: str, **context: Any) -> str:
    """Celery's own line for ``context``, from its format strings in celery.app.trace."""
    return fmt.strip() % context


# ------------------------------------------------------------ the task lines


def test_task_lines_say_what_celerys_say(memory_app: App, trace_lines: Records) -> None:
    @memory_app.task(name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    @memory_app.task(name="proj.fail")
    def fail() -> None:
        raise ValueError("boom")

    @memory_app.task(name="proj.again", bind=True, max_retries=1)
    def again(self: Any) -> None:
        raise self.retry(exc=ConnectionError("later"), countdown=2)

    worker = memory_app.Worker(concurrency=5)
    worker.start()
    try:
        ok, bad, retried = add.delay(2, 3), fail.delay(), again.delay()
        assert ok.get(timeout=10) == 5
        trace_lines.wait(f"Task proj.fail[{bad.id}] raised")
        trace_lines.wait(f"Task proj.again[{retried.id}] retry")
    finally:
        worker.stop(timeout=5)
    by_message = {record.getMessage(): record for record in trace_lines.records}
    received = _celery(celery_trace.LOG_RECEIVED, name="proj.add", id=ok.id)
    assert by_message[received].levelno == logging.INFO
    (success,) = [r for r in trace_lines.records if "succeeded" in r.getMessage()]
    runtime = re.fullmatch(
        rf"Task proj\.add\[{ok.id}\] succeeded in ([0-9.e-]+)s: 5", success.getMessage()
    )
    assert runtime is not None, success.getMessage()
    assert success.getMessage() == _celery(
        celery_trace.LOG_SUCCESS, name="proj.add", id=ok.id, runtime=runtime[1], return_value="5"
    )
    assert success.levelno == logging.INFO
    failure = by_message[
        _celery(
            celery_trace.LOG_FAILURE,
            name="proj.fail",
            id=bad.id,
            description="raised unexpected",
            exc="ValueError('boom')",
        )
    ]
    assert failure.levelno == logging.ERROR
    assert failure.exc_info is not None
    exc_type, exc, tb = failure.exc_info
    assert exc_type is ValueError and str(exc) == "boom" and tb is not None
    assert "\n" not in failure.getMessage()  # the traceback follows as logging formats it
    retry = by_message[
        _celery(
            celery_trace.LOG_RETRY,
            name="proj.again",
            id=retried.id,
            exc=str(Retry(exc=ConnectionError("later"), when=2)),
        )
    ]
    assert retry.getMessage().endswith("retry: Retry in 2s: ConnectionError('later')")
    for record in trace_lines.records:  # name and id as attributes, for formatters
        name, task_id = getattr(record, "task_name"), getattr(record, "task_id")  # noqa: B009
        assert record.getMessage().startswith(f"Task {name}[{task_id}] ")


def test_at_warning_no_line_is_built(trace_lines: Records) -> None:
    """The result's repr is made only when a line is written: none at WARNING."""
    reprs = []

    class Loud:
        def __repr__(self) -> str:
            reprs.append(1)
            return "<Loud>"

    logs.task_succeeded("proj.loud", "id-1", 0.5, Loud())
    assert reprs == [1] and trace_lines.messages() == [
        "Task proj.loud[id-1] succeeded in 0.5s: <Loud>"
    ]
    logging.getLogger("greenworker.trace").setLevel(logging.WARNING)
    logs.task_succeeded("proj.loud", "id-2", 0.5, Loud())
    logs.task_received("proj.loud", "id-2")
    assert reprs == [1] and len(trace_lines.records) == 1


def test_a_long_result_is_cut_in_its_line() -> None:
    assert logs.short_repr("x" * 5000) == repr("x" * 1024)[:1024] + "..."
    assert logs.short_repr(list(range(3))) == "[0, 1, 2]"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert logs.short_repr(Broken()) == "<unrepresentable Broken: RuntimeError('no')>"


def _task_lines(output: str) -> Counter[tuple[str, str]]:
    """The task lines of a worker's output as (level, message), ids and run times made
    the same: what must not differ between Celery's worker and greenworker's."""
    found: Counter[tuple[str, str]] = Counter()
    for line in output.splitlines():
        match = re.match(r"\[[^]]*: (\w+)/[^]]*\] (Task proj\.shop\.tasks\..*)", line)
        if match:
            message = re.sub(ID, "ID", match[2])
            message = re.sub(r"succeeded in [0-9.e-]+s:", "succeeded in Ts:", message)
            found[match[1], message] += 1
    return found


def _send_the_calls(queue: str) -> None:
    client = Celery("client", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    try:

        def send(name: str, *args: Any) -> Any:
            return client.send_task(f"proj.shop.tasks.{name}", list(args), queue=queue)

        assert send("add", 2, 3).get(timeout=20) == 5
        with pytest.raises(ValueError):
            send("fail", "boom").get(timeout=20)
        assert send("flaky", 1).get(timeout=20) == 1
    finally:
        client.close()


def _run_worker(argv: list[str], cwd: Path, env: dict[str, str], queue: str) -> str:
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    try:
        _send_the_calls(queue)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    return output


@pytest.mark.timeout(120)
def test_the_lines_are_those_of_a_celery_gevent_worker(hub: str) -> None:
    """The same calls (a success, a failure, a retry then a success) to ``celery worker -P
    gevent``, to greenworker running the same Celery app, and to greenworker running a
    greenworker App with tasks of the same names: the same task lines, each once."""
    _need_broker(6379, "Redis")
    run = uuid.uuid4().hex[:8]
    env = {"PROJ_BROKER_URL": REDIS_URL, "PROJ_RESULT_BACKEND": REDIS_URL, "PYTHONPATH": str(ROOT)}
    common = ["worker", "-P", hub, "-c", "10", "-l", "info", "--without-mingle"]
    outputs = {}
    for kind, argv, cwd in (
        ("celery", [sys.executable, "-m", "celery", "-A", "proj", *common], PROJECT),
        ("greenworker", [sys.executable, "-m", "greenworker", "-A", "proj", *common], PROJECT),
        (
            "greenworker App",
            [sys.executable, "-m", "greenworker", "-A", "tests.logapp", *common],
            ROOT,
        ),
    ):
        if kind == "celery" and hub != "gevent":
            argv[argv.index(hub)] = "gevent"  # the reference is Celery's gevent pool
        queue = f"logs-{run}-{kind.replace(' ', '-')}"
        outputs[kind] = _run_worker(
            [*argv, "-Q", queue, "-n", f"{kind.replace(' ', '-')}-{run}@%h"],
            cwd,
            {**env, "PROJ_QUEUE": queue, "LOGAPP_QUEUE": queue, "LOGAPP_BROKER": REDIS_URL},
            queue,
        )
    expected = Counter(
        {
            ("INFO", "Task proj.shop.tasks.add[ID] received"): 1,
            ("INFO", "Task proj.shop.tasks.add[ID] succeeded in Ts: 5"): 1,
            ("INFO", "Task proj.shop.tasks.fail[ID] received"): 1,
            ("ERROR", "Task proj.shop.tasks.fail[ID] raised unexpected: ValueError('boom')"): 1,
            ("INFO", "Task proj.shop.tasks.flaky[ID] received"): 2,
            (
                "INFO",
                "Task proj.shop.tasks.flaky[ID] retry: Retry in 0.05s: ConnectionError('not yet')",
            ): 1,
            ("INFO", "Task proj.shop.tasks.flaky[ID] succeeded in Ts: 1"): 1,
        }
    )
    for kind, output in outputs.items():
        assert _task_lines(output) == expected, (kind, output)
        # the traceback follows the failure's line
        assert "Traceback (most recent call last)" in output and "ValueError: boom" in output


# ------------------------------------------------------------ the command's log


@pytest.fixture
def logapp_queue() -> str:
    _need_broker(6379, "Redis")
    return f"logapp-{uuid.uuid4().hex[:8]}"


def _logapp_worker(queue: str, *options: str, **env: str) -> subprocess.Popen[str]:
    return start_cli(
        *("-A", "tests.logapp", "worker", "-c", "5", "-Q", queue, "--without-mingle"),
        *("-n", f"{queue}@%h", *options),
        env={"LOGAPP_QUEUE": queue, "LOGAPP_BROKER": REDIS_URL, **env},
    )


def _call(queue: str, name: str, *args: Any) -> Any:
    client = App("client", broker=REDIS_URL, backend=REDIS_URL)
    try:
        result = client.send_task(f"proj.shop.tasks.{name}", list(args), queue=queue)
        return result.get(timeout=20, propagate=False)
    finally:
        client.close()


def _stop(worker: subprocess.Popen[str]) -> str:
    worker.terminate()
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    return output


def test_json_lines_to_a_file(logapp_queue: str, tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    worker = _logapp_worker(logapp_queue, "-l", "info", "--log-format", "json", "-f", str(path))
    try:
        assert _call(logapp_queue, "add", 2, 3) == 5
        _call(logapp_queue, "fail", "boom")
    finally:
        output = _stop(worker)
    assert "Task proj" not in output  # the file has the lines
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all({"time", "level", "logger", "message", "worker"} <= set(line) for line in lines), (
        lines
    )
    hostname = f"{logapp_queue}@{os.uname().nodename}"
    assert {line["worker"] for line in lines} == {hostname}
    (success,) = [line for line in lines if "succeeded in" in line["message"]]
    assert success["level"] == "INFO" and success["logger"] == "greenworker.trace"
    assert success["task_name"] == "proj.shop.tasks.add"
    assert (
        success["message"]
        == f"Task proj.shop.tasks.add[{success['task_id']}] "
        + (success["message"].split("] ", 1)[1])
    )
    assert datetime.fromisoformat(success["time"]).utcoffset() is not None
    (failure,) = [line for line in lines if "raised unexpected" in line["message"]]
    assert failure["level"] == "ERROR"
    assert failure["exc_info"].startswith("Traceback (most recent call last)")
    assert failure["exc_info"].endswith("ValueError: boom")
    assert "exc_info" not in success
    ready = [line for line in lines if " ready: " in line["message"]]
    assert ready and "task_name" not in ready[0]


def test_hijack_off_keeps_the_apps_own_logging(logapp_queue: str) -> None:
    """``worker_hijack_root_logger = False``: the handler and format the app set up on import
    stay; ``--log-format json``, which cannot apply then, is said, not dropped."""
    worker = _logapp_worker(
        logapp_queue,
        "-l",
        "info",
        "--log-format",
        "json",
        LOGAPP_OWN_LOGGING="1",
        LOGAPP_HIJACK="0",
    )
    started = ""
    try:
        started = wait_for_output(worker, " ready: ")
        assert _call(logapp_queue, "add", 2, 3) == 5
    finally:
        output = started + _stop(worker)
    assert re.search(
        rf"APP\|INFO\|greenworker\.trace\|Task proj\.shop\.tasks\.add\[{ID}\] received", output
    )
    assert "--log-format json: not applied; worker_hijack_root_logger is False" in output
    assert '{"time"' not in output


def test_hijack_on_replaces_the_apps_handlers(logapp_queue: str) -> None:
    worker = _logapp_worker(logapp_queue, "-l", "info", LOGAPP_OWN_LOGGING="1")
    try:
        assert _call(logapp_queue, "add", 2, 3) == 5
    finally:
        output = _stop(worker)
    assert re.search(
        rf"INFO/greenworker\.trace\] Task proj\.shop\.tasks\.add\[{ID}\] received", output
    )
    assert "APP|" not in output.split(" ready: ")[-1]  # the app's handler is gone once running


def test_an_embedded_worker_leaves_logging_alone(memory_app: App) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    @memory_app.task(name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    worker = memory_app.Worker(concurrency=2)
    worker.start()
    try:
        assert add.delay(1, 2).get(timeout=10) == 3
    finally:
        worker.stop(timeout=5)
    assert root.handlers == handlers and root.level == level


def test_log_settings_are_settings_and_honoured() -> None:
    names = ("worker_hijack_root_logger", "worker_log_format", "worker_log_datefmt")
    for name in names:
        assert name not in UNHONOURED
        assert hasattr(Settings(), name)
    assert Settings().worker_hijack_root_logger is True
    assert Settings().worker_stats_interval == 60.0
    with pytest.raises(ConfigError, match="worker_stats_interval must be 0"):
        Settings().update(worker_stats_interval=-1)


def test_a_bad_log_format_is_one_line(logapp_queue: str) -> None:
    from .conftest import run_cli

    done = run_cli(
        "-A",
        "tests.logapp",
        "worker",
        "-Q",
        logapp_queue,
        env={"GREENWORKER_WORKER_LOG_FORMAT": "%(message", "LOGAPP_QUEUE": logapp_queue},
        timeout=60,
    )
    assert done.returncode != 0
    assert "worker_log_format '%(message'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------ the stats line


def test_the_stats_line_comes_every_interval(queue_name: str, stats_lines: Records) -> None:
    app = App(
        "stats",
        broker="memory://",
        backend=f"memory://{uuid.uuid4().hex}",
        config={"task_default_queue": queue_name, "worker_stats_interval": 0.2},
    )

    @app.task(name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    worker = app.Worker(concurrency=7, hostname="stats@test")
    worker.start()
    try:
        assert add.delay(1, 2).get(timeout=10) == 3
        line = stats_lines.wait("processed 1 ")
    finally:
        worker.stop(timeout=5)
    assert line.levelno == logging.INFO
    assert re.fullmatch(
        r"worker stats@test: processed 1 \(failed 0\), [0-9.]+ tasks/s, active 0/7, "
        r"reserved 0, ETA held 0, broker reconnects 0",
        line.getMessage(),
    ), line.getMessage()
    count = len(stats_lines.records)
    assert worker.stats_line is not None and worker.stats_line._entry is None  # stopped
    assert len(stats_lines.records) == count


def test_stats_interval_zero_turns_it_off(memory_app: App) -> None:
    memory_app.conf.worker_stats_interval = 0
    assert memory_app.Worker(concurrency=1).stats_line is None


# ------------------------------------------------------------ Sentry


def test_sentry_sdk_gets_a_failing_app_task_with_its_exception(hub: str) -> None:
    """sentry-sdk initialised with its defaults (its logging integration; its Celery one
    too, Celery being installed): a greenworker App's failing task is an exception event
    with type, value and stack, recorded by a local ``before_send``."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sentry_app.py"), hub],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = json.loads(done.stdout)
    (event,) = [e for e in events if e["exception"]]
    (exception,) = event["exception"]
    assert (exception["type"], exception["value"]) == ("ValueError", "boom")
    frames = exception["stacktrace"]["frames"]
    assert frames[-1]["function"] == "fail"
    assert frames[-1]["filename"].endswith("sentry_app.py")
    assert event["logger"] == "greenworker.trace"
    assert event["message"].startswith("Task sentryapp.fail[")


def test_the_log_file_is_written_in_batches(tmp_path: Path) -> None:
    """-f's handler: INFO lines reach the file within logs.FLUSH_DELAY, in one write;
    a WARNING line and a line from another thread are written at once, with all before."""
    path = tmp_path / "w.log"
    handler = logs.LogFile(str(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.watch_hub()
    logger = logging.getLogger("greenworker.test_turn")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        logger.info("one")
        logger.info("two")
        green.sleep(0)
        assert path.read_text() == ""  # not yet: they wait for the lines after them
        green.sleep(logs.FLUSH_DELAY * 2)
        assert path.read_text() == "INFO one\nINFO two\n"
        logger.info("three")
        logger.warning("four")
        assert path.read_text().endswith("INFO three\nWARNING four\n")
        logger.info("five")
        green.run_in_thread(logger.info, "six")  # a real thread: at once
        assert path.read_text().endswith("INFO five\nINFO six\n")
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate, logger.level = True, logging.NOTSET
