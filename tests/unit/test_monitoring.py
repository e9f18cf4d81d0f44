"""Dashboard, metrics, admin and log pieces without I/O."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from consumers.config import ConsumerSettings
from messaging import envelope, logs, monitor
from messaging import metrics as consumer_metrics
from messaging.worker import Worker
from ops.admin import event_line, printable, queues_table
from orders.config import OrderServiceSettings
from orders.stream import sse_event


def test_rate_meter_measures_between_readings() -> None:
    meter = monitor.RateMeter()
    assert meter.rate("payment", 10, now=100.0) is None  # first reading
    assert meter.rate("payment", 40, now=102.0) == 15.0
    assert meter.rate("invoice", 5, now=102.0) is None  # per queue
    assert meter.rate("payment", 0, now=103.0) is None  # counter reset
    assert meter.rate("payment", 0, now=103.0) is None  # no time passed


def test_letter_ids_are_stable_short_hashes() -> None:
    assert monitor.letter_id(b'{"a":1}') == monitor.letter_id('{"a":1}')
    assert len(monitor.letter_id(b"x")) == monitor.LETTER_ID_LENGTH
    assert monitor.letter_id(b"x") != monitor.letter_id(b"y")


def test_unknown_queue_is_rejected() -> None:
    assert monitor.check_queue("order-updates") == "order-updates"
    with pytest.raises(monitor.UnknownQueue, match="unknown queue 'noop'"):
        monitor.check_queue("noop")


@pytest.mark.parametrize(
    ("data", "event", "expected"),
    [
        ("x", None, "data: x\n\n"),
        ("a\nb", "msg", "event: msg\ndata: a\ndata: b\n\n"),
        ("a\r\nb\rc", None, "data: a\ndata: b\ndata: c\n\n"),  # no way to end an event early
        ("", None, "data: \n\n"),
    ],
)
def test_sse_event_framing(data: str, event: str | None, expected: str) -> None:
    assert sse_event(data, event) == expected


def test_printable_escapes_terminal_control_characters() -> None:
    assert printable("ok é") == "ok é"
    assert printable("\x1b[2Jgone\n") == "\\x1b[2Jgone\\n"


def test_event_line() -> None:
    event = envelope.envelope(
        envelope.INVOICE_ISSUED, {"order_id": 3}, message="Invoice\x07", sender="s", count=3
    )
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    line = event_line(envelope.dumps(event).encode(), at)
    assert line == f"03:04:05.678  InvoiceIssued          order #3     {event['id']}  Invoice\\x07"
    assert event_line(b"\xffjunk", at) == "03:04:05.678  (not an event)  \ufffdjunk"
    assert event_line(b"[1,2]", at) == "03:04:05.678  (not an event)  [1,2]"


def test_queues_table_aligns_columns() -> None:
    figures = [
        monitor.QueueFigures("payment", 3, 2, 1, 2, 1, 3, 1, 2, 1),
        monitor.QueueFigures("order-updates", 0, 0, 0, 0, 12345, 0, 0, 0, 0),
    ]
    table = queues_table(figures, {"payment": 2.25, "order-updates": None}).splitlines()
    assert table[0].startswith("queue          pending  in flight")
    assert table[1].split() == ["payment", "3", "2", "1", "2", "1", "3", "1", "2.2"]
    assert table[2].split() == ["order-updates", "0", "0", "0", "0", "12345", "0", "0", "-"]
    assert len({len(line) for line in table}) == 1


def test_event_age() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    stamp = (now - timedelta(seconds=2.5)).isoformat()
    assert consumer_metrics.event_age({"timestamp": stamp}, now) == 2.5
    assert consumer_metrics.event_age({"timestamp": "2026-01-01T00:00:00"}, now) is None
    assert consumer_metrics.event_age({"timestamp": "soon"}, now) is None
    assert consumer_metrics.event_age({}, now) is None
    future = (now + timedelta(seconds=1)).isoformat()
    assert consumer_metrics.event_age({"timestamp": future}, now) == 0.0  # clock skew


def test_settings_of_the_dashboard_and_metrics() -> None:
    s = OrderServiceSettings.from_env({})
    assert (s.stream_max_seconds, s.stream_keepalive_seconds, s.metrics_dir) == (300.0, 15.0, "")
    assert s.web_threads == 8
    assert ConsumerSettings.from_env({}).worker.metrics_port == 0
    assert ConsumerSettings.from_env({"METRICS_PORT": "9101"}).worker.metrics_port == 9101
    with pytest.raises(ValueError, match="invalid METRICS_PORT"):
        ConsumerSettings.from_env({"METRICS_PORT": "http"})


class _OneShot:
    queue = "payment"
    accepts = frozenset({envelope.ORDER_PLACED})

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        return []


class _NoPublisher:
    def publish(self, event: dict[str, Any]) -> None:
        raise AssertionError("no outcomes expected")


def test_handled_event_is_one_json_log_line_with_event_and_order_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # On success handle_one only needs the queue's name (the ack is the caller's).
    queue = SimpleNamespace(name="payment")
    worker = Worker(queue, _OneShot(), _NoPublisher(), worker_id="w-1")  # type: ignore[arg-type]
    event = envelope.envelope(
        envelope.ORDER_PLACED, {"order_id": 42}, message="m", sender="t", count=1
    )
    raw = envelope.dumps(event).encode()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("json", "INFO")
        before = consumer_metrics.HANDLED.labels("payment", "handled")._value.get()
        assert worker.handle_one(raw)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    handled = [line for line in lines if "handled event" in line["msg"]]
    assert len(handled) == 1
    assert handled[0]["event_id"] == event["id"]
    assert handled[0]["order_id"] == 42
    assert (handled[0]["queue"], handled[0]["worker"]) == ("payment", "w-1")
    assert handled[0]["msg"] == f"payment: handled event {event['id']} order #42"
    assert consumer_metrics.HANDLED.labels("payment", "handled")._value.get() == before + 1
