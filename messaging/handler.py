"""What every queue handler shares: the protocol the worker drives, and outcome events.

A handler is one service's work on one queue. The worker (:mod:`messaging.worker`) takes
messages, calls ``handle`` and emits what it returns, then acknowledges: so a handler
never touches Redis itself, and the same protocol serves the consumer services and the
order service's ``orders-updates``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from messaging import envelope


class Handler(Protocol):
    """One service's work on its queue. ``handle`` must be idempotent by event id."""

    queue: str
    """The queue it drains."""
    accepts: frozenset[str]
    """Event types it handles; any other type is a malformed message on its queue."""

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Do the work once and return the outcome events to emit (the stored ones on
        a duplicate). Raise RetryableError/PermanentError (or anything: retried)."""


class BatchHandler(Handler, Protocol):
    """A handler that can also do a taken batch at once (one database transaction).

    The worker calls ``handle_batch`` with the batch's parsed events when the handler
    has it. It returns, per event in order, the outcome events to emit; None for an
    event it did not do (bad data, another worker's claim): the worker hands those to
    ``handle`` one at a time; or the exception an event's attempt raised (a refused
    send, a gateway timeout): the worker settles that failure (retry or dead letter)
    as if ``handle`` had raised it, without trying again. Whatever it returns as done
    must be committed (effect and stored outcome) before it returns; if it raises,
    nothing of the batch may be committed, and every event is then handled alone.
    ``stopping()`` turns true when the worker is asked to stop: a handler whose events
    take long (a gateway call, an SMTP send) finishes the one it is doing (the batch's
    first counts as started), starts no further one and returns None for the rest,
    which the worker puts back on the queue; a quick one may ignore it.
    """

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool]
    ) -> list[list[dict[str, Any]] | Exception | None]:
        """Do the batch's work; per event its outcomes, None (do it alone) or its failure."""


def rfc3339(value: datetime) -> str:
    """A stored time as UTC RFC 3339 (SQLite hands it back without its zone)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat()


def outcome(
    event_type: str,
    data: dict[str, Any],
    *,
    order_id: int,
    sender: str,
    message: str,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """An outcome event envelope, counted by order id.

    A new id and the current time unless ``event_id`` and ``at`` (when the effect was
    stored) are given: then a re-emission is byte for byte the first one.
    """
    return envelope.envelope(
        event_type,
        data,
        message=message,
        sender=sender,
        count=order_id,
        event_id=event_id,
        timestamp=None if at is None else rfc3339(at),
    )
