"""Configuration: defaults, validation, one-line errors."""

from __future__ import annotations

import pytest

from devtools.envdoc import ALL_ENV_VARS as ENV_VARS
from messaging.config import ConfigError, Settings, database_url


def test_defaults_are_the_originals() -> None:
    s = Settings.from_env({})
    assert (s.redis_host, s.redis_port, s.pattern, s.publish_interval) == (
        "localhost",
        6379,
        "both",
        2.0,
    )
    assert s.redis_connect_attempts == 5
    assert s.redis_connect_retry_delay == 5.0
    assert s.publishes and s.queues


@pytest.mark.parametrize(
    ("pattern", "publishes", "queues"),
    [("pubsub", True, False), ("queue", False, True), ("both", True, True)],
)
def test_pattern_selects_paths(pattern: str, publishes: bool, queues: bool) -> None:
    s = Settings.from_env({"PATTERN": pattern})
    assert (s.publishes, s.queues) == (publishes, queues)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PATTERN": "pubsubb"}, "invalid PATTERN 'pubsubb': must be pubsub, queue or both"),
        ({"PATTERN": "BOTH"}, "invalid PATTERN"),
        ({"REDIS_PORT": "abc"}, "invalid REDIS_PORT 'abc': must be an integer"),
        ({"REDIS_PORT": "70000"}, "invalid REDIS_PORT '70000': must be between 1 and 65535"),
        ({"PUBLISH_INTERVAL": "fast"}, "invalid PUBLISH_INTERVAL 'fast'"),
        ({"PUBLISH_INTERVAL": "0"}, "invalid PUBLISH_INTERVAL '0'"),
        ({"PUBLISH_INTERVAL": "nan"}, "invalid PUBLISH_INTERVAL 'nan'"),
        ({"REDIS_URL": "http://x"}, "invalid REDIS_URL"),
        ({"LOG_FORMAT": "xml"}, "invalid LOG_FORMAT"),
        ({"LOG_LEVEL": "verbose"}, "invalid LOG_LEVEL 'verbose': must be one of DEBUG, INFO"),
        (
            {"REDIS_URL": "redis://h:6379/0", "REDIS_TLS_CA_FILE": __file__},
            "needs a rediss:// REDIS_URL",
        ),
        (
            {"REDIS_URL": "rediss://h:6379/0", "REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"},
            "invalid REDIS_TLS_CA_FILE '/nonexistent/ca.pem': no such file",
        ),
        (
            {"REDIS_URL": "rediss://:pw@h:6379/0?ssl_check_hostname=False"},
            "invalid REDIS_URL: TLS verification cannot be turned off",
        ),
    ],
)
def test_bad_values_are_one_line_errors(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw", ["info", "Info", "INFO", " info "])
def test_log_level_in_any_case(raw: str) -> None:
    assert Settings.from_env({"LOG_LEVEL": raw}).log_level == "INFO"


def test_empty_means_default() -> None:
    s = Settings.from_env({"PATTERN": "", "REDIS_PORT": " ", "REDIS_HOST": ""})
    assert (s.pattern, s.redis_port, s.redis_host) == ("both", 6379, "localhost")


def test_every_env_var_is_documented_once() -> None:
    names = [v.name for v in ENV_VARS]
    assert len(names) == len(set(names))
    assert all(v.doc for v in ENV_VARS)


def test_redis_location_hides_credentials() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://user:secret@cache.local:6390/0"})
    assert s.redis_location == "cache.local:6390"


def test_tls_client_always_verifies_the_server() -> None:
    from messaging.connection import redis_client

    url = "rediss://:pw@cache.local:6380/0"
    with_ca = redis_client(Settings.from_env({"REDIS_URL": url, "REDIS_TLS_CA_FILE": __file__}))
    system = redis_client(Settings.from_env({"REDIS_URL": url}))
    kwargs = with_ca.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == (__file__, "required")
    assert kwargs["ssl_check_hostname"] is True
    assert "ssl_ca_certs" not in system.connection_pool.connection_kwargs  # system CAs
    assert system.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"
    plain = redis_client(Settings.from_env({"REDIS_URL": "redis://cache.local:6379/0"}))
    assert "ssl_cert_reqs" not in plain.connection_pool.connection_kwargs


def test_bad_redis_url_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL": "http://user:s3cret@cache:6379/0"})
    assert "s3cret" not in str(info.value)
    assert "invalid REDIS_URL scheme 'http'" in str(info.value)


def test_reconciliation_settings_have_defaults_and_reject_bad_values() -> None:
    from orders.config import OrderServiceSettings

    s = OrderServiceSettings.from_env({})
    assert (s.reconcile_interval, s.reconcile_after, s.reconcile_batch) == (30.0, 300.0, 100)
    assert (
        OrderServiceSettings.from_env({"RECONCILE_INTERVAL_SECONDS": "0"}).reconcile_interval == 0
    )
    for name, raw in (
        ("RECONCILE_INTERVAL_SECONDS", "0.01"),
        ("RECONCILE_INTERVAL_SECONDS", "-1"),
        ("RECONCILE_AFTER_SECONDS", "0"),
        ("RECONCILE_BATCH", "0"),
        ("RECONCILE_BATCH", "lots"),
    ):
        with pytest.raises(ConfigError, match=f"invalid {name}"):
            OrderServiceSettings.from_env({name: raw})


def test_retry_budget_settings_default_to_an_hour_and_reject_nonsense() -> None:
    from messaging.config import WorkerSettings

    settings = WorkerSettings.from_env({})
    assert (settings.retry_seconds, settings.revive_seconds, settings.revive_rate) == (
        3600.0,
        60.0,
        10,
    )
    tuned = WorkerSettings.from_env(
        {
            "CONSUMER_RETRY_SECONDS": "90",
            "CONSUMER_REVIVE_SECONDS": "5",
            "CONSUMER_REVIVE_RATE": "3",
        }
    )
    assert (tuned.retry_seconds, tuned.revive_seconds, tuned.revive_rate) == (90.0, 5.0, 3)
    for env, needle in (
        ({"CONSUMER_RETRY_SECONDS": "an hour"}, "CONSUMER_RETRY_SECONDS"),
        ({"CONSUMER_RETRY_SECONDS": "-1"}, "CONSUMER_RETRY_SECONDS"),
        ({"CONSUMER_REVIVE_SECONDS": "0"}, "CONSUMER_REVIVE_SECONDS"),
        ({"CONSUMER_REVIVE_RATE": "0"}, "CONSUMER_REVIVE_RATE"),
    ):
        with pytest.raises(ConfigError, match=needle):
            WorkerSettings.from_env(env)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite:///:memory:?cache=shared",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:orders?mode=memory&cache=shared&uri=true",
        "sqlite://localhost/orders.db",
    ],
)
def test_an_in_memory_sqlite_database_is_refused(url: str) -> None:
    """It started and answered 503 to every POST: each pooled connection of each process
    opened its own empty database, without the tables create_schema made in another."""
    with pytest.raises(ConfigError, match="in-memory SQLite database") as refused:
        database_url({"DATABASE_URL": url}, "DATABASE_URL")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///var/orders.db", "sqlite:////srv/data/orders.db", "sqlite:///memory.db"],
)
def test_a_sqlite_file_is_taken_as_given(url: str) -> None:
    assert database_url({"DATABASE_URL": url}, "DATABASE_URL") == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://:s3cret@localhost:99999/0", "invalid REDIS_URL: Port out of range 0-65535"),
        ("redis://:s3cret@localhost:0/0", "invalid REDIS_URL: port 0"),
        ("redis://:s3cret@[::1/0", "invalid REDIS_URL: Invalid IPv6 URL"),
        (
            "redis://:s3cret@localhost/0?socket_timeout=soon",
            "invalid REDIS_URL: Invalid value for 'socket_timeout' in connection URL.",
        ),
        (
            "redis://:s3cret@localhost:6379/orders",
            "invalid REDIS_URL: the database 'orders' after the host must be a number",
        ),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_refused_at_start(url: str, says: str) -> None:
    """Each was a traceback at the first connection, or (a database name) database 0."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"REDIS_URL": url})
    assert str(refused.value).startswith(says)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379",
        "redis://localhost:6379/",
        "redis://:pw@localhost:6379/3",
        "rediss://cache.example:6380/0",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_a_usable_redis_url_is_taken(url: str) -> None:
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url
