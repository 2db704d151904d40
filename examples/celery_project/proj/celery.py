"""The project's Celery app, as Celery's "First steps with Django" writes it."""

import os

from celery import Celery

os.environ.setdefault("PROJ_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")

# every setting is read from the settings module, upper case with a CELERY_ prefix
app.config_from_object(os.environ["PROJ_SETTINGS_MODULE"], namespace="CELERY")

# the tasks modules of the project's packages (Django's installed apps in the guide)
app.autodiscover_tasks(["proj.shop"])
