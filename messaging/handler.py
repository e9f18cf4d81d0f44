"""What every queue handler shares: the protocol the worker drives, and outcome events.

A handler is one service's work on one queue. The worker (:mod:`messaging.worker`) takes
messages, calls ``handle`` and emits what it returns, then acknowledges: so a handler
never touches Redis itself, and the same protocol serves the consumer services and the
order service's ``orders-updates``.
"""

from __future__ import annotations

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
    has it. It returns, per event in order, the outcome events to emit, or None for an
    event it did not do (bad data, a failed send): the worker hands those to
    ``handle`` one at a time, which settles their failure. Whatever it returns as done
    must be committed (effect and stored outcome) before it returns; if it raises,
    nothing of the batch may be committed, and every event is then handled alone.
    """

    def handle_batch(self, events: list[dict[str, Any]]) -> list[list[dict[str, Any]] | None]:
        """Do the batch's work; outcomes per event (None: do it alone)."""


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
