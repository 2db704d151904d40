"""A Celery project laid out as Celery's Django guide lays it out (without Django).

``proj/celery.py`` defines the app, settings are read with ``namespace="CELERY"``
from ``proj/settings.py``, and the tasks in ``proj/shop/tasks.py`` are found by
``autodiscover_tasks``.  Run it with Celery or with greenworker, unchanged::

    celery -A proj worker -P gevent -c 200 -l info
    greenworker -A proj worker -P gevent -c 200 -l info
"""

# as in Celery's guide: the app is loaded whenever the project is imported, so that
# shared_task uses it
from .celery import app as celery_app

__all__ = ("celery_app",)
