"""Running a ``celery.Celery`` app on greenworker (optional: this package imports Celery).

The worker consumes, schedules, limits, revokes and acks a Celery app's
tasks as it does its own, and runs each task body through Celery's own task
tracer (``celery.app.trace.build_tracer``), so Celery's task semantics,
signals and result backends hold as under ``celery worker``.
"""
