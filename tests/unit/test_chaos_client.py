"""The chaos harness's client: an answer cut short by a killed API is a retry, not a crash.

CI once lost the whole scoreboard to ``http.client.IncompleteRead``: orders-api was
SIGKILLed after writing its headers and before its body, and the client only retried
``OSError``s. The order may exist then; the same Idempotency-Key finds it on the retry.
"""

from __future__ import annotations

import socket
import threading

import pytest

from chaos.stack import order_body, post_order


def test_an_answer_cut_after_its_headers_is_a_connection_error() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 447\r\n\r\n"
                )  # then the process dies: no body

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with pytest.raises(ConnectionError, match="answer cut short"):
            post_order(f"http://127.0.0.1:{port}/orders", order_body(3), "cut-1", timeout=5)
        thread.join(5)
