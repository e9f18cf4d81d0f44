"""Consumers without Redis: backoff, failure classification, parsing, idempotent handlers.

The handlers run against a real SQLite file in tmp_path (no Redis, no network).
"""

from __future__ import annotations

import email
import email.policy
import json
import random
import smtplib
import uuid
from collections import Counter
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from consumers import shipping, store
from consumers.config import ConsumerSettings
from consumers.email import (
    EmailHandler,
    RecipientUnknown,
    WirePolicy,
    _text_part,
    message_id,
    render,
    wire_bytes,
)
from consumers.handler import order_of, stable_event_id
from consumers.invoice import InvoiceHandler
from consumers.payment import GatewayUnavailable, PaymentHandler, SimulatedGateway, payment_key
from consumers.shipping import ShippingHandler
from messaging import envelope
from messaging.config import ConfigError
from messaging.queue import (
    MalformedMessage,
    PermanentError,
    RetryableError,
    backoff,
    classify,
    parse,
)


def order_placed(order_id: int = 1, email: str = "ann@example.com", **data: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "order_id": order_id,
        "customer_email": email,
        "currency": "EUR",
        "lines": [
            {"sku": "<b>A&B</b>", "quantity": 2, "unit_price": "5.00", "line_total": "10.00"}
        ],
        "total": "10.00",
        **data,
    }
    return envelope.envelope(
        envelope.ORDER_PLACED, payload, message="placed", sender="orders-api", count=order_id
    )


def captured(order_id: int = 1, amount: str = "10.00") -> dict[str, Any]:
    return envelope.envelope(
        envelope.PAYMENT_CAPTURED,
        {"order_id": order_id, "payment_id": "pay_1", "amount": amount, "currency": "EUR"},
        message="captured",
        sender="payment-service",
        count=order_id,
    )


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'consumers.db'}")
    for service in store.SERVICE_TABLES:  # one file for these unit tests
        store.create_tables(engine, service)
    return engine


def count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# --- backoff -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)]
)
def test_backoff_is_exponential_with_full_jitter_and_capped(attempt: int, ceiling: float) -> None:
    assert backoff(attempt, 1.0, 60.0, rand=lambda: 0.0) == 0.0
    assert backoff(attempt, 1.0, 60.0, rand=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
    rng = random.Random(attempt)
    draws = [backoff(attempt, 1.0, 60.0, rand=rng.random) for _ in range(200)]
    assert all(0.0 <= d <= ceiling for d in draws)
    assert max(draws) > ceiling / 2 > min(draws)  # spread over the range, not fixed


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff(0)


# --- what is retried, what is dead-lettered -------------------------------------


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (PermanentError("invalid data"), "dead"),
        (MalformedMessage("not JSON"), "dead"),
        (RetryableError("later"), "transient"),
        (GatewayUnavailable("timeout"), "transient"),
        (OSError("connection refused"), "transient"),
        (ConnectionRefusedError(111, "Connection refused"), "transient"),
        (TimeoutError("timed out"), "transient"),
        (smtplib.SMTPServerDisconnected("gone"), "transient"),
        (smtplib.SMTPResponseException(451, b"try again later"), "transient"),
        (smtplib.SMTPResponseException(554, b"rejected"), "dead"),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (550, b"no such user")}), "dead"),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (450, b"mailbox busy")}), "transient"),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("refused")), "transient"),
        (sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("unique")), "retry"),
        (FileNotFoundError("no such file"), "retry"),
        (KeyError("a bug"), "retry"),  # retried, then dead after the last attempt
    ],
)
def test_classify(exc: BaseException, verdict: str) -> None:
    assert classify(exc) == verdict


