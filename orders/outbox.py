"""The outbox relay: publishes every stored event that Redis does not have yet.

An event reaches Redis in one of two ways. Right after the request that stored it
commits, it is handed to its worker's :class:`FastPublisher` (the fast path: a
background thread publishes what requests hand in, in pipelined batches; the rows are
then marked published in a batch by :class:`PublishedMarker`, within MARK_INTERVAL).
Whatever that missed (Redis down, process killed) the relay finds in the outbox and
publishes: it polls every RELAY_INTERVAL seconds for up to RELAY_BATCH unpublished rows.

Claims, so that several relays (one per API worker, plus ``orders-relay``) do not send
the same row twice: a relay *claims* rows with one statement
``UPDATE outbox SET claimed_until = now + RELAY_CLAIM_SECONDS WHERE id IN (SELECT ...
unpublished and unclaimed or claim expired ... LIMIT n [FOR UPDATE SKIP LOCKED])
RETURNING ...``. On PostgreSQL ``SKIP LOCKED`` lets concurrent relays take disjoint
batches without waiting; on SQLite the statement runs under the database's single
write lock, so two relays cannot claim the same row either. Rows written by a request
start claimed, so the relay leaves them to the fast path unless it fails (then the
claim is released at once) or dies (then the claim expires).
``now`` is the database's clock (:func:`messaging.database.now_plus`), never a relay
host's: a relay whose clock ran an hour ahead would take every live claim. A poll reads
first whether any row is publishable (:meth:`Relay.claimable`, no write lock) and claims
only then: most polls find nothing.

Publishing, then marking: a crash between the two sends the event again later, a
duplicate that consumers drop by event id. An event is never lost.

Console script: ``orders-relay``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import Engine, bindparam, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from messaging import database, faults, logs, tracing
from messaging.config import EXIT_NO_REDIS, EXIT_OK, arg_seconds, command_line, load_settings
from messaging.publisher import EventPublisher
from orders.bootstrap import OrderServices, create_schema, order_services
from orders.config import OrderServiceSettings
from orders.models import Outbox, utc_now

if TYPE_CHECKING:
    from orders.reconcile import AutoReconciler

log = logging.getLogger("orders-relay")

EXIT_NO_DATABASE = 1
"""The database could not be reached at start."""


def one_line(exc: BaseException) -> str:
    """The first line of an error message (driver errors span several lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _by_ids(dialect: Any, size: int, *, mark: bool) -> database.DriverStatement:
    """``UPDATE outbox ... WHERE id IN (<size> binds) AND published_at IS NULL``, compiled
    once per dialect, list size and kind, and run on the driver (see
    :class:`messaging.database.DriverStatement`): through SQLAlchemy's Core, a mark of
    1-8 rows cost 430-600 µs of CPU, on the driver 60-165 µs (the README's session-26
    section). Sizes are powers of two (the caller repeats
    its last id to fill the list: ``IN`` does not mind), so at most a dozen statements
    are ever compiled.
    """
    key = (dialect, size, mark)
    found = _BY_IDS.get(key)
    if found is None:
        values: dict[str, Any] = {"claimed_until": None, "attempts": Outbox.attempts + 1}
        if mark:
            values["published_at"] = bindparam("now")
        statement = (
            update(Outbox)
            .where(
                Outbox.id.in_([bindparam(f"id{i}") for i in range(size)]),
                Outbox.published_at.is_(None),
            )
            .values(values)
        )
        found = _BY_IDS.setdefault(key, database.DriverStatement(statement, dialect))
    return found


_BY_IDS: dict[tuple[Any, int, bool], database.DriverStatement] = {}


_SQL = database.DriverStatements(
    # The relay's probe (Relay.claimable): a publishable row, unclaimed or its claim expired.
    claimable=lambda dialect: (
        select(Outbox.id)
        .where(
            Outbox.published_at.is_(None),
            or_(
                Outbox.claimed_until.is_(None),
                Outbox.claimed_until < database.now_plus(dialect.name),
            ),
        )
        .limit(1)
    ),
)

_MOST_IDS = 512
"""Most ids one statement names (a longer list takes several, in one transaction)."""


def _update_by_ids(engine: Engine, ids: list[int], *, mark: bool) -> None:
    if not ids:
        return
    now = utc_now()
    with database.driver_transaction(engine) as cursor:
        for start in range(0, len(ids), _MOST_IDS):
            chunk = ids[start : start + _MOST_IDS]
            size = 1 << (len(chunk) - 1).bit_length()
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            values: dict[str, Any] = {f"id{i}": outbox_id for i, outbox_id in enumerate(padded)}
            if mark:
                values["now"] = now
            _by_ids(engine.dialect, size, mark=mark).execute(cursor, **values)


def mark_published(engine: Engine, ids: list[int]) -> None:
    """Record that these rows are in Redis (only rows not already marked)."""
    _update_by_ids(engine, ids, mark=True)


def release(engine: Engine, ids: list[int]) -> None:
    """Give up claims after a failed publish, so the next relay poll retries at once."""
    _update_by_ids(engine, ids, mark=False)


MARK_INTERVAL = 0.05
"""Seconds a fast-path publish waits, at most, to be marked in the outbox (batched).

Must stay far below RELAY_CLAIM_SECONDS (at least 1 s): the row's claim is what keeps
the relay away until the mark lands."""
MARK_BATCH = 500
"""Most rows one mark statement updates."""


class PublishedMarker:
    """Marks fast-path publishes in the outbox in batches, from one background thread.

    :class:`FastPublisher` publishes what POSTs committed, then hands the outbox row
    ids here; every :data:`MARK_INTERVAL` the thread marks all ids handed in since, with
    one UPDATE (one short write transaction instead of one per POST: on SQLite each write
    transaction queues on the file's single write lock).

    Why the relay cannot race it: the row was written claimed (``claimed_until`` = commit
    time + RELAY_CLAIM_SECONDS), and the relay only takes unclaimed or expired rows; the
    mark lands within ``MARK_INTERVAL`` of the publish, long before the claim expires.
    The only window is the one the outbox always had between publish and mark: a
    process killed after publishing but before the mark committed (now up to
    ``MARK_INTERVAL`` wide instead of one statement) leaves the row unmarked, the claim
    expires and the relay sends the event again: a duplicate, dropped by the consumers
    by event id. A mark that fails (database down) is retried on the next round; if that
    takes past the claim, the same duplicate, never a loss.
    """

    def __init__(self, engine: Engine, interval: float = MARK_INTERVAL) -> None:
        self.engine = engine
        self.interval = interval
        self._ids: list[int] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def add(self, outbox_id: int) -> None:
        """Queue one published row for marking (starts the thread on first use)."""
        self.add_many([outbox_id])

    def add_many(self, outbox_ids: list[int]) -> None:
        """Queue published rows for marking (starts the thread on first use)."""
        with self._lock:
            self._ids.extend(outbox_ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="outbox-marker", daemon=True)
                self._thread.start()

    def pending(self) -> int:
        """How many published rows wait to be marked."""
        with self._lock:
            return len(self._ids)

    def flush(self) -> int:
        """Mark every queued row now (one UPDATE per MARK_BATCH); returns how many.

        On a database error the ids stay queued for the next round and it returns 0.
        """
        with self._lock:
            ids, self._ids = self._ids, []
        done = 0
        try:
            for i in range(0, len(ids), MARK_BATCH):
                mark_published(self.engine, ids[i : i + MARK_BATCH])
                done = i + MARK_BATCH
        except SQLAlchemyError as exc:
            with self._lock:
                self._ids[:0] = ids[done:]
            if not self._failing:
                log.error("Cannot mark published outbox rows yet, retrying: %s", one_line(exc))
                self._failing = True
            return 0
        if self._failing:
            log.info("Marking published outbox rows again")
            self._failing = False
        return len(ids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.pending():
                self.flush()

    def close(self) -> None:
        """Stop the thread and mark what is queued (worker shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.pending():
            self.flush()


PUBLISH_BATCH = 500
"""Most events one background publish sends in one pipeline."""


class FastPublisher:
    """Publishes just-committed events from one background thread, in pipelined batches.

    A POST commits its order and outbox row (born claimed), hands the row here and
    answers at once: no Redis round trip on the request path. The thread takes every
    event handed in since its last round (at most :data:`PUBLISH_BATCH`), publishes
    them in one pipeline (the relay's :meth:`EventPublisher.publish_serialized`: each
    event still one atomic script), then passes the ids to the
    :class:`PublishedMarker`, which marks them in one UPDATE.

    Why nothing is lost or doubled that was not before: an event waits here in memory,
    its row claimed in the database. If the process dies first, the claim expires and a
    relay publishes the row (the ``api.after_commit`` window, now also open after the
    201, fault point ``api.before_publish``). If Redis refuses the batch, the claims are
    released at once and the relay retries them, as the synchronous fast path did. A
    crash between publish and mark is the outbox's one duplicate window, unchanged. An
    event that waited here longer than half its claim (Redis hanging, a stalled
    process) is not sent: the relay will take its row once the claim expires, and
    sending it too would be a duplicate.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: EventPublisher,
        max_wait: float,
        marker: PublishedMarker | None = None,
        batch: int = PUBLISH_BATCH,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.max_wait = max_wait
        """Seconds an event may wait here and still be sent (half its claim)."""
        self.marker = marker or PublishedMarker(engine)
        self.batch = batch
        self._queue: list[tuple[int, str, str, float]] = []
        self._ready = threading.Condition()
        self._busy = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._redis_down = False

    def submit(self, outbox_id: int, event_type: str, payload: str) -> None:
        """Queue one committed event (starts the thread on first use); never blocks."""
        with self._ready:
            self._queue.append((outbox_id, event_type, payload, time.monotonic()))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="outbox-publisher", daemon=True
                )
                self._thread.start()
            self._ready.notify()

    def pending(self) -> int:
        """Events handed in and not yet published (or given back to the relay)."""
        with self._ready:
            return len(self._queue) + self._busy

    def _take(self) -> list[tuple[int, str, str, float]]:
        taken, self._queue = self._queue[: self.batch], self._queue[self.batch :]
        self._busy = len(taken)
        return taken

    def _send(self, batch: list[tuple[int, str, str, float]]) -> None:
        oldest = time.monotonic() - self.max_wait
        stale = [row[0] for row in batch if row[3] <= oldest]
        if stale:
            log.warning("%d event(s) waited past half their claim: left to the relay", len(stale))
            batch = [row for row in batch if row[3] > oldest]
        ids = [row[0] for row in batch]
        if not ids:
            return
        try:
            faults.hit("api.before_publish")
            self.publisher.publish_serialized((kind, payload) for _, kind, payload, _ in batch)
        except Exception as exc:  # noqa: BLE001 - Redis down, or a bug: the relay retries
            if not isinstance(exc, redis.RedisError):
                log.error("Publishing %d event(s) failed", len(ids), exc_info=exc)
            elif not self._redis_down:
                log.warning(
                    "%d event(s) not published now, the relay will retry: %s", len(ids), exc
                )
                self._redis_down = True
            try:
                release(self.engine, ids)
            except SQLAlchemyError:
                log.exception("Could not release %d outbox claim(s) (they expire)", len(ids))
            return
        if self._redis_down:
            log.info("Publishing events again")
            self._redis_down = False
        self.marker.add_many(ids)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._busy = 0
                while not self._queue and not self._stop:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = self._take()
            self._send(batch)

    def flush(self) -> None:
        """Publish everything queued, in this thread (tests, shutdown)."""
        while True:
            with self._ready:
                if not self._queue:
                    return
                batch = self._take()
            try:
                self._send(batch)
            finally:
                with self._ready:
                    self._busy = 0

    def close(self) -> None:
        """Stop the thread after it published what is queued; then mark (worker exit)."""
        with self._ready:
            self._stop = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()
        self.marker.close()


def _publish_span(payload: str, event_type: str) -> Any:
    """The relay's span for one stored event (its payload is the envelope)."""
    try:
        event = json.loads(payload)
    except ValueError:
        event = {}
    return tracing.start_message_span(
        event if isinstance(event, dict) else {}, event_type, "publish"
    )


@dataclass
class Relay:
    """Polls the outbox and publishes unpublished events in batches."""

    engine: Engine
    publisher: EventPublisher
    batch: int = 100
    interval: float = 0.5
    claim_seconds: float = 15.0
    reconciler: AutoReconciler | None = None
    """Runs between polls (see :mod:`orders.reconcile`); None: no automatic pass."""

    def __post_init__(self) -> None:
        self._redis_down = False
        self._db_down = False

    def claimable(self) -> bool:
        """Whether any row is publishable now: a read, without the write lock.

        Most polls find nothing (the fast path publishes and marks every row it
        writes), and the claim is a write transaction: on SQLite it queues on the file's
        one write lock with the requests' inserts. The claim still decides; this only
        spares it when there is nothing to take.
        """
        probe = _SQL(self.engine.dialect, "claimable")
        with database.driver_transaction(self.engine, write=False) as cursor:
            return probe.first(cursor) is not None

    def claim(self) -> list[tuple[int, str, str]]:
        """Claim up to ``batch`` publishable rows: ``(id, type, payload)`` in id order."""
        # The database's clock, not this host's: the claim is written here and compared by
        # every other relay, each on its own host (and clock).
        if not self.claimable():
            return []
        dialect = self.engine.dialect.name
        now = database.now_plus(dialect)
        candidates = (
            select(Outbox.id)
            .where(
                Outbox.published_at.is_(None),
                or_(Outbox.claimed_until.is_(None), Outbox.claimed_until < now),
            )
            .order_by(Outbox.id)
            .limit(self.batch)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer anyway
        )
        with database.write_lock(self.engine), self.engine.begin() as conn:
            rows = conn.execute(
                update(Outbox)
                .where(
                    Outbox.id.in_(candidates.scalar_subquery()),
                    # Repeated outside the subquery: PostgreSQL re-checks it on the
                    # locked row version; SQLite evaluates it under its write lock.
                    Outbox.published_at.is_(None),
                    or_(Outbox.claimed_until.is_(None), Outbox.claimed_until < now),
                )
                .values(claimed_until=database.now_plus(dialect, self.claim_seconds))
                .returning(Outbox.id, Outbox.type, Outbox.payload)
            ).all()
        return sorted((row.id, row.type, row.payload) for row in rows)

    def run_once(self) -> int:
        """One poll: claim, publish, mark. Returns how many events were published.

        A Redis or database error is logged once per outage and swallowed (returns 0);
        the claimed rows are released (or their claims expire) and the next poll retries.
        """
        try:
            rows = self.claim()
        except SQLAlchemyError as exc:
            if not self._db_down:
                log.error("Outbox relay cannot read the database, retrying: %s", exc)
                self._db_down = True
            return 0
        if self._db_down:
            log.info("Outbox relay reads the database again")
            self._db_down = False
        if not rows:
            return 0
        ids = [row[0] for row in rows]
        # One producer span per row, child of the context stored in its payload (the
        # request's): the payload goes out unchanged, so consumers continue that trace.
        spans = [_publish_span(payload, event_type) for _, event_type, payload in rows]
        try:
            self.publisher.publish_serialized(
                (event_type, payload) for _, event_type, payload in rows
            )
        except redis.RedisError as exc:
            for span in spans:
                tracing.set_error(span, f"not published: {exc}")
                span.end()
            if not self._redis_down:
                log.error("Redis is unavailable, outbox relay will keep retrying: %s", exc)
                self._redis_down = True
            try:
                release(self.engine, ids)
            except SQLAlchemyError:
                log.exception("Could not release outbox claims (they expire)")
            return 0
        for span in spans:
            span.end()
        if self._redis_down:
            log.info("Redis is back; outbox relay resumed")
            self._redis_down = False
        faults.hit("relay.after_publish")
        try:
            mark_published(self.engine, ids)
        except SQLAlchemyError:
            log.exception(
                "Published %d events but could not mark them; expect duplicates", len(ids)
            )
        log.debug("Outbox relay published %d events", len(ids))
        return len(ids)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a full batch polls again at once."""
        while not stop.is_set():
            published = self.run_once()
            if self.reconciler is not None:
                self.reconciler.maybe_run()
            if published < self.batch:
                stop.wait(self.interval)


def relay_for(services: OrderServices) -> Relay:
    """A relay configured from the services' settings, with its automatic reconciler."""
    # Imported here: it creates Prometheus counters, which in orders-api must come after
    # the worker's metrics directory exists (orders.server).
    from orders.reconcile import auto_reconciler

    settings = services.settings
    reconciler = auto_reconciler(
        services.engine,
        services.publisher,
        services.redis,
        owner=f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}",
        interval=settings.reconcile_interval,
        after=settings.reconcile_after,
        batch=settings.reconcile_batch,
        pattern=settings.base.pattern,
    )
    return Relay(
        services.engine,
        services.publisher,
        batch=settings.relay_batch,
        interval=settings.relay_interval,
        claim_seconds=settings.relay_claim_seconds,
        reconciler=reconciler,
    )


