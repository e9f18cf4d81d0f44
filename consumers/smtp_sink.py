"""A small SMTP server for local runs and tests: every message becomes a .eml file.

Console script ``smtp-sink``: listens on SMTP_HOST:SMTP_PORT (default localhost:1025,
where the email consumer sends) and writes each message it accepts to SMTP_SINK_DIR
(default ``var/mail``) as ``<time>-<pid>-<n>.eml``, logging one line per message. It
never relays anything: it only stores. Compose uses Mailpit instead (a web UI on
http://127.0.0.1:8025).

It speaks what a submitting client uses of ESMTP (RFC 5321): EHLO/HELO, MAIL (with the
SIZE and BODY parameters), RCPT, DATA, RSET, NOOP, VRFY, HELP and QUIT, and offers
PIPELINING (RFC 2920), SIZE (RFC 1870) and 8BITMIME (RFC 6152). What it refuses:

- a command line over 512 octets (MAIL: 548, for its parameters): ``500``, and the
  session goes on; a command line that is not ASCII: ``500``; an unknown command:
  ``500``;
- commands out of order (MAIL before EHLO, a second MAIL, DATA before RCPT): ``503``;
  a malformed path or parameter: ``501``/``553``/``555``; over 100 recipients: ``452``;
  a declared SIZE over the limit: ``552``;
- a message with a line over 1,000 octets (RFC 5321 4.5.3.1.6) or over the SIZE limit
  (32 MiB): read to its end, then refused (``500``/``552``) and not stored;
- a message it cannot write (a full disk, the directory gone): ``451``, so the client
  tries again later;
- a client silent for 300 s: ``421``, and the connection is closed.

On SIGTERM or SIGINT it stops listening, says ``421`` to every client still connected
(RFC 5321 3.8) and exits 0. A port it cannot listen on is one line and exit 1.

A message ends at CR LF . CR LF and nowhere else: a bare LF before or after the dot is
text of the message (the "SMTP smuggling" ambiguity, where two servers disagree on where
a message ends, and the text after the end is read as a second, forged message).
Dot-stuffed lines are unstuffed (RFC 5321 4.5.2).

Why not aiosmtpd, the maintained library it ran on until issue 12: aiosmtpd handles
every line of every message in a coroutine step of its own (a read, a decode, a check,
an await), which made the sink one of the costliest processes of the order pipeline
(1.6-1.8 ms of CPU per order at 200 orders/s, more than payment, invoice or shipping).
This server is one asyncio Protocol: it takes what a read brought as a whole, finds a
message's end with one ``bytes.find``, and answers a pipelined group in one write, for
less than half that (the README's "Speed, measured", session 25).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from consumers.config import ConsumerSettings
from messaging import logs
from messaging.config import EXIT_OK, command_line, load_settings

log = logging.getLogger("smtp-sink")

COMMAND_LIMIT = 512
"""Octets in a command line, CR LF included (RFC 5321 4.5.3.1.4)."""
MAIL_PARAMETERS_ROOM = 26 + 10
"""What MAIL may add for SIZE (RFC 1870) and BODY (RFC 6152)."""
TEXT_LINE_LIMIT = 1000
"""Octets in a line of message text, CR LF included (RFC 5321 4.5.3.1.6)."""
RECIPIENT_LIMIT = 100
"""Recipients per message (the minimum a server must take, RFC 5321 4.5.3.1.8)."""
EXIT_CANNOT_LISTEN = 1
"""The port is taken or the address is not this machine's (a runtime failure, not config)."""
VERBS = ("DATA", "EHLO", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT", "RSET", "VRFY")

_ADDRESS = r"[\x21-\x3b\x3d\x3f-\x7e]"  # printable ASCII but < and > (no space, no control)
_PATH = re.compile(rf"\s*<({_ADDRESS}*)>(?:\s+(.*))?|\s*({_ADDRESS}+)(?:\s+(.*))?", re.DOTALL)
_PARAMETER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_END = b"\r\n.\r\n"
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
"""What a log line never carries from a message (a terminal escape, a control byte)."""


@dataclass(frozen=True)
class Limits:
    """What one session may send and how long it may stay silent."""

    size: int = 32 * 1024 * 1024
    """The largest message, in octets (announced as SIZE)."""
    idle_seconds: float = 300.0
    """A connection silent this long is closed (RFC 5321 4.5.3.2.7 says 5 minutes)."""


def parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str | bool]] | str:
    """``FROM:<a@b> SIZE=12`` -> (``a@b``, {"SIZE": "12"}), or the reply refusing it.

    ``keyword`` is ``FROM:`` or ``TO:``. The address is what the angle brackets hold
    (``<>`` is the null path; a bare address is taken too, as most servers do);
    parameters are ``NAME[=VALUE]`` (RFC 5321 4.1.2), names upper-cased.
    """
    if arg[: len(keyword)].upper() != keyword:
        command = "MAIL FROM" if keyword == "FROM:" else "RCPT TO"
        return f"501 Syntax: {command}:<address>"
    match = _PATH.fullmatch(arg[len(keyword) :])
    if match is None:
        return "553 5.1.3 Error: malformed address"
    bracketed = match.group(1) is not None
    address = match.group(1) if bracketed else match.group(3)
    rest = (match.group(2) if bracketed else match.group(4)) or ""
    params: dict[str, str | bool] = {}
    for item in rest.split():
        name, eq, value = item.partition("=")
        if not _PARAMETER.fullmatch(name) or (eq and not value):
            return "501 Error: malformed parameter"
        params[name.upper()] = value if eq else True
    return address, params