ACCEPTS = frozenset({envelope.ORDER_PLACED})


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xc3\x28", "not UTF-8"),
        (b"{", "not JSON"),
        (b'"a string"', "JSON str, not an object"),
        (b"null", "JSON NoneType, not an object"),
        (b'{"type":"OrderPlaced","version":1,"data":{}}', "no id"),
        (b'{"id":"","type":"OrderPlaced","version":1,"data":{}}', "no id"),
        (b'{"id":"x","version":1,"data":{}}', "no type"),
        (b'{"id":"' + b"7" * 37 + b'","type":"OrderPlaced","version":1,"data":{}}', "longer"),
        (b'{"id":"x","type":"InvoiceIssued","version":1,"data":{}}', "unknown event type"),
        (b'{"id":"x","type":"OrderPlaced","data":{}}', "unsupported version None"),
        (b'{"id":"x","type":"OrderPlaced","version":"1","data":{}}', "unsupported version '1'"),
        (b'{"id":"x","type":"OrderPlaced","version":1,"data":[]}', "no data object"),
    ],
)
def test_parse_classifies_malformed_messages(raw: bytes, error: str) -> None:
    with pytest.raises(MalformedMessage, match=error):
        parse(raw, ACCEPTS)


def test_parse_accepts_a_valid_envelope() -> None:
    event = order_placed(3)
    assert parse(envelope.dumps(event).encode(), ACCEPTS) == event


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"order_id": "1"}, "order_id"),
        ({"order_id": True}, "order_id"),
        ({"order_id": 0}, "order_id"),
        # beyond any order id (a 32-bit key): bad data, not a database error to retry
        ({"order_id": 2**31}, "order_id"),
        ({"order_id": 10**30}, "order_id"),
        ({"customer_email": "nobody"}, "customer_email"),
        ({"currency": "eur"}, "currency"),
        ({"total": 10.0}, "total"),
        ({"lines": []}, "lines"),
    ],
)
def test_invalid_order_data_is_permanent(data: dict[str, Any], error: str) -> None:
    event = order_placed(1)
    event["data"].update(data)
    with pytest.raises(PermanentError, match=error):
        order_of(event)


@pytest.mark.parametrize("order_id", [2**31, 10**30])
def test_an_order_id_beyond_any_order_is_dead_lettered_at_once_by_every_consumer(
    engine: Engine, order_id: int
) -> None:
    """Every handler refuses it as permanent (one attempt, a dead letter with the
    field named) instead of raising the driver's OverflowError, retried until the
    attempts run out."""
    from consumers.invoice import InvoiceHandler
    from consumers.shipping import ShippingHandler

    for handler in (InvoiceHandler(engine), ShippingHandler(engine)):
        with pytest.raises(PermanentError, match="order_id"):
            handler.handle(captured(order_id))


# --- configuration ---------------------------------------------------------------


