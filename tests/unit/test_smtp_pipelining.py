"""SMTP PIPELINING (RFC 2920) in the email consumer, against scripted servers on real sockets.

Each server here answers only once it has read the whole group it expects, so a
client that waited for the MAIL reply before sending RCPT would hang (and the test
fails on its timeout). What is checked: the group MAIL, RCPT, DATA travels in one
write; the body follows only after the 354, dot-stuffed; refusals raise what
``smtplib.sendmail`` raises, after a lone dot when the server took DATA anyway, then
RSET; a 421 closes the connection; and the local ``smtp-sink`` advertises the extension.

A batch of the email consumer (:meth:`EmailHandler.handle_batch`, on SQLite) sends each
body together with the next envelope: one round trip per email. A refusal fails that
email alone (its claim freed), a dropped connection fails what was in flight and the
rest, and each email is recorded only after the server's 250 for it.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from consumers import store
from consumers.email import EmailHandler, SmtpUnavailable, sendmail_pipelined
from messaging.queue import PermanentError, RetryableError
from tests import orders_app
from tests.helpers import RunningSink

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


ScriptedServer = Callable[[Script], tuple[int, list[Conversation]]]
"""Starts a one-connection server running a script; returns its port and conversations."""


@pytest.fixture
def scripted_server() -> Iterator[ScriptedServer]:
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
    scripted_server: ScriptedServer,
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
    scripted_server: ScriptedServer,
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
    scripted_server: ScriptedServer,
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
    scripted_server: ScriptedServer,
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
    scripted_server: ScriptedServer,
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.say("452 mailbox full")  # the transaction is over: no RSET follows
        assert talk.expect(1) == [b"quit"]
        talk.say("221 bye")

    port, _ = scripted_server(script)
    smtp = client(port)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        sendmail_pipelined(smtp, "shop@example.com", "ada@example.com", b"x\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (452, b"mailbox full")
    smtp.quit()


@pytest.mark.parametrize(
    "address", ["ada@example.com\r\nRCPT TO:<eve@example.com>", "ada@example.com\nDATA"]
)
def test_an_address_with_a_line_break_never_reaches_the_wire(
    scripted_server: ScriptedServer, address: str
) -> None:
    def script(talk: Conversation) -> None:
        assert talk.expect(1) == [b"quit"]  # nothing else was sent
        talk.say("221 bye")

    port, _ = scripted_server(script)
    smtp = client(port)
    with pytest.raises(ValueError, match="newline"):
        sendmail_pipelined(smtp, "shop@example.com", address, b"x\r\n")
    smtp.quit()


def test_the_local_sink_advertises_pipelining_and_stores_a_pipelined_message(
    start_sink: Callable[..., RunningSink],
) -> None:
    sink = start_sink()
    smtp = client(sink.port)
    for n in (1, 2):
        sendmail_pipelined(
            smtp, "shop@example.com", f"c{n}@example.com", f"Subject: {n}\r\n\r\n.{n}".encode()
        )
    smtp.quit()
    assert sink.stored() == [b"Subject: 1\r\n\r\n.1\r\n", b"Subject: 2\r\n\r\n.2\r\n"]


def order_placed(order_id: int) -> dict[str, Any]:
    """An OrderPlaced to its own address (the envelope names the recipient)."""
    event = orders_app.order_placed(order_id)
    event["data"]["customer_email"] = f"c{order_id}@example.com"
    return event


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'email.db'}")
    store.create_tables(engine, "email")
    yield engine
    engine.dispose()


def handler(engine: Engine, port: int) -> EmailHandler:
    return EmailHandler(engine, host="127.0.0.1", port=port, sender="shop@example.com", timeout=5)


def envelope_lines(order_id: int) -> list[bytes]:
    return [
        b"MAIL FROM:<shop@example.com> SIZE=",
        f"RCPT TO:<c{order_id}@example.com>".encode(),
        b"DATA",
    ]


def same_envelope(got: list[bytes], order_id: int) -> bool:
    want = envelope_lines(order_id)
    return got[0].startswith(want[0]) and got[1:] == want[1:]


def sent_steps(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(select(store.EmailSent.order_id)))


def open_claims(engine: Engine) -> list[tuple[int, str]]:
    with Session(engine) as session:
        return sorted(
            (claim.order_id, claim.state) for claim in session.scalars(select(store.EmailClaim))
        )


def test_a_batch_sends_each_body_with_the_next_envelope(
    scripted_server: ScriptedServer, engine: Engine
) -> None:
    def script(talk: Conversation) -> None:
        assert same_envelope(talk.expect(3), 1)
        talk.say("250 ok", "250 ok", "354 go on")
        for order_id in (2, 3):
            talk.expect_body()
            # The next envelope came in the same write as the body (nothing answered yet).
            assert same_envelope(talk.expect(3), order_id)
            talk.say("250 queued", "250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.say("250 queued")
        talk.expect(1)  # QUIT at close
        talk.say("221 bye")

    port, talks = scripted_server(script)
    emails = handler(engine, port)
    results = emails.handle_batch([order_placed(n) for n in (1, 2, 3)])
    emails.close()
    assert [r[0]["data"]["order_id"] for r in results] == [1, 2, 3]  # type: ignore[index]
    assert sent_steps(engine) == [1, 2, 3]
    # EHLO, envelope 1, then (body, next envelope) twice, the last body, QUIT.
    bodies_with_envelopes = [r for r in talks[0].received if b"MAIL FROM" in r]
    assert len(talks[0].received) == 2 + 2 * 2 + 2 and len(bodies_with_envelopes) == 3


def test_a_refused_recipient_fails_that_email_alone(
    scripted_server: ScriptedServer, engine: Engine
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        assert same_envelope(talk.expect(3), 2)
        talk.say("250 queued", "250 ok", "550 no such user", "503 need RCPT")
        assert talk.expect(1) == [b"rset"]
        talk.say("250 reset")
        assert same_envelope(talk.expect(3), 3)  # the next email starts afresh
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.say("250 queued")
        talk.expect(1)
        talk.say("221 bye")

    port, _ = scripted_server(script)
    emails = handler(engine, port)
    results = emails.handle_batch([order_placed(n) for n in (1, 2, 3)])
    emails.close()
    assert isinstance(results[1], PermanentError) and "550" in str(results[1])
    assert sent_steps(engine) == [1, 3]
    assert open_claims(engine) == [(1, "sent"), (3, "sent")]  # order 2's claim was freed


def test_a_refused_body_fails_that_email_and_the_next_one_goes_on(
    scripted_server: ScriptedServer, engine: Engine
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.expect(3)
        talk.say("452 mailbox full", "250 ok", "250 ok", "354 go on")  # no RSET in between
        talk.expect_body()
        talk.say("250 queued")
        talk.expect(1)
        talk.say("221 bye")

    port, _ = scripted_server(script)
    emails = handler(engine, port)
    results = emails.handle_batch([order_placed(n) for n in (1, 2)])
    emails.close()
    assert isinstance(results[0], RetryableError) and "452" in str(results[0])
    assert sent_steps(engine) == [2]
    assert open_claims(engine) == [(2, "sent")]


def test_an_email_that_cannot_be_rendered_fails_alone_and_the_next_goes_out_in_its_place(
    scripted_server: ScriptedServer, engine: Engine
) -> None:
    """Each email is rendered while the server reads the one before (ahead of its turn):
    one that cannot be (a ShipmentBooked without a carrier) fails alone, nothing of it
    reaches the wire, and the next one's envelope travels with the body before it."""

    def script(talk: Conversation) -> None:
        assert same_envelope(talk.expect(3), 1)
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        assert same_envelope(talk.expect(3), 2)  # the unrenderable one was skipped
        talk.say("250 queued", "250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.say("250 queued")
        talk.expect(1)
        talk.say("221 bye")

    port, talks = scripted_server(script)
    emails = handler(engine, port)
    unrenderable = orders_app.outcome("ShipmentBooked", 1, tracking_number="T-1")
    results = emails.handle_batch([order_placed(1), unrenderable, order_placed(2)])
    emails.close()
    assert isinstance(results[1], PermanentError) and "carrier" in str(results[1])
    assert sent_steps(engine) == [1, 2]
    assert open_claims(engine) == [(1, "sent"), (2, "sent")]  # the shipped claim was freed
    assert not any(b"T-1" in part for part in talks[0].received)


def test_a_connection_dropped_mid_batch_fails_the_rest_and_frees_their_claims(
    scripted_server: ScriptedServer, engine: Engine
) -> None:
    def script(talk: Conversation) -> None:
        talk.expect(3)
        talk.say("250 ok", "250 ok", "354 go on")
        talk.expect_body()
        talk.expect(3)
        talk.say("250 queued")  # email 1 taken; then the server goes away

    port, _ = scripted_server(script)
    emails = handler(engine, port)
    results = emails.handle_batch([order_placed(n) for n in (1, 2, 3)])
    emails.close()
    assert results[0] is not None and not isinstance(results[0], Exception)
    assert all(isinstance(r, SmtpUnavailable) for r in results[1:])
    assert sent_steps(engine) == [1]
    assert open_claims(engine) == [(1, "sent")]
