"""``free_port``: the port a test hands to a child process stays its own until the child binds.

CI once waited 60 s for a ``make up`` program that never started: a port picked with
``bind(0)`` and closed is free again at once, so another test worker's pick (or an
outgoing connection's source port) could take it before the child bound it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools import redis_server
from devtools.redis_server import free_port


@pytest.fixture
def leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lease directory of this test's own, so the machine's real leases are untouched."""
    monkeypatch.setattr(redis_server, "PORT_LEASES", tmp_path / "leases")
    return tmp_path / "leases"


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_and_are_leased(leases: Path) -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200, "a port was handed out twice"
    assert all(10001 <= p < ephemeral_low() for p in ports)
    assert {int(f.name) for f in leases.iterdir()} == set(ports)


def test_a_port_leased_by_another_process_is_not_handed_out(
    leases: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process (a real one) leases the port this one would draw first.
    child = subprocess.run(
        [sys.executable, "-c", "import pathlib, sys; from devtools import redis_server as r;"
         "r.PORT_LEASES = pathlib.Path(sys.argv[1]); print(r._lease(int(sys.argv[2])))",
         str(leases), "23456"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert child.stdout.strip() == "True"
    draws = iter([23456, 23457])
    monkeypatch.setattr("random.randint", lambda low, high: next(draws))
    assert free_port() == 23457


def test_a_port_something_listens_on_is_not_handed_out(
    leases: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        draws = iter([busy, 23458])
        monkeypatch.setattr("random.randint", lambda low, high: next(draws))
        assert free_port() == 23458
    assert not (leases / str(busy)).exists()


def test_a_stale_lease_is_taken_back(leases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leases.mkdir()
    old = leases / "23459"
    old.touch()
    past = time.time() - redis_server.LEASE_SECONDS - 1
    os.utime(old, (past, past))
    monkeypatch.setattr("random.randint", lambda low, high: 23459)
    assert free_port() == 23459
    assert old.stat().st_mtime > past + 1


def test_cluster_ports_lease_the_bus_port_too(leases: Path) -> None:
    port = redis_server.free_cluster_port()
    assert {f.name for f in leases.iterdir()} == {str(port), str(port + 10000)}
