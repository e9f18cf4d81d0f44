"""Configuration of the consumer services (payment, invoice, shipping, email) and smtp-sink.

Each service owns its data: its database URL is its own variable
(``PAYMENT_DATABASE_URL``, ``INVOICE_DATABASE_URL``, ``SHIPPING_DATABASE_URL``,
``EMAIL_DATABASE_URL``), a separate
SQLite file under ``var/`` by default and a separate PostgreSQL database in compose.
The worker runtime's variables are :data:`messaging.config.WORKER_ENV_VARS`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from messaging.config import (
    ConfigError,
    EnvVar,
    Settings,
    WorkerSettings,
    database_url,
    declare,
    env_float,
    env_int,
    env_str,
)

DATABASE_VARS: dict[str, str] = {
    "payment": "PAYMENT_DATABASE_URL",
    "invoice": "INVOICE_DATABASE_URL",
    "shipping": "SHIPPING_DATABASE_URL",
    "email": "EMAIL_DATABASE_URL",
}
"""Consumer name -> the variable naming its own database."""

ENV_VARS: tuple[EnvVar, ...] = declare(
    EnvVar("PAYMENT_DATABASE_URL", "sqlite:///var/payment.db", "The payment service's database."),
    EnvVar("INVOICE_DATABASE_URL", "sqlite:///var/invoice.db", "The invoice service's database."),
    EnvVar(
        "SHIPPING_DATABASE_URL", "sqlite:///var/shipping.db", "The shipping service's database."
    ),
    EnvVar("EMAIL_DATABASE_URL", "sqlite:///var/email.db", "The email service's database."),
    EnvVar("PAYMENT_DECLINE_RATE", "0.0", "Share of payments the simulated gateway declines."),
    EnvVar("PAYMENT_TRANSIENT_ERROR_RATE", "0.0", "Share of gateway calls that fail transiently."),
    EnvVar("PAYMENT_LATENCY_MS", "0", "Simulated gateway latency per call, in milliseconds."),
    EnvVar("PAYMENT_SEED", "", "Seed making gateway decisions deterministic per event."),
    EnvVar("PAYMENT_FLAKY_CALLS", "2", "Calls that fail transiently for flaky@example.com."),
    EnvVar(
        "PAYMENT_CRASH_EMAIL",
        "",
        "Test only: a customer email whose charge kills the payment process (exit 137).",
    ),
    EnvVar("SMTP_HOST", "localhost", "SMTP server the email consumer sends to (smtp-sink binds)."),
    EnvVar("SMTP_PORT", "1025", "SMTP port (the email consumer's target, smtp-sink's listen)."),
    EnvVar("SMTP_TIMEOUT", "10.0", "Seconds before an SMTP connection or command times out."),
    EnvVar("EMAIL_FROM", "orders@example.com", "From address of the customer emails."),
    EnvVar("SMTP_SINK_DIR", "var/mail", "Where smtp-sink stores each message as a .eml file."),
)
"""The consumer services' own variables."""


@dataclass(frozen=True)
class ConsumerSettings:
    """The configuration of a consumer process: the worker runtime's plus its own."""

    worker: WorkerSettings
    database_url: str
    """This service's own database (``<NAME>_DATABASE_URL``; empty for ``noop``)."""
    payment_decline_rate: float
    payment_transient_error_rate: float
    payment_latency_ms: int
    payment_seed: str
    payment_flaky_calls: int
    smtp_host: str
    smtp_port: int
    smtp_timeout: float
    email_from: str
    smtp_sink_dir: str
    payment_crash_email: str = ""

    @property
    def base(self) -> Settings:
        """The settings every process shares (Redis, PATTERN, logging)."""
        return self.worker.base

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, service: str | None = None
    ) -> ConsumerSettings:
        """Read and validate every variable; raise ConfigError on the first bad one.

        Args:
            env: The environment (``os.environ`` by default).
            service: The consumer's name; its own database variable is read (only that
                one is validated). None or a name without a database: no database.
        """
        env = os.environ if env is None else env
        worker = WorkerSettings.from_env(env)
        db_var = DATABASE_VARS.get(service or "")
        email_from = env_str(env, "EMAIL_FROM")
        if "@" not in email_from or not email_from.isascii() or not email_from.isprintable():
            raise ConfigError(
                f"invalid EMAIL_FROM {email_from!r}: must be an email address in printable ASCII"
            )
        smtp_host = env_str(env, "SMTP_HOST")
        if not smtp_host:
            raise ConfigError("invalid SMTP_HOST '': must not be empty")
        return cls(
            worker=worker,
            database_url=database_url(env, db_var) if db_var else "",
            payment_decline_rate=env_float(env, "PAYMENT_DECLINE_RATE", 0.0, 1.0),
            payment_transient_error_rate=env_float(env, "PAYMENT_TRANSIENT_ERROR_RATE", 0.0, 1.0),
            payment_latency_ms=env_int(env, "PAYMENT_LATENCY_MS", 0, 600_000),
            payment_seed=env_str(env, "PAYMENT_SEED"),
            payment_flaky_calls=env_int(env, "PAYMENT_FLAKY_CALLS", 0, 100),
            smtp_host=smtp_host,
            smtp_port=env_int(env, "SMTP_PORT", 1, 65535),
            smtp_timeout=env_float(env, "SMTP_TIMEOUT", 0.1, 600.0),
            email_from=email_from,
            smtp_sink_dir=env_str(env, "SMTP_SINK_DIR") or "var/mail",
            payment_crash_email=env_str(env, "PAYMENT_CRASH_EMAIL"),
        )
