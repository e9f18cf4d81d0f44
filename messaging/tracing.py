"""W3C trace context on every envelope, and OpenTelemetry spans in every process.

Why: an order is one story told by six processes in two languages (orders-api, the
relay, payment, invoice, shipping, email, orders-updates, the Go subscriber). Each
envelope carries the W3C ``traceparent`` (and ``tracestate`` when there is one) of the
span that produced it, so every process can continue the same trace and a collector
shows the order from POST to the last email as one tree.

- ``POST /orders`` runs in a server span (:func:`server_span`), a child of the
  request's ``traceparent`` header when that header is valid; the OrderPlaced envelope
  carries that span's context, and so does its outbox row (the payload is the envelope),
  so the relay's re-publish continues the same trace.
- Every consumer handles each message in a consumer span (:func:`consumer_span`), a
  child of the envelope's context; the outcome events it emits carry *that* span's
  context (:func:`envelope_fields`), so PaymentCaptured -> invoice/shipping stay in the
  trace. A batch handler gets one span per message: :func:`batch_spans` maps each
  order to its message's span for the duration of the batch call.

What costs what: without ``OTEL_EXPORTER_OTLP_ENDPOINT``, :func:`configure` installs
no SDK: each span is a non-recording one with a new id from the SDK's id generator, so
envelopes and log lines still carry trace ids, and nothing is built, exported, threaded
or sent. With it, the OpenTelemetry SDK records spans and a batch processor exports
them over OTLP/HTTP (protobuf) to ``<endpoint>/v1/traces`` from a background thread; a
full queue drops spans, never messages. A process that never calls :func:`configure` (unit tests,
tools), or runs with ``OTEL_SDK_DISABLED=true``, gets OpenTelemetry's no-op tracer: it
passes a parent's context through and mints nothing.

Incoming context is validated strictly (:func:`parse_traceparent`): exactly version
``00``, lower-case hex, ids not all zero, nothing before or after. Anything else is
ignored and a new trace starts; it is never an error and never copied anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

if TYPE_CHECKING:
    from messaging.config import Settings

TRACEPARENT = "traceparent"
"""The envelope field (and HTTP header) of the W3C trace context."""
TRACESTATE = "tracestate"
"""The envelope field (and HTTP header) of the W3C vendor trace state."""
INSTRUMENTATION = "redis-order-events"
"""The instrumentation scope name of every span this project makes."""

# fullmatch: "$" would let a final newline through. Version 00 only (what the contract
# allows); all-zero ids are invalid by the W3C specification.
_TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})")
# W3C tracestate list-member: key "=" value; keys simple or multi-tenant (tenant@system).
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE = 512
"""Longest tracestate accepted (the W3C limit a vendor must propagate)."""
MAX_TRACESTATE_MEMBERS = 32
"""Most list-members a tracestate may have (W3C)."""


def parse_traceparent(value: object) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent``, or None when it is not valid."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )


def parse_tracestate(value: object) -> TraceState | None:
    """A valid W3C ``tracestate``, or None (absent, or any member malformed: all dropped)."""
    if not isinstance(value, str) or not value or len(value) > MAX_TRACESTATE:
        return None
    pairs: list[tuple[str, str]] = []
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue  # empty list-members are allowed and ignored
        if not _TRACESTATE_MEMBER.fullmatch(member):
            return None
        key, _, val = member.partition("=")
        pairs.append((key, val))
    keys = [key for key, _ in pairs]
    if not pairs or len(pairs) > MAX_TRACESTATE_MEMBERS or len(set(keys)) != len(keys):
        return None
    return TraceState(pairs)


def remote_parent(traceparent: object, tracestate: object = None) -> Any:
    """An OpenTelemetry context whose parent is this remote context (None: a new trace).

    Used for both the HTTP headers of a request and the fields of an envelope.
    """
    parent = parse_traceparent(traceparent)
    if parent is None:
        return None
    state = parse_tracestate(tracestate)
    if state is not None:
        parent = SpanContext(
            parent.trace_id, parent.span_id, True, parent.trace_flags, trace_state=state
        )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def format_traceparent(context: SpanContext) -> str:
    """The W3C ``traceparent`` of a span context."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


_BATCH: contextvars.ContextVar[dict[int, SpanContext] | None] = contextvars.ContextVar(
    "tracing_batch", default=None
)
"""During a batch call: order id -> the span context of that order's message."""


def envelope_fields(order_id: object = None) -> dict[str, str]:
    """The trace fields for an event being built now (empty outside any span).

    Inside :func:`batch_spans`, the span of the message about ``order_id``; otherwise the
    current span (the request's, or the one message's being handled).
    """
    context: SpanContext | None = None
    batch = _BATCH.get()
    if batch is not None and isinstance(order_id, int):
        context = batch.get(order_id)
    if context is None:
        context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    fields = {TRACEPARENT: format_traceparent(context)}
    if context.trace_state:
        fields[TRACESTATE] = context.trace_state.to_header()
    return fields


def trace_id_of(span: Span) -> str:
    """The span's trace id as 32 hex digits, or '' when it has none (for log lines)."""
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""


def _tracer() -> trace.Tracer:
    return trace.get_tracer(INSTRUMENTATION)


_mint_ids: Any = None
"""Set by :func:`configure` without an endpoint: the SDK's id generator, and no SDK."""


