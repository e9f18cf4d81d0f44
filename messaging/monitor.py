"""What the dashboard, ``/metrics`` and ``orders-admin`` show about the queues.

One reading of a queue (:func:`queue_figures`) is the same numbers everywhere: pending,
in flight, delayed retries, dead letters, the processed/failed counters of the
``stats`` hash and the workers alive (registered *and* with a live heartbeat). Dead
letters are named by a short content hash (:func:`letter_id`), which stays valid while
other letters come and go, unlike a position in the list.

Every read and write goes through :class:`~messaging.queue.RedisQueue` or the keys of
:mod:`messaging.keys`; the client must not decode responses (messages are bytes).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from messaging import keys
from messaging.queue import DeadLetter, RedisQueue

QUEUES: tuple[str, ...] = (*keys.CONSUMER_QUEUES, keys.ORDER_UPDATES_QUEUE)
"""Every order queue, in the order the views list them."""

LETTER_ID_LENGTH = 12
"""Hex digits of a dead letter's id (a SHA-256 prefix of the stored entry)."""

MAX_LETTERS_SCANNED = 10_000
"""Most dead letters searched for an id (the list is meant to be read and emptied)."""


class UnknownQueue(LookupError):
    """The name is not one of :data:`QUEUES`."""


class LetterNotFound(LookupError):
    """No dead letter has that id or index (any more)."""


@dataclass(frozen=True)
class QueueFigures:
    """One queue at one moment."""

    name: str
    pending: int
    in_flight: int
    delayed: int
    dead: int
    processed: int
    failed: int
    retried: int
    workers: int
    """Registered workers (including dead ones the reaper has not reaped yet)."""
    workers_alive: int
    """Registered workers whose heartbeat key exists."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def check_queue(name: str) -> str:
    """Return ``name`` if it is an order queue, else raise :class:`UnknownQueue`."""
    if name not in QUEUES:
        raise UnknownQueue(f"unknown queue {name!r}: must be one of {', '.join(QUEUES)}")
    return name


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def queue_figures(client: redis.Redis, name: str) -> QueueFigures:
    """Read one queue's figures (a few round trips; raises redis.RedisError)."""
    queue = RedisQueue(client, check_queue(name))
    stats = queue.stats()
    workers = [_text(w) for w in client.smembers(keys.workers(name))]
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(keys.heartbeat(name, worker))
    alive = sum(int(n) for n in pipe.execute()) if workers else 0
    return QueueFigures(
        name=name,
        pending=stats["pending"],
        in_flight=stats["in_flight"],
        delayed=stats["delayed"],
        dead=stats["dead_letters"],
        processed=stats["processed"],
        failed=stats["failed"],
        retried=stats["retried"],
        workers=stats["workers"],
        workers_alive=alive,
    )


def all_figures(client: redis.Redis) -> list[QueueFigures]:
    """:func:`queue_figures` of every queue in :data:`QUEUES`."""
    return [queue_figures(client, name) for name in QUEUES]


class RateMeter:
    """Processed per second per queue, from successive readings of the counters.

    Each process keeps its own previous reading; the first reading has no rate. A
    counter that went down (stats reset) restarts the measurement.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def rate(self, name: str, processed: int, now: float | None = None) -> float | None:
        """Record a reading; return processed/s since the previous one, or None."""
        now = time.monotonic() if now is None else now
        with self._lock:
            previous = self._last.get(name)
            self._last[name] = (now, processed)
        if previous is None or now <= previous[0] or processed < previous[1]:
            return None
        return (processed - previous[1]) / (now - previous[0])


# --- dead letters ---------------------------------------------------------------


def letter_id(entry: bytes | str) -> str:
    """The id of a stored dead letter: a prefix of the SHA-256 of its bytes."""
    data = entry.encode("utf-8") if isinstance(entry, str) else entry
    return hashlib.sha256(data).hexdigest()[:LETTER_ID_LENGTH]


def letter_to_dict(letter: DeadLetter, index: int) -> dict[str, Any]:
    """The JSON shape of a dead letter in the dashboard API."""
    return {
        "id": letter_id(letter.entry),
        "index": index,
        "queue": letter.queue,
        "error": letter.error,
        "attempts": letter.attempts,
        "cause": letter.cause,
        "failed_at": letter.failed_at,
        "message": letter.message,
    }


def dead_letters(client: redis.Redis, name: str, limit: int = 50) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters of a queue."""
    return RedisQueue(client, check_queue(name)).dead_letters(0, limit - 1)


def find_letter(client: redis.Redis, name: str, ident: str) -> DeadLetter:
    """A dead letter by id (hex) or by index (a number shorter than an id).

    Raises:
        LetterNotFound: nothing matches (it may have been requeued or purged meanwhile).
    """
    queue = RedisQueue(client, check_queue(name))
    if ident.isascii() and ident.isdigit() and len(ident) < LETTER_ID_LENGTH:  # not "²"
        letters = queue.dead_letters(int(ident), int(ident))
        if letters:
            return letters[0]
        raise LetterNotFound(f"{name} has no dead letter at index {ident}")
    for letter in queue.dead_letters(0, MAX_LETTERS_SCANNED - 1):
        if letter_id(letter.entry) == ident.lower():
            return letter
    raise LetterNotFound(f"{name} has no dead letter {ident}")


def requeue_letter(client: redis.Redis, name: str, ident: str) -> DeadLetter:
    """Move one dead letter back to pending (attempts reset); returns it."""
    letter = find_letter(client, name, ident)
    if not RedisQueue(client, name).requeue_dead([letter]):
        raise LetterNotFound(f"{name}: dead letter {ident} is gone")
    return letter


def discard_letter(client: redis.Redis, name: str, ident: str) -> DeadLetter:
    """Delete one dead letter; returns it."""
    letter = find_letter(client, name, ident)
    if not client.lrem(keys.dead(name), 1, letter.entry):
        raise LetterNotFound(f"{name}: dead letter {ident} is gone")
    return letter
