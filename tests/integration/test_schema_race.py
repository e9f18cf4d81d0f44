"""Services create their tables at start without failing when siblings start with them.

On a fresh SQLite file, processes that run ``create_all`` at the same instant race:
pysqlite runs DDL outside a transaction, so two can both find a table missing and the
second ``CREATE TABLE`` fails with "table ... already exists" (orders-api used to exit
at start that way when the relay and a worker started within the same second).
:func:`messaging.database.create_tables` re-checks instead. Six real processes per
round, released at one shared instant, two rounds: without the re-check, about a
third of them fail here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


CREATE = """
import sys, time
from messaging.database import database_engine
start = float(sys.argv[3])
engine = database_engine(sys.argv[2])
if sys.argv[1] == "orders":
    from orders.bootstrap import create_schema as create
else:
    from consumers.store import create_tables
    def create(engine):
        create_tables(engine, sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
create(engine)
"""


@pytest.mark.parametrize("service", ["orders", "payment"])
def test_six_processes_creating_one_schema_at_once_all_succeed(
    service: str, tmp_path: Path
) -> None:
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'{service}-{round_}.db'}"
        start = time.time() + 2.0  # every process imported and waiting by then
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CREATE, service, url, str(start)],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
        assert not failed, failed[0]


CONNECT = """
import sys, time
from sqlalchemy import text
from messaging.database import database_engine
start = float(sys.argv[2])
engine = database_engine(sys.argv[1])
while time.time() < start:
    time.sleep(0.0005)
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
"""


def test_twelve_processes_opening_one_new_file_at_once_all_switch_it_to_wal(
    tmp_path: Path,
) -> None:
    """The first connection to a new file switches it to WAL; SQLite refuses that switch
    with "database is locked" at once, without waiting, while a sibling holds the file
    (the CI failure of 2026-12-01: a consumer and five siblings started together). The
    pragma hook retries the switch. Without the retry, about one process in 90 fails."""
    from sqlalchemy import text

    from messaging.database import database_engine

    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'fresh-{round_}.db'}"
        start = time.time() + 1.5
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CONNECT, url, str(start)],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(12)
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        failed = [e for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
        assert not failed, failed[0]
        with database_engine(url).connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