def _start_span(name: str, context: Any, kind: SpanKind, attributes: dict[str, Any]) -> Span:
    """A new span: the SDK's when exporting; else ids only (nothing exported anyway).

    Without an endpoint an SDK span would be built, timed and attributed only to be
    dropped at ``end()``: the benchmark measured that at a quarter of a no-op consumer's
    speed. A non-recording span with a new span id (and the parent's trace id, or a new
    one) carries the same context onward at the cost of two random numbers.
    """
    if _mint_ids is None:
        return _tracer().start_span(name, context=context, kind=kind, attributes=attributes)
    parent = trace.get_current_span(context).get_span_context()
    if parent.is_valid:
        minted = SpanContext(
            parent.trace_id, _mint_ids.generate_span_id(), False, parent.trace_flags,
            parent.trace_state,
        )  # fmt: skip
    else:
        minted = SpanContext(
            _mint_ids.generate_trace_id(), _mint_ids.generate_span_id(), False,
            TraceFlags(TraceFlags.SAMPLED),
        )  # fmt: skip
    return NonRecordingSpan(minted)


@contextlib.contextmanager
def server_span(name: str, headers: Any, attributes: dict[str, Any]) -> Iterator[Span]:
    """The current span of one HTTP request, child of a valid incoming ``traceparent``.

    ``headers`` is the request's case-insensitive header mapping (werkzeug's
    ``Headers``: ``get``, and ``getlist`` when it has one). Two ``traceparent``
    headers are as invalid as a malformed one (W3C): a new trace starts.
    """
    getlist = getattr(headers, "getlist", None)
    if getlist is not None and len(getlist(TRACEPARENT)) > 1:
        parent = None
    else:
        parent = remote_parent(headers.get(TRACEPARENT), headers.get(TRACESTATE))
    span = _start_span(name, parent, SpanKind.SERVER, attributes)
    with trace.use_span(
        span, end_on_exit=True, record_exception=False, set_status_on_exception=False
    ):
        yield span


def message_attributes(
    event: Mapping[str, Any], destination: str, operation: str
) -> dict[str, Any]:
    """OpenTelemetry messaging attributes of one envelope on one queue or channel."""
    attributes: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
        "messaging.message.id": str(event.get("id", "")),
    }
    event_type = event.get("type")
    if isinstance(event_type, str):
        attributes["event.type"] = event_type
    data = event.get("data")
    order_id = data.get("order_id") if isinstance(data, dict) else None
    if isinstance(order_id, int):
        attributes["order.id"] = order_id
    return attributes


def start_message_span(
    event: Mapping[str, Any], destination: str, operation: str = "process"
) -> Span:
    """A span for one envelope (not made current): child of the envelope's context.

    ``operation`` is ``process`` (a consumer handling it: kind CONSUMER) or ``publish``
    (the relay re-publishing it: kind PRODUCER). The caller ends it.
    """
    kind = SpanKind.PRODUCER if operation == "publish" else SpanKind.CONSUMER
    context = remote_parent(event.get(TRACEPARENT), event.get(TRACESTATE))
    if _mint_ids is not None:  # nothing is exported: skip building the attributes too
        return _start_span("", context, kind, {})
    return _start_span(
        f"{operation} {destination}",
        context,
        kind,
        message_attributes(event, destination, operation),
    )


@contextlib.contextmanager
def consumer_span(event: Mapping[str, Any], queue: str) -> Iterator[Span]:
    """The current span while one message is handled (outcomes built inside carry it)."""
    span = start_message_span(event, queue)
    try:
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            yield span
    finally:
        span.end()


@contextlib.contextmanager
def batch_spans(events: list[dict[str, Any]], queue: str) -> Iterator[list[Span]]:
    """One consumer span per event of a batch handled in one call.

    While it is open, an outcome built for an order (:func:`envelope_fields` with its
    order id) carries the span of that order's message. The spans end on exit.
    """
    spans = [start_message_span(event, queue) for event in events]
    by_order: dict[int, SpanContext] = {}
    for event, span in zip(events, spans, strict=True):
        data = event.get("data")
        order_id = data.get("order_id") if isinstance(data, dict) else None
        if isinstance(order_id, int):
            by_order.setdefault(order_id, span.get_span_context())
    token = _BATCH.set(by_order)
    try:
        yield spans
    finally:
        _BATCH.reset(token)
        for span in spans:
            span.end()


def set_error(span: Span, description: str) -> None:
    """Mark a span failed (a message that will be retried or dead-lettered)."""
    span.set_status(Status(StatusCode.ERROR, description))


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a base endpoint (``<endpoint>/v1/traces``)."""
    return endpoint.rstrip("/") + "/v1/traces"


_provider: Any = None


def configure(service_name: str, endpoint: str) -> bool:
    """Install the OpenTelemetry SDK for this process; returns True when it exports.

    Call once, in the process that does the work (each gunicorn worker after its fork).
    ``endpoint`` is OTEL_EXPORTER_OTLP_ENDPOINT (empty: nothing exported);
    ``service_name`` is the spans' ``service.name`` (OTEL_SERVICE_NAME, or the process's
    name).
    """
    global _provider, _mint_ids
    if not endpoint:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        _mint_ids = RandomIdGenerator()
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def configure_process(settings: Settings, default_name: str) -> bool:
    """:func:`configure` from a process's settings (OTEL_* variables).

    With OTEL_SDK_DISABLED=true nothing is installed: OpenTelemetry's no-op tracer.
    """
    if settings.otel_sdk_disabled:
        return False
    return configure(settings.otel_service_name or default_name, settings.otel_endpoint)


def shutdown() -> None:
    """Export the spans still queued and stop the exporter (process exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