def unstuff(text: bytes) -> bytes:
    """Message text as its author wrote it, without SMTP's dot-stuffing (RFC 5321 4.5.2)."""
    if text.startswith(b"."):
        text = text[1:]
    return text.replace(b"\r\n.", b"\r\n")


def header(data: bytes, name: str) -> str:
    """The first ``name`` header of ``data``'s header block, unfolded, or "" (for the log).

    Only the header block is looked at, as bytes: parsing the message was half of the
    sink's CPU per email in an earlier version.
    """
    end = data.find(b"\r\n\r\n")
    lines = data[: end if end >= 0 else len(data)].split(b"\r\n")
    wanted = name.lower().encode()
    for i, line in enumerate(lines):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == wanted:
            for more in lines[i + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                value += more
            return _UNPRINTABLE.sub("?", " ".join(value.decode("ascii", "replace").split()))
    return ""


class Mailbox:
    """Each accepted message as a .eml file in ``directory``, whole or not at all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def store(self, data: bytes, mail_from: str, rcpt_tos: list[str]) -> str:
        """Write one message (temporary name, then a rename) and log it; the file's name."""
        self._count += 1
        name = f"{time.time_ns()}-{os.getpid()}-{self._count:06d}.eml"
        tmp = self.directory / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.directory / name)  # readers never see half a file
        if log.isEnabledFor(logging.INFO):
            log.info(
                "smtp-sink: stored %s from %s to %s (Message-ID %s)",
                name, mail_from, ",".join(rcpt_tos), header(data, "Message-ID"),
            )  # fmt: skip
        return name


