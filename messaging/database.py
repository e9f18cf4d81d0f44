"""Database engines for the services' own databases (SQLite files or PostgreSQL).

Each service owns its database; what they share is how an engine is built (SQLite
pragmas chosen once, below) and how tables are created without racing a sibling
process that starts at the same moment.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, literal_column, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import ColumnElement

log = logging.getLogger(__name__)


SCHEMA_LOCK_KEY = 7_310_421
"""PostgreSQL advisory lock id held while creating tables (API and relay start together)."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Chosen deliberately, per connection:
    # - journal_mode=WAL: readers never block the writer nor it them; a commit appends
    #   to the log instead of rewriting pages.
    # - synchronous=NORMAL: in WAL mode a commit does not fsync (the checkpoint does). A
    #   process crash loses nothing; a power cut or kernel crash can roll back the last
    #   commits (orders already answered 201 included, each with its outbox row, never
    #   half of one) but never corrupts the file. FULL would fsync every commit and cap
    #   intake at the disk's flush rate; use PostgreSQL where a power cut must lose
    #   nothing.
    # - busy_timeout=10000: a second writer waits for the lock (SQLite's busy handler
    #   sleeps 1, 2, 5, 10 ... ms between tries) instead of failing at once with
    #   "database is locked". Each service has its own file, so the only writers
    #   that queue are one service's own threads and processes.
    # - foreign_keys=ON: SQLite enforces REFERENCES only when asked.
    #
    # busy_timeout comes first, so that every later statement waits for a sibling's
    # lock. WAL is a property of the file, kept once set: a connection reads the mode
    # and switches only when the file is not in WAL yet. The switch needs the file to
    # itself, and SQLite answers "database is locked" to it at once (its busy handler is
    # not consulted while another connection on a fresh file holds or recovers the
    # lock), so processes that open one new file at the same instant retry it, bounded.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=10000")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any, *, budget_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + budget_seconds
    pause = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() in ("wal", "memory"):  # ":memory:" databases stay memory
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        if time.monotonic() >= deadline:
            raise sqlite3.OperationalError("database is locked: could not switch to WAL")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def database_engine(database_url: str, **overrides: Any) -> Engine:
    """A SQLAlchemy engine for DATABASE_URL (creates the SQLite file's directory).

    Does not connect: the first query does.
    """
    url = make_url(database_url)
    # Pre-ping costs a SELECT 1 per checkout (every request): worth it for a server
    # connection that a restart may have cut; a SQLite file has no connection to lose.
    options: dict[str, Any] = {"pool_pre_ping": url.get_backend_name() != "sqlite"}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"check_same_thread": False, "timeout": 10}
    options.update(overrides)
    engine = create_engine(url, **options)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def create_tables(
    engine: Engine, metadata: MetaData, *, tables: list[Any] | None = None, attempts: int = 5
) -> None:
    """Create a service's tables if missing: idempotent, safe when processes start together.

    PostgreSQL: an advisory lock serialises concurrent creators. SQLite runs DDL outside
    a transaction (pysqlite), so two processes can both see a table missing and the
    second ``CREATE TABLE`` fails with "already exists": then the check runs again and
    finds it (bounded retries).
    """
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY}
                    )
                metadata.create_all(conn, tables=tables)
            return
        except OperationalError as exc:
            if "already exists" not in str(exc) or attempt == attempts:
                raise


def now_ms(dialect: str) -> ColumnElement[int]:
    """The database server's clock in UNIX milliseconds, as a SQL expression.

    Leases (the outbox claim, the email claim) are written by one host and compared on
    another: with each host's own clock, a host one hour ahead would steal every lease
    and one behind would hold them an hour. The database's clock is the one both sides
    see. SQLite's is the clock of whichever process runs the statement; its file is
    local to one host, whose processes share that host's clock.
    """
    if dialect == "postgresql":
        return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)")
    return literal_column("CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)")


def now_plus(dialect: str, seconds: float = 0.0) -> ColumnElement[Any]:
    """The database server's clock plus ``seconds``, as a timestamp SQL expression.

    In the storage format of a ``DateTime`` column on each backend (SQLite: naive UTC
    text, ``YYYY-MM-DD HH:MM:SS.ffffff``, which sorts like the values SQLAlchemy writes;
    PostgreSQL: ``timestamptz``), for leases compared in SQL (see :func:`now_ms`).
    """
    offset = float(seconds)
    if dialect == "postgresql":
        return literal_column(f"(clock_timestamp() + {offset!r} * interval '1 second')")
    return literal_column(
        f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '{offset:+.6f} seconds') || '000')"
    )
