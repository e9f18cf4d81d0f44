"""The Flask application factory of the order service.

``create_app()`` reads :class:`~orders.config.OrderServiceSettings` from the environment
(``test_config`` entries named like environment variables override it; any other
entries go to ``app.config``), builds the services through :mod:`orders.bootstrap`, and
registers the API. Nothing connects here: the first request does.

Every error leaves as RFC 9457 problem JSON, never an HTML page or a stack trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from werkzeug.exceptions import HTTPException

from orders import auth
from orders.api import api
from orders.bootstrap import OrderServices, order_services
from orders.config import OrderServiceSettings
from orders.dashboard import dashboard
from orders.extensions import EXTENSION, problem_response
from orders.metrics import metrics
from orders.validation import Problem

log = logging.getLogger("orders-api")


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    title = exc.name
    detail = exc.description or title
    if status == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        detail = f"the request body is larger than {limit} bytes"
        return problem_response(Problem(413, "payload-too-large", "Payload too large", detail))
    response = problem_response(Problem(status, "about:blank", title, detail))
    if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return response


def _database_unavailable(exc: Exception) -> Response:
    # A locked SQLite file (past its busy timeout) or an unreachable PostgreSQL: a
    # passing condition, so 503 + Retry-After, and the client retries (with its
    # Idempotency-Key, a retry never makes a second order).
    log.warning("Database unavailable: %s", str(exc).strip().splitlines()[0] if str(exc) else exc)
    response = problem_response(
        Problem(
            503,
            "database-unavailable",
            "Database unavailable",
            "the database is busy or unreachable; retry shortly",
        )
    )
    response.headers["Retry-After"] = "1"
    return response


def _internal_error(exc: Exception) -> Response:
    original = getattr(exc, "original_exception", None) or exc
    log.error("Unhandled error: %r", original, exc_info=original)
    return problem_response(
        Problem(500, "internal-error", "Internal server error", "an unexpected error occurred")
    )


def _env_names() -> set[str]:
    """Every declared variable (overrides in ``test_config`` are named like them)."""
    from messaging.config import declared_names

    return declared_names()


def _settings(test_config: Mapping[str, Any] | None) -> OrderServiceSettings:
    env_names = _env_names()
    overrides = {k: str(v) for k, v in (test_config or {}).items() if k in env_names}
    return OrderServiceSettings.from_env({**os.environ, **overrides})


def create_app(
    test_config: Mapping[str, Any] | None = None, services: OrderServices | None = None
) -> Flask:
    """Build the order service's Flask app.

    Args:
        test_config: Overrides: environment variable names (``DATABASE_URL``,
            ``PATTERN``, ...) replace the environment's values; other keys are set on
            ``app.config``.
        services: Prebuilt services (the server passes its own); built from the
            settings when omitted.

    Raises:
        ConfigError: A setting is invalid.
    """
    settings = services.settings if services is not None else _settings(test_config)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    env_names = _env_names()
    app.config.update({k: v for k, v in (test_config or {}).items() if k not in env_names})
    app.extensions[EXTENSION] = services or order_services(settings)
    auth.init_app(app, settings)  # first: its checks run before any other blueprint's
    app.register_blueprint(api)
    app.register_blueprint(dashboard)  # /, /events/stream, /api/queues...
    app.register_blueprint(metrics)  # /metrics and the request counters
    app.register_error_handler(Problem, problem_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(OperationalError, _database_unavailable)
    app.register_error_handler(SQLAlchemyTimeoutError, _database_unavailable)
    app.register_error_handler(Exception, _internal_error)
    return app
