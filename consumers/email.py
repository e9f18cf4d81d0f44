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
``emails_sent`` is unique per (order, step).

Claim, then send (one email per order and step even with several workers and
duplicate messages): before talking to SMTP the handler inserts a row in
``email_claims`` keyed by (order, step), in its own committed transaction
(:func:`consumers.store.claim_effect`). A worker that finds a live claim of another
delivery does not send: its message is retried later and then re-emits the outcome
the first one recorded. A claim is a lease on the database's clock, so a worker that
dies between claim and send does not lose the email: the lease expires and the next
delivery takes it over.

The one window no consumer can close: the SMTP server accepts the message, and the
worker dies before it commits the "sent" row. The message is then redelivered (after
the lease) and the email sent a second time - with the SAME Message-ID, which is what
receiving systems (and the tests, which count distinct Message-IDs) deduplicate on.
SMTP has no idempotency key; the Message-ID is the closest thing it has.

An SMTP server that cannot be reached, times out or answers 4xx is a retryable error;
a 5xx answer (recipient refused) is permanent.

Each handler thread keeps one SMTP connection. When the server offers PIPELINING
(RFC 2920; ``smtp-sink`` does) a message's MAIL, RCPT and DATA go out in one write, and
in a batch each body goes out with the next message's envelope: one round trip per
email instead of four (:class:`PipelinedSession`). Otherwise smtplib's ``sendmail``.

Recipients: exactly one per message, the order's ``customer_email``, checked again here
with the order service's rule (one addr-spec, :func:`recipient`) when OrderPlaced is
recorded: whatever sits on the queue may not have come through the API. An address that
fails is a permanent error (dead-lettered with the reason), never stored nor mailed.
The envelope recipient is passed to SMTP explicitly (``to_addrs=[address]``): smtplib
would otherwise read the recipients from the ``To:`` header, where one string with
commas or encoded-words becomes many.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import smtplib
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.charset import QP, Charset
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import formatdate, parseaddr
from typing import Any

import email_validator
from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.orm import Session

from consumers import store
from consumers.config import ConsumerSettings
from consumers.handler import order_id_of, order_of, stable_event_id, text_field
from messaging import database, envelope, faults, keys
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

CLAIM_POLL_SECONDS = 0.2
"""How often a delivery that found another's live claim looks at it again."""

RECIPIENT_WAIT_SECONDS = 0.5
"""How long a later step's event (a shipped email) waits for its order's OrderPlaced to
be recorded here before it fails as :class:`RecipientUnknown` (and is retried after the
queue's backoff). With two handler threads, or two email processes, one may take a
ShipmentBooked while another still holds its order's OrderPlaced, uncommitted: that
wait is a few milliseconds, the backoff a second."""
RECIPIENT_POLL_SECONDS = 0.01
"""How often that wait reads whether the recipient is recorded (no write lock)."""


class RecipientUnknown(RetryableError):
    """A later step arrived before the order's OrderPlaced was handled here."""


class SmtpUnavailable(RetryableError):
    """The SMTP server could not be reached or dropped the connection: nothing sent."""


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


_QP_UTF8 = Charset("utf-8")
_QP_UTF8.body_encoding = QP  # readable in var/mail/*.eml, unlike base64


def _text_part(text: str, subtype: str) -> Message:
    """One body part: 7bit US-ASCII when it can be, quoted-printable UTF-8 otherwise.

    7bit also needs every line within SMTP's 998 characters (RFC 5321 4.5.3.1.6): a
    longer one is refused with a 5xx, so it goes quoted-printable, which wraps it.

    The 7bit part is the message ``MIMEText(text, subtype, "us-ascii")`` builds, with the
    same three headers in the same order and the text as its payload, set directly:
    ``MIMEText`` formats its Content-Type, then parses it again to set the charset, and
    that was a third of rendering an email. The unit tests compare the bytes.
    """
    if text.isascii() and all(len(line) <= 998 for line in text.splitlines()):
        part = Message()
        part["Content-Type"] = f'text/{subtype}; charset="us-ascii"'
        part["MIME-Version"] = "1.0"
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(text)
        return part
    return MIMEText(text, subtype, _QP_UTF8)  # type: ignore[arg-type]


def _header(value: str) -> str:
    """A header value as given, refused if it could end the header block."""
    if "\r" in value or "\n" in value or not value.isascii():
        raise PermanentError(f"refused header value {value[:100]!r}")
    return value


