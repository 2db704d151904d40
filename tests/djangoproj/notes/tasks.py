"""Tasks of the notes app (found by ``autodiscover_tasks``): they use the ORM."""

from typing import Any

from celery import shared_task
from django.db import connection

from .models import Note


@shared_task
def add_note(text: str) -> dict[str, Any]:
    Note.objects.create(text=text)
    return {"count": Note.objects.count(), "vendor": connection.vendor}


@shared_task
def closed_after(task_id: str) -> bool | None:
    from djangoproj.celery import CLOSED_AFTER

    return CLOSED_AFTER.get(task_id)
