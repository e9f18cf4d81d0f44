"""Shared fixtures: a real Redis server for the session, clean per test.

``make test`` starts one Redis server and passes it as ``REDIS_TEST_URL`` (the Go tests
use the same one). Run pytest alone and the session starts its own. ``make test`` runs
pytest in two processes (pytest-xdist): the first uses that server, every other one
starts a server of its own, since tests flush whole servers (FLUSHALL). The end-to-end
tests, which each start a whole stack of processes, run one after the other in one of
them (``xdist_group``), beside the unit and integration tests in the other. Either way it is
a real ``redis-server``; fakeredis appears only in ``tests/unit``. When no server can
be found or started, Redis tests are skipped locally but fail when ``CI`` is set.

CI cannot look away: with ``CI`` set, any skip (a test's or a whole module's) is turned
into a failure here, whatever raised it, and an empty ``parametrize`` fails at
collection (``empty_parameter_set_mark`` in pyproject.toml). Locally the run ends with
what was skipped and, from each skip reason, what to install to run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from consumers import smtp_sink
from devtools.redis_server import RedisCluster, RedisNotFound, RedisServer
from tests.helpers import RunningSink
from tests.orders_app import PostgresCluster, find_postgres_bin
from tests.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = bool(os.environ.get("CI"))


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI: {_skip_reason(report)}\n"
            "CI (CI is set) runs every test: a skip here hides a test that did not run."
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI, a skipped test is a failed test."""
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """In CI, a module that skips itself at collection fails instead."""
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """End the run with what was skipped and, from the skip reasons, what to install."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    reasons = Counter(_skip_reason(r) for r in skipped)
    terminalreporter.section("skipped: these tests did not run", sep="=", yellow=True)
    for reason, count in reasons.most_common():
        terminalreporter.line(f"{count:4d} x {reason}")
    terminalreporter.line("Install what the reasons name to run them; CI fails on any skip.")


_GROUP_LOST = pytest.StashKey[str]()
"""An e2e test's node id without its group, when xdist lost the group (else unset)."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests share one xdist worker: at most one whole stack runs at a time.

    First among the hooks (tryfirst): xdist's own, which reads ``xdist_group`` to send a
    group to one worker, runs before a conftest's otherwise, and found no marker (so
    until this was seen, two whole stacks ran at once in CI).
    """
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.xdist_group("e2e"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note when ``--dist loadgroup`` would not keep the e2e group together.

    xdist passes a test's group to its scheduler as an ``@group`` suffix on the node id;
    where that no longer works (pytest 9.2, pytest-dev/pytest-xdist#1386) the group is
    silently ignored and two whole stacks run at once on two cores. Every e2e test then
    fails, saying so (:func:`pytest_runtest_setup`).
    """
    if not session.config.getoption("loadgroup", default=False):
        return  # not an xdist worker with --dist loadgroup
    e2e = [i.nodeid for i in session.items if i.get_closest_marker("e2e") is not None]
    lost = [nodeid for nodeid in e2e if not nodeid.endswith("@e2e")]
    if lost:
        session.config.stash[_GROUP_LOST] = lost[0]


def pytest_runtest_setup(item: pytest.Item) -> None:
    lost = item.config.stash.get(_GROUP_LOST, None)
    if lost is not None and item.get_closest_marker("e2e") is not None:
        pytest.fail(
            f"--dist loadgroup lost the e2e group ({lost} has no @e2e suffix), so whole "
            "stacks would run at once: this pytest and pytest-xdist do not group tests "
            "(see the pin in pyproject.toml)"
        )


def _no_redis(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Redis is required in CI: {reason}")
    pytest.skip(
        f"no Redis server: {reason} "
        "(install: pip install -e '.[dev]' or apt-get install redis-server)"
    )


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's real Redis server."""
    given = os.environ.get("REDIS_TEST_URL")
    if given and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        yield given
        return
    try:
        server = RedisServer(data_dir=tmp_path_factory.mktemp("redis")).start()
    except (RedisNotFound, RuntimeError) as exc:
        _no_redis(str(exc))
    yield server.url
    server.stop()


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    """A client of the session server, on an empty database."""
    client = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    try:
        client.flushdb()
    except redis_lib.ConnectionError as exc:
        _no_redis(str(exc))
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start dedicated Redis servers (for tests that stop, kill or restart them)."""
    started: list[RedisServer] = []

    def start(**options: object) -> RedisServer:
        try:
            server = RedisServer(data_dir=tmp_path / f"redis-{len(started)}", **options)  # type: ignore[arg-type]
            server.data_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            server.start()
        except (RedisNotFound, RuntimeError) as exc:
            _no_redis(str(exc))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real Redis Cluster for the session: 3 masters, each with a replica (6 nodes)."""
    cluster = RedisCluster(root=tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except (RedisNotFound, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        _no_redis(f"Redis Cluster did not start: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., RedisCluster]]:
    """Start dedicated Redis Clusters (for tests that kill their masters)."""
    started: list[RedisCluster] = []

    def start(**options: object) -> RedisCluster:
        cluster = RedisCluster(root=tmp_path / f"cluster-{len(started)}", **options)  # type: ignore[arg-type]
        started.append(cluster)
        try:
            cluster.start()
        except (RedisNotFound, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _no_redis(f"Redis Cluster did not start: {exc}")
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(params=["single", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """Each Redis topology in turn (one node, then the cluster), flushed before and after."""
    if request.param == "single":
        topo = Topology("single", request.getfixturevalue("redis_url"), cluster=False)
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        topo = Topology("cluster", cluster.url, cluster=True)
    try:
        topo.flush()
    except redis_lib.ConnectionError as exc:
        _no_redis(str(exc))
    yield topo
    topo.flush()


@pytest.fixture
def bredis(topology: Topology) -> Iterator[redis_lib.Redis]:
    """A bytes client (as the consumers build it) on the flushed server or cluster."""
    client = topology.client(decode_responses=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A real PostgreSQL server for the session (skipped locally without binaries)."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are required in CI")
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) (install: apt-get install postgresql)")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
    except (subprocess.CalledProcessError, OSError) as exc:
        output = getattr(exc, "stderr", b"") or b""
        cluster.stop()
        pytest.fail(f"PostgreSQL did not start: {exc}\n{output.decode(errors='replace')}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def go_subscriber_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go subscriber, built once per session from go-subscriber/."""
    if shutil.which("go") is None:
        pytest.fail("the go toolchain is required to build go-subscriber")
    out = tmp_path_factory.mktemp("go") / "go-subscriber"
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=ROOT / "go-subscriber", check=True)
    return out


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[Callable[..., RunningSink]]:
    """Start the real SMTP sink (``consumers.smtp_sink``) in-process: ``start_sink(size=...,
    idle_seconds=...)``; it stores into ``tmp_path / "mail"`` and stops after the test."""
    sinks: list[RunningSink] = []

    def start(**limits: Any) -> RunningSink:
        sink = RunningSink(tmp_path / "mail", smtp_sink.Limits(**limits))
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()