def start_relay_thread(services: OrderServices) -> tuple[threading.Thread, threading.Event]:
    """Run a relay in a daemon thread of this process (RELAY_IN_PROCESS=1)."""
    stop = threading.Event()
    thread = threading.Thread(
        target=relay_for(services).run, args=(stop,), name="outbox-relay", daemon=True
    )
    thread.start()
    return thread, stop


MAX_RECONCILE_WINDOW = 10 * 365 * 86400.0
"""Seconds: the longest ``--window`` (and ``--older-than``) a reconcile pass takes."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_line(
        "orders-relay",
        "Publish unpublished outbox events; or, with --reconcile, re-publish OrderPlaced\n"
        "for orders whose outcomes never arrived (see orders/reconcile.py).",
    )
    parser.add_argument(
        "--reconcile", action="store_true", help="run one reconciliation pass and exit"
    )
    parser.add_argument(
        "--older-than", type=arg_seconds(0, MAX_RECONCILE_WINDOW), default=60.0,
        metavar="SECONDS", help="only orders placed at least this long ago (default 60)",
    )  # fmt: skip
    parser.add_argument(
        "--window", type=arg_seconds(0, MAX_RECONCILE_WINDOW), default=86400.0,
        metavar="SECONDS", help="only orders placed within this many seconds (default "
        f"86400, at most {MAX_RECONCILE_WINDOW:.0f}: ten years)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 <= args.older_than <= args.window:
        parser.error("need 0 <= --older-than <= --window")
    return args


def main(argv: list[str] | None = None) -> int:
    """Console script ``orders-relay``: the relay as its own process (or --reconcile)."""
    args = _parse_args(argv)
    settings = load_settings("orders-relay", OrderServiceSettings.from_env)
    logs.configure(settings.base.log_format, settings.base.log_level)
    try:
        services = order_services(settings)
        create_schema(services.engine)
    except (SQLAlchemyError, OSError) as exc:
        print(f"orders-relay: cannot use DATABASE_URL: {one_line(exc)}", file=sys.stderr)
        return EXIT_NO_DATABASE
    if args.reconcile:
        from orders.reconcile import reconcile

        try:
            services.redis.ping()  # fail before reading anything: wrong password, no server
            result = reconcile(services.engine, services.publisher, args.older_than, args.window)
        except redis.RedisError as exc:
            print(f"orders-relay: cannot reach Redis: {one_line(exc)}", file=sys.stderr)
            return EXIT_NO_REDIS
        finally:
            services.close()
        print(
            f"orders-relay: reconcile: {len(result.incomplete)} orders stuck, "
            f"{result.republished} OrderPlaced re-published"
        )
        return EXIT_OK
    stop = threading.Event()

    def handle_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("Received signal %d. Shutting down gracefully...", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle_signal)
    signal.signal(signal.SIGINT, handle_signal)
    tracing.configure_process(settings.base, "orders-relay")
    log.info(
        "Outbox relay started: pattern %s, every %ss, batches of %d; reconcile every %ss",
        settings.base.pattern, settings.relay_interval, settings.relay_batch,
        settings.reconcile_interval,
    )  # fmt: skip
    relay_for(services).run(stop)
    services.close()
    tracing.shutdown()
    log.info("Outbox relay stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
