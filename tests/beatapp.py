"""An app with one periodic task, for the beat CLI tests (broker and queue from the env)."""

from __future__ import annotations

import os

from greenworker import App

app = App(
    "beatapp",
    broker=os.environ.get("BEATAPP_BROKER"),
    config={
        "task_default_queue": os.environ.get("BEATAPP_QUEUE", "beatapp"),
        "beat_schedule": {
            "tick": {"task": "beatapp.tick", "schedule": 1.0, "args": [1]},
        },
    },
)


@app.task(name="beatapp.tick")
def tick(n: int) -> int:
    return n
