"""Requests the HTTP servers cannot parse get a 4xx problem naming the part at fault.

gunicorn (orders-api) and aiohttp (orders-stream) answer these themselves, before the
app sees anything; :func:`orders.httpworker.parse_problem` and
:func:`orders.stream.parse_problem` turn them into the app's problem+json. Every
exception gunicorn's parser defines is covered (found by walking its classes, so one a
new gunicorn adds is covered too); the end-to-end test sends the real bytes.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from aiohttp import http_exceptions
from gunicorn.http import errors as gunicorn_errors

from orders import httpworker, stream
from orders.validation import MAX_PARSE_DETAIL


def _subclasses(base: type) -> list[type]:
    found = []
    for sub in base.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _instance(kind: type) -> BaseException:
    """One instance of a gunicorn error, whatever its constructor takes."""
    params = [
        p
        for p in inspect.signature(kind.__init__).parameters.values()  # type: ignore[misc]
        if p.name != "self" and p.default is inspect.Parameter.empty
    ]
    args: list[Any] = ["X-Some\x01Thing" if p.name == "hdr" else "junk" for p in params]
    return kind(*args)  # type: ignore[no-any-return]


CLIENT_ERRORS = [
    kind
    for kind in _subclasses(gunicorn_errors.ParseException)
    if not issubclass(
        kind, (gunicorn_errors.InvalidResponseHeader, gunicorn_errors.InvalidResponseHeaderName)
    )
]


@pytest.mark.parametrize("kind", CLIENT_ERRORS, ids=lambda kind: kind.__name__)
def test_every_gunicorn_parse_error_is_a_4xx_problem_naming_a_field(kind: type) -> None:
    problem = httpworker.parse_problem(_instance(kind))
    assert problem is not None
    assert 400 <= problem.status < 500
    body = problem.to_dict()
    assert body["status"] == problem.status
    assert body["errors"][0]["field"]
    assert len(body["detail"]) <= MAX_PARSE_DETAIL + 3
    response = httpworker.problem_bytes(problem)
    head, _, raw = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {problem.status} ".encode())
    assert b"\r\nContent-Type: application/problem+json\r\n" in head
    assert b"\r\nConnection: close\r\n" in head
    assert b"\r\nX-Content-Type-Options: nosniff\r\n" in head
    assert f"Content-Length: {len(raw)}".encode() in head
    assert json.loads(raw) == body


def test_the_part_at_fault_is_named() -> None:
    header = httpworker.parse_problem(gunicorn_errors.InvalidHeader("IDEMPOTENCY-KEY"))
    assert header is not None and header.errors[0]["field"] == "Idempotency-Key"
    # A bogus header *name* is not repeated as a field name.
    name = httpworker.parse_problem(gunicorn_errors.InvalidHeaderName("Bad Header"))
    assert name is not None and name.errors[0]["field"] == "headers"
    line = httpworker.parse_problem(gunicorn_errors.LimitRequestLine(9000, 4094))
    assert line is not None and (line.status, line.errors[0]["field"]) == (414, "request-target")
    many = httpworker.parse_problem(gunicorn_errors.LimitRequestHeaders("too many"))
    assert many is not None and many.status == 431
    script = httpworker.parse_problem(gunicorn_errors.ConfigurationProblem("SCRIPT_NAME"))
    assert script is not None and (script.status, script.errors[0]["field"]) == (
        400,
        "SCRIPT_NAME",
    )
    # The request line may be 4 KiB of anything: the answer quotes only the start.
    long = httpworker.parse_problem(gunicorn_errors.InvalidRequestLine("A" * 5000))
    assert long is not None and len(long.detail) == MAX_PARSE_DETAIL + 3


def test_the_apps_own_errors_stay_500s() -> None:
    assert httpworker.parse_problem(RuntimeError("a bug")) is None
    assert httpworker.parse_problem(gunicorn_errors.InvalidResponseHeader("X-Bad\r\n")) is None
    assert httpworker.parse_problem(gunicorn_errors.InvalidResponseHeaderName("Bad:")) is None


@pytest.mark.parametrize(
    ("exc", "message", "field"),
    [
        (http_exceptions.BadHttpMethod("GARBAGE"), None, "method"),
        (http_exceptions.InvalidHeader(b"Idempotency-Key"), None, "Idempotency-Key"),
        (http_exceptions.InvalidHeader(b"Bad Header"), None, "headers"),
        (http_exceptions.LineTooLong("/aaa", 8190, 9000), None, "request-line or headers"),
        (
            http_exceptions.BadHttpMessage("Invalid header value char"),
            "Invalid header value char:\n\n  b'X-A: \\x01'\n     ^",
            "headers",
        ),
        (
            http_exceptions.BadHttpMessage("x"),
            "Invalid character in Content-Length:",
            "Content-Length",
        ),
        (http_exceptions.BadHttpMessage("x"), "Invalid character in chunk size", "body"),
        (http_exceptions.BadHttpMessage("x"), "something new", "request"),
    ],
)
def test_aiohttp_parse_errors_are_problems_naming_the_part(
    exc: BaseException, message: str | None, field: str
) -> None:
    response = stream.parse_problem(400, exc, message)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert response.text is not None
    body = json.loads(response.text)
    assert body["errors"][0]["field"] == field
    assert "\n" not in body["detail"]
    assert len(body["detail"]) <= MAX_PARSE_DETAIL + 3
