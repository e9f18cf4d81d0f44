"""Database engines for the services' own databases (SQLite files or PostgreSQL).

Each service owns its database; what they share is how an engine is built (SQLite
pragmas chosen once, below) and how tables are created without racing a sibling
process that starts at the same moment.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Dialect,
    Engine,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
    literal_column,
    make_url,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

log = logging.getLogger(__name__)


BUSY_TIMEOUT_SECONDS = 10.0
"""How long a SQLite writer waits for the file's write lock before "database is locked"."""

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
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
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
        options["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_SECONDS}
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


class DriverInsert:
    """An INSERT compiled once by SQLAlchemy, executed on the driver's cursor.

    Why: on the order intake (every POST) SQLAlchemy's per-execution machinery (result
    objects, parameter processing through the compiled cache, the connection's
    transaction bookkeeping) cost about 400 µs of CPU per order, four times the driver's
    own work. The SQL text and each column's bind processor (the same
    ``TypeEngine.bind_processor`` SQLAlchemy itself applies: money as text on SQLite,
    UTC timestamps) still come from SQLAlchemy, so the rows written are exactly the ones
    ``conn.execute(insert(table), ...)`` would write. Statements are compiled per set of
    columns on first use (a caller that adds a column needs no change here).

    Use it inside :func:`driver_transaction`, which also turns driver errors into
    SQLAlchemy's exceptions.
    """

    def __init__(
        self,
        table: Table,
        dialect: Dialect,
        *,
        returning_id: bool = False,
        sql_values: dict[str, Any] | None = None,
        skip_conflicts_on: tuple[str, ...] = (),
    ) -> None:
        """``sql_values``: columns set by a SQL expression (the database's clock ...).

        ``skip_conflicts_on``: the columns of a unique index; a row whose values are
        taken already is not inserted (``ON CONFLICT DO NOTHING``) and :meth:`one`
        returns None for it instead of raising ``IntegrityError``.
        """
        self.table = table
        self.dialect = dialect
        self.skip_conflicts_on = skip_conflicts_on
        # SQLite hands back the new row's id as lastrowid; PostgreSQL needs RETURNING.
        self.returning = returning_id and dialect.name != "sqlite"
        self.sql_values = sql_values or {}
        self._compiled: dict[tuple[str, ...], tuple[str, list[tuple[str, Any]]]] = {}
        self._positional = dialect.paramstyle in ("qmark", "numeric", "format")

    def _prepare(self, columns: tuple[str, ...]) -> tuple[str, list[tuple[str, Any]]]:
        found = self._compiled.get(columns)
        if found is None:
            if self.skip_conflicts_on:
                statement = (
                    insert_of(self.dialect)(self.table)
                    .values(self.sql_values)
                    .on_conflict_do_nothing(index_elements=list(self.skip_conflicts_on))
                )
            else:
                statement = insert(self.table).values(self.sql_values)
            if self.returning:
                statement = statement.returning(*self.table.primary_key.columns)
            compiled = statement.compile(dialect=self.dialect, column_keys=list(columns))
            # The binds in the statement's own order (the table's column order).
            names = list(compiled.positiontup or ()) if self._positional else list(columns)
            if sorted(names) != sorted(columns):
                raise ValueError(f"binds {names} of {compiled.string!r} are not {columns}")
            binds = [
                (
                    name,
                    self.table.c[name].type.dialect_impl(self.dialect).bind_processor(self.dialect),
                )
                for name in names
            ]
            found = self._compiled.setdefault(columns, (compiled.string, binds))
        return found

    def _params(self, binds: list[tuple[str, Any]], row: dict[str, Any]) -> Any:
        values = [row[name] if process is None else process(row[name]) for name, process in binds]
        if self._positional:
            return values
        return {name: value for (name, _), value in zip(binds, values, strict=True)}

    def one(self, cursor: Any, row: dict[str, Any]) -> int | None:
        """Insert one row; returns its primary key when built with ``returning_id``
        (None when ``skip_conflicts_on`` skipped it)."""
        sql, binds = self._prepare(tuple(row))
        cursor.execute(sql, self._params(binds, row))
        if self.returning:
            found = cursor.fetchone()
            return None if found is None else int(found[0])
        if self.dialect.name != "sqlite" or cursor.rowcount == 0:
            return None
        return int(cursor.lastrowid)

    def many(self, cursor: Any, rows: list[dict[str, Any]]) -> None:
        """Insert rows that all name the same columns (one executemany)."""
        if not rows:
            return
        sql, binds = self._prepare(tuple(rows[0]))
        cursor.executemany(sql, [self._params(binds, row) for row in rows])


class DriverStatement:
    """Any fixed-shape Core statement compiled once, executed on the driver's cursor.

    :class:`DriverInsert`'s reason, for the reads and updates of the consumers' and the
    order history's hot paths: SQLAlchemy's per-execution machinery costs about 100 µs
    of CPU per statement (a whole ORM "process once" about 1 ms against 0.2 ms on the
    driver; ``python -m benchmarks.fastpath``). The SQL text and the bind processors come
    from SQLAlchemy, compiled for ``dialect``; parameters are named with
    ``bindparam("name")`` and given by name to :meth:`execute`; literals written into
    the statement keep their values. Rows come back as the driver returns them, without
    SQLAlchemy's result processing: read columns whose driver value is already right
    (integers, strings, text), not dates. No IN lists or other expanding parameters.
    """

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        positional = dialect.paramstyle in ("qmark", "numeric", "format")
        if positional:  # in the order of the placeholders (a name may come twice)
            pairs = [(compiled.binds[name], name) for name in compiled.positiontup or ()]
        else:  # each bind under the name the SQL text uses
            pairs = list(compiled.bind_names.items())
        if "POSTCOMPILE" in compiled.string:
            raise ValueError(f"expanding parameters are not supported: {compiled.string!r}")
        self.sql: str = compiled.string
        self._positional = positional
        self._binds: list[tuple[str, bool, Any, Any]] = []
        """(name in the SQL text, given by the caller, literal value, bind processor)."""
        for bind, name in pairs:
            given = bind.required
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            value = bind.effective_value
            if not given and process is not None:
                value = process(value)
            if given and bind.key != name:
                raise ValueError(f"bind {bind.key!r} is rendered as {name!r} in {self.sql!r}")
            self._binds.append((name, given, value, process))

    def params(self, values: dict[str, Any]) -> Any:
        """The driver's parameters (a list or a dict by the dialect's paramstyle)."""
        out = []
        for name, given, value, process in self._binds:
            if given:
                value = values[name]
                if process is not None:
                    value = process(value)
            out.append(value)
        if self._positional:
            return out
        return {name: value for (name, *_), value in zip(self._binds, out, strict=True)}

    def execute(self, cursor: Any, **values: Any) -> Any:
        """Run it on ``cursor`` with the named parameters; returns the cursor."""
        cursor.execute(self.sql, self.params(values))
        return cursor

    def first(self, cursor: Any, **values: Any) -> Any:
        """The first row (a driver tuple), or None."""
        return self.execute(cursor, **values).fetchone()


def insert_of(dialect: Dialect) -> Any:
    """The INSERT construct of ``dialect``: both have ON CONFLICT and RETURNING."""
    if dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def binds(*names: str) -> dict[str, Any]:
    """``{name: bindparam(name)}`` for a statement's ``.values(**binds(...))``: the
    columns a :class:`DriverStatement` caller gives by name."""
    return {name: bindparam(name) for name in names}


class DriverStatements:
    """Named :class:`DriverStatement` builders, each compiled once per dialect on first use.

    ``SQL = DriverStatements(find=lambda dialect: select(...))``, then
    ``SQL(dialect, "find")``; a builder gets the dialect (for its own INSERT's upsert).
    """

    def __init__(self, **builders: Callable[[Dialect], Any]) -> None:
        self._builders = builders
        self._compiled: dict[tuple[Dialect, str], DriverStatement] = {}

    def __call__(self, dialect: Dialect, name: str) -> DriverStatement:
        found = self._compiled.get((dialect, name))
        if found is None:
            found = DriverStatement(self._builders[name](dialect), dialect)
            found = self._compiled.setdefault((dialect, name), found)
        return found


@contextmanager
def _pipelined(dbapi_connection: Any) -> Iterator[None]:
    pipeline = getattr(dbapi_connection, "pipeline", None)  # psycopg 3; sqlite3 has none
    if pipeline is None:
        yield
        return
    with pipeline():
        yield


@contextmanager
def driver_transaction(engine: Engine, *, write: bool = True) -> Iterator[Any]:
    """A pooled connection's DBAPI cursor in one transaction: commit, or roll back.

    ``write=False`` is for reads: no write lock is taken (SQLite: WAL readers never wait
    for the writer), and the transaction only ends what the driver began.

    The connection comes from the engine's pool (its ``connect`` listeners, pre-ping and
    recycling apply). On SQLite the transaction holds :func:`write_lock`. A driver
    error leaves as the SQLAlchemy exception ``conn.execute`` would raise
    (``IntegrityError``, ``OperationalError`` ...), so the callers' handlers (a 503 for
    a locked or unreachable database) see no difference; a lost connection is
    invalidated, as SQLAlchemy does.

    On PostgreSQL (psycopg) the transaction runs in pipeline mode: statements whose
    results are not read yet go out together, so BEGIN travels with the first
    statement and an executemany with the next one (4 round trips for an order instead
    of 6; on a busy machine each round trip costs a scheduler wake-up of the server).
    """
    dialect = engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        raw = engine.raw_connection()  # the pool does not wrap a failed connect
    except dbapi_error as exc:
        raise DBAPIError.instance(None, None, exc, dbapi_error, dialect=dialect) from exc
    cursor = None
    try:
        cursor = raw.cursor()
        try:
            with write_lock(engine) if write else nullcontext(), _pipelined(raw.dbapi_connection):
                driver = raw.dbapi_connection
                sqlite_autocommit = getattr(driver, "isolation_level", "") is None
                if write and dialect.name == "sqlite" and sqlite_autocommit:
                    # Autocommit mode (the consumers' engines, see consumers.store): no
                    # implicit BEGIN, so take the write lock now, as their ORM path does.
                    cursor.execute("BEGIN IMMEDIATE")
                yield cursor
                raw.commit()
        except BaseException:
            with suppress(dbapi_error):
                raw.rollback()
            raise
    except dbapi_error as exc:
        lost = dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
        if lost:
            raw.invalidate(exc)
        raise DBAPIError.instance(
            None, None, exc, dbapi_error, connection_invalidated=lost, dialect=dialect
        ) from exc
    finally:
        if cursor is not None:
            with suppress(dbapi_error):
                cursor.close()
        raw.close()


class _SqliteWriteLock:
    """One SQLite file's writers on this host, queued in the kernel instead of sleeping.

    Why: SQLite lets one writer in at a time, and a connection that finds the file
    locked waits in SQLite's busy handler, which *sleeps* (1, 2, 5, 10 ... 100 ms) and
    tries again: the lock is usually free again after a fraction of a millisecond, yet
    the waiter sleeps on, and under load most POST latency was these sleeps. Writers
    that take this lock first queue on a threading lock (threads of one process) and a
    blocking ``flock`` on ``<file>-writer.lock`` (processes of one host; the kernel wakes
    the next one the moment the holder lets go), so they find SQLite's lock free.
    Writers that do not take it (another service's tool, the sqlite3 shell) still meet
    the busy timeout, as before.

    Waiting is bounded by the busy timeout (a foreign writer holding the file must not
    make queued writers wait one timeout each, in turn): the thread lock with a
    timeout, then ``flock`` tried without blocking every 0.1 to 1 ms until the deadline
    (the maintained libraries, filelock and fasteners, poll at 10 to 100 ms, the very
    delay this removes). Past it: ``OperationalError`` "database is locked", as SQLite
    itself would answer (a 503 for the API).
    """

    def __init__(self, path: str) -> None:
        self.path = f"{path}-writer.lock"
        self._threads = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        # Opened per process: a descriptor inherited over fork() would share its lock.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self, timeout: float = BUSY_TIMEOUT_SECONDS) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=timeout):
            raise _locked()
        try:
            fd = self._file()
            pause = 0.0001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise _locked() from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.001)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


def _locked() -> OperationalError:
    return OperationalError(
        None, None, sqlite3.OperationalError("database is locked (writer lock busy)")
    )


_WRITE_LOCKS: dict[str, _SqliteWriteLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


@contextmanager
def write_lock(engine: Engine, timeout: float = BUSY_TIMEOUT_SECONDS) -> Iterator[None]:
    """Hold this host's writer lock of the engine's SQLite file (no-op elsewhere).

    Wrap a whole write transaction in it (begin to commit), and never nest it.

    Raises:
        OperationalError: "database is locked" after ``timeout`` seconds of waiting.
    """
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    path = os.path.abspath(database)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(path)
        if lock is None:
            lock = _WRITE_LOCKS[path] = _SqliteWriteLock(path)
    with lock.held(timeout):
        yield
