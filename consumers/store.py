"""The consumer services' tables and the idempotent "process once" step.

Each service owns its database (``PAYMENT_DATABASE_URL``, ``INVOICE_DATABASE_URL``,
``SHIPPING_DATABASE_URL``, ``EMAIL_DATABASE_URL``: SQLite files locally, separate
PostgreSQL databases in compose)
and creates only its own tables in it (:data:`SERVICE_TABLES`). ``consumer_processed`` holds one
row per (queue, event id) with the outcome events the handling produced, written in
the same transaction as the effect: a duplicate delivery finds the row and re-emits
the stored outcome instead of doing the work again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from messaging import database
from messaging.queue import PermanentError

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long an SQLite writer waits for the lock (several processes write)."""


def now() -> datetime:
    """Now, in UTC (the time columns' default)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of the consumers' tables (separate from the order service's)."""


class Processed(Base):
    """One handled event per queue, with the outcome events it produced (JSON list)."""

    __tablename__ = "consumer_processed"
    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_id: Mapped[int | None] = mapped_column(Integer, index=True)
    outcome: Mapped[str] = mapped_column(Text)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class GatewayCharge(Base):
    """The simulated payment gateway's idempotency ledger, keyed like Idempotency-Key."""

    __tablename__ = "payment_gateway_charges"
    idempotency_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer, index=True)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str | None] = mapped_column(String(16))
    """None until decided; then 'captured' or 'declined' (final for this key)."""
    payment_id: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[str] = mapped_column(String(32))
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Payment(Base):
    """One payment outcome per order: the unique key that makes "charge once" data.

    The gateway call is keyed by the order too (:func:`consumers.payment.payment_key`),
    so a second OrderPlaced for the same order (a new event id: a re-publish, a
    replay) finds this row and re-emits its stored outcome, with the same event id.
    """

    __tablename__ = "payments"
    order_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(Text)
    """The outcome events (JSON list) emitted for the order."""
    paid_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


def order_payment(engine: Engine, order_id: int) -> list[dict[str, Any]] | None:
    """The stored outcome events of the order's payment, or None when it has none yet."""
    with Session(engine) as session:
        row = session.get(Payment, order_id)
        return None if row is None else json.loads(row.outcome)


class EmailClaim(Base):
    """Who is sending one order's email of one step: claimed before the SMTP send.

    The row is inserted (or taken over) in its own committed transaction *before* the
    send, so two workers holding two copies of the same OrderPlaced cannot both send:
    the second finds the claim and waits (its message is retried) or, once the first
    has recorded the send, re-emits the stored outcome. The claim is a lease on the
    database's clock (``lease_until_ms``): a worker that dies after claiming and
    before sending leaves it to expire, and the next delivery takes it over and sends,
    so the email is never lost.
    """

    __tablename__ = "email_claims"
    order_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    step: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    """'sending' (claimed) or 'sent' (recorded with ``outcome``)."""
    lease_until_ms: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str | None] = mapped_column(Text)


def claim_effect(
    engine: Engine, order_id: int, step: str, event_id: str, owner: str, lease_seconds: float
) -> tuple[str, list[dict[str, Any]] | None]:
    """Claim (order, step) for ``owner``; committed before returning.

    Returns ``("mine", None)``: do the effect; ``("done", outcome)``: another delivery
    did it, emit its outcome; ``("busy", None)``: another worker holds a live claim.
    """
    now = database.now_ms(engine.dialect.name)
    lease = int(lease_seconds * 1000)
    try:
        with Session(engine) as session, session.begin():
            session.execute(
                insert(EmailClaim).values(
                    order_id=order_id, step=step, owner=owner, event_id=event_id,
                    state="sending", lease_until_ms=now + lease, outcome=None,
                )
            )  # fmt: skip
        return "mine", None
    except IntegrityError:
        pass
    with Session(engine) as session, session.begin():
        taken = session.execute(  # type: ignore[attr-defined]
            update(EmailClaim)
            .where(
                EmailClaim.order_id == order_id,
                EmailClaim.step == step,
                EmailClaim.state == "sending",
                EmailClaim.lease_until_ms < now,
            )
            .values(owner=owner, event_id=event_id, lease_until_ms=now + lease)
        ).rowcount
        if taken:
            return "mine", None
        row = session.get(EmailClaim, (order_id, step))
        if row is not None and row.state == "sent" and row.outcome is not None:
            return "done", json.loads(row.outcome)
    return "busy", None


def extend_claims(engine: Engine, owner: str, lease_seconds: float) -> None:
    """Renew the leases of ``owner``'s claims still sending (a long batch keeps them)."""
    until = database.now_ms(engine.dialect.name) + int(lease_seconds * 1000)
    with Session(engine) as session, session.begin():
        session.execute(
            update(EmailClaim)
            .where(EmailClaim.owner == owner, EmailClaim.state == "sending")
            .values(lease_until_ms=until)
        )


def dialect_insert(bind: Engine | Connection) -> Any:
    """The INSERT of ``bind``'s dialect (both have ON CONFLICT DO NOTHING and RETURNING)."""
    return dialect_insert_of(bind.dialect)


