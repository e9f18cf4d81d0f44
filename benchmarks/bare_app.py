"""The web-stack limit: a bare Flask endpoint under orders-api's exact gunicorn setup.

``POST /orders`` parses the JSON body and answers 201 with a small JSON document; no
validation, no database, no Redis. :class:`BareServer` is :class:`orders.server.OrdersServer`
with only ``load`` replaced, so the bind, worker count, threads and worker class are
the production server's, read from the same environment variables.

Run: ``PORT=8001 WEB_CONCURRENCY=2 python -m benchmarks.bare_app``.
"""

from __future__ import annotations

import sys

from flask import Flask, Response, jsonify, request

from orders.config import OrderServiceSettings
from orders.server import OrdersServer


def create_bare_app() -> Flask:
    """A Flask app with ``POST /orders`` (echo-ish, 201) and ``GET /healthz``."""
    app = Flask(__name__)
    counter = iter(range(1, sys.maxsize))

    @app.post("/orders")
    def create_order() -> Response:
        body = request.get_json()
        response = jsonify({"id": next(counter), "status": "placed", "order": body})
        response.status_code = 201
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    return app


class BareServer(OrdersServer):
    """orders-api's gunicorn configuration serving :func:`create_bare_app`."""

    def load(self) -> Flask:
        """Runs in each worker after the fork."""
        return create_bare_app()


def main() -> int:
    """Serve until SIGTERM (gunicorn's own signal handling)."""
    BareServer(OrderServiceSettings.from_env()).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
