"""Fixtures of the order service's integration tests: each database backend, an app.

Tests that take ``database_url`` run twice: on SQLite in ``tmp_path`` and on a real
PostgreSQL started for the session (``postgres_cluster`` in tests/conftest.py: skipped
locally when no binaries exist; fails when they exist but the server fails, or in CI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.orders_app import PostgresCluster, build_app


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orders.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


@pytest.fixture
def make_app(database_url: str) -> Iterator[Callable[..., Flask]]:
    """Build apps on the test's database (any Redis URL, any PATTERN); closed after."""
    apps: list[Flask] = []

    def make(redis_url: str, pattern: str = "both", **env: str) -> Flask:
        app = build_app(database_url, redis_url, pattern, **env)
        apps.append(app)
        return app

    yield make
    for app in apps:
        publisher = app.extensions.get("orders.publisher")  # orders.api.PUBLISHER
        if publisher is not None:
            publisher.close()
        app.extensions["orders"].close()
