"""How the order service's blueprints reach the objects built once per app.

The app factory (:mod:`orders.app`) stores the :class:`~orders.bootstrap.OrderServices`
in ``app.extensions``; blueprints read them through :func:`services` on the current app.
So no blueprint imports the factory, and the factory imports the blueprints: one
direction, no circle.
"""

from __future__ import annotations

from flask import Response, current_app, json

from orders.bootstrap import OrderServices
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
