"""The app the CLI tests run: the embedded default unless -b says otherwise."""

from __future__ import annotations

import datetime
import decimal

from greenworker import App

app = App("cliapp")


@app.task(name="cliapp.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="cliapp.fail")
def fail() -> None:
    raise RuntimeError("failed on purpose")


@app.task(name="cliapp.nap")
def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)  # cooperative: the worker monkeypatched the process
    return "rested"


@app.task(name="cliapp.typed")
def typed() -> list[object]:
    return [datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), decimal.Decimal("1.50")]
