"""The small steps supervisor needs to run ``make up`` as a lab (``supervisord.conf``).

Supervisor starts programs in priority order but does not wait for one to be ready
before the next, and it writes each program's output to its own log file only. Three
helpers close those gaps, each a short step supervisor runs or ``make`` calls:

- ``wait-ready -- CMD ...`` waits until the lab's Redis program runs and answers PING
  (and a PostgreSQL database, if one is configured, accepts connections), then *execs*
  CMD: the pid supervisor watches, stops and kills is the service itself, never a
  wrapper that could leave it orphaned. This is compose's ``condition: service_healthy``.
- ``echo-logs`` is a supervisor event listener: every program's output arrives as a
  PROCESS_LOG event and is printed with a time and the program's name, like
  ``docker compose up``, while the per-program files (``var/log/NAME.log``) stay whole
  for ``make logs s=NAME``. When Redis cannot start at all (its port taken, say), it
  shuts the stack down: nothing should run against a Redis that is not ours.
- ``down`` asks this checkout's supervisord (through its own unix socket, never by
  process name) to shut down, and waits until it is gone.

Console use: ``python -m devtools.lab wait-ready|echo-logs|down``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import TextIO

WAIT_TIMEOUT = 60.0
"""Seconds ``wait-ready`` waits for Redis and the database before it gives up (exit 1)."""
DOWN_TIMEOUT = 180.0
"""Seconds ``down`` waits for supervisord to stop everything (stopwaitsecs add up)."""
REDIS_PROGRAM = "redis"
"""The program name of the lab's Redis in supervisord.conf."""
NAME_WIDTH = 10
"""Width of the program name column in the combined output."""


def redis_answers(host: str, port: int) -> bool:
    """True when a Redis server on host:port answers PING (NOAUTH counts: it is up)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def redis_pid(host: str, port: int) -> int | None:
    """The ``process_id`` a Redis server on host:port reports (INFO server); None if none
    answers (or it wants a password: the lab's Redis has none)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
                head, sep, _ = reply.partition(b"\r\n")
                if not head.startswith(b"$"):
                    break  # an error reply (NOAUTH ...): no pid to read
                if sep and len(reply) >= len(head) + 2 + int(head[1:]):
                    break  # the whole bulk string is in
    except (OSError, ValueError):
        return None
    match = re.search(rb"process_id:(\d+)", reply)
    return int(match.group(1)) if match else None


def our_redis_ready(host: str, port: int) -> bool:
    """True when the Redis answering on host:port is the lab's own ``redis`` program.

    Under supervisor (SUPERVISOR_SERVER_URL set) that means: the server's process_id is
    the pid supervisor started (local-redis execs redis-server, so they are the same).
    Another Redis already on the port answers PING too, and must not get our traffic.
    Outside supervisor there is no one to ask: any server answering PING will do.
    """
    if not os.environ.get("SUPERVISOR_SERVER_URL"):
        return redis_answers(host, port)
    from supervisor import childutils

    try:
        info = childutils.getRPCInterface(os.environ).supervisor.getProcessInfo(REDIS_PROGRAM)
    except (OSError, xmlrpc.client.Fault):
        return False
    if info["statename"] not in ("STARTING", "RUNNING") or not info["pid"]:
        return False
    return redis_pid(host, port) == int(info["pid"])


def database_answers(url: str) -> bool:
    """True when the database of ``url`` accepts a connection (SQLite always does)."""
    if not url.startswith("postgresql"):
        return True
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, pool_pre_ping=False)
    try:
        with engine.connect():
            return True
    except sqlalchemy.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def _say(line: str) -> None:
    print(f"wait-ready: {line}", flush=True)


def wait_ready(command: list[str], database_envs: list[str], timeout: float) -> int:
    """Wait for Redis (and the databases named by ``database_envs``), then exec ``command``."""
    if not command:
        print("wait-ready: give the command to run after --", file=sys.stderr)
        return 2
    host = os.environ.get("REDIS_HOST", "").strip() or "localhost"
    raw_port = os.environ.get("REDIS_PORT", "").strip() or "6379"
    if not raw_port.isdigit():
        print(f"wait-ready: invalid REDIS_PORT {raw_port!r}: must be an integer", file=sys.stderr)
        return 2
    port = int(raw_port)
    urls = [os.environ[name] for name in database_envs if os.environ.get(name, "").strip()]
    started = time.monotonic()
    deadline = started + timeout
    said = False
    while not our_redis_ready(host, port):
        if not said:
            _say(f"waiting for Redis at {host}:{port}")
            said = True
        if time.monotonic() > deadline:
            print(
                f"wait-ready: Redis at {host}:{port} not ready after {timeout:g}s", file=sys.stderr
            )
            return 1
        time.sleep(0.1)
    for url in urls:
        while not database_answers(url):
            if time.monotonic() > deadline:
                where = url.split("@")[-1]  # no credentials in the message
                print(f"wait-ready: database {where} not ready after {timeout:g}s", file=sys.stderr)
                return 1
            time.sleep(0.2)
    if said:
        _say(f"Redis at {host}:{port} ready after {time.monotonic() - started:.1f}s")
    os.execvp(command[0], command)
    return 0  # pragma: no cover (execvp does not return)


