"""Console script ``orders-admin``: look at the queues, handle dead letters, follow events.

::

    orders-admin queues [--sample SECONDS]
    orders-admin dead-letters list QUEUE [--limit N]
    orders-admin dead-letters show QUEUE ID
    orders-admin dead-letters requeue QUEUE (ID ... | --all)
    orders-admin dead-letters purge QUEUE (ID ... | --all)
    orders-admin orders show ORDER_ID
    orders-admin stuck [--older-than SECONDS]
    orders-admin watch

A dead letter's ID is the 12-hex-digit id that ``list`` prints (it stays valid while
other letters come and go) or its index in the list. It reads the same environment as
the other processes (REDIS_URL or REDIS_HOST/REDIS_PORT, DATABASE_URL for ``orders``).

Exit codes: 0 done, 1 Redis or the database unreachable or the thing asked for does not
exist, 2 bad arguments or configuration. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.exc import SQLAlchemyError

from messaging import keys, monitor
from messaging.config import (
    EXIT_BAD_CONFIG,
    EXIT_NO_REDIS,
    EXIT_OK,
    ConfigError,
    Settings,
    arg_int,
    arg_seconds,
)
from messaging.connection import redis_client
from messaging.database import database_engine
from messaging.queue import RedisQueue
from orders.config import OrderServiceSettings
from orders.validation import MAX_ORDER_ID

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from orders.stuck import StuckReport

PROG = "orders-admin"
MAX_LIST = 10_000
"""The most dead letters ``dead-letters list --limit`` shows at once."""
EXIT_FAILED = 1
"""Not found, or the database is unreachable."""

COLUMNS = (
    ("queue", "name"),
    ("pending", "pending"),
    ("in flight", "in_flight"),
    ("delayed", "delayed"),
    ("dead", "dead"),
    ("processed", "processed"),
    ("failed", "failed"),
    ("workers alive", "workers_alive"),
)


class Failure(Exception):
    """Print this one-line message and exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message} (see {PROG} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def printable(text: str) -> str:
    """Untrusted text made safe for a terminal: control characters become escapes."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _client(settings: Settings) -> redis.Redis:
    # Bytes, not text (queue messages may be anything); fail fast when Redis is away.
    return redis_client(
        settings,
        decode_responses=False,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )


def _queue(name: str) -> str:
    try:
        return monitor.check_queue(name)
    except monitor.UnknownQueue as exc:
        raise Failure(str(exc), EXIT_BAD_CONFIG) from None


# --- queues ---------------------------------------------------------------------------


def queues_table(figures: Sequence[monitor.QueueFigures], rates: dict[str, float | None]) -> str:
    """The ``queues`` table: a header and one row per queue, columns aligned."""
    header = [title for title, _ in COLUMNS] + ["processed/s"]
    rows = [
        [str(getattr(f, field)) for _, field in COLUMNS]
        + ["-" if rates.get(f.name) is None else f"{rates[f.name]:.1f}"]
        for f in figures
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return "\n".join(line(r) for r in [header, *rows])


def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(settings)
    meter = monitor.RateMeter()
    rates: dict[str, float | None] = {}
    if args.sample > 0:
        # Processed per second over a short sample: read the counters twice.
        for f in monitor.all_figures(client):
            meter.rate(f.name, f.processed)
        time.sleep(args.sample)
    figures = monitor.all_figures(client)
    if args.sample > 0:
        rates = {f.name: meter.rate(f.name, f.processed) for f in figures}
    print(queues_table(figures, rates))
    return EXIT_OK


# --- dead letters -----------------------------------------------------------------------


def cmd_dead_list(args: argparse.Namespace, settings: Settings) -> int:
    name = _queue(args.queue)
    letters = monitor.dead_letters(_client(settings), name, args.limit)
    if not letters:
        print(f"{name}: no dead letters")
        return EXIT_OK
    for index, letter in enumerate(letters):
        print(
            f"{monitor.letter_id(letter.entry)}  #{index}  {letter.failed_at}  "
            f"attempts={letter.attempts}  {printable(letter.error)}"
        )
    return EXIT_OK


def cmd_dead_show(args: argparse.Namespace, settings: Settings) -> int:
    name = _queue(args.queue)
    try:
        letter = monitor.find_letter(_client(settings), name, args.id)
    except monitor.LetterNotFound as exc:
        raise Failure(str(exc)) from None
    print(f"id:        {monitor.letter_id(letter.entry)}")
    print(f"queue:     {printable(letter.queue)}")
    print(f"failed at: {printable(letter.failed_at)}")
    print(f"attempts:  {letter.attempts}")
    if letter.cause:
        revives = " (revived by the workers: the dependency was away)" if letter.transient else ""
        print(f"cause:     {letter.cause}{revives}")
    print(f"error:     {printable(letter.error)}")
    print(f"message:   {printable(letter.message)}")
    return EXIT_OK


def _settle(args: argparse.Namespace, settings: Settings, action: str) -> int:
    name = _queue(args.queue)
    if not args.ids and not args.all:
        raise Failure(
            f"{action}: which dead letters? give their IDs (orders-admin dead-letters list "
            f"{name}) or --all",
            EXIT_BAD_CONFIG,
        )
    if args.ids and args.all:
        raise Failure(f"{action}: give dead letter IDs or --all, not both", EXIT_BAD_CONFIG)
    client = _client(settings)
    if args.all:
        queue = RedisQueue(client, name)
        count = queue.requeue_dead() if action == "requeue" else queue.purge_dead()
        print(f"{name}: {'requeued' if action == 'requeue' else 'purged'} {count} dead letter(s)")
        return EXIT_OK
    act = monitor.requeue_letter if action == "requeue" else monitor.discard_letter
    missing = 0
    for ident in args.ids:
        try:
            letter = act(client, name, ident)
        except monitor.LetterNotFound as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            missing += 1
            continue
        verb = "requeued" if action == "requeue" else "purged"
        print(f"{name}: {verb} {monitor.letter_id(letter.entry)}")
    return EXIT_FAILED if missing else EXIT_OK


def cmd_dead_requeue(args: argparse.Namespace, settings: Settings) -> int:
    return _settle(args, settings, "requeue")


def cmd_dead_purge(args: argparse.Namespace, settings: Settings) -> int:
    return _settle(args, settings, "purge")


# --- orders -------------------------------------------------------------------------------


@contextlib.contextmanager
def _order_database(database_url: str) -> Iterator[Session]:
    """A session on the order service's database for one command; a database error is
    one line ("cannot read the database: ..."), exit 1."""
    from sqlalchemy.orm import Session

    engine = database_engine(database_url)
    try:
        with Session(engine) as session:
            yield session
    except SQLAlchemyError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Failure(f"cannot read the database: {first}") from None
    finally:
        engine.dispose()


def cmd_order_show(args: argparse.Namespace, _settings: Settings) -> int:
    from orders.service import load_order

    with _order_database(OrderServiceSettings.from_env().database_url) as session:
        order = load_order(session, args.order_id)
        if order is None:
            raise Failure(f"there is no order {args.order_id}")
        print(f"order #{order.id}  {order.status}")
        print(f"customer:  {printable(order.customer_email)}")
        print(f"total:     {order.total} {order.currency}")
        print(f"placed at: {order.created_at.isoformat()}")
        print("history:" if order.history else "history:   (none yet)")
        for entry in order.history:
            print(f"  {entry.occurred_at.isoformat()}  {entry.type}  {entry.event_id}")
    return EXIT_OK


# --- stuck orders ---------------------------------------------------------------------------


def stuck_table(report: StuckReport) -> str:
    """The ``stuck`` listing: a summary line, then one aligned row per order."""
    if not report.total:
        return f"no stuck orders (none idle for more than {report.older_than:g} s)"
    header = ["order", "status", "age", "idle", "waiting for"]
    rows = [
        [f"#{o.order_id}", o.status, f"{o.age_seconds:.0f}s", f"{o.idle_seconds:.0f}s",
         o.waiting_for]
        for o in report.orders
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"{report.total} stuck order(s): not settled, no step for more than "
        f"{report.older_than:g} s" + (f" (oldest {len(rows)} shown)" if report.total > len(rows)
                                      else "")
    ]  # fmt: skip
    for cells in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)


def cmd_stuck(args: argparse.Namespace, _settings: Settings) -> int:
    from orders.stuck import stuck_orders

    service_settings = OrderServiceSettings.from_env()
    older_than = service_settings.stuck_seconds if args.older_than is None else args.older_than
    if not 0 <= older_than <= 86400:
        raise Failure("--older-than must be between 0 and 86400 seconds", EXIT_BAD_CONFIG)
    with _order_database(service_settings.database_url) as session:
        print(stuck_table(stuck_orders(session, older_than)))
    return EXIT_OK


# --- watch --------------------------------------------------------------------------------


def event_line(raw: bytes | str, received: datetime | None = None) -> str:
    """One terminal line for a message of the order channel (untrusted: escaped)."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    stamp = (received or datetime.now(UTC)).strftime("%H:%M:%S.%f")[:-3]
    try:
        event: Any = json.loads(text)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return f"{stamp}  (not an event)  {printable(text)}"
    data = event.get("data")
    if not isinstance(data, dict):
        data = {}
    order = f"order #{data['order_id']}" if "order_id" in data else "-"
    return printable(
        f"{stamp}  {event.get('type', '?')!s:<22} {order:<12} {event.get('id', '?')}  "
        f"{event.get('message', '')}"
    )


def cmd_watch(_args: argparse.Namespace, settings: Settings) -> int:
    # Ctrl-C (and SIGTERM) must stop it even when started with SIGINT ignored, as a
    # shell does for background jobs and Python then leaves it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    pubsub = _client(settings).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
    source = {
        "pubsub": "every event as it is emitted; the consumers read this channel too",
        "queue": "what the order service records: each order placed, each outcome once"
        " orders-updates has recorded it",
        "both": "every event as it is emitted",
    }[settings.pattern]
    print(
        f"watching {keys.ORDER_EVENTS_CHANNEL} (live only: earlier events are not shown; "
        f"PATTERN={settings.pattern}: {source}); Ctrl-C stops",
        flush=True,
    )
    try:
        while True:
            message = pubsub.get_message(timeout=1.0)
            if message and message.get("type") == "message":
                print(event_line(message["data"]), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        try:
            pubsub.close()
        except redis.RedisError:
            pass


# --- entry point --------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The argument parser (one-line errors, exit 2)."""
    p = _OneLineParser(prog=PROG, description="Operate the order queues and follow events.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    q = sub.add_parser("queues", help="a table of every queue's figures")
    q.add_argument(
        "--sample",
        type=arg_seconds(0, 60),
        default=1.0,
        metavar="SECONDS",
        help="measure processed/s over this many seconds (0: skip)",
    )
    q.set_defaults(func=cmd_queues)

    dead = sub.add_parser("dead-letters", help="list, show, requeue or purge dead letters")
    dsub = dead.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    dl = dsub.add_parser("list", help="the oldest dead letters of a queue")
    dl.add_argument("queue", metavar="QUEUE", help=", ".join(monitor.QUEUES))
    dl.add_argument("--limit", type=arg_int(1, MAX_LIST), default=50, help="at most this many")
    dl.set_defaults(func=cmd_dead_list)
    ds = dsub.add_parser("show", help="one dead letter in full")
    ds.add_argument("queue", metavar="QUEUE")
    ds.add_argument("id", metavar="ID", help="id from `list`, or index")
    ds.set_defaults(func=cmd_dead_show)
    for action, func, text in (
        ("requeue", cmd_dead_requeue, "put dead letters back on their queue"),
        ("purge", cmd_dead_purge, "delete dead letters"),
    ):
        a = dsub.add_parser(action, help=text)
        a.add_argument("queue", metavar="QUEUE")
        a.add_argument("ids", metavar="ID", nargs="*", help="ids from `list`, or indexes")
        a.add_argument("--all", action="store_true", help="every dead letter of the queue")
        a.set_defaults(func=func)

    orders = sub.add_parser("orders", help="orders in the database")
    osub = orders.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    show = osub.add_parser("show", help="an order's status and history")
    show.add_argument("order_id", metavar="ORDER_ID", type=arg_int(1, MAX_ORDER_ID))
    show.set_defaults(func=cmd_order_show)

    st = sub.add_parser(
        "stuck", help="orders that stopped advancing: state, age and what they wait for"
    )
    st.add_argument(
        "--older-than",
        type=arg_seconds(0, 86400),
        default=None,
        metavar="SECONDS",
        help="idle for at least this long (default ORDER_STUCK_SECONDS, 30)",
    )
    st.set_defaults(func=cmd_stuck)

    w = sub.add_parser("watch", help="follow the order event channel live (Ctrl-C stops)")
    w.set_defaults(func=cmd_watch)
    return p


def main(argv: list[str] | None = None) -> int:
    """Console script ``orders-admin``."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except redis.RedisError as exc:
        where = settings.redis_location
        print(f"{PROG}: cannot reach Redis at {where}: {exc}", file=sys.stderr)
        return EXIT_NO_REDIS
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
