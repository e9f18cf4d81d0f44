"""The email consumer: sends each order's confirmation over SMTP, once.

The message has a plain-text and an HTML part (every value HTML-escaped) and a
``Message-ID`` derived from the order and the step: ``<order-{id}.confirmation@{domain}>``.

Claim, then send (one email per order and step even with several workers and
duplicate messages): before talking to SMTP the handler inserts a row in
``email_claims`` keyed by (order, step), in its own committed transaction
(:func:`consumers.store.claim_effect`). A worker that finds a live claim of another
delivery does not send: its message is retried later and then re-emits the outcome
the first one recorded. A claim is a lease on the database's clock, so a worker that
dies between claim and send does not lose the email: the lease expires and the next
delivery takes it over.

The one window no consumer can close: the SMTP server accepts the message, and the
worker dies before it commits the "processed" row. The message is then redelivered
(after the lease) and the email sent a second time - with the SAME Message-ID, which
is what receiving systems (and the tests, which count distinct Message-IDs)
deduplicate on. SMTP has no idempotency key; the Message-ID is the closest thing it
has.

An SMTP server that cannot be reached, times out or answers 4xx is a retryable error;
a 5xx answer (recipient refused) is permanent.

Each handler thread keeps one SMTP connection open across messages (connect, EHLO and
QUIT per message cost more round trips than the message itself); a connection the
server closed is reopened once at once, any failure drops it (see
:meth:`EmailHandler.send`).

Recipients: exactly one per message, the order's ``customer_email``, checked again here
with the order service's rule (one addr-spec, :func:`recipient`): whatever sits on the
queue may not have come through the API. An address that fails is a permanent error
(dead-lettered with the reason), never mailed. The envelope recipient is passed to SMTP
explicitly (``to_addrs=[address]``): smtplib would otherwise read the recipients from
the ``To:`` header, where one string with commas or encoded-words becomes many.
"""

from __future__ import annotations

import contextlib
import html
import json
import smtplib
import threading
import time
import uuid
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import email_validator
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from consumers import store
from consumers.config import ConsumerSettings
from consumers.handler import Order, order_of
from messaging import envelope
from messaging.handler import outcome
from messaging.queue import PermanentError, RetryableError

QUEUE = "email"
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


STEP = "confirmation"
"""The email step this handler sends (one per order: the claim's key with the order)."""

CLAIM_POLL_SECONDS = 0.2
"""How often a delivery that found another's live claim looks at it again."""


def message_id(order_id: int, sender: str) -> str:
    """The Message-ID of an order's confirmation: stable per order and step, so even a
    re-send in the one window left (see the module doc) is dropped by receivers."""
    domain = sender.rsplit("@", 1)[-1] or "localhost"
    return f"<order-{order_id}.{STEP}@{domain}>"


def render(order: Order, *, event_id: str, sender: str) -> EmailMessage:
    """The confirmation email: plain text and HTML alternatives (one checked recipient)."""
    msg = EmailMessage()
    msg["Subject"] = f"Your order #{order.order_id} is confirmed"
    msg["From"] = sender
    msg["To"] = recipient(order.customer_email)
    msg["Message-ID"] = message_id(order.order_id, sender)
    rows = [
        (
            str(line.get("sku", "")),
            str(line.get("quantity", "")),
            str(line.get("unit_price", "")),
            str(line.get("line_total", "")),
        )
        for line in order.lines
    ]
    text = [f"Thank you for your order #{order.order_id}.", ""]
    text += [f"  {q} x {sku} @ {price} = {total} {order.currency}" for sku, q, price, total in rows]
    text += ["", f"Total: {order.total} {order.currency}", ""]
    msg.set_content("\n".join(text))
    e = html.escape
    cells = "".join(
        f"<tr><td>{e(sku)}</td><td>{e(q)}</td><td>{e(price)}</td><td>{e(total)}</td></tr>"
        for sku, q, price, total in rows
    )
    msg.add_alternative(
        "<!doctype html><html><body>"
        f"<p>Thank you for your order #{order.order_id}.</p>"
        "<table><tr><th>Item</th><th>Qty</th><th>Price</th><th>Total</th></tr>"
        f"{cells}</table>"
        f"<p><strong>Total: {e(order.total)} {e(order.currency)}</strong></p>"
        "</body></html>",
        subtype="html",
    )
    return msg