def dialect_insert_of(dialect: Dialect) -> Any:
    """The INSERT of ``dialect`` (both have ON CONFLICT and RETURNING)."""
    return database.insert_of(dialect)


def release_claim(engine: Engine, order_id: int, step: str, owner: str) -> None:
    """Drop ``owner``'s claim when its effect did not happen (best effort: it expires)."""
    try:
        with Session(engine) as session, session.begin():
            session.execute(
                delete(EmailClaim).where(
                    EmailClaim.order_id == order_id,
                    EmailClaim.step == step,
                    EmailClaim.owner == owner,
                    EmailClaim.state == "sending",
                )
            )
    except SQLAlchemyError:
        log.warning("could not release the claim of order #%s %s; it expires", order_id, step)


class InvoiceCounter(Base):
    """The last invoice number issued per year (allocation is gap-free)."""

    __tablename__ = "invoice_counters"
    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last: Mapped[int] = mapped_column(Integer, default=0)


class Invoice(Base):
    """One invoice per order."""

    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("order_id"), UniqueConstraint("invoice_number"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer)
    invoice_number: Mapped[str] = mapped_column(String(20))
    event_id: Mapped[str] = mapped_column(String(64))
    total: Mapped[str] = mapped_column(String(32))
    currency: Mapped[str] = mapped_column(String(3))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Shipment(Base):
    """One carrier booking per order (the shipping service's own table)."""

    __tablename__ = "shipments"
    __table_args__ = (UniqueConstraint("order_id"), UniqueConstraint("tracking_number"))
    shipment_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer)
    carrier: Mapped[str] = mapped_column(String(40))
    tracking_number: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(64))
    """The PaymentCaptured event that booked it."""
    booked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Recipient(Base):
    """Who to tell about an order: recorded by the email service from OrderPlaced.

    Later steps (PaymentDeclined, ShipmentBooked) carry no address: the email service
    keeps its own copy instead of asking the order service."""

    __tablename__ = "email_recipients"
    order_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(320))
    currency: Mapped[str] = mapped_column(String(3))
    total: Mapped[str] = mapped_column(String(32))


class EmailSent(Base):
    """A customer email handed to the SMTP server: at most one per (order, step)."""

    __tablename__ = "emails_sent"
    __table_args__ = (UniqueConstraint("order_id", "step"),)
    message_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer, index=True)
    step: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(320))
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


def make_engine(url: str) -> Engine:
    """An engine for the service's database URL; SQLite also gets BEGIN IMMEDIATE.

    messaging.database already sets WAL and a busy timeout. BEGIN IMMEDIATE takes
    SQLite's write lock when a transaction starts, so two processes never both read a
    row and then both write it (the invoice counter): writers queue on the lock
    instead of failing with "database is locked" when a read lock cannot be upgraded.
    """
    engine = database.database_engine(url)
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


SERVICE_TABLES: dict[str, tuple[type[Base], ...]] = {
    "payment": (Processed, GatewayCharge, Payment),
    "invoice": (Processed, InvoiceCounter, Invoice),
    "shipping": (Processed, Shipment),
    "email": (Processed, Recipient, EmailSent, EmailClaim),
}
"""The tables each service creates in its own database (and nothing else's)."""


def create_tables(engine: Engine, service: str) -> None:
    """Create ``service``'s tables in its database if missing (safe to run concurrently)."""
    tables = [model.__table__ for model in SERVICE_TABLES[service]]
    database.create_tables(engine, Base.metadata, tables=tables)


def lookup(engine: Engine, queue: str, event_id: str) -> list[dict[str, Any]] | None:
    """The stored outcome events of an event already handled on ``queue``, else None."""
    with engine.connect() as conn:  # Core: the ORM's identity map is no use for one read
        outcome = conn.execute(
            select(Processed.outcome).where(
                Processed.queue == queue, Processed.event_id == event_id
            )
        ).scalar_one_or_none()
    return None if outcome is None else json.loads(outcome)


def process_once(
    engine: Engine,
    queue: str,
    event: dict[str, Any],
    effect: Callable[[Session], list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], bool]:
    """Run ``effect`` and record it, once per (queue, event id), in one transaction.

    ``effect`` gets the open session, may add rows (they commit with the processed
    row, or not at all) and returns the outcome events to emit. Returns
    ``(outcome events, True)`` when this call did the work, or the stored outcome and
    False when the event had been handled before (also when a concurrent duplicate
    won the race and this transaction hit the unique key).
    """
    order_id = event.get("data", {}).get("order_id")
    try:
        with Session(engine) as session, session.begin():
            row = session.get(Processed, (queue, event["id"]))
            if row is not None:
                return json.loads(row.outcome), False
            outcome = effect(session)
            session.add(
                Processed(
                    queue=queue,
                    event_id=event["id"],
                    order_id=order_id if isinstance(order_id, int) else None,
                    outcome=json.dumps(outcome),
                )
            )
    except IntegrityError:
        stored = lookup(engine, queue, event["id"])
        if stored is None:
            raise
        return stored, False
    return outcome, True


