"""A small crawler: tasks fetch pages over HTTP and enqueue the links they find.

``python -m examples.scrape`` runs the whole demo (a local site, a worker, a
summary); ``greenworker -A examples.scrape -c 100`` runs a worker alone.

The app lives in :mod:`examples.scrape.tasks` and loads on first use, so the
demo can monkeypatch before anything opens a socket.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "crawl"):
        from . import tasks

        return getattr(tasks, name)
    raise AttributeError(name)
