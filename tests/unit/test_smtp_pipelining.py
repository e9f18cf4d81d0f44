"""SMTP PIPELINING (RFC 2920) in the email consumer, against scripted servers on real sockets.

Each server here answers only once it has read the whole group it expects, so a
client that waited for the MAIL reply before sending RCPT would hang (and the test
fails on its timeout). What is checked: the group MAIL, RCPT, DATA travels in one
write; the body follows only after the 354, dot-stuffed; refusals raise what
``smtplib.sendmail`` raises, after a lone dot when the server took DATA anyway, then
RSET; a 421 closes the connection; and the local ``smtp-sink`` advertises the extension.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumers.email import sendmail_pipelined
from consumers.smtp_sink import EmlWriter
from devtools.redis_server import free_port

Script = Callable[["Conversation"], None]


class Conversation:
    """The server side of one connection: read what the client sent, say what to answer."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""
        self.received: list[bytes] = []
        """What each wait below found, in order (the groups the client sent)."""

    def say(self, *lines: str) -> None:
        self.conn.sendall("".join(f"{line}\r\n" for line in lines).encode())

    def expect(self, count: int) -> list[bytes]:
        """Wait for ``count`` more lines (without answering any of them first)."""
        while self.buffer.count(b"\r\n") < count:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed")
            self.buffer += chunk
        lines = self.buffer.split(b"\r\n")
        taken, rest = lines[:count], lines[count:]
        self.buffer = b"\r\n".join(rest)
        self.received.append(b"\r\n".join(taken) + b"\r\n")
        return taken

    def expect_body(self) -> bytes:
        """Wait for a message body ending in CRLF.CRLF; returns it as sent (stuffed)."""
        while b"\r\n.\r\n" not in b"\r\n" + self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed")
            self.buffer += chunk
        end = (b"\r\n" + self.buffer).index(b"\r\n.\r\n") + 3
        body, self.buffer = self.buffer[:end], self.buffer[end:]
        self.received.append(body)
        return body


@pytest.fixture
def scripted_server() -> Iterator[Callable[[Script], tuple[int, list[Conversation]]]]:
    """Start a one-connection SMTP server running ``script``; returns its port."""
    servers: list[tuple[socket.socket, threading.Thread]] = []
    errors: list[BaseException] = []

    def start(script: Script) -> tuple[int, list[Conversation]]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(10)
        done: list[Conversation] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with conn:
                    talk = Conversation(conn)
                    done.append(talk)
                    talk.say("220 test ESMTP")
                    assert talk.expect(1)[0].lower().startswith(b"ehlo ")
                    talk.say("250-test", "250-PIPELINING", "250 SIZE 100000")
                    script(talk)
            except BaseException as exc:  # noqa: BLE001 - reported by the fixture
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append((listener, thread))
        return listener.getsockname()[1], done

    yield start
    for listener, thread in servers:
        thread.join(10)
        listener.close()
    if errors:
        raise errors[0]


def client(port: int) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.ehlo()
    assert smtp.has_extn("pipelining")
    return smtp


def test_mail_rcpt_and_data_travel_as_one_group_and_the_body_after_354(
    scripted_server: Callable[[Script], tuple[int, list[Conversation]]],
) -> None:
    def script(talk: Conversation) -> None:
        group = talk.expect(3)  # all three before any answer: a waiting client hangs here
        assert group == [
            b"MAIL FROM:<shop@example.com> SIZE=21",
            b"RCPT TO:<ada@example.com>",
            b"DATA",
        ]
        talk.say("250 ok", "250 ok", "354 go on")
        assert talk.expect_body() == b"Subject: x\r\n\r\n..hidden\r\n.\r\n"
        talk.say("250 queued")
        assert talk.expect(1) == [b"quit"]
        talk.say("221 bye")

    port, talks = scripted_server(script)
    smtp = client(port)
    sendmail_pipelined(smtp, "shop@example.com", "ada@example.com", b"Subject: x\r\n\r\n.hidden")
    smtp.quit()
    assert len(talks[0].received) == 4  # EHLO, the group, the body, QUIT


def test_a_refused_recipient_raises_as_sendmail_does_and_resets(
    scripted_server: Callable[[Script], tuple[int, list[Conversation]]],
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("250 ok", "550 no such user", "503 need RCPT")
        assert talk.expect(1) == [b"rset"]
        talk.say("250 reset")

    port, _ = scripted_server(script)
    smtp = client(port)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        sendmail_pipelined(smtp, "shop@example.com", "nobody@example.com", b"x\r\n")
    assert refused.value.recipients == {"nobody@example.com": (550, b"no such user")}
    smtp.close()


def test_data_accepted_after_a_refusal_is_ended_with_a_lone_dot_then_reset(
    scripted_server: Callable[[Script], tuple[int, list[Conversation]]],
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("550 sender refused", "550 no", "354 go on")  # RFC 2920 3.1's case
        assert talk.expect(1) == [b"."]  # an empty message, never the body
        talk.say("554 no valid recipients")
        assert talk.expect(1) == [b"rset"]
        talk.say("250 reset")

    port, _ = scripted_server(script)
    smtp = client(port)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        sendmail_pipelined(smtp, "shop@example.com", "ada@example.com", b"secret\r\n")
    assert refused.value.smtp_code == 550
    smtp.close()


def test_a_closing_server_421_closes_the_connection(
    scripted_server: Callable[[Script], tuple[int, list[Conversation]]],
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("421 shutting down")

    port, _ = scripted_server(script)
    smtp = client(port)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        sendmail_pipelined(smtp, "shop@example.com", "ada@example.com", b"x\r\n")
    assert refused.value.smtp_code == 421
    assert smtp.sock is None  # closed, as sendmail does: the next send reconnects


def test_a_refused_message_raises_data_error(
    scripted_server: Callable[[Script], tuple[int, list[Conversation]]],
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.say("452 mailbox full")
        assert talk.expect(1) == [b"rset"]
        talk.say("250 reset")

    port, _ = scripted_server(script)
    smtp = client(port)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        sendmail_pipelined(smtp, "shop@example.com", "ada@example.com", b"x\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (452, b"mailbox full")
    smtp.close()


def test_the_local_sink_advertises_pipelining_and_stores_a_pipelined_message(
    tmp_path: Path,
) -> None:
    from aiosmtpd.controller import Controller

    port = free_port()
    controller = Controller(EmlWriter(tmp_path), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        smtp = client(port)
        for n in (1, 2):
            sendmail_pipelined(
                smtp, "shop@example.com", f"c{n}@example.com", f"Subject: {n}\r\n\r\n.{n}".encode()
            )
        smtp.quit()
    finally:
        controller.stop()
    stored = sorted(path.read_bytes() for path in tmp_path.glob("*.eml"))
    assert stored == [b"Subject: 1\r\n\r\n.1\r\n", b"Subject: 2\r\n\r\n.2\r\n"]
