"""The order service: HTTP API, models, outbox + relay, state, history, invoice page, dashboard.

It builds on the messaging core only; the consumer services learn of its orders from
its events, and it learns of their work from theirs (``orders-updates``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: dict[str, Any] | None = None, **kwargs: Any) -> Flask:
    """The order service's Flask application factory (see :func:`orders.app.create_app`).

    Imported lazily so importing ``orders`` (say, for its config) does not load Flask.
    """
    from orders.app import create_app as factory

    return factory(test_config, **kwargs)
