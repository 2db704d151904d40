"""Django settings; the CELERY_ names are read by the Celery app (``namespace="CELERY"``)."""

import os

SECRET_KEY = "test-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "notes"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGOPROJ_DB", "db.sqlite3"),
        "CONN_MAX_AGE": 0,  # closed after each task by Celery's Django fixup
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CELERY_BROKER_URL = os.environ.get("DJANGOPROJ_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("DJANGOPROJ_QUEUE", "celery")
