"""Every console script answers ``--help`` with its usage and exit 0, starting nothing.

``orders-api --help`` used to start gunicorn; a learner who asks a command what it does
must not get a running service (or a database file) instead. Each script runs in an
empty directory with Redis pointed at a closed port: help needs neither.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from devtools.redis_server import free_port
from tests.helpers import BIN

pytestmark = pytest.mark.e2e

SCRIPTS = sorted(
    tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
)
"""Every console script the package installs (a new one is checked without a list to edit)."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_starts_nothing(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_PORT": str(free_port()), "REDIS_CONNECT_ATTEMPTS": "1"}
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [str(BIN / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # a script that starts its service instead never returns
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script} "), done.stdout
    assert len(done.stdout.splitlines()) > 2  # a description, not just a usage line
    assert list(tmp_path.iterdir()) == []  # no var/, no database, no mail directory


def test_purge_without_ids_says_what_is_missing(redis_url: str) -> None:
    done = subprocess.run(
        [str(BIN / "orders-admin"), "dead-letters", "purge", "payment"],
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "orders-admin: purge: which dead letters? give their IDs "
        "(orders-admin dead-letters list payment) or --all\n"
    )


BAD_CONFIG_ARGS = {
    "consumer": ["payment"],
    "orders-admin": ["queues"],
}
"""The arguments a script needs to get as far as reading its configuration."""

READS_NO_SETTINGS = {"local-redis"}
"""Scripts with no environment settings (local-redis takes flags only)."""


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - READS_NO_SETTINGS))
def test_bad_config_is_one_line_and_exit_2(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "PATTERN": "sometimes", "REDIS_PORT": str(free_port())}
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [str(BIN / script), *BAD_CONFIG_ARGS.get(script, [])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"{script}: invalid PATTERN 'sometimes': must be pubsub, queue or both\n"
    ), done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before it created anything


def test_every_script_without_settings_is_a_console_script() -> None:
    assert READS_NO_SETTINGS <= set(SCRIPTS)


OUT_OF_RANGE = [
    (
        "orders-admin",
        ["orders", "show", "99999999999999999999999"],
        "argument ORDER_ID: '99999999999999999999999' is not between 1 and 2147483647",
    ),
    ("orders-admin", ["orders", "show", "0"], "argument ORDER_ID: '0' is not between 1"),
    (
        "orders-admin",
        ["dead-letters", "list", "payment", "--limit", "1e30"],
        "argument --limit: '1e30' is not an integer",
    ),
    (
        "orders-admin",
        ["dead-letters", "list", "payment", "--limit", "99999999999999999999999"],
        "argument --limit: '99999999999999999999999' is not between 1 and 10000",
    ),
    ("orders-admin", ["queues", "--sample", "inf"], "argument --sample: 'inf' is not between"),
    ("orders-admin", ["queues", "--sample", "nan"], "argument --sample: 'nan' is not between"),
    ("orders-admin", ["stuck", "--older-than", "-1"], "argument --older-than: '-1' is not"),
    (
        "orders-relay",
        ["--reconcile", "--window", "1e12"],
        "argument --window: '1e12' is not between 0 and 315360000",
    ),
    ("orders-relay", ["--reconcile", "--older-than", "inf"], "argument --older-than: 'inf'"),
]
"""Arguments past what the code can use: each was a traceback (an id SQLite cannot bind,
a sleep or a date out of range) or a wrong message ("cannot reach Redis" for a count
Redis refused)."""


@pytest.mark.parametrize(("script", "argv", "says"), OUT_OF_RANGE)
def test_an_argument_out_of_range_is_one_line_and_exit_2(
    script: str, argv: list[str], says: str, tmp_path: Path, redis_url: str
) -> None:
    done = subprocess.run(
        [str(BIN / script), *argv],
        cwd=tmp_path,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{script}: {says}"), line
    assert list(tmp_path.iterdir()) == []


def test_local_redis_refuses_a_port_past_65535(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "local-redis"), "--port", "99999999", "--dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "local-redis: error: argument --port: 99999999 is not between 1 and 65535"
    )
    assert "Traceback" not in done.stderr
