"""Tasks that block the hub, for the watchdog tests (run by a CLI worker subprocess)."""

from __future__ import annotations

import time

from greenworker import App

app = App("blockapp", config={"worker_block_threshold": 0.2})


@app.task(name="block.spin", time_limit=0.5)
def spin(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # never yields: blocks the hub
        pass
    return "spun"


@app.task(name="block.ok")
def ok() -> str:
    return "ok"
