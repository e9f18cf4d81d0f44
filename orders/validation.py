"""Request validation by hand, reporting RFC 9457 problem details.

Every rejected request gets ``application/problem+json``: ``type`` (a stable URI),
``title``, ``status``, ``detail`` and, for field errors, ``errors``: a list of
``{"field": "items[0].quantity", "message": "..."}``, all errors at once, not only the
first. Malformed JSON is 400, a semantically invalid order is 422.

Rules for ``POST /orders`` (documented in the OpenAPI document too):

- the body is a JSON object with exactly ``customer_email``, ``currency``, ``items`` and
  optionally ``priority``;
- ``priority``: ``"standard"`` (the default) or ``"express"``: express work is taken
  before standard work on every queue the order passes through;
- ``customer_email``: exactly one addr-spec (``local@domain.tld``), checked by
  `email-validator <https://pypi.org/project/email-validator/>`_ (what pydantic uses,
  without DNS look-ups): no display name, no list (commas), no comment, no quoted local
  part, no IP literal, no local user without a domain, no RFC 2047 encoded-word
  (``=?utf-8?q?...?=``), no control character; an ASCII local part (the SMTP path
  does not negotiate SMTPUTF8). It is stored in its ASCII form (domain in lower case,
  an internationalised domain as ``xn--`` punycode), at most 254 characters;
- ``currency``: one of :data:`CURRENCIES` (ISO 4217 codes with two minor units, since
  every amount carries exactly two decimals);
- ``items``: 1 to ``MAX_LINES`` objects with exactly ``sku``, ``quantity``, ``unit_price``;
- ``sku``: 1 to 64 characters from ``A-Z a-z 0-9 . _ -`` (not even a final newline);
  the same SKU twice in one order is rejected (one line per SKU keeps invoices
  unambiguous: add the quantities);
- ``quantity``: an integer (not a boolean, not 1.0) from 1 to :data:`MAX_QUANTITY`;
- ``unit_price``: a decimal *string* such as ``"12.50"`` (a JSON number is rejected: it
  would pass through a float), at most two decimals, above 0, at most 1,000,000.00.

Every pattern here is matched with :func:`re.fullmatch`: ``re.match`` with ``^...$``
accepts a final ``"\\n"`` (``$`` matches before it), which let ``"BOOK\\n"`` past the
SKU rule (and past the one-line-per-SKU rule, next to ``"BOOK"``) and a newline into
an email header. Whatever passes is also free of NUL, control characters and lone
surrogates, so the same input is the same 422 on SQLite and PostgreSQL (which refuses
NUL in text) and nothing reaches the database that could fail there.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import email_validator

from orders.money import MAX_UNIT_PRICE

PROBLEM_BASE = "https://example.invalid/redis-order-events/problems/"
"""Prefix of every problem type URI of this service."""

PROBLEM_CONTENT_TYPE = "application/problem+json"

CURRENCIES: frozenset[str] = frozenset(
    "USD EUR GBP CHF CAD AUD NZD SEK NOK DKK PLN CZK HUF RON BGN "
    "TRY CNY HKD SGD INR BRL MXN ZAR ILS AED SAR THB MYR PHP TWD".split()
)
"""Accepted ISO 4217 codes: common currencies whose minor unit is the cent."""

MAX_QUANTITY = 1000
MAX_EMAIL_LENGTH = 254
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_ORDER_ID = 2**31 - 1
"""orders.id is an INTEGER column: 32 bits on PostgreSQL. A larger id cannot exist, and
binding one there is a DataError (a 500 the fuzz test found), so it never reaches SQL."""
# Always used with .fullmatch(): see the module docstring.
SKU_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
PRICE_RE = re.compile(r"[0-9]+(\.[0-9]+)?")
DIGITS_RE = re.compile(r"[0-9]{1,18}")
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
"""A header name short and plain enough to name in an answer (an RFC 9110 token)."""
MAX_PARSE_DETAIL = 200
"""Characters of an HTTP parser's message kept in a problem's ``detail``: it may quote
the request (orders.httpworker, orders.stream)."""


def parse_detail(message: str) -> str:
    """An HTTP parser's message as a problem's ``detail``: at most
    :data:`MAX_PARSE_DETAIL` characters of it (it may quote the request), then "..."."""
    if len(message) > MAX_PARSE_DETAIL:
        return message[:MAX_PARSE_DETAIL] + "..."
    return message


ORDER_FIELDS = ("customer_email", "currency", "items")
OPTIONAL_ORDER_FIELDS = ("priority",)
PRIORITIES = ("standard", "express")
"""An order's priority (the contract's ``priority`` enum)."""
LINE_FIELDS = ("sku", "quantity", "unit_price")


@dataclass
class Problem(Exception):
    """An error response in RFC 9457 form; raise it, the app renders it."""

    status: int
    slug: str
    title: str
    detail: str
    errors: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.detail)

    @property
    def type(self) -> str:
        """The problem type URI (``about:blank`` for plain HTTP errors)."""
        return "about:blank" if self.slug == "about:blank" else PROBLEM_BASE + self.slug

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


def validation_problem(errors: list[dict[str, str]]) -> Problem:
    """422 with the list of field errors."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    return Problem(422, "validation", "The request is not valid", detail, errors)


