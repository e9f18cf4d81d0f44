"""messaging.database.DriverStatement: a Core statement compiled once, run on the cursor.

The fast paths of the consumers and of orders-updates write through it, so the rows it
writes must be exactly the rows SQLAlchemy's own execution writes (bind processors
applied, literals kept), on both paramstyles (SQLite's qmark, psycopg's pyformat).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Engine, Table, bindparam, insert, select
from sqlalchemy.dialects import postgresql

from consumers import store
from messaging import database
from messaging.database import DriverInsert, DriverStatement, DriverStatements
from orders.bootstrap import create_schema
from orders.models import Order

PROCESSED = store.Processed.__table__


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'driver.db'}")
    store.create_tables(engine, "shipping")
    return engine


def test_a_driver_insert_writes_the_row_sqlalchemy_writes(engine: Engine) -> None:
    at = datetime(2026, 12, 4, 5, 6, 7, 891011, tzinfo=UTC)
    row = {"queue": "q", "order_id": 7, "outcome": "[]", "processed_at": at}
    statement = DriverStatement(
        insert(PROCESSED).values(
            event_id=bindparam("event_id"),
            queue=bindparam("queue"),
            order_id=bindparam("order_id"),
            outcome=bindparam("outcome"),
            processed_at=bindparam("processed_at"),
        ),
        engine.dialect,
    )
    with database.driver_transaction(engine) as cursor:
        statement.execute(cursor, event_id="driver", **row)
    with engine.begin() as conn:
        conn.execute(insert(PROCESSED).values(event_id="core", **row))
        stored = {
            event_id: (queue, order_id, outcome, processed_at)
            for event_id, queue, order_id, outcome, processed_at in conn.exec_driver_sql(
                "SELECT event_id, queue, order_id, outcome, processed_at FROM consumer_processed"
            )
        }
    assert stored["driver"] == stored["core"]
    assert stored["driver"][3] == "2026-12-04 05:06:07.891011"  # the DateTime bind processor


def test_literals_in_the_statement_keep_their_values_and_a_read_finds_the_row(
    engine: Engine,
) -> None:
    statements = DriverStatements(
        find=lambda _dialect: select(PROCESSED.c.outcome).where(
            PROCESSED.c.queue == "shipping", PROCESSED.c.event_id == bindparam("event_id")
        )
    )
    with engine.begin() as conn:
        conn.execute(
            insert(PROCESSED).values(queue="shipping", event_id="e1", outcome='["x"]'),
        )
        conn.execute(insert(PROCESSED).values(queue="other", event_id="e2", outcome='["y"]'))
    find = statements(engine.dialect, "find")
    assert statements(engine.dialect, "find") is find  # compiled once
    with database.driver_transaction(engine) as cursor:
        assert find.first(cursor, event_id="e1") == ('["x"]',)
        assert find.first(cursor, event_id="e2") is None  # queue 'other': the literal held


def test_named_paramstyle_gets_each_bind_under_its_name_in_the_sql() -> None:
    dialect = postgresql.dialect(paramstyle="pyformat")
    statement = DriverStatement(
        select(PROCESSED.c.outcome).where(
            PROCESSED.c.queue == "payment", PROCESSED.c.event_id == bindparam("event_id")
        ),
        dialect,
    )
    params = statement.params({"event_id": "e9"})
    assert params == {"queue_1": "payment", "event_id": "e9"}
    for name in params:
        assert f"%({name})s" in statement.sql


def test_a_missing_parameter_is_a_key_error_not_a_null() -> None:
    statement = DriverStatement(
        select(PROCESSED.c.outcome).where(PROCESSED.c.event_id == bindparam("event_id")),
        postgresql.dialect(paramstyle="pyformat"),
    )
    with pytest.raises(KeyError):
        statement.params({})


def test_expanding_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="expanding"):
        DriverStatement(
            select(PROCESSED.c.outcome).where(
                PROCESSED.c.event_id.in_(bindparam("ids", expanding=True))
            ),
            postgresql.dialect(paramstyle="pyformat"),
        )


def test_a_consumer_engines_driver_transaction_holds_the_write_lock(engine: Engine) -> None:
    """The consumers' SQLite connections are in autocommit mode (no implicit BEGIN):
    driver_transaction begins IMMEDIATE, so the transaction is one and rolls back whole."""
    with pytest.raises(RuntimeError), database.driver_transaction(engine) as cursor:
        cursor.execute(
            "INSERT INTO consumer_processed (queue, event_id, outcome, processed_at)"
            " VALUES ('q', 'rolled-back', '[]', '2026-01-01')"
        )
        raise RuntimeError("after the insert")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM consumer_processed").scalar() == 0


def test_a_driver_insert_skips_a_row_whose_unique_key_is_taken(tmp_path: Path) -> None:
    """skip_conflicts_on: ON CONFLICT DO NOTHING, and ``one`` answers None for the row
    it skipped (the intake's Idempotency-Key), the new id otherwise."""
    orders = database.database_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    create_schema(orders)
    inserts = DriverInsert(
        cast(Table, Order.__table__),
        orders.dialect,
        returning_id=True,
        skip_conflicts_on=("idempotency_key",),
    )
    row = {
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "total": Decimal("25.00"),
        "status": "placed",
        "priority": "standard",
        "created_at": datetime(2026, 12, 5, tzinfo=UTC),
        "idempotency_key": "k-1",
        "request_hash": "0" * 64,
    }
    with database.driver_transaction(orders) as cursor:
        first = inserts.one(cursor, row)
        again = inserts.one(cursor, {**row, "customer_email": "eve@example.com"})
        other = inserts.one(cursor, {**row, "idempotency_key": "k-2"})
        unkeyed = [inserts.one(cursor, {**row, "idempotency_key": None}) for _ in range(2)]
    assert again is None
    ids = [first, other, *unkeyed]
    assert None not in ids and len(set(ids)) == 4
    with orders.connect() as conn:
        stored = conn.execute(select(Order.id, Order.customer_email).order_by(Order.id)).all()
    assert [tuple(r) for r in stored] == [(i, "ada@example.com") for i in ids]
    sql, _ = inserts._prepare(tuple(row))
    assert "ON CONFLICT (idempotency_key) DO NOTHING" in sql
    orders.dispose()
