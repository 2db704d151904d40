"""The app the metrics tests run in a worker process: ``METRICSAPP_BROKER`` is its broker
(the embedded default when unset); no result backend."""

from __future__ import annotations

import os
import time
from typing import Any

from greenworker import App

app = App("metricsapp", broker=os.environ.get("METRICSAPP_BROKER"))


@app.task(name="metricsapp.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="metricsapp.fail")
def fail() -> None:
    raise ValueError("failed on purpose")


@app.task(name="metricsapp.flaky", bind=True)
def flaky(self: Any) -> str:
    """Retries once at once, then succeeds."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "second time"


@app.task(name="metricsapp.nap", ignore_result=True)
def nap(seconds: float) -> None:
    time.sleep(seconds)  # cooperative: the worker monkeypatched the process
