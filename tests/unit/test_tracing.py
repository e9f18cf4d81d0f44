"""W3C trace context: strict parsing, what an envelope carries, the OTEL_* settings."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import TraceState
from werkzeug.datastructures import Headers

from messaging import envelope, tracing
from messaging.config import ConfigError, Settings

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (VALID, True),
        (f"00-{TRACE}-{SPAN}-00", True),  # not sampled: still a context
        (VALID + "\n", False),
        (" " + VALID, False),
        (VALID + "-extra", False),  # a future version's fields: version 00 has none
        (VALID.upper(), False),
        (f"00-{'0' * 32}-{SPAN}-01", False),
        (f"00-{TRACE}-{'0' * 16}-01", False),
        (f"ff-{TRACE}-{SPAN}-01", False),
        (f"01-{TRACE}-{SPAN}-01", False),
        (f"00-{TRACE}-{SPAN[:-1]}-01", False),
        (TRACE, False),
        ("", False),
        (None, False),
        (42, False),
        ("00-" + "é" * 32 + f"-{SPAN}-01", False),
    ],
)
def test_traceparent_is_parsed_strictly(value: object, valid: bool) -> None:
    parsed = tracing.parse_traceparent(value)
    assert (parsed is not None) == valid
    if parsed is not None:
        assert tracing.format_traceparent(parsed) == value
        assert parsed.is_remote


@pytest.mark.parametrize(
    ("value", "members"),
    [
        ("congo=t61rcWkgMzE", [("congo", "t61rcWkgMzE")]),
        ("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7", [("congo", "t61rcWkgMzE"), ("rojo", SPAN)]),
        ("t@vendor=1,,a=2", [("t@vendor", "1"), ("a", "2")]),  # empty members are skipped
        ("Congo=1", None),
        ("congo=", None),
        ("congo=1,congo=2", None),  # a key twice
        ("congo=1\n", None),
        ("a=1," * 33, None),  # more than 32 members
        ("a=" + "x" * 600, None),
        ("", None),
        (None, None),
    ],
)
def test_tracestate_is_validated_whole(
    value: object, members: list[tuple[str, str]] | None
) -> None:
    parsed = tracing.parse_tracestate(value)
    assert (None if parsed is None else list(parsed.items())) == members


def test_an_event_built_in_a_span_carries_its_context_and_outside_none() -> None:
    tracer = TracerProvider().get_tracer("test")  # a local SDK: the global stays no-op
    placed = {"order_id": 7}
    assert "traceparent" not in envelope.envelope(
        envelope.ORDER_PLACED, placed, message="m", sender="s", count=7
    )
    parent = tracing.remote_parent(VALID, "congo=t61rcWkgMzE")
    with tracer.start_as_current_span("POST /orders", context=parent) as span:
        event = envelope.envelope(envelope.ORDER_PLACED, placed, message="m", sender="s", count=7)
    context = span.get_span_context()
    assert f"{context.trace_id:032x}" == TRACE and f"{context.span_id:016x}" != SPAN
    assert event["traceparent"] == tracing.format_traceparent(context)
    assert event["tracestate"] == "congo=t61rcWkgMzE"
    assert list(event) == [
        "id", "timestamp", "message", "sender", "count", "type", "version",
        "traceparent", "tracestate", "data",
    ]  # fmt: skip


def test_without_the_sdk_a_parent_is_passed_through_and_nothing_is_minted() -> None:
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    with tracing.consumer_span({"id": "e", "traceparent": VALID, "data": {}}, "payment"):
        assert tracing.envelope_fields(1) == {"traceparent": VALID}
    with tracing.consumer_span({"id": "e", "traceparent": "garbage", "data": {}}, "payment"):
        assert tracing.envelope_fields(1) == {}


def test_a_batch_gives_each_order_the_span_of_its_own_message() -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    events = [
        {"id": "a", "traceparent": VALID, "data": {"order_id": 1}},
        {"id": "b", "traceparent": other, "data": {"order_id": 2}},
    ]
    with tracing.batch_spans(events, "invoice"):
        assert tracing.envelope_fields(1) == {"traceparent": VALID}
        assert tracing.envelope_fields(2) == {"traceparent": other}
        assert tracing.envelope_fields(3) == {}
    assert tracing.envelope_fields(1) == {}


def test_two_traceparent_headers_start_a_new_trace() -> None:
    headers = Headers([("traceparent", VALID), ("traceparent", VALID)])
    with tracing.server_span("POST /orders", headers, {}):
        assert tracing.envelope_fields() == {}
    with tracing.server_span("POST /orders", Headers([("traceparent", VALID)]), {}):
        assert tracing.envelope_fields() == {"traceparent": VALID}


def test_tracestate_header_of_an_envelope_round_trips() -> None:
    state = TraceState([("congo", "t61rcWkgMzE"), ("rojo", SPAN)])
    assert tracing.parse_tracestate(state.to_header()) == state


@pytest.mark.parametrize(
    "endpoint", ["localhost:4318", "ftp://collector", "http://", "http://host:port"]
)
def test_a_bad_otlp_endpoint_is_bad_config(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="invalid OTEL_EXPORTER_OTLP_ENDPOINT"):
        Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})


def test_otel_settings() -> None:
    settings = Settings.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/", "OTEL_SERVICE_NAME": "pay-eu"}
    )
    assert (settings.otel_endpoint, settings.otel_service_name) == (
        "http://127.0.0.1:4318/",
        "pay-eu",
    )
    assert tracing.traces_url(settings.otel_endpoint) == "http://127.0.0.1:4318/v1/traces"
    assert Settings.from_env({}).otel_endpoint == ""


def test_without_an_endpoint_spans_are_ids_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    monkeypatch.setattr(tracing, "_mint_ids", RandomIdGenerator())  # what configure() sets
    with tracing.consumer_span({"id": "e", "traceparent": VALID, "data": {}}, "payment") as span:
        child = tracing.envelope_fields()["traceparent"]
    assert not span.is_recording()
    assert child.startswith(f"00-{TRACE}-") and child.endswith("-01") and SPAN not in child
    with tracing.server_span("POST /orders", Headers([("traceparent", "garbage")]), {}):
        root = tracing.parse_traceparent(tracing.envelope_fields()["traceparent"])
    assert root is not None and f"{root.trace_id:032x}" != TRACE and root.trace_flags == 1
