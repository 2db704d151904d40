"""The project's settings; Celery reads the CELERY_ names (``namespace="CELERY"``)."""

import os

DEBUG = False  # a setting of the project, not of Celery

CELERY_BROKER_URL = os.environ.get("PROJ_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("PROJ_RESULT_BACKEND", "redis://127.0.0.1:6379/0")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("PROJ_QUEUE", "celery")
CELERY_TASK_TRACK_STARTED = True
CELERY_RESULT_EXTENDED = True
CELERY_TIMEZONE = "UTC"

# beat (``-B``, or ``greenworker -A proj beat``): Celery's schedules, last runs kept in LMDB
CELERY_BEAT_SCHEDULE = {
    "add-every-minute": {
        "task": "proj.shop.tasks.add",
        "schedule": float(os.environ.get("PROJ_BEAT_EVERY", "60")),
        "args": (20, 22),
    },
}
