"""The email consumer: tells the customer each visible step of an order once, over SMTP.

Steps (event -> email): OrderPlaced -> "received" (the order and its lines),
PaymentDeclined -> "payment_declined" (the order is cancelled), ShipmentBooked ->
"shipped" (carrier and tracking number). Each email is reported as
``CustomerNotified {order_id, step, message_id}``.

Later steps carry no address, so the email service keeps its own copy from OrderPlaced
(table ``email_recipients``, written before the first send is tried). A
PaymentDeclined or ShipmentBooked that arrives before its order's OrderPlaced was
handled (its first send is still being retried) is retried until it is.

Every message has a plain-text and an HTML part (every value HTML-escaped) and a
``Message-ID`` fixed by the order and the step: ``<order-{id}.{step}@{domain}>``.
``emails_sent`` is unique per (order, step): once a step's row is committed no event,
redelivered or new, sends it again.

The one window no consumer can close: the SMTP server accepts the message, and the
worker dies before it commits the "sent" row. The message is then redelivered and the
email sent a second time - with the SAME Message-ID, which is what receiving systems
(and the tests, which count distinct Message-IDs) deduplicate on. SMTP has no
idempotency key; the Message-ID is the closest thing it has.

An SMTP server that cannot be reached, times out or answers 4xx is a retryable error;
a 5xx answer (recipient refused) is permanent.

Recipients: exactly one per message, the order's ``customer_email``, checked again here
with the order service's rule (one addr-spec, :func:`recipient`) when OrderPlaced is
recorded: whatever sits on the queue may not have come through the API. An address that
fails is a permanent error (dead-lettered with the reason), never stored nor mailed.
The envelope recipient is passed to SMTP explicitly (``to_addrs=[address]``): smtplib
would otherwise read the recipients from the ``To:`` header, where one string with
commas or encoded-words becomes many.
"""

from __future__ import annotations

import html
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import email_validator
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from consumers import store
from consumers.config import ConsumerSettings
from consumers.handler import order_id_of, order_of, stable_event_id, text_field
from messaging import envelope, keys
from messaging.handler import outcome
from messaging.queue import PermanentError, RetryableError

QUEUE = keys.EMAIL_QUEUE
SENDER = "email-service"
MAX_ADDRESS_LENGTH = 254


def recipient(address: str) -> str:
    """The one envelope recipient for ``address``, or PermanentError saying why not.

    The same rule as ``POST /orders`` (orders/validation.py): exactly one addr-spec
    (no list, display name, comment, quoted local part, IP literal, encoded-word or
    control character; a domain with a dot), returned in its ASCII form.
    """
    if len(address) > MAX_ADDRESS_LENGTH or "=?" in address:
        raise PermanentError(f"refused recipient {address[:300]!r}: not one plain address")
    try:
        checked = email_validator.validate_email(
            address, check_deliverability=False, allow_smtputf8=False
        )
    except email_validator.EmailNotValidError as exc:
        raise PermanentError(f"refused recipient {address[:300]!r}: {exc}") from None
    if not checked.ascii_email or len(checked.ascii_email) > MAX_ADDRESS_LENGTH:
        raise PermanentError(f"refused recipient {address[:300]!r}: too long in ASCII form")
    return checked.ascii_email


STEP_RECEIVED = "received"
STEP_PAYMENT_DECLINED = "payment_declined"
STEP_SHIPPED = "shipped"
STEPS: dict[str, str] = {
    envelope.ORDER_PLACED: STEP_RECEIVED,
    envelope.PAYMENT_DECLINED: STEP_PAYMENT_DECLINED,
    envelope.SHIPMENT_BOOKED: STEP_SHIPPED,
}
"""Event type -> the customer-visible step it is told as."""


class RecipientUnknown(RetryableError):
    """A later step arrived before the order's OrderPlaced was handled here."""


def message_id(order_id: int, step: str, sender: str) -> str:
    """The Message-ID of one step's email (stable per order and step)."""
    domain = sender.rsplit("@", 1)[-1] or "localhost"
    return f"<order-{order_id}.{step}@{domain}>"


@dataclass(frozen=True)
class Letter:
    """What one email says: subject, paragraphs and optional table rows."""

    subject: str
    paragraphs: list[str]
    rows: list[tuple[str, str, str, str]]
    footer: str = ""


def _letter(event: dict[str, Any], who: store.Recipient) -> Letter:
    """The text of the email for ``event``'s step."""
    order_id = who.order_id
    if event["type"] == envelope.ORDER_PLACED:
        order = order_of(event)
        rows = [
            (
                str(line.get("sku", "")),
                str(line.get("quantity", "")),
                str(line.get("unit_price", "")),
                str(line.get("line_total", "")),
            )
            for line in order.lines
        ]
        return Letter(
            f"We received your order #{order_id}",
            [f"Thank you for your order #{order_id}. We will charge your card now."],
            rows,
            f"Total: {order.total} {order.currency}",
        )
    if event["type"] == envelope.PAYMENT_DECLINED:
        reason = text_field(event, "reason")
        return Letter(
            f"Your order #{order_id} is cancelled: payment declined",
            [
                f"Your payment of {who.total} {who.currency} for order "
                f"#{order_id} was declined ({reason}).",
                "The order is cancelled; nothing was charged and nothing will be shipped.",
            ],
            [],
        )
    carrier = text_field(event, "carrier")
    tracking = text_field(event, "tracking_number")
    return Letter(
        f"Your order #{order_id} has shipped",
        [f"Your order #{order_id} is on its way with {carrier}.", f"Tracking number: {tracking}"],
        [],
    )