def bad_request(field_name: str, message: str) -> Problem:
    """400 for a bad header or query parameter."""
    return Problem(
        400,
        "bad-request",
        "Bad request",
        f"{field_name}: {message}",
        [{"field": field_name, "message": message}],
    )


@dataclass(frozen=True)
class LineRequest:
    """One validated line."""

    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True)
class OrderRequest:
    """A validated order body."""

    customer_email: str
    currency: str
    items: tuple[LineRequest, ...]
    priority: str = "standard"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Malformed(ValueError):
    """A body JSON's grammar allows and this API refuses: ``detail``, and the member
    at fault when there is one."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.field = detail, field


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object; a name given twice is refused.

    RFC 8259 leaves a repeated name to the parser: Python's (and Go's) keep the last
    value, many others the first, so a proxy or a log reader in front of this API could
    see another order than the one stored, and two bodies could share one
    Idempotency-Key hash.
    """
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                shown = name if len(name) <= 64 else name[:64] + "..."
                raise _Malformed(f"the name {json.dumps(shown)} appears twice in one object", name)
            seen.add(name)
    return obj


def _parse_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # longer than sys.get_int_max_str_digits() (4300)
        raise _Malformed(f"a number has {len(digits)} digits") from None


def parse_json(raw: bytes) -> Any:
    """Parse a request body strictly, or raise a 400 Problem.

    Refused: bytes that are not UTF-8, NaN and Infinity, an object that names one member
    twice, an integer of more digits than Python converts, nesting deeper than the
    parser recurses.
    """
    errors: list[dict[str, str]] = []
    try:
        text = raw.decode("utf-8")
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            object_pairs_hook=_unique_names,
        )
    except UnicodeDecodeError:
        detail = "the body is not UTF-8"
    except json.JSONDecodeError as exc:
        detail = f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except _Malformed as exc:
        detail = f"the body is not accepted JSON: {exc.detail}"
        if exc.field is not None:
            errors = [{"field": exc.field[:64], "message": "appears twice in one object"}]
    except RecursionError:
        detail = "the body is not accepted JSON: arrays or objects nested too deeply"
    except ValueError as exc:  # NaN, Infinity
        detail = f"the body is not valid JSON: {exc}"
    raise Problem(400, "malformed-json", "Malformed JSON", detail, errors)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


class _Errors:
    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append({"field": path, "message": message})


def _check_fields(
    obj: dict[str, Any],
    allowed: tuple[str, ...],
    prefix: str,
    errors: _Errors,
    optional: tuple[str, ...] = (),
) -> None:
    for name in allowed:
        if name not in obj:
            errors.add(prefix + name, "is required")
    for name in obj:
        if name not in allowed and name not in optional:
            errors.add(prefix + str(name), "unknown field")


def check_email(value: str) -> tuple[str, str]:
    """One recipient address: ``(ASCII form, "")`` or ``("", why it is refused)``.

    The email consumer applies the same rule to every address it takes from a queue.
    """
    if len(value) > MAX_EMAIL_LENGTH:
        return "", f"must be at most {MAX_EMAIL_LENGTH} characters"
    if "=?" in value:
        return "", "must be a plain address, not an RFC 2047 encoded-word (=?...?=)"
    try:
        checked = email_validator.validate_email(
            value, check_deliverability=False, allow_smtputf8=False
        )
    except email_validator.EmailNotValidError as exc:
        return "", f"must be one email address like ada@example.com: {exc}"
    address = checked.ascii_email or ""
    if not address or len(address) > MAX_EMAIL_LENGTH:
        return "", f"must be at most {MAX_EMAIL_LENGTH} characters (in its ASCII form)"
    return address, ""


def _email(value: Any, errors: _Errors) -> str:
    path = "customer_email"
    if not isinstance(value, str):
        errors.add(path, f"must be a string, not {_type_name(value)}")
        return ""
    address, message = check_email(value)
    if message:
        errors.add(path, message)
    return address


def _priority(value: Any, errors: _Errors) -> str:
    if not isinstance(value, str):
        errors.add("priority", f"must be a string, not {_type_name(value)}")
    elif value not in PRIORITIES:
        errors.add("priority", 'must be "standard" or "express"')
    else:
        return value
    return "standard"


def _currency(value: Any, errors: _Errors) -> str:
    if not isinstance(value, str):
        errors.add("currency", f"must be a string, not {_type_name(value)}")
    elif value not in CURRENCIES:
        errors.add("currency", "must be a supported ISO 4217 code such as EUR or USD")
    else:
        return value
    return ""


