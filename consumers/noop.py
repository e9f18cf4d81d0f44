"""A handler that does nothing: ``consumer noop`` drains its queue (benchmarks, smoke tests)."""

from __future__ import annotations

from typing import Any

from messaging import keys


class NoopHandler:
    """Accepts OrderPlaced and does nothing (``consumer noop``: benchmarks, smoke tests)."""

    queue = keys.NOOP_QUEUE
    accepts = frozenset({"OrderPlaced"})

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Nothing to do, nothing to emit."""
        return []