def render(event: dict[str, Any], who: store.Recipient, *, step: str, sender: str) -> EmailMessage:
    """The email of one step: plain text and HTML alternatives (values HTML-escaped).

    ``who.email`` was checked by :func:`recipient` when it was recorded.
    """
    letter = _letter(event, who)
    msg = EmailMessage()
    msg["Subject"] = letter.subject
    msg["From"] = sender
    msg["To"] = who.email
    msg["Message-ID"] = message_id(who.order_id, step, sender)
    text = [*letter.paragraphs, ""]
    text += [f"  {q} x {sku} @ {price} = {total}" for sku, q, price, total in letter.rows]
    if letter.footer:
        text += ["", letter.footer]
    msg.set_content("\n".join(text) + "\n")
    e = html.escape
    body = "".join(f"<p>{e(p)}</p>" for p in letter.paragraphs)
    if letter.rows:
        cells = "".join(
            f"<tr><td>{e(sku)}</td><td>{e(q)}</td><td>{e(price)}</td><td>{e(total)}</td></tr>"
            for sku, q, price, total in letter.rows
        )
        head = "<tr><th>Item</th><th>Qty</th><th>Price</th><th>Total</th></tr>"
        body += f"<table>{head}{cells}</table>"
    if letter.footer:
        body += f"<p><strong>{e(letter.footer)}</strong></p>"
    msg.add_alternative(f"<!doctype html><html><body>{body}</body></html>", subtype="html")
    return msg


class EmailHandler:
    """Sends each order's step emails once each and reports CustomerNotified."""

    queue = QUEUE
    accepts = envelope.accepted_by(QUEUE)

    def __init__(
        self, engine: Engine, *, host: str, port: int, sender: str, timeout: float = 10.0
    ) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.sender = sender
        self.timeout = timeout

    @classmethod
    def from_settings(cls, engine: Engine, settings: ConsumerSettings) -> EmailHandler:
        """Build from SMTP_HOST, SMTP_PORT, SMTP_TIMEOUT and EMAIL_FROM."""
        return cls(
            engine,
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=settings.email_from,
            timeout=settings.smtp_timeout,
        )

    def send(self, msg: EmailMessage, to: str) -> None:
        """Hand the message to the SMTP server for exactly ``to``; classify failures."""
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.send_message(msg, from_addr=parseaddr(self.sender)[1], to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if all(code >= 500 for code in codes):
                raise PermanentError(f"SMTP refused the recipient: {exc.recipients}") from exc
            raise RetryableError(f"SMTP deferred the recipient: {exc.recipients}") from exc
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                raise PermanentError(f"SMTP error {exc.smtp_code}: {exc.smtp_error!r}") from exc
            raise RetryableError(f"SMTP error {exc.smtp_code}: {exc.smtp_error!r}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise RetryableError(f"SMTP {self.host}:{self.port} unavailable: {exc}") from exc

    def _recipient(self, event: dict[str, Any], order_id: int) -> store.Recipient:
        """Who to write to: recorded now from OrderPlaced, looked up for later steps."""
        with Session(self.engine) as session, session.begin():
            known = session.get(store.Recipient, order_id)
            if known is None and event["type"] == envelope.ORDER_PLACED:
                order = order_of(event)
                known = store.Recipient(
                    order_id=order_id,
                    email=recipient(order.customer_email),
                    currency=order.currency,
                    total=order.total,
                )
                session.add(known)
                session.flush()
            if known is None:
                raise RecipientUnknown(f"order #{order_id}: OrderPlaced not handled here yet")
            session.expunge(known)
            return known

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Send the step's email (once per order and step) and return CustomerNotified."""
        stored = store.lookup(self.engine, QUEUE, event["id"])
        if stored is not None:
            return stored
        step = STEPS[event["type"]]
        order_id = order_of(event).order_id if step == STEP_RECEIVED else order_id_of(event)
        mid = message_id(order_id, step, self.sender)
        with Session(self.engine) as session:
            already = session.get(store.EmailSent, mid) is not None
        if not already:
            who = self._recipient(event, order_id)
            self.send(render(event, who, step=step, sender=self.sender), who.email)

        def record(session: Session) -> list[dict[str, Any]]:
            sent = session.get(store.EmailSent, mid)
            if sent is None:
                who = session.get(store.Recipient, order_id)
                sent = store.EmailSent(
                    message_id=mid,
                    order_id=order_id,
                    step=step,
                    event_id=event["id"],
                    recipient=who.email if who else "",
                )
                session.add(sent)
                session.flush()
            return [
                outcome(
                    envelope.CUSTOMER_NOTIFIED,
                    {"order_id": order_id, "step": step, "message_id": mid},
                    order_id=order_id,
                    sender=SENDER,
                    message=f"Customer notified for order #{order_id}: {step.replace('_', ' ')}",
                    event_id=stable_event_id(envelope.CUSTOMER_NOTIFIED, order_id, step),
                    at=sent.sent_at,
                )
            ]

        emitted, _new = store.process_once(self.engine, QUEUE, event, record)
        return emitted