def _quantity(value: Any, path: str, errors: _Errors) -> int:
    # bool is a subclass of int in Python: true is not a quantity.
    if isinstance(value, bool) or not isinstance(value, int):
        errors.add(path, f"must be an integer, not {_type_name(value)}")
    elif not 1 <= value <= MAX_QUANTITY:
        errors.add(path, f"must be between 1 and {MAX_QUANTITY}")
    else:
        return value
    return 0


def parse_price(value: Any) -> tuple[Decimal | None, str]:
    """Parse a unit price string; returns (amount, "") or (None, error message)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None, 'must be a decimal string like "12.50", not a JSON number'
    if not isinstance(value, str):
        return None, f'must be a decimal string like "12.50", not {_type_name(value)}'
    if len(value) > 32 or not PRICE_RE.fullmatch(value):
        return None, 'must be a decimal string like "12.50"'
    try:
        amount = Decimal(value)
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        return None, 'must be a decimal string like "12.50"'
    if "." in value and len(value.split(".")[1]) > 2:
        return None, "must have at most 2 decimal places"
    if amount <= 0:
        return None, "must be greater than 0"
    if amount > MAX_UNIT_PRICE:
        return None, f"must be at most {MAX_UNIT_PRICE}"
    return amount, ""


def _items(value: Any, max_lines: int, errors: _Errors) -> tuple[LineRequest, ...]:
    if not isinstance(value, list):
        errors.add("items", f"must be an array, not {_type_name(value)}")
        return ()
    if not value:
        errors.add("items", "must contain at least one item")
        return ()
    if len(value) > max_lines:
        errors.add("items", f"must contain at most {max_lines} items")
        return ()
    lines: list[LineRequest] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        prefix = f"items[{index}]"
        if not isinstance(item, dict):
            errors.add(prefix, f"must be an object, not {_type_name(item)}")
            continue
        before = len(errors.items)
        _check_fields(item, LINE_FIELDS, prefix + ".", errors)
        sku = item.get("sku")
        if "sku" in item:
            if not isinstance(sku, str):
                errors.add(prefix + ".sku", f"must be a string, not {_type_name(sku)}")
            elif not SKU_RE.fullmatch(sku):
                errors.add(prefix + ".sku", "must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
            elif sku in seen:
                errors.add(
                    prefix + ".sku",
                    f"duplicate of items[{seen[sku]}].sku: put the whole quantity in one line",
                )
            else:
                seen[sku] = index
        quantity = (
            _quantity(item["quantity"], prefix + ".quantity", errors) if ("quantity" in item) else 0
        )
        price = None
        if "unit_price" in item:
            price, message = parse_price(item["unit_price"])
            if message:
                errors.add(prefix + ".unit_price", message)
        if len(errors.items) == before and price is not None and isinstance(sku, str):
            lines.append(LineRequest(sku, quantity, price))
    return tuple(lines)


def validate_order(body: Any, max_lines: int = 100) -> OrderRequest:
    """Check a parsed ``POST /orders`` body; raise a 422 Problem listing every error."""
    errors = _Errors()
    if not isinstance(body, dict):
        errors.add("body", f"must be a JSON object, not {_type_name(body)}")
        raise validation_problem(errors.items)
    _check_fields(body, ORDER_FIELDS, "", errors, OPTIONAL_ORDER_FIELDS)
    email = _email(body["customer_email"], errors) if "customer_email" in body else ""
    currency = _currency(body["currency"], errors) if "currency" in body else ""
    items = _items(body["items"], max_lines, errors) if "items" in body else ()
    priority = _priority(body["priority"], errors) if "priority" in body else "standard"
    if errors.items:
        raise validation_problem(errors.items)
    return OrderRequest(email, currency, items, priority)


def request_hash(body: Any) -> str:
    """SHA-256 of the canonical JSON of a body: key order and spacing do not matter."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: never an error, even for a lone surrogate (validation refuses those).
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def idempotency_key(value: str | None) -> str | None:
    """Validate the Idempotency-Key header: absent, or 1-255 visible ASCII characters."""
    if value is None:
        return None
    if not IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise bad_request(
            "Idempotency-Key",
            f"must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters",
        )
    return value


def page_limit(value: str | None, default: int = 20, maximum: int = 100) -> int:
    """The ``limit`` query parameter: 1 to ``maximum``."""
    if value is None:
        return default
    if not DIGITS_RE.fullmatch(value) or not 1 <= int(value) <= maximum:
        raise bad_request("limit", f"must be an integer from 1 to {maximum}")
    return int(value)


def page_cursor(value: str | None) -> int | None:
    """The ``cursor`` query parameter: a ``next_cursor`` from a previous page."""
    if value is None:
        return None
    if not DIGITS_RE.fullmatch(value) or not 1 <= int(value) <= MAX_ORDER_ID:
        raise bad_request("cursor", "must be a next_cursor value from a previous page")
    return int(value)
