"""The Celery app of the Django project, as "First steps with Django" writes it."""

import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproj.settings")

app = Celery("djangoproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

#: task id -> whether its database connection was closed once the task ended
CLOSED_AFTER: dict[str, bool] = {}


@signals.worker_ready.connect
def watch_connections(**kwargs: Any) -> None:
    # connected after Celery's Django fixup (installed at worker_init), so it runs after
    # the fixup's own task_postrun receiver
    signals.task_postrun.connect(_record_connection, weak=False)


def _record_connection(task_id: str | None = None, **kwargs: Any) -> None:
    from django.db import connection

    if task_id is not None:
        CLOSED_AFTER[task_id] = connection.connection is None


@signals.worker_shutting_down.connect
def say_shutting_down(sig: str = "", how: str = "", **kwargs: Any) -> None:
    print(f"worker_shutting_down: {sig} {how}", flush=True)
