"""Writes revokes and counters to a state store until killed; prints each durable batch.

python tests/crash_writer.py PATH ROUND
"""

from __future__ import annotations

import sys
import time

from greenworker import green

green.patch("gevent")

from greenworker.worker.store import StateStore  # noqa: E402


def main() -> None:
    path, round_no = sys.argv[1], sys.argv[2]
    store = StateStore(path).open()
    batch = 0
    while True:
        ids = {f"r{round_no}-{batch}-{i}": time.time() for i in range(20)}
        store.add_revoked(ids)
        store.save_counters({"crash.task": batch * 20}, batch)
        print(f"durable {round_no} {batch}", flush=True)  # committed before this line
        batch += 1


if __name__ == "__main__":
    main()
