"""Each service's own database, for the harnesses that start the whole stack.

Tests, ``make chaos`` and the benchmarks start every service with its own database, as
``make up`` and compose do: the order service's ``DATABASE_URL`` and one
``<NAME>_DATABASE_URL`` per consumer service. Nothing here is imported by a service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from consumers.config import DATABASE_VARS

ENV_VARS: dict[str, str] = {"orders": "DATABASE_URL", **DATABASE_VARS}
"""Service -> the variable naming its database."""

SERVICES: tuple[str, ...] = tuple(ENV_VARS)


def sqlite_urls(directory: Path) -> dict[str, str]:
    """Service -> a SQLite file of its own in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    return {name: f"sqlite:///{directory / f'{name}.db'}" for name in SERVICES}


def created_urls(create: Callable[[], str]) -> dict[str, str]:
    """Service -> a database of its own made by ``create`` (a PostgreSQL CREATE DATABASE)."""
    return {name: create() for name in SERVICES}


def environment(urls: Mapping[str, str]) -> dict[str, str]:
    """The environment variables pointing every service at its database."""
    return {ENV_VARS[name]: url for name, url in urls.items()}


def worker_command(bin_dir: Path, name: str) -> list[str]:
    """The command line of one queue worker: ``orders-updates`` or ``consumer NAME``."""
    if name == "updates":  # the order service's own worker
        return [str(bin_dir / "orders-updates")]
    return [str(bin_dir / "consumer"), name]