def _line(name: str, data: bytes) -> str:
    """One line of the combined output: ``HH:MM:SS name       | text``."""
    text = data.decode("utf-8", "replace").rstrip("\r")
    return f"{time.strftime('%H:%M:%S')} {name:<{NAME_WIDTH}} | {text}\n"


def _give_up(out: TextIO) -> None:
    """Redis could not start: shut the whole stack down rather than run without it."""
    from supervisor import childutils

    out.write(
        f"{time.strftime('%H:%M:%S')} {'lab':<{NAME_WIDTH}} | Redis could not start "
        "(its lines above say why): stopping everything\n"
    )
    out.flush()
    try:
        childutils.getRPCInterface(os.environ).supervisor.shutdown()
    except xmlrpc.client.Fault:
        pass  # already shutting down


def echo_logs() -> int:
    """Supervisor event listener: print every PROCESS_LOG event with time and name.

    The protocol (supervisor's docs, "Event Listeners"): write READY, read one header
    line, read ``len`` bytes of payload, answer ``RESULT 2\\nOK``. Payloads are read as
    bytes: ``len`` counts bytes, and a log line may hold any UTF-8. Output goes to
    stderr, which the config sends to supervisord's stdout (the terminal of ``make up``).
    """
    from supervisor import childutils

    stdin, out = sys.stdin.buffer, sys.stderr
    partial: dict[str, bytes] = {}  # a line split across two events waits for its end

    def on_term(_signum: int, _frame: object) -> None:
        # Supervisor stops the listener last (priority 1): print what is left, exit 0.
        for name, rest in partial.items():
            out.write(_line(name, rest))
        out.flush()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = stdin.readline()
        if not header:
            return 0  # supervisord closed our stdin: it is shutting down
        headers = childutils.get_headers(header.decode("ascii"))
        payload = stdin.read(int(headers["len"]))
        first, _, data = payload.partition(b"\n")
        meta = childutils.get_headers(first.decode("utf-8", "replace"))
        name = meta.get("processname", "?")
        if headers.get("eventname") == "PROCESS_STATE_FATAL":
            sys.stdout.write("RESULT 2\nOK")
            sys.stdout.flush()
            if name == REDIS_PROGRAM:
                _give_up(out)
            continue
        lines = (partial.pop(name, b"") + data).split(b"\n")
        if lines[-1]:
            partial[name] = lines[-1]
        for line in lines[:-1]:
            out.write(_line(name, line))
        out.flush()
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


def _supervisor(socket_path: Path) -> xmlrpc.client.ServerProxy:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def down(lab_home: Path, timeout: float) -> int:
    """Shut this checkout's supervisord down and wait until it has exited."""
    sock = lab_home / "var" / "supervisor.sock"
    try:
        _supervisor(sock).supervisor.shutdown()
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"make down: nothing running in {lab_home} (no supervisord on {sock})")
        return 0
    except xmlrpc.client.Fault as exc:
        if "SHUTDOWN_STATE" not in exc.faultString:
            raise
    print("make down: stopping the services, then Redis...", flush=True)
    deadline = time.monotonic() + timeout
    while sock.exists():  # supervisord removes its socket as its very last step
        if time.monotonic() > deadline:
            print(f"make down: supervisord still running after {timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print("make down: stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m devtools.lab``: the helpers of ``supervisord.conf`` and ``make down``."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.lab", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait-ready", help="wait for Redis (and the database), then exec")
    wait.add_argument(
        "--database",
        action="append",
        default=[],
        metavar="ENV",
        help="also wait for the PostgreSQL database this variable names (repeatable)",
    )
    wait.add_argument("--timeout", type=float, default=WAIT_TIMEOUT)
    wait.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to exec")
    sub.add_parser("echo-logs", help="supervisor event listener printing every program's output")
    stop = sub.add_parser("down", help="shut down the supervisord of LAB_HOME and wait")
    stop.add_argument("--timeout", type=float, default=DOWN_TIMEOUT)
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return wait_ready(cmd, args.database, args.timeout)
    if args.command == "echo-logs":
        return echo_logs()
    home = Path(os.environ.get("LAB_HOME", "").strip() or ".").resolve()
    return down(home, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
