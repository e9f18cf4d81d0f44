"""The pipeline profile's sample sorting: which py-spy samples are CPU, and whose."""

from __future__ import annotations

import pytest

from benchmarks.profiling import WAITING, _layer_of_names, _waits


@pytest.mark.parametrize(
    "leaf",
    [
        "_HiredisParser.read_from_socket (redis/_parsers/hiredis.py:108)",
        "SocketIO.readinto (socket.py:706)",
        "EpollSelector.select (selectors.py:468)",
        "Condition.wait (threading.py:327)",
        "Event.wait (threading.py:629)",
        "_worker (concurrent/futures/thread.py:81)",
    ],
)
def test_a_blocked_thread_is_not_cpu(leaf: str) -> None:
    assert _waits(leaf)


@pytest.mark.parametrize(
    "leaf",
    [
        "AbstractConnection.send_packed_command (redis/connection.py:592)",  # a send works
        "driver_transaction (messaging/database.py:384)",  # SQLite's commit
        "DriverStatement.execute (messaging/database.py:301)",
        "Path.open (pathlib.py:1044)",
        "JSONEncoder.iterencode (json/encoder.py:258)",
    ],
)
def test_work_is_cpu(leaf: str) -> None:
    assert not _waits(leaf)


def test_samples_go_to_the_innermost_known_layer() -> None:
    under_gunicorn = "ThreadWorker.handle (gunicorn/workers/gthread.py:553)"
    flask = "Flask.wsgi_app (flask/app.py:1511)"
    ours = "place_order (orders/service.py:222)"
    driver = "DriverInsert.one (messaging/database.py:236)"
    assert _layer_of_names([under_gunicorn]) == "gunicorn (the WSGI server)"
    assert _layer_of_names([under_gunicorn, flask]) == "Flask/Werkzeug"
    assert _layer_of_names([under_gunicorn, flask, ours]).startswith("our code")
    assert _layer_of_names([under_gunicorn, flask, ours, driver]).startswith("database driver")
    taking = "BasicKeyCommands.blmove (redis/commands/core.py:1979)"
    assert _layer_of_names(["Worker._consume (messaging/worker.py:431)", taking]) == WAITING


CHILD = """
import threading, time
threading.Thread(target=time.sleep, args=(60,), name="outbox-marker", daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def test_the_cpu_split_names_each_thread_by_its_role() -> None:
    """``profiling cpu``'s per-thread table: every thread of a process is read from
    /proc and named by ``py-spy dump`` (a real py-spy attached to a real process)."""
    import shutil
    import subprocess
    import sys

    from benchmarks.harness import BIN
    from benchmarks.profiling import THREAD_ROLES, thread_cpu, thread_roles

    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    assert py_spy is not None, "py-spy is a dev dependency (make install-dev)"
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        cpu = thread_cpu([child.pid])
        roles = thread_roles(py_spy, [child.pid])
    finally:
        child.kill()
        child.communicate()
    assert {pid for pid, _ in cpu} == {child.pid}
    assert len(cpu) == 2 and all(seconds >= 0 for seconds in cpu.values())
    assert sorted(roles.values()) == sorted(
        [THREAD_ROLES["MainThread"], THREAD_ROLES["outbox-marker"]]
    )
    assert set(roles) == {tid for _, tid in cpu}
