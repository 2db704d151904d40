"""Publishes, takes and acks on the embedded broker's store until killed; prints each
step after its commit.

python tests/crash_broker.py PATH ROUND

Lines: ``open N`` once the store is open (N: messages put back from the last round's
holder), then ``published ID``, ``taken ID``, ``acked ID``, each after its transaction
committed.
"""

from __future__ import annotations

import json
import sys

from greenworker.transport.lmdb_store import open_store


def main() -> None:
    path, round_no = sys.argv[1], sys.argv[2]
    store = open_store(path, visibility_timeout=3600)
    print(f"open {store.sweep()}", flush=True)  # the last round's holder is dead: restored
    n = 0
    while True:
        for _ in range(3):
            message_id = f"{round_no}-{n}"
            n += 1
            store.put(["crash"], json.dumps({"id": message_id, "pad": "x" * 200}).encode(), 0)
            print(f"published {message_id}", flush=True)
        for taken in store.take(["crash"], 2):
            message_id = json.loads(taken.envelope)["id"]
            print(f"taken {message_id}", flush=True)
            store.ack([taken.tag])
            print(f"acked {message_id}", flush=True)


if __name__ == "__main__":
    main()
