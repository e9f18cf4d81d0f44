"""One trace per order, from POST /orders to every effect, across Python and Go.

Real processes on a real Redis: orders-api (gunicorn), a separate orders-relay, the
payment, invoice, shipping and email consumers, orders-updates and the Go subscriber,
all with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a real OTLP/HTTP receiver in this
test (:mod:`devtools.otlp_receiver`: protobuf export requests decoded with
opentelemetry-proto). Two orders:

- **B** arrives with a valid ``traceparent`` header: its trace id is the caller's, the
  request span is the caller's child, and the fast path publishes it.
- **A** arrives with a garbage ``traceparent`` header (a new trace starts, no 500 for
  it) and its first POST fails right after the commit (FAULT_POINT
  api.after_commit:raise, once per process): the relay publishes the stored row, and
  the consumers continue the trace the request started, from the outbox payload.

Every span of each order's trace is then checked: who made it and whose child it is
(PaymentCaptured's invoice and shipping spans are children of the payment span, the
shipped email of the shipping span).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from chaos import stack as chaos_stack
from devtools.otlp_receiver import OTLPReceiver, ReceivedSpan
from devtools.redis_server import RedisServer
from messaging import keys
from orders.models import Outbox
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import ORDER

pytestmark = pytest.mark.e2e

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
GARBAGE = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01;junk"
"""Upper case and trailing bytes: not W3C, so ignored (a new trace), never an error."""


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as running:
        yield running


class TracedStack(chaos_stack.Stack):
    """The e2e stack with tracing on, one API worker, and the relay as its own process."""

    def __init__(self, root: Path, redis: RedisServer, endpoint: str) -> None:
        super().__init__(
            root,
            redis=redis,
            workers_per_queue=1,
            proxy=False,
            common_env={
                "REDIS_CONNECT_ATTEMPTS": "100",
                "LOG_LEVEL": "INFO",
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            },
            api_env={
                "WEB_CONCURRENCY": "1",  # the fault fires once per process: once
                "RELAY_IN_PROCESS": "0",
                "RELAY_CLAIM_SECONDS": "1",
                "RATE_LIMIT_PER_MINUTE": "0",
                "FAULT_POINT": "api.after_commit:raise",
            },
            tuning={"CONSUMER_HEARTBEAT_TTL": "3"},
        )


def _post(url: str, key: str, traceparent: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(ORDER).encode(),
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "traceparent": traceparent,
            "tracestate": "congo=t61rcWkgMzE",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _one(spans: list[ReceivedSpan], service: str, name: str, **attrs: Any) -> ReceivedSpan:
    found = [
        s
        for s in spans
        if (s.service, s.name) == (service, name)
        and all(s.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, f"{service} {name} {attrs}: {len(found)} spans in {spans}"
    return found[0]


def test_one_trace_per_order_from_post_to_every_effect_across_python_and_go(
    tmp_path: Path,
    redis_server_factory: Callable[..., RedisServer],
    go_subscriber_binary: Path,
    receiver: OTLPReceiver,
) -> None:
    stack = TracedStack(tmp_path / "stack", redis_server_factory(), receiver.endpoint)
    relay: Proc | None = None
    sub: Proc | None = None
    try:
        stack.start()
        relay = Proc(
            [str(BIN / "orders-relay")],
            {**stack.common, "RELAY_INTERVAL": "0.2", "RELAY_CLAIM_SECONDS": "1"},
            tmp_path / "relay.log",
        )
        sub = Proc(
            [str(go_subscriber_binary)],
            {
                "REDIS_URL": stack.redis.url,
                "PATTERN": "both",
                "ORDER_CHANNEL": keys.ORDER_EVENTS_CHANNEL,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            },
            tmp_path / "sub.log",
        )
        sub.wait_output(f"Successfully subscribed to '{keys.ORDER_EVENTS_CHANNEL}' channel")
        relay.wait_output("Outbox relay started")

        url = stack.base + "/orders"
        first, _ = _post(url, "trace-a", GARBAGE)
        assert first == 500, "FAULT_POINT api.after_commit:raise did not fire"
        status_a, order_a = _post(url, "trace-a", GARBAGE)  # the client's retry
        assert status_a == 200
        status_b, order_b = _post(url, "trace-b", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
        assert status_b == 201
        ids = [order_a["id"], order_b["id"]]
        wait_for(lambda: stack.completed(ids) == set(ids), 120, 0.2, "both orders completed")
        with Session(stack.engine) as session:
            stored = {
                json.loads(p)["data"]["order_id"]: json.loads(p)
                for p in session.scalars(select(Outbox.payload))
            }
        trace_a = stored[order_a["id"]]["traceparent"].split("-")[1]
        assert stored[order_b["id"]]["traceparent"].split("-")[1] == CALLER_TRACE
        assert trace_a != CALLER_TRACE  # garbage is not continued: a new trace
        # Six events per order on the channel: the Go subscriber shows each trace id 6x.
        for trace_id in (trace_a, CALLER_TRACE):
            sub.wait_output(f"trace: {trace_id})", timeout=60, count=6)
    finally:
        for proc in (sub, relay):
            if proc is not None:
                assert proc.terminate(20.0) == 0, proc.output()
        stack.stop()  # SIGTERM: each process exports the spans it still holds

    logs = stack.logs() + (relay.output() if relay else "") + (sub.output() if sub else "")
    # The one traceback is the injected fault's (the 500 of A's first POST).
    assert stack.logs().count("Traceback") == 1, stack.logs()
    assert "messaging.faults.FaultInjected: fault injected at api.after_commit" in stack.logs()
    assert "junk" not in logs  # ignored, not logged or copied anywhere
    spans = receiver.spans()
    for trace_id, relayed in ((trace_a, True), (CALLER_TRACE, False)):
        mine = [s for s in spans if s.trace_id == trace_id]
        assert Counter(s.service for s in mine) == {
            "orders-api": 1,
            **({"orders-relay": 1} if relayed else {}),
            "payment-service": 1,
            "invoice-service": 1,
            "shipping-service": 1,
            "email-service": 2,  # received, shipped
            "orders-updates": 5,  # captured, invoiced, shipped, 2 x notified
            "go-subscriber": 6,  # every event on the order channel
        }, mine
        post = _one(mine, "orders-api", "POST /orders")
        payment = _one(mine, "payment-service", "process payment")
        invoice = _one(mine, "invoice-service", "process invoice")
        shipping = _one(mine, "shipping-service", "process shipping")
        shipped_mail = _one(
            mine, "email-service", "process email", **{"event.type": "ShipmentBooked"}
        )
        received_mail = _one(
            mine, "email-service", "process email", **{"event.type": "OrderPlaced"}
        )
        assert payment.parent_span_id == post.span_id
        assert received_mail.parent_span_id == post.span_id
        assert invoice.parent_span_id == payment.span_id  # PaymentCaptured carried it on
        assert shipping.parent_span_id == payment.span_id
        assert shipped_mail.parent_span_id == shipping.span_id
        updates = [s for s in mine if s.service == "orders-updates"]
        assert {s.parent_span_id for s in updates} <= {
            payment.span_id, invoice.span_id, shipping.span_id,
            received_mail.span_id, shipped_mail.span_id,
        }  # fmt: skip
        go = [s for s in mine if s.service == "go-subscriber"]
        assert {s.name for s in go} == {f"receive {keys.ORDER_EVENTS_CHANNEL}"}
        assert {s.parent_span_id for s in go} == {
            post.span_id, payment.span_id, invoice.span_id, shipping.span_id,
            received_mail.span_id, shipped_mail.span_id,
        }  # fmt: skip
        if relayed:
            assert post.attributes["error.type"] == "FaultInjected"  # A's first POST
            assert post.parent_span_id == ""  # the garbage header was ignored
            publish = _one(mine, "orders-relay", "publish OrderPlaced")
            assert publish.parent_span_id == post.span_id
        else:
            assert post.attributes["http.response.status_code"] == 201
            assert post.parent_span_id == CALLER_SPAN
            assert post.trace_state == "congo=t61rcWkgMzE"
