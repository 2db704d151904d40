"""OpenTelemetry (greenworker.observe.otel): one CONSUMER span per task run, the child of
the producer's span carried in the message headers (``traceparent``), from a
greenworker producer, a hand-made message and a Celery producer instrumented with
CeleryInstrumentor; recorded by the SDK's in-memory exporter."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from greenworker import App, Task, green
from greenworker.exceptions import TaskRevokedError

from .conftest import publish_raw

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.propagate import inject  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from greenworker.observe.otel import OpenTelemetryMiddleware, PublishTracing  # noqa: E402


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def no_detach_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """OpenTelemetry logs a context detached in the wrong greenlet; none may be."""
    with caplog.at_level(logging.ERROR, "opentelemetry"):
        yield
    wrong = [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]
    assert not wrong, wrong


def runs(exporter: InMemorySpanExporter, task_id: str | None = None) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.name.startswith("run/")
        and (task_id is None or (span.attributes or {}).get("messaging.message.id") == task_id)
    ]


def test_a_run_is_the_child_of_the_greenworker_producers_span(
    memory_app: App,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    no_detach_errors: None,
) -> None:
    inner: list[Any] = []

    @memory_app.task
    def add(x: int, y: int) -> int:
        # the run's span is current in the task: the task's own spans are its children
        with provider.get_tracer("test").start_as_current_span("inside") as span:
            inner.append(span.get_span_context())
        return x + y

    worker = memory_app.Worker(
        concurrency=5, middleware=[OpenTelemetryMiddleware(tracer_provider=provider)]
    )
    publishing = PublishTracing(provider)
    publishing.connect()
    worker.start()
    try:
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("web request") as root:
            result = add.delay(2, 3)
        assert result.get(timeout=5) == 5
        worker.join()
    finally:
        publishing.disconnect()
        worker.stop(timeout=5)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    name = add.name
    publish, run = spans[f"apply_async/{name}"], spans[f"run/{name}"]
    trace_id = root.get_span_context().trace_id
    assert publish.context is not None and run.context is not None and run.parent is not None
    assert publish.kind is SpanKind.PRODUCER and publish.parent is not None
    assert publish.parent.span_id == root.get_span_context().span_id
    assert run.kind is SpanKind.CONSUMER
    assert run.context.trace_id == trace_id and run.parent.span_id == publish.context.span_id
    assert (publish.attributes or {})["messaging.message.id"] == result.id
    attributes = dict(run.attributes or {})
    assert attributes.pop("celery.hostname") == f"{os.getpid()}@{socket.gethostname()}"
    assert attributes == {
        "celery.action": "run",
        "celery.task_name": name,
        "messaging.message.id": result.id,
        "celery.retries": 0,
        "messaging.destination": memory_app.conf.task_default_queue,
        "celery.state": "SUCCESS",
    }
    assert run.status.status_code is StatusCode.UNSET
    [inside] = inner
    assert spans["inside"].parent is not None
    assert spans["inside"].parent.span_id == run.context.span_id
    assert inside.trace_id == trace_id


def test_a_hand_made_traceparent_failure_and_retries(
    memory_app: App,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    no_detach_errors: None,
) -> None:
    @memory_app.task
    def boom() -> None:
        raise ValueError("boom")

    @memory_app.task(bind=True, max_retries=1)
    def flaky(self: Task) -> str:
        if self.request.retries == 0:
            raise self.retry(exc=ConnectionError("down"), countdown=0)
        return "ok"

    worker = memory_app.Worker(
        concurrency=5, middleware=[OpenTelemetryMiddleware(tracer_provider=provider)]
    )
    worker.start()
    try:
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("somewhere else") as producer:
            headers: dict[str, Any] = {"task": boom.name, "id": "failing-1"}
            inject(headers)  # as Celery's instrumentation writes it
        assert headers["traceparent"].startswith("00-")
        publish_raw(memory_app, [[], {}, {}], headers)
        retried = flaky.delay()  # no producer span: the first run is a root
        assert retried.get(timeout=5) == "ok"
        worker.join(fail_fast=False)
    finally:
        worker.stop(timeout=5)
    [failed] = runs(exporter, "failing-1")
    assert failed.context is not None and failed.parent is not None
    assert failed.context.trace_id == producer.get_span_context().trace_id
    assert failed.parent.span_id == producer.get_span_context().span_id
    assert failed.parent.is_remote
    assert (failed.attributes or {})["celery.state"] == "FAILURE"
    assert (
        failed.status.status_code is StatusCode.ERROR
        and failed.status.description == "ValueError: boom"
    )
    [event] = failed.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "ValueError"
    assert "boom" in str((event.attributes or {})["exception.stacktrace"])
    first, second = sorted(
        runs(exporter, retried.id),
        key=lambda s: int((s.attributes or {})["celery.retries"]),  # type: ignore[arg-type]
    )
    assert (first.attributes or {})["celery.state"] == "RETRY"
    assert "down" in str((first.attributes or {})["celery.retry.reason"])
    assert (second.attributes or {})["celery.retries"] == 1
    assert (second.attributes or {})["celery.state"] == "SUCCESS"
    # sent from here (the middleware traces publishing in its worker's process), then
    # again from inside the first run: one trace, each run under the message it ran
    sends = [s for s in exporter.get_finished_spans() if s.name == f"apply_async/{flaky.name}"]
    [sent] = [s for s in sends if s.parent is None]
    [resent] = [s for s in sends if s.parent is not None]
    assert sent.context is not None and resent.context is not None and resent.parent is not None
    assert first.context is not None and first.parent is not None
    assert second.context is not None and second.parent is not None
    assert first.parent.span_id == sent.context.span_id
    assert resent.parent.span_id == first.context.span_id
    assert second.parent.span_id == resent.context.span_id
    trace_ids = {span.context.trace_id for span in (sent, first, resent, second) if span.context}
    assert trace_ids == {sent.context.trace_id}


def test_links_instead_of_a_parent(
    memory_app: App, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @memory_app.task
    def noop() -> None:
        return None

    worker = memory_app.Worker(
        concurrency=2,
        middleware=[OpenTelemetryMiddleware(tracer_provider=provider, links=True, publish=False)],
    )
    worker.start()
    try:
        with provider.get_tracer("test").start_as_current_span("producer") as producer:
            headers: dict[str, Any] = {"task": noop.name, "id": "linked-1"}
            inject(headers)
        publish_raw(memory_app, [[], {}, {}], headers)
        worker.join()
    finally:
        worker.stop(timeout=5)
    [run] = runs(exporter, "linked-1")
    assert run.parent is None and run.context is not None
    assert run.context.trace_id != producer.get_span_context().trace_id
    [link] = run.links
    assert link.context.span_id == producer.get_span_context().span_id


def test_hard_time_limit_terminate_and_cold_shutdown_end_their_spans(
    memory_app: App,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    no_detach_errors: None,
) -> None:
    started = green.new_event()

    @memory_app.task(time_limit=0.1)
    def stuck() -> None:
        green.sleep(30)

    @memory_app.task
    def long() -> None:
        started.set()
        green.sleep(30)

    worker = memory_app.Worker(
        concurrency=3, middleware=[OpenTelemetryMiddleware(tracer_provider=provider)]
    )
    worker.start()
    try:
        limited = stuck.delay()
        limited.get(timeout=5, propagate=False)
        running = long.delay()
        assert started.wait(5)
        worker.revoke(running.id, terminate=True)
        with pytest.raises(TaskRevokedError):
            running.get(timeout=5)
        started.clear()
        killed = long.delay()
        assert started.wait(5)
    finally:
        worker.stop(timeout=0.1)  # the last one is still running: killed
    [timed_out] = runs(exporter, limited.id)
    assert (timed_out.attributes or {})["celery.state"] == "FAILURE"
    assert timed_out.status.description == "TimeLimitExceeded: 0.1"
    [terminated] = runs(exporter, running.id)
    assert (terminated.attributes or {})["celery.state"] == "REVOKED"
    assert (terminated.attributes or {})["celery.revoked.reason"] == "terminated"
    [cold] = runs(exporter, killed.id)
    assert cold.status.status_code is StatusCode.ERROR
    assert cold.status.description == "killed by the worker's shutdown"


def test_a_celery_producer_instrumented_with_celery_instrumentor(
    memory_app: App, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    celery = pytest.importorskip("celery")
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.celery")

    @memory_app.task
    def mul(x: int, y: int) -> int:
        return x * y

    queue = memory_app.conf.task_default_queue
    producer_app = celery.Celery(f"producer-{uuid.uuid4().hex[:6]}", broker="memory://")
    instrumentor: Any = instrumentation.CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    worker = memory_app.Worker(
        concurrency=2,
        middleware=[OpenTelemetryMiddleware(tracer_provider=provider, publish=False)],
    )
    worker.start()
    try:
        sent = producer_app.send_task(mul.name, (6, 7), queue=queue)
        worker.join()
    finally:
        instrumentor.uninstrument()
        worker.stop(timeout=5)
        producer_app.close()
    assert memory_app.AsyncResult(sent.id).get(timeout=5) == 42
    [publish] = [s for s in exporter.get_finished_spans() if s.name == f"apply_async/{mul.name}"]
    [run] = runs(exporter, sent.id)
    assert publish.context is not None and run.context is not None and run.parent is not None
    assert run.context.trace_id == publish.context.trace_id
    assert run.parent.span_id == publish.context.span_id
