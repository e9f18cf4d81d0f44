"""``smtp-sink`` (consumers/smtp_sink.py) on real sockets: what it stores, and what it refuses.

Each test starts the real server in this process (the ``start_sink`` fixture) and talks
to it as a client would, with smtplib or with raw bytes when the point is what exactly
goes over the wire: pipelined groups, lines split across reads, a message that ends in
the wrong place, a client that says too much or nothing at all.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from consumers import smtp_sink
from tests.helpers import RunningSink

StartSink = Callable[..., RunningSink]


class Client:
    """A raw SMTP client: send bytes, read whole replies (multi-line ones as one)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.greeting = self.replies(1)[0]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, count: int) -> list[str]:
        """The next ``count`` replies, each as its lines joined by newlines."""
        out: list[str] = []
        lines: list[str] = []
        while len(out) < count:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {out + lines}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                out.append("\n".join(lines))
                lines = []
        return out

    def closed(self) -> bool:
        """True once the server has closed the connection (after what is buffered)."""
        return self.sock.recv(65536) == b""

    def hello(self) -> None:
        self.send(b"EHLO client.example\r\n")
        assert self.replies(1)[0].startswith("250-")

    def greeted_in_data(self, to: str = "c@example.com") -> None:
        """EHLO, then MAIL, RCPT and DATA: what comes next is message text."""
        self.hello()
        self.envelope(to)

    def envelope(self, to: str = "c@example.com") -> None:
        self.send(f"MAIL FROM:<shop@example.com>\r\nRCPT TO:<{to}>\r\nDATA\r\n".encode())
        assert [r[:3] for r in self.replies(3)] == ["250", "250", "354"]


@pytest.fixture
def sink(start_sink: StartSink) -> RunningSink:
    return start_sink()


@pytest.fixture
def connect() -> Iterator[Callable[[int], Client]]:
    """``connect(port)``: a raw client, closed after the test."""
    clients: list[Client] = []

    def open_one(port: int) -> Client:
        clients.append(Client(port))
        return clients[-1]

    yield open_one
    for client in clients:
        client.sock.close()


