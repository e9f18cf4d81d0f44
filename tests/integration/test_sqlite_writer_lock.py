"""The SQLite writer lock (messaging.database.write_lock): queued, bounded, per host.

Writers of one SQLite file queue on a thread lock and an ``flock`` instead of sleeping
in SQLite's busy handler; a holder that never lets go (another process, another
thread) makes a waiter fail with "database is locked" after its timeout, which the API
answers with a 503, never a hang and never a 500.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from messaging.database import database_engine, write_lock
from tests.helpers import wait_for

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_another_process_holding_the_lock_times_out_then_releases(tmp_path: Path) -> None:
    engine = database_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "orders.db-writer.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(OperationalError, match="database is locked"):
            with write_lock(engine, timeout=0.3):
                pass
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits, the kernel drops its lock
        holder.wait(30)
        assert holder.stdout is not None
        holder.stdout.close()
    with write_lock(engine, timeout=30):
        pass
    engine.dispose()


def test_threads_of_one_process_queue_and_a_stuck_holder_times_out(tmp_path: Path) -> None:
    engine = database_engine(f"sqlite:///{tmp_path / 'orders.db'}")
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with write_lock(engine):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        wait_for(held.is_set, message="the lock held by another thread")
        with pytest.raises(OperationalError, match="database is locked"):
            with write_lock(engine, timeout=0.3):
                pass
    finally:
        release.set()
        thread.join(30)
    order = []

    def write(n: int) -> None:
        with write_lock(engine, timeout=30):
            order.append(n)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    assert sorted(order) == list(range(8))
    engine.dispose()
