"""The order service: HTTP API, outbox relay, and the original Hello publisher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: dict[str, Any] | None = None, **kwargs: Any) -> Flask:
    """The order service's Flask application factory (see :func:`orders.app.create_app`).

    Imported lazily so ``hello-publisher`` does not load Flask and SQLAlchemy.
    """
    from orders.app import create_app as factory

    return factory(test_config, **kwargs)
