"""Every documented environment variable of every process, and the README's table of them.

Each package declares its own variables next to its settings class; this module (a
developer tool, imported by no service) gathers them in one order for the README:
``python -m devtools.envdoc`` prints the table, and a test keeps the README in step.
"""

from __future__ import annotations

from consumers import config as consumer_config
from messaging import config as core_config
from messaging.config import EnvVar, markdown_table
from orders import config as order_config

SECTIONS: tuple[tuple[str, tuple[EnvVar, ...]], ...] = (
    ("every process", core_config.ENV_VARS),
    ("order service (orders-api, orders-relay, orders-updates)", order_config.ENV_VARS),
    ("queue workers (consumer NAME, orders-updates)", core_config.WORKER_ENV_VARS),
    (
        "consumer services (payment, invoice, shipping, email) and smtp-sink",
        consumer_config.ENV_VARS,
    ),
)
"""Who reads which variables, in the README's order."""

ALL_ENV_VARS: tuple[EnvVar, ...] = tuple(var for _, section in SECTIONS for var in section)
"""Every variable any Python process reads."""


def readme_table() -> str:
    """The README's configuration table (one table, every variable)."""
    return markdown_table(ALL_ENV_VARS)


if __name__ == "__main__":
    print(readme_table())
