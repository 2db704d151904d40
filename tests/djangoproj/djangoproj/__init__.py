"""A small Django project (sqlite) with a Celery app, as Celery's Django guide sets it up."""

from .celery import app as celery_app

__all__ = ("celery_app",)
