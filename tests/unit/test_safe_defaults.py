"""Safe defaults a copy of this project starts with: no secrets in files, small exposure.

Checked without a container engine, from the files themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from devtools.redis_server import RedisServer
from messaging import keys
from ops import acl
from orders.config import OrderServiceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")


def test_compose_holds_no_secret_only_required_references() -> None:
    for name, service in COMPOSE["services"].items():
        for var, value in (service.get("environment") or {}).items():
            text = str(value)
            if SECRET_NAMES.search(var):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", text), f"{name}.{var} = {text}"
            for match in re.finditer(r"://[^:/@]+:([^@]+)@", text):
                assert match.group(1).startswith("${") and ":?" in match.group(1), (name, text)


def test_env_example_names_every_required_variable_and_env_is_ignored() -> None:
    required = set(re.findall(r"\$\{([A-Z_]+):\?", (ROOT / "docker-compose.yml").read_text()))
    example = (ROOT / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert required and required <= defined
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_published_ports_are_loopback_only() -> None:
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_our_containers_run_read_only_as_non_root() -> None:
    built = {n: s for n, s in COMPOSE["services"].items() if "build" in s}
    assert built
    for name, service in built.items():
        assert service.get("read_only") is True, f"{name} has a writable root filesystem"
    assert re.search(r"^USER app$", (ROOT / "Dockerfile").read_text(), re.M)
    assert "nonroot" in (ROOT / "go-subscriber" / "Dockerfile").read_text()


def test_python_image_installs_only_hash_pinned_dependencies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "requirements.lock" in dockerfile
    lock = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([a-z0-9._-]+)==\S+ \\$", lock, re.M | re.I)
    assert {"redis", "flask", "sqlalchemy", "gunicorn"} <= {p.lower() for p in pins}
    blocks = re.split(r"\n(?=[a-z0-9._-]+==)", lock, flags=re.I)
    for block in blocks:
        if "==" in block.split("\n")[0]:
            assert "--hash=sha256:" in block, block.split("\n")[0]


def test_local_redis_binds_loopback(tmp_path: Path) -> None:
    command = RedisServer(data_dir=tmp_path).command()
    assert command[command.index("--bind") + 1] == "127.0.0.1"


def test_rate_limit_is_on_by_default() -> None:
    settings = OrderServiceSettings.from_env({})
    assert settings.rate_limit_per_minute == 600


def test_acl_names_exactly_the_project_keys_and_channels() -> None:
    rules = acl.rules()
    assert "~*" not in rules and "&*" not in rules and "+@all" not in rules
    assert f"&{keys.ORDER_EVENTS_CHANNEL}" in rules and f"~{keys.HELLO_QUEUE}" in rules
    assert rules.index("-@all") < rules.index("+ping")
    for dangerous in ("flushall", "flushdb", "config", "keys", "debug", "shutdown", "acl"):
        assert f"+{dangerous}" not in rules


def test_acl_names_only_subcommands_the_server_has() -> None:
    # Redis 7+ refuses to start on a rule naming a subcommand it lacks; 6.2 needs them.
    newest, seven, six = acl.rules(), acl.rules((7, 0)), acl.rules((6, 2))
    assert "+client|setinfo" in newest and "+client|maint_notifications" not in newest
    assert not any(r.startswith("+client|") and r != "+client|setname" for r in seven)
    assert {"+client|setinfo", "+client|maint_notifications"} <= set(six)
    assert acl.parse_version("7.0.15") == (7, 0)
    assert acl.main(["orders", "pw", "seven"]) == 2
