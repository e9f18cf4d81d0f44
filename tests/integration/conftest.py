"""Fixtures of the order service's integration tests: each database backend, an app.

Tests that take ``database_url`` run twice: on SQLite in ``tmp_path`` and on a real
PostgreSQL started for the session. PostgreSQL is skipped locally when no binaries
exist; when they exist but the server fails, or when ``CI`` is set, the test fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.orders_app import PostgresCluster, build_app, find_postgres_bin


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A real PostgreSQL server for the session."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are required in CI")
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl)")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
    except (subprocess.CalledProcessError, OSError) as exc:
        output = getattr(exc, "stderr", b"") or b""
        cluster.stop()
        pytest.fail(f"PostgreSQL did not start: {exc}\n{output.decode(errors='replace')}")
    yield cluster
    cluster.stop()


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
        app.extensions["orders"].close()
