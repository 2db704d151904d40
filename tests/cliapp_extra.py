"""A module the CLI tests import with -I/--include: it adds a task to tests.cliapp's app."""

from __future__ import annotations

from .cliapp import app


@app.task(name="cliapp.extra")
def extra() -> str:
    return "included"
