"""How the order service's blueprints reach the objects built once per app.

The app factory (:mod:`orders.app`) stores the :class:`~orders.bootstrap.OrderServices`
in ``app.extensions``; blueprints read them through :func:`services` on the current app.
So no blueprint imports the factory, and the factory imports the blueprints: one
direction, no circle.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Response, current_app, json

from messaging import keys
from orders.bootstrap import OrderServices
from orders.config import OrderServiceSettings
from orders.ratelimit import RateLimiter
from orders.validation import PROBLEM_CONTENT_TYPE, Problem

EXTENSION = "orders"
"""Key of the :class:`~orders.bootstrap.OrderServices` in ``app.extensions``."""


def services() -> OrderServices:
    """The current app's services (engine, sessions, Redis, publisher, settings)."""
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


def problem_response(problem: Problem) -> Response:
    """Render a Problem as ``application/problem+json``."""
    response = Response(
        json.dumps(problem.to_dict()), status=problem.status, mimetype=PROBLEM_CONTENT_TYPE
    )
    response.headers["Content-Type"] = PROBLEM_CONTENT_TYPE
    return response


def app_limiter(
    name: str,
    per_minute: Callable[[OrderServiceSettings], int],
    key: Callable[[str], str] = keys.rate_limit,
) -> RateLimiter:
    """The current app's :class:`RateLimiter` stored as ``name`` (made on first use)."""
    found = current_app.extensions.get(name)
    if found is None:
        svc = services()
        limiter = RateLimiter(svc.guard, per_minute(svc.settings), key)
        found = current_app.extensions.setdefault(name, limiter)
    return found  # type: ignore[no-any-return]


def too_many(slug: str, title: str, detail: str, retry_after: int) -> Response:
    """429 problem JSON with ``Retry-After``."""
    response = problem_response(Problem(429, slug, title, detail))
    response.headers["Retry-After"] = str(retry_after)
    return response
