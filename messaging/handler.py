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
