"""Run the example Celery project on greenworker with sentry-sdk or OpenTelemetry set up
as their Celery guides say, and print what they recorded as JSON (one process per
integration: both patch Celery for the rest of the process).

python tests/celery_integrations.py gevent|eventlet sentry|otel
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main() -> int:
    hub, integration = sys.argv[1], sys.argv[2]
    from greenworker import green

    green.patch("gevent" if hub == "gevent" else "eventlet")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "celery_project"))
    import importlib

    tasks: Any = importlib.import_module("proj.shop.tasks")
    out = run_sentry(tasks) if integration == "sentry" else run_otel(tasks)
    print(json.dumps(out, default=str))
    import gc

    gc.collect()  # Celery's AsyncResult.__del__ unsubscribes: while the hub still runs
    return 0


def run_sentry(tasks: Any) -> dict[str, Any]:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    events: list[dict[str, Any]] = []

    def keep_here(event: Any, hint: dict[str, Any]) -> None:
        events.append(event)
        return None  # recorded locally; nothing is sent

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        integrations=[CeleryIntegration()],
        before_send=keep_here,
        send_client_reports=False,
        auto_session_tracking=False,
    )
    worker = _worker()
    try:
        failed = tasks.fail.delay("boom")
        try:
            failed.get(timeout=10)
        except ValueError:
            pass
        assert tasks.add.delay(1, 2).get(timeout=10) == 3
    finally:
        worker.stop()
    return {
        "task_id": failed.id,
        "events": [
            {
                "exception": event.get("exception", {}).get("values", []),
                "tags": event.get("tags", {}),
                "extra": event.get("extra", {}),
                "transaction": event.get("transaction"),
            }
            for event in events
        ],
    }


def run_otel(tasks: Any) -> dict[str, Any]:
    from celery import signals
    from opentelemetry import trace as otel_trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_trace.set_tracer_provider(provider)

    instrumentor: Any = CeleryInstrumentor

    def instrument(**kwargs: Any) -> None:  # where OpenTelemetry's Celery guide does it
        instrumentor().instrument()

    signals.worker_process_init.connect(instrument, weak=False)

    worker = _worker()
    try:
        sent = tasks.add.delay(2, 2)
        assert sent.get(timeout=10) == 4
    finally:
        worker.stop()
    spans = exporter.get_finished_spans()
    return {
        "task_id": sent.id,
        "spans": [
            {
                "name": span.name,
                "trace_id": span.context.trace_id,
                "span_id": span.context.span_id,
                "parent": span.parent.span_id if span.parent else None,
                "attributes": dict(span.attributes or {}),
            }
            for span in spans
        ],
    }


def _worker() -> Any:
    from greenworker.loader import load_app

    worker = load_app("proj").Worker(concurrency=5)
    worker.start()
    return worker


if __name__ == "__main__":
    sys.exit(main())
