"""What every queue handler shares: the protocol the worker drives, and outcome events.

A handler is one service's work on one queue. The worker (:mod:`messaging.worker`) takes
messages, calls ``handle`` and emits what it returns, then acknowledges: so a handler
never touches Redis itself, and the same protocol serves the consumer services and the
order service's ``orders-updates``.
"""

from __future__ import annotations

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


def outcome(
    event_type: str, data: dict[str, Any], *, order_id: int, sender: str, message: str
) -> dict[str, Any]:
    """An outcome event envelope (new id, now), counted by order id."""
    return envelope.envelope(event_type, data, message=message, sender=sender, count=order_id)
