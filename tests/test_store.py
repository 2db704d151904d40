"""The LMDB state store: restart, crash safety (kill -9), lock, expiry, layout, CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from greenworker import App
from greenworker.worker.state import RevokedSet
from greenworker.worker.store import LAYOUT_VERSION, StateStore, StoreError, StoreLocked

from .conftest import ROOT, run_cli, start_cli


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if "ready" in line:
            return
    raise AssertionError("worker did not start")


@pytest.mark.timeout(90)
def test_revoked_before_restart_is_not_run_after(hub: str, tmp_path: Path) -> None:
    data = str(tmp_path)
    env = {"GREENWORKER_DATA_DIR": data}
    # 1. a worker revokes the id (as a remote revoke would), then stops
    app = App("storeapp", data_dir=data)
    worker = app.Worker()
    worker.start()
    worker.revoke("revoked-before-restart")
    worker.stop()
    app.close()
    # 2. a worker process starts on the same data dir; the revoked task arrives
    proc = start_cli("-A", "tests.storeapp", "-P", hub, env=env)
    try:
        _wait_ready(proc)
        sent = run_cli("-A", "tests.storeapp", "call", "store.mark", "--args", '["x"]', env=env)
        assert sent.returncode == 0, sent.stderr
        revoked_id = "revoked-before-restart"
        client = App("storeapp", data_dir=data)
        client.tasks.update(app.tasks)
        late = client.send_task("store.mark", ("late",), task_id=revoked_id)
        ok = client.send_task("store.mark", ("ok",))
        assert ok.get(timeout=20) == "ran ok"
        assert late.get(timeout=20, propagate=False) is not None
        assert late.state == "REVOKED"
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    shown = run_cli("statedb", os.path.join(data, "state"), "show")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["revoked"] >= 1 and summary["counters"].get("store.mark", 0) >= 1


@pytest.mark.timeout(300)
def test_kill_9_while_writing_never_corrupts(tmp_path: Path) -> None:
    """50 rounds: kill -9 a writer mid-stream; the store opens, every durable batch is there."""
    path = str(tmp_path / "state")
    rng = random.Random(7)
    expected: set[str] = set()
    for round_no in range(50):
        proc = subprocess.Popen(
            [sys.executable, "tests/crash_writer.py", path, str(round_no)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        durable = -1
        deadline = time.monotonic() + rng.uniform(0.05, 0.3)
        for line in proc.stdout:
            _, _, batch = line.split()
            durable = int(batch)
            if time.monotonic() > deadline and durable >= 0:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        expected |= {f"r{round_no}-{b}-{i}" for b in range(durable + 1) for i in range(20)}
        store = StateStore(path).open()  # opens: the lock died with the process
        try:
            present = set(store.revoked(expires=3600))
            assert expected <= present, f"round {round_no}: lost {len(expected - present)}"
            assert store.counters()["crash.task"] >= durable * 20
            with store.env.begin() as txn:  # every page readable, every value JSON
                for name in (b"revoked", b"counters", b"meta"):
                    db = store.env.open_db(name, txn=txn)
                    for _, value in txn.cursor(db=db):
                        json.loads(bytes(value))
        finally:
            store.close()


def test_second_worker_gets_a_clear_lock_error(tmp_path: Path) -> None:
    first = StateStore(str(tmp_path)).open()
    try:
        with pytest.raises(StoreLocked, match=rf"{tmp_path}.*in use by pid {os.getpid()}"):
            StateStore(str(tmp_path)).open()
        locked = run_cli("statedb", str(tmp_path), "show")
        assert locked.returncode == 2 and "in use by pid" in locked.stderr
    finally:
        first.close()
    StateStore(str(tmp_path)).open().close()  # free again


def test_second_cli_worker_on_one_statedb_exits_2(hub: str, tmp_path: Path) -> None:
    env = {"GREENWORKER_DATA_DIR": str(tmp_path)}
    proc = start_cli("-A", "tests.storeapp", "-P", hub, env=env)
    try:
        _wait_ready(proc)
        second = run_cli("-A", "tests.storeapp", "-P", hub, env=env, timeout=30)
        assert second.returncode == 2
        assert "is in use by pid" in second.stderr and "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_expiry_and_maximum_size_survive_a_restart(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path)).open()
    now = time.time()
    store.add_revoked({"fresh": now, "stale": now - 4 * 3600})
    store.add_revoked({f"n{i}": now + i for i in range(10)})
    assert set(store.revoked(expires=3 * 3600)) == {"fresh", *(f"n{i}" for i in range(10))}
    with store.env.begin(db=store.env.open_db(b"revoked")) as txn:
        assert txn.get(b"stale") is None  # expired ids are purged, not only hidden
    limited = RevokedSet(maxlen=5, expires=3 * 3600)
    limited.update(store.revoked(expires=3 * 3600))
    assert store.trim_revoked(set(limited.as_dict())) == 6
    assert set(store.revoked(expires=3 * 3600)) == {f"n{i}" for i in range(5, 10)}
    store.close()


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    StateStore(str(tmp_path)).open().close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        txn.put(b"layout", str(LAYOUT_VERSION + 1).encode())
    env.close()
    with pytest.raises(StoreError, match=r"layout version '2'.*reads version 1"):
        StateStore(str(tmp_path)).open()


def test_tables_grow_and_cli_compact_and_clear(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path)).open()
    table = store.table("beat")
    big = "x" * 100_000
    for i in range(1000):  # ~100 MB into a 64 MB map: it grows
        table.put(f"k{i}", big)
    assert table.get("k999") == big and table.get("missing", 1) == 1
    for i in range(1000):
        table.delete(f"k{i}")
    store.add_revoked({"keep": time.time()})
    store.save_counters({"t": 3}, 9)
    store.close()
    compacted = run_cli("statedb", str(tmp_path), "compact")
    assert compacted.returncode == 0, compacted.stderr
    before, after = [int(w) for w in compacted.stdout.split(":")[1].split()[0:3:2]]
    assert after < before
    again = StateStore(str(tmp_path)).open()
    assert "keep" in again.revoked(3600) and again.counters() == {"t": 3} and again.clock() == 9
    again.close()
    cleared = run_cli("statedb", str(tmp_path), "clear", "-f")
    assert cleared.returncode == 0, cleared.stderr
    empty = StateStore(str(tmp_path)).open()
    assert empty.revoked(3600) == {} and empty.counters() == {} and empty.clock() == 0
    empty.close()


def test_hub_blockers_are_kept_until_they_expire_and_cleared_with_the_rest(
    tmp_path: Path,
) -> None:
    store = StateStore(str(tmp_path / "state")).open()
    try:
        store.add_blocker("recent", {"task": "t.spin", "when": time.time(), "hard_limit": 1})
        store.add_blocker("old", {"task": "t.spin", "when": time.time() - 100, "hard_limit": 1})
        assert set(store.summary()["hub_blockers"]) == {"recent", "old"}
        assert set(store.blockers(expires=50)) == {"recent"}
        assert set(store.summary()["hub_blockers"]) == {"recent"}  # the expired one is gone
        store.clear()
        assert store.blockers(expires=50) == {}
    finally:
        store.close()
