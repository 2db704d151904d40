"""A plain Celery 5 producer sending to the greenworker worker (no greenworker import).

python examples/celery_interop/producer.py
"""

from __future__ import annotations

import os

from celery import Celery

REDIS = os.environ.get("INTEROP_REDIS", "redis://127.0.0.1:6379/0")

producer = Celery("producer", broker=REDIS, backend=REDIS)

if __name__ == "__main__":
    result = producer.send_task("interop.add", (2, 3))
    print(f"sent {result.id}; result: {result.get(timeout=10)}")
    chained = producer.signature("interop.add", (1, 1)) | producer.signature("interop.add", (10,))
    print(f"chain (1 + 1) + 10 = {chained.apply_async().get(timeout=10)}")
