"""greenworker: a Celery-compatible task worker on one green hub (gevent or eventlet).

``from greenworker import App`` is cheap: the heavy modules (kombu, the hubs)
load on first use, so the CLI can monkeypatch before anything opens a socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "App",
    "AsyncResult",
    "Context",
    "Task",
    "Worker",
    "current_app",
    "current_request",
    "shared_task",
]

if TYPE_CHECKING:
    from .client.app import App
    from .client.result import AsyncResult
    from .client.shared import current_app, shared_task
    from .client.task import Context, Task, current_request
    from .worker.worker import Worker

_LAZY = {
    "App": "client.app",
    "AsyncResult": "client.result",
    "Context": "client.task",
    "Task": "client.task",
    "current_request": "client.task",
    "current_app": "client.shared",
    "shared_task": "client.shared",
    "Worker": "worker.worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'greenworker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