class EmailHandler:
    """Sends each order's confirmation once and reports ConfirmationEmailSent."""

    queue = QUEUE
    accepts = frozenset({envelope.ORDER_PLACED})

    def __init__(
        self,
        engine: Engine,
        *,
        host: str,
        port: int,
        sender: str,
        timeout: float = 10.0,
        claim_seconds: float | None = None,
    ) -> None:
        self.engine = engine
        # A claim outlives a send that times out at every step (connect, each command).
        self.claim_seconds = claim_seconds if claim_seconds is not None else 6 * timeout
        self.host = host
        self.port = port
        self.sender = sender
        self.timeout = timeout
        self._local = threading.local()  # each handler thread keeps its own connection

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

    def _connection(self) -> tuple[smtplib.SMTP, bool]:
        """This thread's open SMTP connection (opened now if none); True if reused."""
        smtp: smtplib.SMTP | None = getattr(self._local, "smtp", None)
        if smtp is not None:
            return smtp, True
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        self._local.smtp = smtp
        return smtp, False

    def _drop(self) -> None:
        """Forget this thread's connection (the next send opens a new one)."""
        smtp: smtplib.SMTP | None = getattr(self._local, "smtp", None)
        self._local.smtp = None
        if smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.close()

    def close(self) -> None:
        """Say QUIT on this thread's connection, if one is open."""
        smtp: smtplib.SMTP | None = getattr(self._local, "smtp", None)
        self._local.smtp = None
        if smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()

    def send(self, msg: EmailMessage, to: str) -> None:
        """Hand the message to the SMTP server for exactly ``to``; classify failures.

        The connection stays open across messages (one per handler thread): a
        connect + EHLO + QUIT per message cost more than the message itself. A server
        that closed an idle kept connection is reconnected once, at once; any other
        failure drops the connection, so the retry starts on a fresh one.
        """
        for attempt in (1, 2):
            try:
                smtp, reused = self._connection()
                smtp.send_message(msg, from_addr=parseaddr(self.sender)[1], to_addrs=[to])
                return
            except smtplib.SMTPServerDisconnected as exc:
                self._drop()
                if reused and attempt == 1:
                    # Typically the first command on a connection the server timed out.
                    # Had it already taken the DATA, this resends the same Message-ID:
                    # the one window the module doc names, no new one.
                    continue
                raise RetryableError(f"SMTP {self.host}:{self.port} unavailable: {exc}") from exc
            except smtplib.SMTPRecipientsRefused as exc:
                self._drop()
                codes = [code for code, _ in exc.recipients.values()]
                if all(code >= 500 for code in codes):
                    raise PermanentError(f"SMTP refused the recipient: {exc.recipients}") from exc
                raise RetryableError(f"SMTP deferred the recipient: {exc.recipients}") from exc
            except smtplib.SMTPResponseException as exc:
                self._drop()
                if exc.smtp_code >= 500:
                    raise PermanentError(f"SMTP error {exc.smtp_code}: {exc.smtp_error!r}") from exc
                raise RetryableError(f"SMTP error {exc.smtp_code}: {exc.smtp_error!r}") from exc
            except (OSError, smtplib.SMTPException) as exc:
                self._drop()
                raise RetryableError(f"SMTP {self.host}:{self.port} unavailable: {exc}") from exc

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Claim the order's confirmation, send it, record it; return the outcome event.

        The claim commits before the send (:func:`consumers.store.claim_effect`): a
        second worker with a copy of the same OrderPlaced (or another OrderPlaced of the
        same order) finds it and retries later, then re-emits the first one's outcome.
        """
        stored = store.lookup(self.engine, QUEUE, event["id"])
        if stored is not None:
            return stored
        order = order_of(event)
        to = recipient(order.customer_email)
        owner = uuid.uuid4().hex  # this delivery's claim (another thread: another one)
        state, done = store.claim_effect(
            self.engine, order.order_id, STEP, event["id"], owner, self.claim_seconds
        )
        if state == "done" and done is not None:
            emitted, _new = store.record_outcome(self.engine, QUEUE, event, done)
            return emitted
        # Another delivery holds a live claim: wait for it to be sent (then re-emit its
        # outcome) or for its lease to run out (its worker died: claim it ourselves).
        # Waiting, not failing: a retry per poll would spend the message's attempts
        # while a dead worker's lease runs, and dead-letter a mail nobody sent.
        deadline = time.monotonic() + self.claim_seconds + CLAIM_POLL_SECONDS
        while state == "busy":
            if time.monotonic() > deadline:
                raise RetryableError(
                    f"another worker is sending the {STEP} email of order #{order.order_id}"
                )
            time.sleep(CLAIM_POLL_SECONDS)
            state, done = store.claim_effect(
                self.engine, order.order_id, STEP, event["id"], owner, self.claim_seconds
            )
        if state == "done" and done is not None:
            emitted, _new = store.record_outcome(self.engine, QUEUE, event, done)
            return emitted
        msg = render(order, event_id=event["id"], sender=self.sender)
        try:
            self.send(msg, to)
        except Exception:
            # Not sent: free the claim, so this message's retry (or a copy) claims again
            # at once instead of waiting for the lease.
            store.release_claim(self.engine, order.order_id, STEP, owner)
            raise
        mid = str(msg["Message-ID"])
        result = outcome(
            envelope.CONFIRMATION_EMAIL_SENT,
            {"order_id": order.order_id, "to": order.customer_email, "message_id": mid},
            order_id=order.order_id,
            sender=SENDER,
            message=f"Confirmation email sent for order #{order.order_id}",
        )

        def record(session: Any) -> list[dict[str, Any]]:
            claim = session.get(store.EmailClaim, (order.order_id, STEP))
            if claim is not None:
                claim.state, claim.outcome = "sent", json.dumps([result])
            if session.get(store.EmailSent, mid) is None:
                session.add(
                    store.EmailSent(
                        message_id=mid,
                        order_id=order.order_id,
                        event_id=event["id"],
                        recipient=order.customer_email,
                    )
                )
            return [result]

        emitted, _new = store.process_once(self.engine, QUEUE, event, record)
        return emitted

    def handle_batch(self, events: list[dict[str, Any]]) -> list[list[dict[str, Any]] | None]:
        """Send a taken batch's emails on the kept connection, then record them at once.

        One look-up for the batch (what was sent before), each new message sent in
        order, then ONE transaction records every sent message. A send that fails
        stops the batch there: the messages already sent are recorded (so they are
        not sent again), that one and the rest are left to :meth:`handle`, which
        classifies the failure. An event with bad data is left to it as well. If the
        recording transaction fails, the sent messages are sent again on redelivery,
        same Message-ID: the window the module doc names, batch-wide.
        """
        stored = store.lookup_many(self.engine, QUEUE, [event["id"] for event in events])
        results: list[list[dict[str, Any]] | None] = []
        sent: dict[str, tuple[Order, str, list[dict[str, Any]]]] = {}
        failed = False
        for event in events:
            if event["id"] in stored:
                results.append(stored[event["id"]])
                continue
            if event["id"] in sent:  # the same event twice in one batch: sent once
                results.append(sent[event["id"]][2])
                continue
            if failed:
                results.append(None)
                continue
            try:
                order = order_of(event)
                to = recipient(order.customer_email)
                msg = render(order, event_id=event["id"], sender=self.sender)
            except PermanentError:  # bad data: handle() dead-letters it; go on
                results.append(None)
                continue
            try:
                self.send(msg, to)
            except Exception:  # noqa: BLE001 - handle() sends again and classifies it
                failed = True
                results.append(None)
                continue
            mid = str(msg["Message-ID"])
            result = [
                outcome(
                    envelope.CONFIRMATION_EMAIL_SENT,
                    {"order_id": order.order_id, "to": order.customer_email, "message_id": mid},
                    order_id=order.order_id,
                    sender=SENDER,
                    message=f"Confirmation email sent for order #{order.order_id}",
                )
            ]
            sent[event["id"]] = (order, mid, result)
            results.append(result)
        if sent:

            def record(session: Session, event: dict[str, Any]) -> list[dict[str, Any]]:
                order, mid, result = sent[event["id"]]
                if session.get(store.EmailSent, mid) is None:
                    session.add(
                        store.EmailSent(
                            message_id=mid,
                            order_id=order.order_id,
                            event_id=event["id"],
                            recipient=order.customer_email,
                        )
                    )
                return result

            unique = {event["id"]: event for event in events if event["id"] in sent}
            recorded = store.process_batch(self.engine, QUEUE, list(unique.values()), record)
            outcomes = dict(zip(unique, recorded, strict=True))
            results = [
                outcomes.get(event["id"], r) if r is not None else None
                for event, r in zip(events, results, strict=True)
            ]
        return results
