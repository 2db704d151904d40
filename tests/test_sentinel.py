"""Redis Sentinel for the broker (native consumer and publisher, kombu's transport for
remote control) and the result backend, against a master, a replica and a sentinel of
the test's own; a failover (the master killed, the replica promoted) loses nothing."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from greenworker import App
from greenworker.exceptions import ImproperlyConfigured

from .conftest import IN_CI, run_cli, run_python, start_cli, wait_for_output
from .sentinel import MASTER_NAME, SentinelSet

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed (CI=true: integration tests must run)")
        pytest.skip("redis-server is not installed")
    servers = SentinelSet(tmp_path / "sentinel")
    servers.start()
    yield servers
    servers.stop()


def ran(runs: Path) -> set[str]:
    return set(runs.read_text().split()) if runs.exists() else set()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll a file another process appends to: there is no event to await."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def client_run(code: str, env: dict[str, str]) -> str:
    done = run_python(code, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_failover_loses_no_task_and_no_result(
    hub: str, sentinels: SentinelSet, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    env = {
        "SENTINEL_URL": sentinels.url,
        "SENTINEL_RUNS": str(runs),
        "SENTINEL_QUEUE": f"gwtest.sentinel.{uuid.uuid4().hex[:8]}",
    }
    worker = start_cli(
        "-A", "tests.sentinelapp", "worker", "-P", hub, "-c", "10", "-n", "s@test", env=env
    )
    try:
        seen = wait_for_output(worker, "ready")
        assert "(native Redis consumer)" in seen, seen
        ids = client_run(
            "from tests.sentinelapp import work\n"
            "print(' '.join(work.delay(0.3).id for _ in range(200)))",
            env,
        ).split()
        sentinels.replicate()  # what was published is on the replica too
        wait_until(lambda: len(ran(runs)) >= 20, "the worker runs tasks")
        assert len(ran(runs)) < len(ids) / 2  # 6 s of work at -c 10: it comes mid-run
        sentinels.fail_over()
        wait_until(lambda: set(ids) <= ran(runs), "every task runs after the failover")
        # the last results were stored on the promoted master, after the failover
        out = client_run(
            "from tests.sentinelapp import app\n"
            f"ids = {ids[-20:]!r}\n"
            "print(sum(app.AsyncResult(i).state == 'SUCCESS' for i in ids))",
            env,
        )
        assert out.strip() == "20"
        added = client_run("from tests.sentinelapp import add; print(add.delay(2, 3).get(20))", env)
        assert added.strip() == "5"
        pinged = run_cli("-A", "tests.sentinelapp", "inspect", "ping", env=env)
        assert pinged.returncode == 0 and "s@test: OK" in pinged.stdout, pinged.stderr
    finally:
        worker.terminate()
        out = worker.communicate(timeout=30)[0]
    assert "Traceback" not in out, out


def test_sentinel_without_a_master_name_is_a_clear_error(sentinels: SentinelSet) -> None:
    app = App("nomaster", broker=sentinels.url, backend=sentinels.url)
    try:
        with pytest.raises(ImproperlyConfigured, match="master_name"):
            app.backend  # noqa: B018
    finally:
        app.close()
    status = run_cli("-A", "tests.cliapp", "-b", sentinels.url, "status")
    assert status.returncode == 2
    assert status.stderr.strip().count("\n") == 0, status.stderr  # one line
    assert "master_name" in status.stderr


def test_the_master_name_reaches_the_sentinels(sentinels: SentinelSet) -> None:
    options = {"master_name": MASTER_NAME}
    app = App(
        "withmaster",
        broker=sentinels.url,
        backend=sentinels.url,
        config={
            "broker_transport_options": options,
            "result_backend_transport_options": options,
        },
    )
    try:
        app.backend.store("sentinel-probe", {"status": "SUCCESS", "result": 1})
        meta = app.backend.get("sentinel-probe")
        assert meta is not None and meta["status"] == "SUCCESS"
    finally:
        app.close()