def test_consumer_settings_defaults() -> None:
    s = ConsumerSettings.from_env({}, service="payment")
    w = s.worker
    assert (w.concurrency, w.batch_size, w.max_attempts, w.heartbeat_ttl) == (1, 10, 5, 10)
    assert (s.smtp_host, s.smtp_port, s.email_from) == ("localhost", 1025, "orders@example.com")
    assert s.database_url == "sqlite:///var/payment.db"  # its own, not the order service's
    assert ConsumerSettings.from_env({}, service="invoice").database_url == (
        "sqlite:///var/invoice.db"
    )
    assert ConsumerSettings.from_env({}, service="noop").database_url == ""


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CONSUMER_CONCURRENCY": "0"}, "invalid CONSUMER_CONCURRENCY '0'"),
        ({"CONSUMER_MAX_ATTEMPTS": "many"}, "invalid CONSUMER_MAX_ATTEMPTS 'many'"),
        ({"PAYMENT_DECLINE_RATE": "1.5"}, "invalid PAYMENT_DECLINE_RATE '1.5'"),
        ({"SMTP_PORT": "0"}, "invalid SMTP_PORT"),
        ({"EMAIL_FROM": "orders"}, "invalid EMAIL_FROM"),
        ({"EMAIL_FROM": "orders@example.com\r\nBcc: x@evil.example"}, "invalid EMAIL_FROM"),
        ({"PAYMENT_DATABASE_URL": "mysql://x"}, "invalid PAYMENT_DATABASE_URL"),
        ({"PATTERN": "nope"}, "invalid PATTERN"),
    ],
)
def test_consumer_settings_bad_values_are_one_line(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConsumerSettings.from_env(env, service="payment")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


# --- idempotent handlers ---------------------------------------------------------


def test_payment_twice_charges_once_and_returns_the_stored_outcome(engine: Engine) -> None:
    handler = PaymentHandler(engine, SimulatedGateway(engine))
    event = order_placed(1)
    first = handler.handle(event)
    second = handler.handle(event)
    assert first == second  # the same outcome event, same id: re-emitted, not redone
    [captured] = first
    assert captured["type"] == envelope.PAYMENT_CAPTURED
    assert captured["data"]["amount"] == "10.00"
    assert captured["count"] == 1
    assert count(engine, store.GatewayCharge) == 1
    with Session(engine) as session:
        assert session.get(store.GatewayCharge, payment_key(1)).calls == 1  # type: ignore[union-attr]


def test_gateway_ledger_answers_a_repeated_key_without_charging_again(engine: Engine) -> None:
    """A crash after the charge but before our commit: the retry gets the first answer."""
    gateway = SimulatedGateway(engine)
    one = gateway.charge("key-1", order_id=1, amount="1.00", currency="EUR", email="a@b.c")
    two = gateway.charge("key-1", order_id=1, amount="1.00", currency="EUR", email="a@b.c")
    assert one == two and one.status == "captured"
    assert count(engine, store.GatewayCharge) == 1


def test_payment_magic_emails(engine: Engine) -> None:
    handler = PaymentHandler(engine, SimulatedGateway(engine, flaky_calls=2))
    [declined] = handler.handle(order_placed(1, email="decline@example.com"))
    assert declined["type"] == envelope.PAYMENT_DECLINED
    assert declined["data"] == {
        "order_id": 1,
        "reason": "card declined by issuer",
        "amount": "10.00",
        "currency": "EUR",
    }
    flaky = order_placed(2, email="flaky@example.com")
    for _ in range(2):
        with pytest.raises(GatewayUnavailable):
            handler.handle(flaky)
    [captured] = handler.handle(flaky)
    assert captured["type"] == envelope.PAYMENT_CAPTURED


def test_seeded_gateway_decisions_are_deterministic(tmp_path: Path) -> None:
    def outcomes(name: str) -> list[str]:
        engine = store.make_engine(f"sqlite:///{tmp_path / name}")
        store.create_tables(engine, "payment")
        gateway = SimulatedGateway(engine, decline_rate=0.5, seed="s1")
        return [
            gateway.charge(f"k{i}", order_id=i, amount="1.00", currency="EUR", email="a@b.c").status
            for i in range(40)
        ]

    first, second = outcomes("a.db"), outcomes("b.db")
    assert first == second
    assert 5 < first.count("declined") < 35  # the rate is honoured, roughly


def test_invoice_twice_issues_one_invoice(engine: Engine) -> None:
    handler = InvoiceHandler(engine)
    event = captured(9, amount="12.50")
    first = handler.handle(event)
    assert handler.handle(event) == first
    # A second capture of the same order (never expected) still yields the one invoice,
    # reported under the same event id.
    assert handler.handle(captured(9)) == first
    assert count(engine, store.Invoice) == 1
    [issued] = first
    assert issued["data"]["invoice_number"].endswith("-000001")
    assert issued["data"]["total"] == "12.50"
    assert issued["id"] == stable_event_id(envelope.INVOICE_ISSUED, 9)


def test_invoice_numbers_are_consecutive(engine: Engine) -> None:
    handler = InvoiceHandler(engine)
    numbers = [handler.handle(captured(i))[0]["data"]["invoice_number"] for i in range(1, 6)]
    assert [int(n.rsplit("-", 1)[1]) for n in numbers] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("handler_class", [InvoiceHandler, ShippingHandler])
def test_invoice_and_shipping_refuse_order_placed(engine: Engine, handler_class: type[Any]) -> None:
    """They work on PaymentCaptured only: an OrderPlaced on their queue is malformed."""
    handler = handler_class(engine)
    assert handler.accepts == frozenset({envelope.PAYMENT_CAPTURED})
    with pytest.raises(MalformedMessage, match="OrderPlaced"):
        parse(json.dumps(order_placed(1)).encode(), handler.accepts)


def test_tracking_numbers_are_random_in_the_carriers_alphabet() -> None:
    numbers = [shipping.tracking_number() for _ in range(2000)]
    assert len(set(numbers)) == len(numbers)
    assert all(n[:2] == "1Z" and len(n) == 18 for n in numbers)
    used = Counter(ch for n in numbers for ch in n[2:])
    assert set(used) == set(shipping._TRACKING_ALPHABET)  # every character, no other
    assert max(used.values()) < 2 * min(used.values())  # about uniform (~941 each)


def test_shipping_books_one_shipment_per_order(engine: Engine) -> None:
    handler = ShippingHandler(engine)
    event = captured(5)
    [booked] = handler.handle(event)
    assert booked["type"] == envelope.SHIPMENT_BOOKED
    assert booked["id"] == stable_event_id(envelope.SHIPMENT_BOOKED, 5)
    data = booked["data"]
    assert data["order_id"] == 5 and data["carrier"] == "SimParcel"
    assert data["tracking_number"].startswith("1Z") and len(data["tracking_number"]) == 18
    assert handler.handle(event) == [booked]  # redelivered: the stored outcome
    assert handler.handle(captured(5)) == [booked]  # another capture: the same shipment
    [other] = handler.handle(captured(6))
    assert other["data"]["tracking_number"] != data["tracking_number"]
    assert count(engine, store.Shipment) == 2


def test_shipment_unique_per_order_is_enforced_by_the_table(engine: Engine) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        for n in (1, 2):
            session.add(
                store.Shipment(
                    shipment_id=f"s{n}", order_id=7, carrier="c", tracking_number=f"t{n}",
                    event_id=f"e{n}",
                )
            )  # fmt: skip


def declined(order_id: int = 1) -> dict[str, Any]:
    return envelope.envelope(
        envelope.PAYMENT_DECLINED,
        {"order_id": order_id, "reason": "card declined", "amount": "10.00", "currency": "EUR"},
        message="declined",
        sender="payment-service",
        count=order_id,
    )


def shipment_booked(order_id: int = 1) -> dict[str, Any]:
    return envelope.envelope(
        envelope.SHIPMENT_BOOKED,
        {"order_id": order_id, "shipment_id": "s", "carrier": "SimParcel",
         "tracking_number": "1ZTRACK<&>"},
        message="booked",
        sender="shipping-service",
        count=order_id,
    )  # fmt: skip


def _received(msg: Message | bytes) -> EmailMessage:
    """What a receiver reads: the bytes SMTP carries, parsed by the modern API."""
    raw = msg if isinstance(msg, bytes) else wire_bytes(msg)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_email_is_rendered_escaped_with_a_stable_message_id() -> None:
    event = order_placed(4)
    recipient = store.Recipient(order_id=4, email="ann@example.com", currency="EUR", total="10.00")
    msg = _received(render(event, recipient, step="received", sender="orders@example.com"))
    assert msg["Message-ID"] == "<order-4.received@example.com>"  # per order and step
    assert message_id(4, "received", "orders@example.com") == msg["Message-ID"]
    html_part = msg.get_body(("html",))
    text_part = msg.get_body(("plain",))
    assert html_part is not None and text_part is not None
    assert "&lt;b&gt;A&amp;B&lt;/b&gt;" in html_part.get_content()
    assert "<b>A&B</b>" in text_part.get_content()  # plain text is not HTML
    assert "Total: 10.00 EUR" in text_part.get_content()
    shipped = _received(
        render(shipment_booked(4), recipient, step="shipped", sender="orders@example.com")
    )
    assert "1ZTRACK&lt;&amp;&gt;" in shipped.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Tracking number: 1ZTRACK<&>" in shipped.get_body(("plain",)).get_content()  # type: ignore[union-attr]


class _Outbox(EmailHandler):
    """The real handler with SMTP replaced by a list (unit tests: no network)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, host="unused", port=0, sender="orders@example.com")
        self.sent: list[Any] = []

    def send(self, msg: Any, to: str) -> None:
        assert msg["To"] == to
        self.sent.append(_received(msg))  # as the SMTP server gets it


def test_email_tells_each_step_once(engine: Engine) -> None:
    handler = _Outbox(engine)
    placed = order_placed(3)
    for event in (placed, placed, shipment_booked(3), shipment_booked(3)):
        [notified] = handler.handle(event)
        assert notified["type"] == envelope.CUSTOMER_NOTIFIED
    subjects = [m["Subject"] for m in handler.sent]
    assert subjects == ["We received your order #3", "Your order #3 has shipped"]
    assert notified["data"] == {
        "order_id": 3,
        "step": "shipped",
        "message_id": "<order-3.shipped@example.com>",
    }
    assert notified["id"] == stable_event_id(envelope.CUSTOMER_NOTIFIED, 3, "shipped")
    assert count(engine, store.EmailSent) == 2


def test_email_for_a_declined_order(engine: Engine) -> None:
    handler = _Outbox(engine)
    handler.handle(order_placed(8, email="decline@example.com"))
    [notified] = handler.handle(declined(8))
    assert notified["data"]["step"] == "payment_declined"
    [received, cancelled] = handler.sent
    assert cancelled["To"] == "decline@example.com"
    assert cancelled["Subject"] == "Your order #8 is cancelled: payment declined"
    assert "10.00 EUR" in cancelled.get_body(("plain",)).get_content()


def test_a_step_before_order_placed_is_retried(engine: Engine) -> None:
    """ShipmentBooked overtook OrderPlaced (its send is being retried): no address yet."""
    handler = _Outbox(engine)
    with pytest.raises(RecipientUnknown):
        handler.handle(shipment_booked(2))
    assert classify(RecipientUnknown("x")) == "transient"
    handler.handle(order_placed(2))
    handler.handle(shipment_booked(2))
    assert [m["Subject"] for m in handler.sent][-1] == "Your order #2 has shipped"


def test_process_once_keeps_the_first_outcome(engine: Engine) -> None:
    event = order_placed(1)
    first, new = store.process_once(engine, "q", event, lambda _s: [{"n": 1}])
    second, again = store.process_once(engine, "q", event, lambda _s: [{"n": 2}])
    assert (first, new, second, again) == ([{"n": 1}], True, [{"n": 1}], False)
    assert json.loads(json.dumps(second)) == [{"n": 1}]


def test_a_header_value_that_could_end_the_header_block_is_refused() -> None:
    recipient = store.Recipient(order_id=4, email="ann@example.com", currency="EUR", total="1")
    for sender in ("orders@example.com\r\nBcc: x@evil.example", "orders@exämple.com"):
        with pytest.raises(PermanentError, match="refused header"):
            render(order_placed(4), recipient, step="received", sender=sender)
    bad = store.Recipient(order_id=4, email="ann@example.com\nBcc: x@e.x", currency="E", total="1")
    with pytest.raises(PermanentError, match="refused header"):
        render(order_placed(4), bad, step="received", sender="orders@example.com")


def test_a_non_ascii_body_is_quoted_printable_utf8() -> None:
    recipient = store.Recipient(order_id=5, email="ann@example.com", currency="EUR", total="1")
    event = shipment_booked(5)
    event["data"]["carrier"] = "Zustellung Müller"
    raw = wire_bytes(render(event, recipient, step="shipped", sender="orders@example.com"))
    assert b"quoted-printable" in raw and "Müller".encode() not in raw
    assert "Müller" in _received(raw).get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_no_line_of_an_email_is_longer_than_smtp_allows() -> None:
    """SMTP refuses a line over 998 characters with a 5xx (the sink does, as a real
    server would): a long order, a long value, every line still fits."""
    recipient = store.Recipient(order_id=6, email="ann@example.com", currency="EUR", total="1")
    event = order_placed(6)
    line = {"sku": "S" * 64, "quantity": 1, "unit_price": "1.00", "line_total": "1.00"}
    event["data"]["lines"] = [line] * 50
    raw = wire_bytes(render(event, recipient, step="received", sender="orders@example.com"))
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF line ends only, as SMTP counts them
    assert max(len(row) for row in raw.split(b"\r\n")) <= 998
    parsed = _received(raw)
    assert parsed.get_body(("html",)).get_content().count("S" * 64) == 50  # type: ignore[union-attr]
    shipped = shipment_booked(6)
    shipped["data"]["carrier"] = "C" * 2000  # one value longer than a line may be
    raw = wire_bytes(render(shipped, recipient, step="shipped", sender="orders@example.com"))
    assert max(len(row) for row in raw.split(b"\r\n")) <= 998
    assert "C" * 2000 in _received(raw).get_body(("plain",)).get_content()  # type: ignore[union-attr]


_STOCK_WIRE = email.policy.compat32.clone(linesep="\r\n")
"""What the email consumer's policy must write byte for byte (``compat32``, CRLF)."""


def test_the_wire_policy_writes_every_header_as_compat32_does() -> None:
    """Random values over all of ASCII (control characters, tabs, runs of spaces,
    encoded-word look-alikes, lengths around the fold): the same bytes or the same
    error as compat32, whichever path a value takes."""
    rng = random.Random(12)
    alphabet = [chr(c) for c in range(128) if chr(c) not in "\r\n"] + [" ", "\t", "=?"]

    def folded(policy: email.policy.Compat32, name: str, value: str) -> bytes | str:
        try:
            return policy.fold_binary(name, value)
        except Exception as exc:  # noqa: BLE001 - compared with compat32's
            return repr(exc)

    for _ in range(50_000):
        name = rng.choice(["Subject", "To", "From", "Message-ID", "Content-Type", "X-Long-Name"])
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
        assert folded(WirePolicy(linesep="\r\n"), name, value) == folded(_STOCK_WIRE, name, value)


@pytest.mark.parametrize("step", ["received", "payment_declined", "shipped"])
@pytest.mark.parametrize("carrier", ["SimParcel", "Zustellung Müller", "C" * 120, "a\tb  c"])
def test_every_email_is_the_bytes_compat32_would_write(step: str, carrier: str) -> None:
    recipient = store.Recipient(order_id=9, email="ann@example.com", currency="EUR", total="5")
    events = {
        "received": order_placed(
            9, lines=[{"sku": carrier, "quantity": 1, "unit_price": "5.00", "line_total": "5.00"}]
        ),  # fmt: skip
        "payment_declined": declined(9),
        "shipped": shipment_booked(9),
    }
    event = events[step]
    if step == "shipped":
        event["data"]["carrier"] = carrier
    msg = render(event, recipient, step=step, sender="Shop <orders@example.com>")
    assert wire_bytes(msg) == msg.as_bytes(policy=_STOCK_WIRE)


def test_an_ascii_part_is_the_bytes_mimetext_writes() -> None:
    """The 7bit part built directly is MIMEText's, byte for byte, alone and in a
    multipart, under the wire policy and compat32: random ASCII texts (control
    characters, "From " and "." at a line's start, CR and LF alone, lines near 998)."""
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + ["\n", "From ", ".", "=?utf-8?q?x?="]
    policies = [WirePolicy(linesep="\r\n"), _STOCK_WIRE, email.policy.compat32]
    for n in range(3000):
        size = rng.choice([0, 1, 40, 300, 997, 998, 999])
        text = "".join(rng.choice(alphabet) for _ in range(size))
        if n % 3 == 0:
            text += "\n"
        subtype = rng.choice(["plain", "html"])
        ours, stock = _text_part(text, subtype), MIMEText(text, subtype, "us-ascii")
        if any(len(line) > 998 for line in text.splitlines()):
            assert ours.get_content_charset() == "utf-8"  # quoted-printable: MIMEText's own
            continue
        for policy in policies:
            assert ours.as_bytes(policy=policy) == stock.as_bytes(policy=policy)
        whole = [MIMEMultipart("alternative", boundary="b", _subparts=[p]) for p in (ours, stock)]
        assert whole[0].as_bytes(policy=policies[0]) == whole[1].as_bytes(policy=policies[0])


def test_the_boundary_is_in_no_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """A boundary found in a part's text is drawn again (the first draw here is one the
    plain part contains, as a hostile SKU could only guess)."""
    taken = uuid.UUID(int=1)
    recipient = store.Recipient(order_id=9, email="ann@example.com", currency="EUR", total="5")
    event = order_placed(9, lines=[
        {"sku": f"=_{taken.hex}", "quantity": 1, "unit_price": "5.00", "line_total": "5.00"}
    ])  # fmt: skip
    draws = iter([taken, uuid.UUID(int=2)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    msg = render(event, recipient, step="received", sender="orders@example.com")
    assert msg.get_boundary() == f"=_{uuid.UUID(int=2).hex}"
    parsed = _received(wire_bytes(msg))
    assert f"=_{taken.hex}" in parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