def test_a_message_is_stored_as_its_author_wrote_it_and_logged(
    sink: RunningSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtp-sink")
    text = (
        b"Message-ID:\r\n <order-7.received@example.com>\r\nSubject: hi\r\n\r\n"
        b".a line that starts with a dot\r\n..two\r\nend\r\n"
    )
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as smtp:
        assert smtp.sendmail("shop@example.com", ["c@example.com"], text) == {}
    assert sink.stored() == [text]  # smtplib dot-stuffs; the sink unstuffs
    (line,) = [r.getMessage() for r in caplog.records if "stored" in r.getMessage()]
    assert line.endswith(
        "from shop@example.com to c@example.com (Message-ID <order-7.received@example.com>)"
    )


def test_ehlo_offers_pipelining_size_and_8bitmime_and_helo_works_too(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("pipelining") and smtp.has_extn("8bitmime")
        assert smtp.esmtp_features["size"] == str(smtp_sink.Limits().size)
    talk = connect(sink.port)
    assert talk.greeting.startswith("220 ")
    talk.send(b"HELO client.example\r\nMAIL FROM:<a@example.com>\r\n")
    assert [r[:3] for r in talk.replies(2)] == ["250", "250"]


def test_a_pipelined_stream_of_messages_gets_every_reply_in_order(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    talk = connect(sink.port)
    group = b"MAIL FROM:<shop@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    talk.send(b"EHLO client.example\r\n" + group)
    assert [r[:3] for r in talk.replies(4)] == ["250", "250", "250", "354"]
    # Each body with the next envelope, in one write; then all the bodies at once.
    talk.send(b"Subject: 1\r\n\r\none\r\n.\r\n" + group)
    talk.send(b"Subject: 2\r\n\r\ntwo\r\n.\r\n" + group + b"Subject: 3\r\n\r\n.\r\nQUIT\r\n")
    codes = [r[:3] for r in talk.replies(9)]
    assert codes == ["250", "250", "250", "354", "250", "250", "250", "354", "250"]
    assert talk.replies(1) == ["221 Bye"]
    assert talk.closed()
    assert sink.stored() == [
        b"Subject: 1\r\n\r\none\r\n",
        b"Subject: 2\r\n\r\ntwo\r\n",
        b"Subject: 3\r\n\r\n",
    ]


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"])
def test_only_crlf_dot_crlf_ends_a_message_so_nothing_can_be_smuggled(
    sink: RunningSink,
    fake_end: bytes,
    connect: Callable[[int], Client],
) -> None:
    talk = connect(sink.port)
    talk.greeted_in_data("victim@example.com")
    smuggled = b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n"
    talk.send(b"Subject: real\r\n\r\ntext" + fake_end + smuggled + b".\r\nNOOP\r\n")
    assert [r[:3] for r in talk.replies(2)] == ["250", "250"]  # the message, then NOOP
    (stored,) = sink.stored()  # one message, the "forged" one inside it as text
    sent = b"Subject: real\r\n\r\ntext" + fake_end + smuggled
    assert stored == sent.replace(b"\r\n.", b"\r\n")  # a CR LF and a dot: unstuffed


def test_the_end_of_a_message_split_across_reads_is_found(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    talk = connect(sink.port)
    talk.greeted_in_data()
    body = b"Subject: big\r\n\r\n" + b"".join(b"line %06d\r\n" % n for n in range(20_000))
    text = body.removesuffix(b"\r\n")
    for start in range(0, len(text), 4096):
        talk.send(text[start : start + 4096])
    for byte in b"\r\n.\r\n":  # the end, one byte per write
        talk.send(bytes([byte]))
    assert talk.replies(1)[0].startswith("250")
    assert sink.stored() == [body]


def test_an_empty_message_is_stored_empty(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    talk = connect(sink.port)
    talk.greeted_in_data()
    talk.send(b".\r\n")
    assert talk.replies(1)[0].startswith("250")
    assert sink.stored() == [b""]


@pytest.mark.parametrize(
    ("commands", "last"),
    [
        ([b"MAIL FROM:<a@example.com>"], "503 Error: send HELO first"),
        ([b"EHLO c", b"RCPT TO:<a@example.com>"], "503 Error: need MAIL command"),
        ([b"EHLO c", b"MAIL FROM:<a@example.com>", b"DATA"], "503 Error: need RCPT command"),
        (
            [b"EHLO c", b"MAIL FROM:<a@example.com>", b"MAIL FROM:<b@example.com>"],
            "503 Error: nested MAIL command",
        ),
        (
            [b"EHLO c", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"RSET", b"DATA"],
            "503 Error: need RCPT command",
        ),
        ([b"EHLO"], "501 Syntax: EHLO hostname"),
        ([b"EHLO c", b"MAIL <a@example.com>"], "501 Syntax: MAIL FROM:<address>"),
        ([b"EHLO c", b"MAIL FROM:<a b@example.com>"], "553 5.1.3 Error: malformed address"),
        ([b"EHLO c", b"MAIL FROM:<a\x00b@example.com>"], "553 5.1.3 Error: malformed address"),
        ([b"EHLO c", b"MAIL FROM:<a\rb@example.com>"], "553 5.1.3 Error: malformed address"),
        ([b"EHLO c", b"MAIL FROM:<a@example.com> X-FOO=1"], "555 MAIL FROM parameters"),
        ([b"EHLO c", b"MAIL FROM:<a@example.com> SIZE=ten"], "501 Error: SIZE takes a number"),
        ([b"EHLO c", b"MAIL FROM:<a@example.com> SIZE="], "501 Error: malformed parameter"),
        ([b"EHLO c", b"MAIL FROM:<a@example.com> BODY=BINARYMIME"], "501 Error: BODY can only"),
        ([b"EHLO c", b"MAIL FROM:<a@example.com> SIZE=99999999999"], "552 Error: message size"),
        ([b"EHLO c", b"MAIL FROM:<>", b"RCPT TO:<>"], "553 5.1.3 Error: malformed address"),
        ([b"EHLO c", b"MAIL FROM:<>", b"RCPT TO:<b@example.com> NOTIFY=NEVER"], "555 RCPT TO"),
        ([b"DATA now"], "501 Syntax: DATA"),
        ([b"BDAT 10 LAST"], '500 Error: command "BDAT" not recognized'),
        ([b"MAIL FROM:<\xc3\xa9@example.com>"], "500 Error: strict ASCII mode"),
        ([b"NOOP " + b"x" * 600], "500 Command line too long"),
        ([b"VRFY someone"], "252 Cannot VRFY user"),
        ([b"HELP"], "250 Supported commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"),
    ],
)
def test_each_command_is_answered_and_a_wrong_one_refused_with_the_right_code(
    sink: RunningSink,
    commands: list[bytes],
    last: str,
    connect: Callable[[int], Client],
) -> None:
    talk = connect(sink.port)
    talk.send(b"".join(command + b"\r\n" for command in commands) + b"NOOP\r\n")
    replies = talk.replies(len(commands) + 1)
    assert replies[-2].startswith(last)
    assert replies[-1] == "250 OK"  # the session goes on
    assert sink.stored() == []


def test_a_command_line_longer_than_any_read_is_refused_once(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    talk = connect(sink.port)
    for _ in range(50):  # 100 KB without a line end, in pieces
        talk.send(b"y" * 2000)
    talk.send(b"\r\nNOOP\r\n")
    assert talk.replies(2) == ["500 Command line too long", "250 OK"]


def test_a_line_over_1000_octets_refuses_the_message_and_the_next_one_is_taken(
    sink: RunningSink,
    connect: Callable[[int], Client],
) -> None:
    talk = connect(sink.port)
    talk.greeted_in_data()
    talk.send(b"Subject: long\r\n\r\n" + b"z" * 999 + b"\r\n.\r\n")
    assert talk.replies(1)[0].startswith("500 Line too long")
    talk.envelope()
    talk.send(b"Subject: ok\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")
    assert talk.replies(1)[0].startswith("250")
    assert sink.stored() == [b"Subject: ok\r\n\r\n" + b"z" * 998 + b"\r\n"]


def test_a_message_over_the_size_limit_is_read_to_its_end_and_refused(
    start_sink: StartSink,
    connect: Callable[[int], Client],
) -> None:
    sink = start_sink(size=1000)
    talk = connect(sink.port)
    talk.hello()
    talk.send(b"MAIL FROM:<a@example.com> SIZE=1001\r\n")
    assert talk.replies(1)[0].startswith("552")
    talk.envelope()
    for _ in range(40):  # 40 x 100 lines: far past the limit, across many reads
        talk.send(b"0123456789" * 10 + b"\r\n")
    talk.send(b".\r\n")
    assert talk.replies(1) == ["552 Error: Too much mail data"]
    talk.envelope()
    talk.send(b"small\r\n.\r\n")
    assert talk.replies(1)[0].startswith("250")
    assert sink.stored() == [b"small\r\n"]


def test_over_100_recipients_are_refused_with_452(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    talk = connect(sink.port)
    talk.hello()
    talk.send(b"MAIL FROM:<a@example.com>\r\n")
    talk.send(b"".join(b"RCPT TO:<r%d@example.com>\r\n" % n for n in range(101)))
    replies = talk.replies(102)
    assert replies[100] == "250 OK"
    assert replies[101] == "452 Error: too many recipients"


def test_a_client_that_sends_and_never_reads_gets_every_reply(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    talk = connect(sink.port)
    talk.send(b"NOOP\r\n" * 50_000)
    assert talk.replies(50_000) == ["250 OK"] * 50_000


def test_a_silent_client_is_told_421_and_disconnected(
    start_sink: StartSink, connect: Callable[[int], Client]
) -> None:
    sink = start_sink(idle_seconds=0.3)
    talk = connect(sink.port)
    talk.hello()
    assert talk.replies(1)[0].startswith("421 4.4.2")
    assert talk.closed()


def test_a_client_gone_mid_message_stores_nothing_and_the_sink_serves_on(
    sink: RunningSink,
    connect: Callable[[int], Client],
) -> None:
    talk = connect(sink.port)
    talk.greeted_in_data()
    talk.send(b"Subject: half\r\n\r\nno end")
    talk.sock.close()
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: whole\r\n\r\nx\r\n")
    assert sink.stored() == [b"Subject: whole\r\n\r\nx\r\n"]


def test_the_header_for_the_log_is_read_from_the_header_block_only() -> None:
    data = b"Subject: s\r\nmessage-id: <a@b>\r\n\tfolded\r\n\r\nMessage-ID: <body@x>\r\n"
    assert smtp_sink.header(data, "Message-ID") == "<a@b> folded"
    assert smtp_sink.header(b"Subject: s\r\n\r\nMessage-ID: <body@x>\r\n", "Message-ID") == ""
    # A terminal escape or any other control byte never reaches the log line.
    hostile = b"Message-ID: <\x1b[2J\x1b]0;pwned\x07\xff@x>\r\n\r\n"
    assert smtp_sink.header(hostile, "Message-ID") == "<?[2J?]0;pwned??@x>"


def test_a_message_it_cannot_write_is_deferred_with_451_and_the_next_one_is_stored(
    sink: RunningSink, connect: Callable[[int], Client]
) -> None:
    sink.directory.rmdir()
    sink.directory.write_text("not a directory")  # every write under it now fails
    talk = connect(sink.port)
    talk.greeted_in_data()
    talk.send(b"Subject: a\r\n\r\nx\r\n.\r\n")
    assert talk.replies(1) == ["451 4.3.0 Error: cannot store the message now"]
    sink.directory.unlink()
    sink.directory.mkdir()
    talk.envelope()
    talk.send(b"Subject: b\r\n\r\ny\r\n.\r\n")
    assert talk.replies(1)[0].startswith("250")
    assert sink.stored() == [b"Subject: b\r\n\r\ny\r\n"]


def test_a_port_in_use_is_one_line_and_exit_1(sink: RunningSink) -> None:
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(sink.port), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "consumers.smtp_sink"],
        env={**env, "SMTP_SINK_DIR": str(sink.directory)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "smtp-sink: cannot listen on 127.0.0.1:" in lines[0], lines
