"""A small SMTP server for local runs and tests: every message becomes a .eml file.

Console script ``smtp-sink``: listens on SMTP_HOST:SMTP_PORT (default localhost:1025,
where the email consumer sends) and writes each message it accepts to SMTP_SINK_DIR
(default ``var/mail``) as ``<time>-<n>.eml``, logging one line per message. It offers
PIPELINING (RFC 2920), which the email consumer uses. Compose uses Mailpit instead (a
web UI on http://127.0.0.1:8025).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import threading
import time
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from types import FrameType
from typing import Any

from aiosmtpd.controller import Controller

from consumers.config import ConsumerSettings
from messaging import logs
from messaging.config import EXIT_OK, command_line, load_settings

log = logging.getLogger("smtp-sink")


class EmlWriter:
    """aiosmtpd handler: store each message's bytes as a .eml file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    async def handle_EHLO(  # noqa: N802
        self, _server: Any, session: Any, _envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """Called by aiosmtpd for EHLO: its extensions, plus PIPELINING (RFC 2920).

        aiosmtpd reads commands one line at a time from one stream and answers each at
        once, in order, and refuses DATA without a recipient, which is what RFC 2920 asks
        of a server; so a client may send MAIL, RCPT and DATA together (the email consumer
        does: two round trips per message instead of four).
        """
        session.host_name = hostname  # aiosmtpd leaves it to this hook
        return [*responses[:-1], "250-PIPELINING", responses[-1]]  # the last is "250 HELP"

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
        """Called by aiosmtpd for each message: write it, then answer 250."""
        data: bytes = envelope.original_content or envelope.content
        with self._lock:
            n = next(self._counter)
        name = f"{time.time_ns()}-{os.getpid()}-{n:06d}.eml"
        tmp = self.directory / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.directory / name)  # readers never see half a file
        if log.isEnabledFor(logging.INFO):
            # Only the header block, unparsed values: the whole message under the default
            # policy was half of this process's CPU per email (the log needs one header).
            headers = BytesHeaderParser(policy=compat32).parsebytes(data)
            log.info(
                "smtp-sink: stored %s from %s to %s (Message-ID %s)",
                name, envelope.mail_from, ",".join(envelope.rcpt_tos),
                " ".join(str(headers.get("Message-ID", "")).split()),
            )  # fmt: skip
        return "250 Message accepted for delivery"


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT."""
    command_line("smtp-sink", __doc__).parse_args(argv)  # only --help
    settings = load_settings("smtp-sink", ConsumerSettings.from_env)
    logs.configure(settings.base.log_format, settings.base.log_level)
    # aiosmtpd logs every connection at INFO (its own readiness probe included);
    # our one line per stored message is what a reader of `make up` wants.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    directory = Path(settings.smtp_sink_dir)
    controller = Controller(
        EmlWriter(directory), hostname=settings.smtp_host, port=settings.smtp_port
    )
    controller.start()
    log.info(
        "smtp-sink: listening on %s:%d, storing into %s",
        settings.smtp_host, settings.smtp_port, directory,
    )  # fmt: skip
    try:
        while not stop.wait(0.5):
            pass
    finally:
        controller.stop()
    log.info("smtp-sink: stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