def render(event: dict[str, Any], who: store.Recipient, *, step: str, sender: str) -> Message:
    """The email of one step: plain text and HTML alternatives (values HTML-escaped).

    ``who.email`` was checked by :func:`recipient` when it was recorded. Built with the
    ``compat32`` MIME classes rather than ``EmailMessage``: the modern API parses every
    header it is given and it was a fifth of the consumer's CPU per email (py-spy,
    ``benchmarks/README.md``); the headers here are ASCII by construction (an ``int``
    order id, a checked address, the configured sender) and :func:`_header` refuses a
    CR or LF anyway, which ``compat32`` would not.
    """
    letter = _letter(event, who)
    text = [*letter.paragraphs, ""]
    text += [f"  {q} x {sku} @ {price} = {total}" for sku, q, price, total in letter.rows]
    if letter.footer:
        text += ["", letter.footer]
    e = html.escape
    body = "\n".join(f"<p>{e(p)}</p>" for p in letter.paragraphs)
    if letter.rows:
        cells = "\n".join(
            f"<tr><td>{e(sku)}</td><td>{e(q)}</td><td>{e(price)}</td><td>{e(total)}</td></tr>"
            for sku, q, price, total in letter.rows
        )
        head = "<tr><th>Item</th><th>Qty</th><th>Price</th><th>Total</th></tr>"
        body += f"\n<table>\n{head}\n{cells}\n</table>"
    if letter.footer:
        body += f"\n<p><strong>{e(letter.footer)}</strong></p>"
    parts = [
        _text_part("\n".join(text) + "\n", "plain"),
        _text_part(f"<!doctype html><html><body>{body}</body></html>\n", "html"),
    ]
    msg = MIMEMultipart("alternative", boundary=_boundary(parts), _subparts=parts)
    msg["Subject"] = _header(letter.subject)
    msg["From"] = _header(sender)
    msg["To"] = _header(who.email)
    msg["Message-ID"] = _header(message_id(who.order_id, step, sender))
    msg["Date"] = formatdate(localtime=False)
    return msg


_PLAIN_HEADER = re.compile(r"[\t\x20-\x7e]*")


