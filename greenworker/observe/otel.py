"""OpenTelemetry tracing of tasks (extra ``greenworker[otel]``: ``opentelemetry-api``).

:class:`OpenTelemetryMiddleware` opens one span per task run, named and
attributed as Celery's OpenTelemetry instrumentation names its own
(``run/<task name>``, kind CONSUMER, ``celery.task_name``,
``messaging.message.id``, ``celery.state``...), as the child of the
producer's span whose context the message headers carry (``traceparent``,
read with the global propagator: W3C trace context unless configured
otherwise), so a trace goes on from a Celery producer instrumented with
``CeleryInstrumentor`` or from a greenworker one.  The span is current in the
task's greenlet while it runs: spans the task opens are its children, and
the tasks it sends carry it on.

:class:`PublishTracing` is the producer's side for a :class:`greenworker.App`:
a span per message sent (``apply_async/<task name>``, kind PRODUCER) whose
context goes into the message headers.  The middleware turns it on in its
worker (for the tasks its tasks send); a process that only sends calls
``PublishTracing().connect()`` once.

The tracer comes from ``tracer_provider``, else the global one
(``opentelemetry.trace.set_tracer_provider``); without the SDK configured,
spans are no-ops.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from .. import __version__
from .. import signals as task_signals
from ..worker.hooks import Middleware

if TYPE_CHECKING:
    from ..worker.request import Request
    from ..worker.worker import Worker

__all__ = ["OpenTelemetryMiddleware", "PublishTracing"]

#: Celery's instrumentation's attribute names (``opentelemetry.instrumentation.celery``).
ACTION = "celery.action"
TASK_NAME = "celery.task_name"
STATE = "celery.state"
RETRIES = "celery.retries"
HOSTNAME = "celery.hostname"
RETRY_REASON = "celery.retry.reason"
REVOKED_REASON = "celery.revoked.reason"
MESSAGE_ID = "messaging.message.id"
DESTINATION = "messaging.destination"

#: The request whose span is current in this greenlet (each greenlet has its own): the
#: span's context is detached only there, where it was attached.
_attached: ContextVar[Request | None] = ContextVar("greenworker_otel_attached", default=None)


def _tracer(tracer_provider: trace.TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer("greenworker", __version__, tracer_provider)


class OpenTelemetryMiddleware(Middleware):
    """One span per task run; add it with ``app.middleware.append(...)`` (or
    ``app.Worker(middleware=[...])``).

    ``links=True`` makes each run a trace of its own, linked to the producer's span
    rather than its child (Celery's instrumentation's ``use_span_links``).
    ``publish`` (the default) also traces the messages this worker's tasks send
    (:class:`PublishTracing`), while the worker runs.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        links: bool = False,
        publish: bool = True,
    ) -> None:
        self.tracer = _tracer(tracer_provider)
        self.links = links
        self.publishing = PublishTracing(tracer_provider) if publish else None
        #: The spans of the tasks running now, and their context tokens.
        self._spans: dict[Request, tuple[Span, Token[otel_context.Context]]] = {}

    def worker_start(self, worker: Worker) -> None:
        if self.publishing is not None:
            self.publishing.connect()

    def worker_stop(self, worker: Worker) -> None:
        if self.publishing is not None:
            self.publishing.disconnect()
        # tasks killed by a cold shutdown never ended: their spans end here, as failed
        for request, (span, _) in list(self._spans.items()):
            del self._spans[request]
            span.set_attribute(STATE, "FAILURE")
            span.set_status(Status(StatusCode.ERROR, "killed by the worker's shutdown"))
            span.end()

    def before_task(self, request: Request) -> None:
        msg = request.msg
        producer = extract(msg.headers)
        attributes: dict[str, Any] = {
            ACTION: "run",
            TASK_NAME: msg.task,
            MESSAGE_ID: msg.id,
            RETRIES: msg.retries,
        }
        if msg.origin:
            attributes[HOSTNAME] = msg.origin
        routing_key = (request.message.delivery_info or {}).get("routing_key")
        if routing_key:
            attributes[DESTINATION] = routing_key
        name = f"run/{msg.task}"
        if self.links:
            producer_span = trace.get_current_span(producer).get_span_context()
            links = [Link(producer_span)] if producer_span.is_valid else None
            span = self.tracer.start_span(
                name,
                context=otel_context.Context(),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
            )
        else:
            span = self.tracer.start_span(
                name, context=producer, kind=SpanKind.CONSUMER, attributes=attributes
            )
        # current in the task's greenlet: its own spans and the tasks it sends follow it
        token = otel_context.attach(trace.set_span_in_context(span))
        _attached.set(request)
        self._spans[request] = (span, token)

    def after_task(self, request: Request, state: str, result: Any) -> None:
        entry = self._spans.pop(request, None)
        if entry is None:
            return
        span, token = entry
        if span.is_recording():
            span.set_attribute(STATE, state)
            if state == "FAILURE":
                if isinstance(result, BaseException):
                    span.record_exception(result)
                    description = f"{type(result).__name__}: {result}"
                else:
                    description = str(result)
                span.set_status(Status(StatusCode.ERROR, description))
            elif state == "RETRY":
                span.set_attribute(RETRY_REASON, str(result))
            elif state == "REVOKED":
                span.set_attribute(REVOKED_REASON, str(result))
        span.end()
        # ended from another greenlet (hard time limit, terminate): that one is killed,
        # and its context with it; a context can only be detached where it was attached
        if _attached.get() is request:
            _attached.set(None)
            otel_context.detach(token)


class PublishTracing:
    """A PRODUCER span per task message a :class:`greenworker.App` sends, its context
    written into the message headers (``traceparent``) for the worker to go on from.

    Receivers of :data:`greenworker.signals.before_task_publish` and
    :data:`~greenworker.signals.after_task_publish`: :meth:`connect` them once per
    process (a second :meth:`connect` adds nothing).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = _tracer(tracer_provider)
        #: The message being published in this greenlet: its id and its span.
        self._publishing: ContextVar[tuple[str, Span] | None] = ContextVar(
            "greenworker_otel_publishing", default=None
        )

    def connect(self) -> None:
        task_signals.before_task_publish.connect(self._before, weak=False)
        task_signals.after_task_publish.connect(self._after, weak=False)

    def disconnect(self) -> None:
        task_signals.before_task_publish.disconnect(self._before)
        task_signals.after_task_publish.disconnect(self._after)

    def _before(self, sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        if not isinstance(headers, dict) or not isinstance(headers.get("id"), str):
            return  # not a task message of protocol 2
        name = sender if isinstance(sender, str) else "unknown"
        attributes: dict[str, Any] = {
            ACTION: "apply_async",
            TASK_NAME: name,
            MESSAGE_ID: headers["id"],
        }
        routing_key = kwargs.get("routing_key")
        if routing_key:
            attributes[DESTINATION] = routing_key
        stale = self._publishing.get()
        if stale is not None:  # the last publish from here raised: it was never sent
            stale[1].set_status(Status(StatusCode.ERROR, "the message was not published"))
            stale[1].end()
        span = self.tracer.start_span(
            f"apply_async/{name}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        inject(headers, context=trace.set_span_in_context(span))
        self._publishing.set((headers["id"], span))

    def _after(self, sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        publishing = self._publishing.get()
        if publishing is None or not isinstance(headers, dict):
            return
        task_id, span = publishing
        if headers.get("id") == task_id:
            self._publishing.set(None)
            span.end()
