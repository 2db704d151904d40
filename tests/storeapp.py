"""App for the state store tests (embedded default; the test sets GREENWORKER_DATA_DIR)."""

from __future__ import annotations

from greenworker import App

app = App("storeapp")
RAN: list[str] = []


@app.task(name="store.mark")
def mark(tag: str) -> str:
    return f"ran {tag}"