class SmtpSession(asyncio.Protocol):
    """One client connection: a state machine fed whatever each read brought.

    Every complete command (or message) in the buffer is handled in turn and the replies
    go out together in one write, in order: a pipelined group (RFC 2920) costs one read
    and one write. A message is refused or stored only once its end has arrived.
    """

    def __init__(
        self, mailbox: Mailbox, hostname: str, limits: Limits, sessions: set[SmtpSession]
    ) -> None:
        self.mailbox = mailbox
        self.hostname = hostname
        self.limits = limits
        self.sessions = sessions
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.scanned = 0  # DATA: where the search for the end goes on from
        self.too_big = False  # DATA: over the size limit, being read to its end
        self.skip_line = False  # a command line over the limit, being read to its end
        self.greeted = False
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sessions.add(self)
        transport.write(f"220 {self.hostname} ESMTP smtp-sink\r\n".encode())
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        if self.idle is not None:
            self.idle.cancel()
        self.sessions.discard(self)
        self.transport = None

    def shut_down(self) -> None:
        """Tell the client the service is closing (421, RFC 5321 3.8) and hang up."""
        self.closing = True
        if self.transport is not None:
            self.transport.write(f"421 4.3.2 {self.hostname} Service shutting down\r\n".encode())
            self.transport.close()

    def pause_writing(self) -> None:
        """A client that sends without reading the replies: stop reading it too."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:  # noqa: D102
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self.closing or self.transport is None:
            return
        self.buffer += data
        replies: list[bytes] = []
        while not self.closing and (
            self._message(replies) if self.in_data else self._line(replies)
        ):
            pass
        if replies:
            self.transport.write(b"".join(replies))
        if self.closing:
            self.transport.close()
        else:
            self._wake()

    # The state machine
    def _line(self, replies: list[bytes]) -> bool:
        """Answer the first command line in the buffer; False when none is whole yet."""
        buffer = self.buffer
        end = buffer.find(b"\n")
        if self.skip_line:
            if end < 0:
                buffer.clear()
                return False
            del buffer[: end + 1]
            self.skip_line = False
            replies.append(b"500 Command line too long\r\n")
            return True
        if end < 0:
            if len(buffer) > COMMAND_LIMIT + MAIL_PARAMETERS_ROOM:
                buffer.clear()
                self.skip_line = True
            return False
        raw = bytes(buffer[:end]).removesuffix(b"\r")
        del buffer[: end + 1]
        room = MAIL_PARAMETERS_ROOM if raw[:4].upper() == b"MAIL" else 0
        if len(raw) + 2 > COMMAND_LIMIT + room:
            replies.append(b"500 Command line too long\r\n")
        elif not raw.isascii():
            replies.append(b"500 Error: strict ASCII mode\r\n")
        else:
            replies.append(self._command(raw.decode("ascii")).encode("ascii") + b"\r\n")
        return True

    def _command(self, line: str) -> str:
        """The reply to one command, its state change made."""
        verb, _, arg = line.partition(" ")
        verb, arg = verb.upper(), arg.strip()
        if verb in ("EHLO", "HELO"):
            if not arg:
                return f"501 Syntax: {verb} hostname"
            self.greeted = True
            self._reset()
            if verb == "HELO":
                return f"250 {self.hostname}"
            return (
                f"250-{self.hostname}\r\n250-SIZE {self.limits.size}\r\n250-8BITMIME\r\n"
                "250-PIPELINING\r\n250 HELP"
            )
        if verb == "MAIL":
            return self._mail(arg)
        if verb == "RCPT":
            return self._rcpt(arg)
        if verb == "DATA":
            if arg:
                return "501 Syntax: DATA"
            if not self.rcpt_tos:
                return "503 Error: need RCPT command"
            self.in_data, self.scanned, self.too_big = True, 0, False
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb == "RSET":
            self._reset()
            return "250 OK"
        if verb == "NOOP":
            return "250 OK"
        if verb == "QUIT":
            self.closing = True
            return "221 Bye"
        if verb == "VRFY":
            return "252 Cannot VRFY user, but will accept message and attempt delivery"
        if verb == "HELP":
            return "250 Supported commands: " + " ".join(VERBS)
        return f'500 Error: command "{verb[:20]}" not recognized'

    def _mail(self, arg: str) -> str:
        if not self.greeted:
            return "503 Error: send HELO first"
        if self.mail_from is not None:
            return "503 Error: nested MAIL command"
        parsed = parse_path(arg, "FROM:")
        if isinstance(parsed, str):
            return parsed
        address, params = parsed
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            return "501 Error: BODY can only be one of 7BIT, 8BITMIME"
        size = params.pop("SIZE", "0")
        if not isinstance(size, str) or not size.isdigit():
            return "501 Error: SIZE takes a number"
        if int(size) > self.limits.size:
            return "552 Error: message size exceeds fixed maximum message size"
        if params:
            return "555 MAIL FROM parameters not recognized or not implemented"
        self.mail_from = address
        return "250 OK"

    def _rcpt(self, arg: str) -> str:
        if self.mail_from is None:
            return "503 Error: need MAIL command"
        parsed = parse_path(arg, "TO:")
        if isinstance(parsed, str):
            return parsed
        address, params = parsed
        if not address:
            return "553 5.1.3 Error: malformed address"
        if params:
            return "555 RCPT TO parameters not recognized or not implemented"
        if len(self.rcpt_tos) >= RECIPIENT_LIMIT:
            return "452 Error: too many recipients"
        self.rcpt_tos.append(address)
        return "250 OK"

    def _message(self, replies: list[bytes]) -> bool:
        """Refuse or store the message once its end is in the buffer; False until then."""
        buffer = self.buffer
        if not self.too_big and buffer.startswith(b".\r\n"):  # an empty message
            text_end, after = 0, 3
        else:
            end = buffer.find(_END, max(0, self.scanned - len(_END)))
            if end < 0:
                self.scanned = len(buffer)
                if len(buffer) > self.limits.size + len(_END):  # keep reading, not keeping
                    self.too_big = True
                    del buffer[: len(buffer) - len(_END)]
                    self.scanned = len(_END)
                return False
            text_end, after = end + 2, end + len(_END)
        text = bytes(buffer[:text_end])
        del buffer[:after]
        self.in_data = False
        if self.too_big or len(text) > self.limits.size:
            replies.append(b"552 Error: Too much mail data\r\n")
        elif (
            len(text) >= TEXT_LINE_LIMIT
            and max(map(len, text.split(b"\r\n"))) + 2 > TEXT_LINE_LIMIT
        ):
            replies.append(b"500 Line too long (see RFC5321 4.5.3.1.6)\r\n")
        else:
            assert self.mail_from is not None
            try:
                self.mailbox.store(unstuff(text), self.mail_from, self.rcpt_tos)
            except OSError as exc:  # a full disk, a directory gone: the client retries
                log.error("smtp-sink: cannot store a message: %s", exc)
                replies.append(b"451 4.3.0 Error: cannot store the message now\r\n")
            else:
                replies.append(b"250 OK: message accepted for delivery\r\n")
        self._reset()
        return True

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpt_tos = []

    def _wake(self) -> None:
        """Restart the idle timer."""
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(self.limits.idle_seconds, self._timeout)

    def _timeout(self) -> None:
        if self.transport is not None:
            self.transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
            self.transport.close()


class Sink:
    """The server: its listening socket and the sessions it has open."""

    def __init__(self, directory: Path, limits: Limits | None = None) -> None:
        self.mailbox = Mailbox(directory)
        self.limits = limits or Limits()
        self.hostname = socket.getfqdn()
        self.sessions: set[SmtpSession] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port) on the running loop; the port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SmtpSession(self.mailbox, self.hostname, self.limits, self.sessions),
            host,
            port,
            reuse_address=True,
        )
        port_bound: int = self.server.sockets[0].getsockname()[1]
        return port_bound

    async def close(self) -> None:
        """Stop listening, tell each connected client 421, and wait until all are closed
        (a client that keeps its connection, as the email consumer does, would otherwise
        hold a 3.12+ ``wait_closed`` for as long as it likes)."""
        if self.server is None:
            return
        self.server.close()
        for session in list(self.sessions):
            session.shut_down()
        await self.server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    command_line("smtp-sink", __doc__).parse_args(argv)  # only --help
    settings = load_settings("smtp-sink", ConsumerSettings.from_env)
    logs.configure(settings.base.log_format, settings.base.log_level)
    directory = Path(settings.smtp_sink_dir)

    async def serve() -> int:
        sink = Sink(directory)
        try:
            await sink.start(settings.smtp_host, settings.smtp_port)
        except OSError as exc:
            log.error(
                "smtp-sink: cannot listen on %s:%d: %s", settings.smtp_host, settings.smtp_port, exc
            )
            return EXIT_CANNOT_LISTEN
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            "smtp-sink: listening on %s:%d, storing into %s",
            settings.smtp_host, settings.smtp_port, directory,
        )  # fmt: skip
        await stop.wait()
        await sink.close()
        return EXIT_OK

    code = asyncio.run(serve())
    if code == EXIT_OK:
        log.info("smtp-sink: stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