class WirePolicy(Compat32):
    """``compat32`` with CRLF line ends, writing a header that needs no folding as is.

    ``compat32`` folds every header through ``email.header.Header``, which was a third
    of rendering an email. A value of printable ASCII (and tabs) whose line fits in
    ``max_line_length`` folds to itself, so it is written directly; anything else (a
    long value, a control character) takes ``compat32``'s own path. The unit tests
    compare the bytes with ``compat32``'s for hundreds of thousands of values.
    """

    def fold_binary(self, name: str, value: Any) -> bytes:
        """The header line as bytes, ``name: value`` and the line end."""
        if (
            isinstance(value, str)
            and len(name) + 2 + len(value) <= (self.max_line_length or 78)
            and _PLAIN_HEADER.fullmatch(value)
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_WIRE = WirePolicy(linesep="\r\n")


def _boundary(parts: list[Message]) -> str:
    """A multipart boundary found in none of the parts' (encoded) text.

    Chosen here rather than by the generator, which makes a random one and then compiles
    a regular expression for it to scan the parts (a new pattern, and so a compile, per
    email); a substring test is stricter and a fraction of the cost.
    """
    texts = [str(part.get_payload()) for part in parts]
    while True:
        boundary = f"=_{uuid.uuid4().hex}"
        if not any(boundary in text for text in texts):
            return boundary


def wire_bytes(msg: Message) -> bytes:
    """The message as SMTP carries it: every line ended by CRLF.

    smtplib sends bytes as given; a bare LF is no line end to the server, so the whole
    message would be one line, refused as too long (RFC 5321 4.5.3.1.6).
    """
    return msg.as_bytes(policy=_WIRE)


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _after_send() -> None:
    """The fault point after the server took an email (one by one or pipelined)."""
    faults.hit("email.after_send")


class PipelinedSession:
    """Messages over one SMTP connection whose server advertised PIPELINING (RFC 2920).

    A message's envelope (MAIL, RCPT, DATA) is one group; its body follows only once
    DATA got 354 (DATA ends a group), and the body may open the next group: a body,
    then the next message's envelope, in one write. So one message alone takes two
    round trips instead of four, and each further message of a batch one
    (:meth:`EmailHandler.handle_batch`). An envelope goes out only for a message already
    rendered: once DATA is accepted the client owes the server that message.
    """

    def __init__(self, smtp: smtplib.SMTP, sender: str) -> None:
        self.smtp = smtp
        self.sender = sender
        self._size = smtp.has_extn("size")
        self._from = smtplib.quoteaddr(sender)  # the same for every message

    def envelope(self, to: str, data: bytes) -> bytes:
        """MAIL, RCPT and DATA for one message to ``to`` (SIZE when the server takes it).

        Raises:
            ValueError: An address holds a CR or LF (it would smuggle in a command),
                as smtplib's own ``putcmd`` refuses.
        """
        if any(c in self.sender + to for c in "\r\n"):
            raise ValueError(f"prohibited newline characters in an SMTP address: {to!r}")
        size = f" SIZE={len(data)}" if self._size else ""
        return (
            f"MAIL FROM:{self._from}{size}\r\nRCPT TO:{smtplib.quoteaddr(to)}\r\nDATA\r\n"
        ).encode("ascii")

    @staticmethod
    def body(data: bytes) -> bytes:
        """The message as DATA carries it: dot-stuffed, ended by CRLF.CRLF."""
        body = _LEADING_DOT.sub(b"..", data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        return body + b".\r\n"

    def read_envelope(self, to: str) -> None:
        """Read one envelope's three replies; a refusal raises what sendmail raises.

        Before raising, the transaction is ended: a lone dot if the server took DATA
        anyway (no valid recipient: it delivers nothing, RFC 2920 3.1), then RSET; a 421
        closes the connection, as sendmail does.
        """
        replies: list[tuple[int, bytes]] = []
        while len(replies) < 3:
            replies.append(self.smtp.getreply())
            if replies[-1][0] == 421:  # the server is closing the connection
                self.smtp.close()
                break
        mail, rcpt, start = (replies + [(0, b"")] * 3)[:3]
        refused: smtplib.SMTPException | None = None
        if mail[0] != 250:
            refused = smtplib.SMTPSenderRefused(mail[0], mail[1], self.sender)
        elif rcpt[0] not in (250, 251):
            refused = smtplib.SMTPRecipientsRefused({to: rcpt})
        elif start[0] != 354:
            refused = smtplib.SMTPDataError(start[0], start[1])
        if refused is None:
            return
        if start[0] == 354:
            self.smtp.send(b".\r\n")
            self.smtp.getreply()
        if len(replies) == 3:
            with contextlib.suppress(smtplib.SMTPServerDisconnected):
                self.smtp.rset()
        raise refused

    def read_body(self) -> None:
        """Read a body's reply: 250 is "accepted"; anything else raises SMTPDataError.

        Either way the transaction is over (RFC 5321 4.1.1.4): no RSET, which would
        reset the next message's envelope when it is already on its way.
        """
        code, reply = self.smtp.getreply()
        if code != 250:
            if code == 421:
                self.smtp.close()
            raise smtplib.SMTPDataError(code, reply)


def _closed_by_server(exc: smtplib.SMTPException) -> bool:
    """The server hung up (a 421 is its last word before it does, RFC 5321 3.8)."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    return isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code == 421


def sendmail_pipelined(smtp: smtplib.SMTP, sender: str, to: str, data: bytes) -> None:
    """``smtp.sendmail(sender, [to], data)`` in two round trips instead of four.

    For a server that advertised PIPELINING (:class:`PipelinedSession`): the envelope's
    three commands in one write, the body once DATA got 354; its 250 is what says
    "accepted", as with sendmail, and a refusal raises what sendmail raises.
    """
    session = PipelinedSession(smtp, sender)
    smtp.send(session.envelope(to, data))
    session.read_envelope(to)
    smtp.send(session.body(data))
    session.read_body()


def notified(order_id: int, step: str, mid: str, at: datetime) -> list[dict[str, Any]]:
    """The CustomerNotified outcome of one sent email (the same event every time)."""
    return [
        outcome(
            envelope.CUSTOMER_NOTIFIED,
            {"order_id": order_id, "step": step, "message_id": mid},
            order_id=order_id,
            sender=SENDER,
            message=f"Customer notified for order #{order_id}: {step.replace('_', ' ')}",
            event_id=stable_event_id(envelope.CUSTOMER_NOTIFIED, order_id, step),
            at=at,
        )
    ]


@dataclass
class _Job:
    """One event of a taken batch on its way through :meth:`EmailHandler.handle_batch`."""

    index: int
    event: dict[str, Any]
    order_id: int
    step: str
    address: str | None
    """The checked recipient of an OrderPlaced (later steps look it up)."""
    who: store.Recipient | None = None


class _Declined(Exception):
    """A fast path declines: roll back, the full path decides."""


SQL = database.DriverStatements(
    add_recipient=lambda dialect: (
        store.dialect_insert_of(dialect)(store.Recipient)
        .values(
            **database.binds("order_id", "email", "currency", "total"),
        )
        .on_conflict_do_nothing()
    ),
    recipient=lambda _dialect: select(
        store.Recipient.email, store.Recipient.currency, store.Recipient.total
    ).where(store.Recipient.order_id == bindparam("order_id")),
    claim=lambda dialect: (
        store.dialect_insert_of(dialect)(store.EmailClaim)
        .values(
            **database.binds("order_id", "step", "owner", "event_id"),
            state="sending",
            lease_until_ms=database.now_ms(dialect.name) + bindparam("lease"),
            outcome=None,
        )
        .on_conflict_do_nothing()
        .returning(store.EmailClaim.order_id)
    ),
    sent=lambda dialect: (
        store.dialect_insert_of(dialect)(store.EmailSent)
        .values(
            **database.binds("message_id", "order_id", "step", "event_id", "recipient", "sent_at"),
        )
        .on_conflict_do_nothing()
        .returning(store.EmailSent.message_id)
    ),
    claim_sent=lambda _dialect: (
        update(store.EmailClaim)
        .where(
            store.EmailClaim.order_id == bindparam("order_id"),
            store.EmailClaim.step == bindparam("step"),
        )
        .values(state="sent", outcome=bindparam("outcome"))
    ),
)
"""The email service's fast paths, compiled once per dialect (:meth:`EmailHandler.handle`)."""


class EmailHandler:
    """Sends each order's step emails once each and reports CustomerNotified."""

    queue = QUEUE
    accepts = envelope.accepted_by(QUEUE)

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

    def send(self, msg: Message, to: str) -> None:
        """Hand the message to the SMTP server for exactly ``to``; classify failures.

        The connection stays open across messages (one per handler thread): a
        connect + EHLO + QUIT per message cost more than the message itself. A server
        that closed an idle kept connection is reconnected once, at once; any other
        failure drops the connection, so the retry starts on a fresh one.
        """
        for attempt in (1, 2):
            try:
                smtp, reused = self._connection()
                smtp.ehlo_or_helo_if_needed()
                if smtp.has_extn("pipelining"):
                    sendmail_pipelined(smtp, parseaddr(self.sender)[1], to, wire_bytes(msg))
                else:
                    smtp.sendmail(parseaddr(self.sender)[1], [to], wire_bytes(msg))
                _after_send()
                return
            except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException) as exc:
                self._drop()
                if reused and attempt == 1 and _closed_by_server(exc):
                    # Typically the first command on a connection the server timed out
                    # or shut down (a 421 waiting in the socket, then the close).
                    # Had it already taken the DATA, this resends the same Message-ID:
                    # the one window the module doc names, no new one.
                    continue
                raise self._verdict(exc) from exc
            except (OSError, smtplib.SMTPException) as exc:
                self._drop()
                raise self._verdict(exc) from exc

    def _verdict(self, exc: OSError | smtplib.SMTPException) -> Exception:
        """What a failed send is: a 5xx refusal is permanent, a 4xx retryable, any other
        failure (no connection, a timeout, a dropped connection) :class:`SmtpUnavailable`."""
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            codes = [code for code, _ in exc.recipients.values()]
            if all(code >= 500 for code in codes):
                return PermanentError(f"SMTP refused the recipient: {exc.recipients}")
            return RetryableError(f"SMTP deferred the recipient: {exc.recipients}")
        if isinstance(exc, smtplib.SMTPResponseException):
            if exc.smtp_code >= 500:
                return PermanentError(f"SMTP error {exc.smtp_code}: {exc.smtp_error!r}")
            return RetryableError(f"SMTP error {exc.smtp_code}: {exc.smtp_error!r}")
        return SmtpUnavailable(f"SMTP {self.host}:{self.port} unavailable: {exc}")

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
        """Claim the order's step, send its email, record it; return CustomerNotified.

        The claim commits before the send (:func:`consumers.store.claim_effect`): a
        second worker with a copy of the same event (or another event of the same order
        and step) finds it and waits, then re-emits the first one's outcome.
        """
        claimed = self._claim_new(event)
        if claimed is not None:  # the common case, claimed on the driver
            order_id, step, who, owner = claimed
            return self._send_claimed(event, order_id, step, who, owner)
        stored = store.lookup(self.engine, QUEUE, event["id"])
        if stored is not None:
            return stored
        step = STEPS[event["type"]]
        order_id = order_of(event).order_id if step == STEP_RECEIVED else order_id_of(event)
        try:
            who = self._recipient(event, order_id)
        except RecipientUnknown:
            if not self.await_recipients({order_id}):
                raise
            who = self._recipient(event, order_id)
        owner = uuid.uuid4().hex  # this delivery's claim (another thread: another one)
        state, done = store.claim_effect(
            self.engine, order_id, step, event["id"], owner, self.claim_seconds
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
                    f"another worker is sending the {step} email of order #{order_id}"
                )
            time.sleep(CLAIM_POLL_SECONDS)
            state, done = store.claim_effect(
                self.engine, order_id, step, event["id"], owner, self.claim_seconds
            )
        if state == "done" and done is not None:
            emitted, _new = store.record_outcome(self.engine, QUEUE, event, done)
            return emitted
        return self._send_claimed(event, order_id, step, who, owner)

    def _send_claimed(
        self, event: dict[str, Any], order_id: int, step: str, who: store.Recipient, owner: str
    ) -> list[dict[str, Any]]:
        """Send the email of a step ``owner`` has claimed, then record it."""
        mid = message_id(order_id, step, self.sender)
        try:
            self.send(render(event, who, step=step, sender=self.sender), who.email)
        except Exception:
            # Not sent: free the claim, so this message's retry (or a copy) claims again
            # at once instead of waiting for the lease.
            store.release_claim(self.engine, order_id, step, owner)
            raise

        return self._mark_sent(event, order_id, step, who.email, mid)

    def _claim_new(self, event: dict[str, Any]) -> tuple[int, str, store.Recipient, str] | None:
        """:meth:`handle`'s common case in one transaction on the driver (:data:`SQL`).

        A new event of a step nobody has claimed: check the processed row, record the
        recipient (OrderPlaced) or read it, insert the claim, commit. Returns (order id,
        step, recipient, claim owner), the claim committed; None, with nothing
        committed, for every other case (handled before, bad data, no recipient yet,
        a claim held or done): :meth:`handle`'s full path decides those.
        """
        try:
            step = STEPS[event["type"]]
            if step == STEP_RECEIVED:
                order = order_of(event)
                order_id, address = order.order_id, recipient(order.customer_email)
            else:
                order_id, address = order_id_of(event), None
        except (PermanentError, KeyError):
            return None
        owner = uuid.uuid4().hex
        dialect = self.engine.dialect
        try:
            with database.driver_transaction(self.engine) as cursor:
                if store.SQL(dialect, "processed").first(cursor, queue=QUEUE, event_id=event["id"]):
                    raise _Declined
                if address is not None:
                    SQL(dialect, "add_recipient").execute(
                        cursor,
                        order_id=order_id,
                        email=address,
                        currency=order.currency,
                        total=order.total,
                    )
                known = SQL(dialect, "recipient").first(cursor, order_id=order_id)
                if known is None:
                    raise _Declined
                claim = SQL(dialect, "claim").first(
                    cursor,
                    order_id=order_id,
                    step=step,
                    owner=owner,
                    event_id=event["id"],
                    lease=int(self.claim_seconds * 1000),
                )
                if claim is None:
                    raise _Declined
        except _Declined:
            return None
        email, currency, total = known
        who = store.Recipient(order_id=order_id, email=email, currency=currency, total=total)
        return order_id, step, who, owner

    def await_recipients(
        self, order_ids: Collection[int], stopping: Callable[[], bool] = bool
    ) -> set[int]:
        """The orders of ``order_ids`` whose recipient is (or, within
        :data:`RECIPIENT_WAIT_SECONDS`, gets) recorded here: reads, no write lock."""
        dialect = self.engine.dialect
        deadline = time.monotonic() + RECIPIENT_WAIT_SECONDS
        while True:
            with database.driver_transaction(self.engine, write=False) as cursor:
                known = {
                    order_id
                    for order_id in order_ids
                    if SQL(dialect, "recipient").first(cursor, order_id=order_id) is not None
                }
            if len(known) == len(order_ids) or time.monotonic() >= deadline or stopping():
                return known
            time.sleep(RECIPIENT_POLL_SECONDS)

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | Exception | None]:
        """A taken batch (:meth:`_handle_batch`); then the events whose order had no
        recipient yet, once more, as soon as another thread or process records it
        (:meth:`await_recipients`). Those still without one fail as RecipientUnknown."""
        results = self._handle_batch(events, stopping)
        unknown = [i for i, r in enumerate(results) if isinstance(r, RecipientUnknown)]
        if not unknown or stopping():
            return results
        found = self.await_recipients({order_id_of(events[i]) for i in unknown}, stopping)
        again = [i for i in unknown if order_id_of(events[i]) in found]
        if again:
            retried = self._handle_batch([events[i] for i in again], stopping)
            for i, result in zip(again, retried, strict=True):
                results[i] = result
        return results

    def _handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | Exception | None]:
        """A taken batch: one claim transaction, one SMTP session, one record transaction.

        The guarantees of :meth:`handle`, with fewer transactions: the recipients of the
        batch's OrderPlaced events and the claims of every (order, step) are committed
        in ONE transaction before the first send; the emails then go out one after the
        other over this thread's kept connection (one round trip each when the server
        pipelines, :meth:`_send_pipelined`), and each is marked sent (its
        ``emails_sent`` row, its claim's outcome and its event's processed row) in its
        own short transaction right after the server took it, so a crash resends at
        most the one email a crash of :meth:`handle` would.

        What the batch does not claim (another delivery's claim, a second event of one
        order and step) is left to :meth:`handle` (None); a send that fails is that
        event's failure, and once the server is unreachable the rest of the batch fails
        with it instead of waiting for the same timeout again. Once ``stopping()`` is
        true no further email is sent: the rest's claims are freed and they go back
        to the queue un-started.
        """
        results: list[list[dict[str, Any]] | Exception | None] = [None] * len(events)
        dialect = self.engine.dialect
        with database.driver_transaction(self.engine) as cursor:
            stored = {
                event["id"]: json.loads(found[0])
                for event in events
                if (
                    found := store.SQL(dialect, "processed").first(
                        cursor, queue=QUEUE, event_id=event["id"]
                    )
                )
            }
        jobs: list[_Job] = []
        seen: set[tuple[int, str]] = set()
        for index, event in enumerate(events):
            if event["id"] in stored:
                results[index] = stored[event["id"]]
                continue
            try:
                step = STEPS[event["type"]]
                address = None
                if step == STEP_RECEIVED:
                    order = order_of(event)
                    order_id, address = order.order_id, recipient(order.customer_email)
                else:
                    order_id = order_id_of(event)
            except PermanentError as exc:
                results[index] = exc
                continue
            if (order_id, step) in seen:  # a second event of one step: after this one
                continue
            seen.add((order_id, step))
            jobs.append(_Job(index, event, order_id, step, address))
        if not jobs:
            return results
        owner = uuid.uuid4().hex  # this batch's claims
        lease = int(self.claim_seconds * 1000)
        claimed: set[tuple[int, str]] = set()
        # One transaction on the driver (statements compiled once, :data:`SQL`): the
        # recipients of the OrderPlaced events, then each job's recipient and claim.
        with database.driver_transaction(self.engine) as cursor:
            for job in jobs:
                if job.address is not None:
                    SQL(dialect, "add_recipient").execute(
                        cursor,
                        order_id=job.order_id,
                        email=job.address,
                        currency=job.event["data"]["currency"],
                        total=job.event["data"]["total"],
                    )
            for job in jobs:
                known = SQL(dialect, "recipient").first(cursor, order_id=job.order_id)
                if known is None:
                    results[job.index] = RecipientUnknown(
                        f"order #{job.order_id}: OrderPlaced not handled here yet"
                    )
                    continue
                email, currency, total = known
                job.who = store.Recipient(
                    order_id=job.order_id, email=email, currency=currency, total=total
                )
                if SQL(dialect, "claim").first(
                    cursor,
                    order_id=job.order_id,
                    step=job.step,
                    owner=owner,
                    event_id=job.event["id"],
                    lease=lease,
                ):
                    claimed.add((job.order_id, job.step))
        jobs = [job for job in jobs if (job.order_id, job.step) in claimed]
        pipelined = self._pipelined_session()
        if pipelined is None or not self._send_pipelined(
            *pipelined, jobs, owner, results, stopping
        ):
            unsent = [job for job in jobs if results[job.index] is None]
            self._send_one_by_one(unsent, owner, results, stopping)
        return results

    def _send_one_by_one(
        self,
        jobs: list[_Job],
        owner: str,
        results: list[list[dict[str, Any]] | Exception | None],
        stopping: Callable[[], bool],
    ) -> None:
        """The batch's claimed emails, each sent and then recorded (:meth:`send`)."""
        claimed_at = time.monotonic()
        down: Exception | None = None
        for n, job in enumerate(jobs):
            assert job.who is not None
            if n and stopping():  # shutting down: free the claim, the message goes back
                store.release_claim(self.engine, job.order_id, job.step, owner)
                continue
            if down is None and time.monotonic() - claimed_at > self.claim_seconds / 3:
                store.extend_claims(self.engine, owner, self.claim_seconds)
                claimed_at = time.monotonic()
            try:
                if down is not None:
                    raise down
                mid = message_id(job.order_id, job.step, self.sender)
                self.send(
                    render(job.event, job.who, step=job.step, sender=self.sender), job.who.email
                )
            except Exception as exc:
                store.release_claim(self.engine, job.order_id, job.step, owner)
                results[job.index] = exc
                if isinstance(exc, SmtpUnavailable):
                    down = exc
                continue
            results[job.index] = self._mark_sent(
                job.event, job.order_id, job.step, job.who.email, mid
            )

    def _pipelined_session(self) -> tuple[PipelinedSession, bool] | None:
        """This thread's connection as a :class:`PipelinedSession` (True: reused), or None
        when the server lacks PIPELINING or cannot be reached now (the one-by-one path
        then tries it and says why)."""
        try:
            smtp, reused = self._connection()
            smtp.ehlo_or_helo_if_needed()
        except (OSError, smtplib.SMTPException):
            self._drop()
            return None
        if not smtp.has_extn("pipelining"):
            return None
        return PipelinedSession(smtp, parseaddr(self.sender)[1]), reused

    def _send_pipelined(
        self,
        session: PipelinedSession,
        reused: bool,
        jobs: list[_Job],
        owner: str,
        results: list[list[dict[str, Any]] | Exception | None],
        stopping: Callable[[], bool],
    ) -> bool:
        """The batch's claimed emails in one round trip each (:class:`PipelinedSession`).

        Each email is rendered while the server reads the group before it (the body of
        one and the envelope of the next), so the thread's CPU and the server's work
        overlap instead of taking turns; an email that cannot be rendered fails alone.

        Each email is recorded right after the server's 250 for it, as one by one, so
        a crash resends at most that one; the next email's envelope already on the wire
        is simply dropped by the server with the connection. A refused email is that
        event's failure (its claim freed); a connection that fails fails what was in
        flight and the rest as :class:`SmtpUnavailable`. False, with nothing sent: the
        kept connection turned out closed by the server (a disconnect or a 421 as the
        first reply); the caller goes one by one, which reconnects.
        """
        smtp = session.smtp
        claimed_at = time.monotonic()
        flight: list[_Job] = []  # the body awaiting its reply, then the envelope
        mids: dict[int, str] = {}
        put_back: set[int] = set()  # not started (shutting down): results stay None
        ready: dict[int, tuple[bytes, bytes] | Exception] = {}  # rendered ahead, by k
        read_any = False
        refusals = (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused)

        def fail(job: _Job, error: Exception) -> None:
            store.release_claim(self.engine, job.order_id, job.step, owner)
            results[job.index] = error

        def prepare(k: int) -> None:
            """Render ``jobs[k]`` and its envelope now, or keep why it cannot be sent."""
            if k >= len(jobs) or k in ready:
                return
            job = jobs[k]
            assert job.who is not None
            try:
                data = wire_bytes(render(job.event, job.who, step=job.step, sender=self.sender))
                ready[k] = (data, session.envelope(job.who.email, data))
            except Exception as exc:  # noqa: BLE001 - that event's failure, as one by one
                ready[k] = exc

        def start(k: int, prefix: bytes = b"") -> tuple[int, bytes] | None:
            """Send ``prefix`` and the envelope of the first of ``jobs[k:]`` that renders;
            then render the one after it while the server reads them."""
            nonlocal claimed_at
            while k < len(jobs):
                job = jobs[k]
                if k and stopping():  # shutting down: the rest go back un-started
                    for rest in jobs[k:]:
                        store.release_claim(self.engine, rest.order_id, rest.step, owner)
                        put_back.add(rest.index)
                    break
                if time.monotonic() - claimed_at > self.claim_seconds / 3:
                    store.extend_claims(self.engine, owner, self.claim_seconds)
                    claimed_at = time.monotonic()
                prepare(k)
                prepared = ready.pop(k)
                if isinstance(prepared, Exception):
                    fail(job, prepared)
                    k += 1
                    continue
                data, commands = prepared
                mids[job.index] = message_id(job.order_id, job.step, self.sender)
                smtp.send(prefix + commands)
                flight.append(job)
                prepare(k + 1)  # CPU spent while the server works, not after its reply
                return k, data
            if prefix:
                smtp.send(prefix)
            return None

        try:
            current = start(0)
            body_sent = False
            while flight:
                if body_sent:  # the oldest in flight is a body: its reply comes first
                    job = flight.pop(0)
                    assert job.who is not None
                    try:
                        session.read_body()
                        read_any = True
                    except refusals as exc:
                        fail(job, self._verdict(exc))
                    else:
                        _after_send()
                        results[job.index] = self._mark_sent(
                            job.event, job.order_id, job.step, job.who.email, mids[job.index]
                        )
                    body_sent = False
                if current is None:
                    break
                k, data = current
                job = jobs[k]
                assert job.who is not None
                try:
                    session.read_envelope(job.who.email)
                    read_any = True
                except refusals as exc:
                    if reused and not read_any and _closed_by_server(exc):
                        self._drop()  # a kept connection the server had closed (421)
                        return False  # nothing was sent: the caller goes one by one
                    flight.pop()
                    fail(job, self._verdict(exc))
                    current = start(k + 1)
                    continue
                current = start(k + 1, session.body(data))
                body_sent = True
        except (OSError, smtplib.SMTPException) as exc:  # the connection failed
            self._drop()
            if reused and not read_any and isinstance(exc, smtplib.SMTPServerDisconnected):
                return False  # nothing was sent: the caller sends them one by one
            error = self._verdict(exc)
            for job in jobs:  # in flight, or not sent: the server is gone
                if results[job.index] is None and job.index not in put_back:
                    fail(job, error)
        except BaseException:
            # Never reuse a connection left mid-conversation (an envelope on the wire may
            # have had its DATA accepted: whatever came next would be message text).
            self._drop()
            raise
        return True

    def _mark_sent(
        self, event: dict[str, Any], order_id: int, step: str, address: str, mid: str
    ) -> list[dict[str, Any]]:
        """Record one handed-over email, committed now, in ONE transaction: its
        ``emails_sent`` row, its claim's outcome and the event's processed row.

        Core statements on one connection (compiled once, cached): the ORM session
        this replaced (a get, a flush and a second transaction for the processed row)
        was a sixth of the consumer's CPU per email. A redelivery after a crash past the
        send finds the first ``sent_at`` and so builds the same outcome; a duplicate
        processed row is skipped, its outcome being that same one.
        """
        now = datetime.now(UTC)
        dialect = self.engine.dialect
        result = notified(order_id, step, mid, now)
        outcome = json.dumps(result)
        try:
            with database.driver_transaction(self.engine) as cursor:
                sent = SQL(dialect, "sent").first(
                    cursor,
                    message_id=mid,
                    order_id=order_id,
                    step=step,
                    event_id=event["id"],
                    recipient=address,
                    sent_at=now,
                )
                if sent is None:  # sent before (a crash after the send): the path below
                    raise _Declined
                SQL(dialect, "claim_sent").execute(
                    cursor, order_id=order_id, step=step, outcome=outcome
                )
                store.SQL(dialect, "record_new").execute(
                    cursor,
                    queue=QUEUE,
                    event_id=event["id"],
                    order_id=order_id,
                    outcome=outcome,
                    processed_at=now,
                )
            return result
        except _Declined:
            pass
        insert = store.dialect_insert(self.engine)
        with self.engine.begin() as conn:
            at = conn.execute(
                insert(store.EmailSent)
                .values(
                    message_id=mid,
                    order_id=order_id,
                    step=step,
                    event_id=event["id"],
                    recipient=address,
                    sent_at=now,
                )
                .on_conflict_do_nothing()
                .returning(store.EmailSent.sent_at)
            ).scalar_one_or_none()
            if at is None:  # sent before (a crash after the send): its first time
                at = conn.execute(
                    select(store.EmailSent.sent_at).where(store.EmailSent.message_id == mid)
                ).scalar_one()
            result = notified(order_id, step, mid, at)
            outcome = json.dumps(result)
            conn.execute(
                update(store.EmailClaim)
                .where(store.EmailClaim.order_id == order_id, store.EmailClaim.step == step)
                .values(state="sent", outcome=outcome)
            )
            conn.execute(
                insert(store.Processed)
                .values(
                    queue=QUEUE,
                    event_id=event["id"],
                    order_id=order_id,
                    outcome=outcome,
                    processed_at=now,
                )
                .on_conflict_do_nothing()
            )
        return result
