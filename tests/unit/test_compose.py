"""docker-compose.yml and the Dockerfiles, checked without a container engine.

No engine runs on our machines, so we check what `docker compose config` and a build
would: the file against the Compose Specification's schema, every build context has
its Dockerfile, every variable passed is one the service reads, and the fixes to the
original (health-gated start, PATTERN/PUBLISH_INTERVAL passed, unbuffered Python).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from devtools.envdoc import ALL_ENV_VARS as ENV_VARS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GO_DIR = ROOT / "go-subscriber"
PYTHON_ONLY_ENV = {"PYTHONUNBUFFERED"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _context(service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    context = build if isinstance(build, str) else build.get("context", ".")
    return (ROOT / context).resolve()


def go_env_vars() -> set[str]:
    """Every variable name the Go subscriber reads (string literals passed to a getenv)."""
    names: set[str] = set()
    for src in GO_DIR.glob("*.go"):
        if src.name.endswith("_test.go"):
            continue
        names |= set(
            re.findall(
                r'\b(?:get|intVar|secondsVar|[Gg]etenv|LookupEnv)\((?:get,\s*)?"([A-Z][A-Z0-9_]*)"',
                src.read_text(),
            )
        )
    return names


def test_compose_matches_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
    # The spec names draft-07 as "https://json-schema.org/draft-07/schema" (no "#"),
    # which jsonschema does not resolve by itself: it is draft-07, so say so.
    assert "draft-07" in schema["$schema"]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_compose()), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_every_build_context_has_a_dockerfile() -> None:
    contexts = [c for c in map(_context, _services().values()) if c is not None]
    assert contexts
    for context in contexts:
        assert (context / "Dockerfile").is_file(), f"{context} has no Dockerfile"


def test_services_wait_for_a_healthy_redis() -> None:
    services = _services()
    assert "healthcheck" in services["redis"]
    for name, service in services.items():
        if name == "redis" or "redis" not in str(service.get("environment", {})).lower():
            continue
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_redis_is_published_on_loopback_only() -> None:
    for port in _services()["redis"].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port
    assert "--appendonly" in _services()["redis"]["command"]


@pytest.mark.parametrize(
    "name",
    [
        "python-publisher", "go-subscriber", "orders-api", "orders-stream", "orders-relay",
        "payment", "invoice", "shipping", "email", "orders-updates",
    ],
)  # fmt: skip
def test_pattern_is_passed_through(name: str) -> None:
    # PATTERN decides where the order consumers take their events, not only Hello's.
    assert _services()[name]["environment"]["PATTERN"] == "${PATTERN:-both}"


def test_every_service_built_here_gets_pattern() -> None:
    built = {n for n, s in _services().items() if "build" in s}
    assert built and all(_services()[n]["environment"]["PATTERN"] for n in built)


def test_make_up_passes_pattern_to_every_program() -> None:
    """`PATTERN=pubsub make up`: make exports it, supervisord hands its environment to
    every program, and no program's ``environment=`` sets it otherwise."""
    makefile = (ROOT / "Makefile").read_text()
    assert "export PATTERN ?= both" in makefile
    conf = (ROOT / "supervisord.conf").read_text()
    assert "PATTERN" not in "".join(
        line for line in conf.splitlines() if line.startswith("environment=")
    )


def test_publisher_gets_interval_and_unbuffered_output() -> None:
    env = _services()["python-publisher"]["environment"]
    assert env["PUBLISH_INTERVAL"] == "${PUBLISH_INTERVAL:-2.0}"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_every_variable_passed_is_read_by_the_service() -> None:
    python_vars = {v.name for v in ENV_VARS} | PYTHON_ONLY_ENV
    go_vars = go_env_vars()
    assert {"REDIS_HOST", "REDIS_PORT", "PATTERN"} <= go_vars
    for name, service in _services().items():
        env = set(service.get("environment", {}))
        context = _context(service)
        if context is None:
            continue
        known = go_vars if context == GO_DIR.resolve() else python_vars
        assert env <= known, f"{name} is given variables it never reads: {env - known}"


def test_images_are_small_and_run_as_non_root() -> None:
    python = (ROOT / "Dockerfile").read_text()
    assert "python:3.11-slim" in python
    assert re.search(r"^USER (?!root)\S+", python, re.M)
    go = (GO_DIR / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", go, re.M)) >= 2, "the Go image must be a multi-stage build"
    assert re.search(r"(^USER (?!root)\S+|nonroot)", go, re.M)


# --- docker-compose.cluster.yml: the scale-out override ------------------------------

CLUSTER_COMPOSE = ROOT / "docker-compose.cluster.yml"


def _cluster_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(CLUSTER_COMPOSE.read_text())["services"]


def test_cluster_override_matches_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
    override = yaml.safe_load(CLUSTER_COMPOSE.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(override), key=str)
    assert not errors, "\n".join(e.message for e in errors)
    # Only services of the base file are overridden, besides the new cluster nodes.
    new = set(override["services"]) - set(_services())
    assert new == {"redis-2", "redis-3", "redis-4", "redis-5", "redis-6", "redis-cluster-init"}


def test_cluster_override_runs_six_cluster_nodes_and_creates_the_cluster_once() -> None:
    services = _cluster_services()
    nodes = ["redis", *(f"redis-{i}" for i in range(2, 7))]
    volumes = set()
    for name in nodes:
        command = services[name]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes", name
        assert "--appendonly" in command
        volumes.add(services[name]["volumes"][0].split(":")[0])
    assert len(volumes) == 6, "each node needs its own data volume (nodes.conf, AOF)"
    init = services["redis-cluster-init"]
    assert set(init["depends_on"]) == set(nodes)
    assert all(d["condition"] == "service_healthy" for d in init["depends_on"].values())
    script = init["command"][0]
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert "--cluster-yes" in script and "cluster_state:ok" in script


def test_cluster_override_points_every_client_at_the_cluster() -> None:
    python_vars = {v.name for v in ENV_VARS}
    go_vars = go_env_vars()
    clients = {n: s for n, s in _cluster_services().items() if n in _services() and n != "redis"}
    assert set(clients) == {
        n for n, s in _services().items() if "REDIS_HOST" in str(s.get("environment", {}))
    }
    for name, service in clients.items():
        env = service["environment"]
        assert env["REDIS_CLUSTER"] == "1", name
        known = go_vars if name == "go-subscriber" else python_vars
        assert set(env) <= known, f"{name} is given variables it never reads"
        assert service["depends_on"]["redis-cluster-init"] == {
            "condition": "service_completed_successfully"
        }
    for name in ("payment", "invoice", "shipping", "email", "orders-updates"):
        assert clients[name]["deploy"]["replicas"] >= 2, name


def test_every_service_built_here_can_export_traces() -> None:
    """`OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 docker compose up` reaches the
    Python services and the Go subscriber alike (empty, the default: nothing exported)."""
    built = {n for n, s in _services().items() if "build" in s}
    for name in built:
        env = _services()[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}", name


def test_every_program_make_up_runs_can_be_named_to_make_stop_start_kill_logs() -> None:
    """`make stop s=NAME` (and start, kill, logs) accepts exactly supervisord's programs."""
    conf = (ROOT / "supervisord.conf").read_text()
    programs = set(re.findall(r"^\[program:([\w-]+)\]", conf, re.M))
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^PROGRAMS := (.+)$", makefile, re.M)
    assert listed is not None
    assert set(listed.group(1).split()) == programs