SQL = database.DriverStatements(
    processed=lambda _dialect: select(Processed.outcome).where(
        Processed.queue == bindparam("queue"), Processed.event_id == bindparam("event_id")
    ),
    record=lambda _dialect: insert(Processed).values(
        **database.binds("queue", "event_id", "order_id", "outcome", "processed_at"),
    ),
    # A processed row after an effect outside the database (an email sent): a
    # duplicate's row, there already, is that same outcome.
    record_new=lambda dialect: (
        dialect_insert_of(dialect)(Processed)
        .values(
            **database.binds("queue", "event_id", "order_id", "outcome", "processed_at"),
        )
        .on_conflict_do_nothing()
    ),
)
"""The fast path's statements, compiled once per dialect (:func:`process_new`)."""

NewEffect = Callable[[Any, Dialect], "list[dict[str, Any]] | None"]
"""The effect of :func:`process_new`: (driver cursor, dialect) -> outcome events, or
None when the event is not the common case (its row exists already ...)."""


Parsed = TypeVar("Parsed")


class _NotNew(Exception):
    """The fast path declines: roll back, the full path decides."""


def process_new(
    engine: Engine, queue: str, event: dict[str, Any], effect: NewEffect
) -> list[dict[str, Any]] | None:
    """:func:`process_once`'s common case (an event seen for the first time), on the driver.

    One transaction on the DBAPI cursor (:func:`messaging.database.driver_transaction`,
    statements compiled once by SQLAlchemy): check the processed row, run ``effect``,
    insert the processed row, commit. A message's database work costs about a tenth of
    the ORM's (``benchmarks/README.md``, "the consumers' fast path"). Returns the
    outcome events when this call did the work and committed it; None, with nothing
    committed, when the event was handled before, when ``effect`` returns None, or
    when a unique key refused the insert (a concurrent duplicate): the caller then runs
    the full path (:func:`process_once`), which returns the stored outcome or does the
    rare case. So the fast path never decides anything the full path would decide
    differently; it only skips the ORM when there is nothing to decide.
    """
    dialect = engine.dialect
    try:
        with database.driver_transaction(engine) as cursor:
            if SQL(dialect, "processed").first(cursor, queue=queue, event_id=event["id"]):
                raise _NotNew
            outcome = effect(cursor, dialect)
            if outcome is None:
                raise _NotNew
            record_processed(cursor, dialect, queue, event, outcome)
    except (_NotNew, IntegrityError):
        return None
    return outcome


def record_processed(
    cursor: Any, dialect: Dialect, queue: str, event: dict[str, Any], outcome: list[Any]
) -> None:
    """Insert the event's processed row (its outcome) on the driver."""
    order_id = event.get("data", {}).get("order_id")
    SQL(dialect, "record").execute(
        cursor,
        queue=queue,
        event_id=event["id"],
        order_id=order_id if isinstance(order_id, int) else None,
        outcome=json.dumps(outcome),
        processed_at=now(),
    )


def process_new_batch(
    engine: Engine,
    queue: str,
    events: list[dict[str, Any]],
    effect_of: Callable[[dict[str, Any]], NewEffect | None],
) -> list[list[dict[str, Any]] | None]:
    """:func:`process_new` for a taken batch, in ONE transaction on the driver.

    Per event, in order: its stored outcome when it was handled before (or earlier in
    this batch); else ``effect_of(event)``'s effect, recorded with its processed row.
    None for an event whose ``effect_of`` is None (bad data) or whose effect declines
    (its row exists already): the worker hands those to the handler's ``handle``, which
    dead-letters or reports them. Raises what the transaction raised (a concurrent
    duplicate's unique key included): nothing of the batch is then committed, and the
    worker handles the events one at a time.
    """
    dialect = engine.dialect
    results: list[list[dict[str, Any]] | None] = []
    with database.driver_transaction(engine) as cursor:
        for event in events:
            effect = effect_of(event)
            if effect is None:
                results.append(None)
                continue
            found = SQL(dialect, "processed").first(cursor, queue=queue, event_id=event["id"])
            if found is not None:
                results.append(json.loads(found[0]))
                continue
            outcome = effect(cursor, dialect)
            if outcome is not None:
                record_processed(cursor, dialect, queue, event, outcome)
            results.append(outcome)
    return results


def new_effects(
    parse: Callable[[dict[str, Any]], Parsed],
    effect: Callable[[dict[str, Any], Parsed], NewEffect],
) -> Callable[[dict[str, Any]], NewEffect | None]:
    """``effect_of`` for :func:`process_new_batch`: None when ``parse`` refuses the event
    (PermanentError; the handler's ``handle`` dead-letters it with the reason)."""

    def effect_of(event: dict[str, Any]) -> NewEffect | None:
        try:
            return effect(event, parse(event))
        except PermanentError:
            return None

    return effect_of


def record_outcome(
    engine: Engine, queue: str, event: dict[str, Any], outcome: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bool]:
    """Record an effect done outside the database (a charge, an email); see process_once."""
    return process_once(engine, queue, event, lambda _session: outcome)
