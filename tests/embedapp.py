"""Tasks for the embedded broker's tests: each run appends a line to ``EMBED_RUNS``."""

from __future__ import annotations

import os
import time

from greenworker import App, Task

app = App("embedapp")


def _record(task: Task) -> None:
    """A line per run in ``EMBED_RUNS``: "<task id> <hostname>" (O_APPEND: the lines of
    two processes never mix)."""
    line = f"{task.request.id} {task.request.hostname}\n".encode()
    fd = os.open(
        os.environ.get("EMBED_RUNS", "runs.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="embed.work", bind=True)
def work(self: Task, seconds: float) -> None:
    time.sleep(seconds)  # cooperative: the worker patched the process
    _record(self)


@app.task(name="embed.now", bind=True)
def now(self: Task) -> None:
    _record(self)
