"""State store throughput: 10,000 revokes and 100,000 counter updates, store on vs off.

    python -m bench.statedb

"Off" is the in-memory state alone; "on" also commits to the LMDB store the way
the worker does: each revoke committed at once (durable before the reply), the
counters batched by the flush timer (here: one flush every 1,000 updates).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter

from greenworker import green

green.patch("gevent")

from greenworker.worker.state import RevokedSet  # noqa: E402
from greenworker.worker.store import StateStore  # noqa: E402

REVOKES = 10_000
UPDATES = 100_000
FLUSH_EVERY = 1_000


def run(store: StateStore | None) -> dict[str, float]:
    revoked = RevokedSet()
    started = time.perf_counter()
    for i in range(REVOKES):
        task_id = f"task-{i}"
        now = time.time()
        revoked.add(task_id, now)
        if store is not None:
            store.add_revoked({task_id: now})
    revoke_s = time.perf_counter() - started
    counters: Counter[str] = Counter()
    started = time.perf_counter()
    for i in range(UPDATES):
        counters[f"task.{i % 20}"] += 1
        if store is not None and i % FLUSH_EVERY == FLUSH_EVERY - 1:
            store.save_counters(dict(counters), i)
    update_s = time.perf_counter() - started
    return {
        "revokes_per_s": round(REVOKES / revoke_s),
        "updates_per_s": round(UPDATES / update_s),
        "revoke_us": round(revoke_s / REVOKES * 1e6, 2),
        "update_us": round(update_s / UPDATES * 1e6, 3),
    }


def hub_gap_during(action: object) -> float:
    """Largest pause (ms) a 1 ms ticker greenlet sees while ``action()`` runs."""
    gaps: list[float] = []
    running = True

    def ticker() -> None:
        last = time.perf_counter()
        while running:
            green.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    handle = green.spawn(ticker)
    green.sleep(0.01)
    action()  # type: ignore[operator]
    running = False
    handle.join(1)
    return round(max(gaps) * 1e3, 1)


def blocking_hub_test() -> dict[str, float]:
    """A 200 MB store: fsync+compact inline on the hub vs in the thread pool."""
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(tmp).open()
        table = store.table("filler")
        blob = "x" * 1_000_000
        for i in range(200):
            table.put(f"k{i}", blob)
        os.makedirs(tmp + "/copy1")
        os.makedirs(tmp + "/copy2")
        inline = hub_gap_during(lambda: store.env.copy(tmp + "/copy1", compact=True))
        threaded = hub_gap_during(lambda: green.run_in_thread(store.env.copy, tmp + "/copy2", True))
        store.close()
    return {"compact_inline_max_hub_gap_ms": inline, "compact_threadpool_max_hub_gap_ms": threaded}


def main() -> None:
    off = run(None)
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(tmp).open()
        try:
            on = run(store)
            started = time.perf_counter()
            store.sync()  # the fsync, in the hub's thread pool
            sync_ms = (time.perf_counter() - started) * 1e3
        finally:
            store.close()
    print(json.dumps(blocking_hub_test()))
    print(json.dumps({"store": "off", **off}))
    print(json.dumps({"store": "on", **on, "final_sync_ms": round(sync_ms, 2)}))
    print()
    print("| store | revokes/s | µs/revoke | counter updates/s | µs/update |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in (("off", off), ("on", on)):
        print(
            f"| {name} | {row['revokes_per_s']} | {row['revoke_us']} | "
            f"{row['updates_per_s']} | {row['update_us']} |"
        )


if __name__ == "__main__":
    main()
