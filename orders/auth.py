"""The operator credential of the order service, and the checks every request passes.

Why: the dashboard's actions (requeue, discard), the dead-letter lists, ``GET /orders``
(every customer's email) and ``/metrics`` were open to anyone who reached the port; 16
anonymous discards emptied a queue's dead letters for good. The shop's own API stays
public: ``POST /orders``, ``GET /orders/<id>``, the invoice page, ``/healthz``,
``/readyz``, ``/openapi.json`` (:data:`PUBLIC_ENDPOINTS`). Everything else is operator
surface, closed by default: an endpoint added later is protected until it is listed
here.

The credential is one token, ``ADMIN_TOKEN``. When none is configured, ``orders-api``
generates one at start and logs the dashboard URL with it once, as Jupyter does
(Flower and rq-dashboard instead stay open until someone configures basic auth; a
reference implementation must not teach that). Three ways to present it:

- ``Authorization: Bearer <token>``: API clients, Prometheus, scripts. A header no
  other site can make a browser send, so it needs no CSRF protection.
- ``GET /?token=<token>`` once (the logged URL): sets the session cookie and redirects
  to ``/`` so the token leaves the address bar and the history.
- ``/login``: a form with the token as its password.

The session cookie (:data:`COOKIE`) is ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page makes the browser send it) and ``Secure``
behind HTTPS; its value is an HMAC of the token, not the token, and changing
``ADMIN_TOKEN`` ends every session. A state-changing request authenticated by the
cookie must also carry an ``Origin`` equal to its own (SameSite treats every port
of localhost as the same site; the Origin check does not).

Guessing is throttled: every presented token (bearer, login form, ``?token=``) is first
checked against the client IP's bucket of failures (``AUTH_FAILURES_PER_MINUTE``, a
token bucket in Redis, :class:`orders.ratelimit.RateLimiter`), and only a wrong one
takes from it. Once it is empty the client gets ``429`` with ``Retry-After`` and its
tokens are not even compared, right or wrong, until the bucket refills: a short or
guessable ``ADMIN_TOKEN`` cannot be found by trying. The session cookie is not counted
(an HMAC of the token, nothing to guess). With Redis down the throttle is skipped,
as the API's rate limit is.

Every request's ``Host`` must be in ``ALLOWED_HOSTS`` (default ``localhost``,
``127.0.0.1``, ``[::1]`` and ``HOST``): a page on a name that an attacker rebinds to
127.0.0.1 (DNS rebinding) then gets a 400, not the dashboard. Every response carries
:data:`SECURITY_HEADERS` (CSP, nosniff, Referrer-Policy, frame-ancestors/X-Frame-Options),
the HTML ones (dashboard, login, invoice) included.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, g, redirect, render_template, request

from messaging import keys
from orders.config import OrderServiceSettings
from orders.extensions import app_limiter, problem_response, too_many
from orders.ratelimit import RateLimiter
from orders.validation import Problem, bad_request

log = logging.getLogger("orders-api")
auth = Blueprint("auth", __name__)

EXTENSION = "orders.auth"
"""Key of the app's :class:`Credential` in ``app.extensions``."""

THROTTLE = "orders.auth.throttle"
"""Key of the app's failed-token :class:`~orders.ratelimit.RateLimiter` in ``app.extensions``."""

LOGIN_ENDPOINTS = frozenset({"auth.login", "auth.login_page", "dashboard.page"})
"""Where a person types or follows the token: a throttled one gets the form, not JSON."""

COOKIE = "orders_admin"
"""The dashboard's session cookie."""

MIN_TOKEN_LENGTH = 16
"""A configured ADMIN_TOKEN shorter than this is a configuration error."""

DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")

PUBLIC_ENDPOINTS = frozenset(
    {
        "orders.create_order",
        "orders.get_order",
        "orders.get_invoice",
        "orders.healthz",
        "orders.readyz",
        "orders.openapi",
        "static",
        "auth.login_page",
        "auth.login",
    }
)
"""Endpoints anyone may call. Every other endpoint needs the operator credential."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# Referrer-Policy same-origin, not no-referrer: under no-referrer Chromium sends
# "Origin: null" with a form POST (the login form), which the Origin check refuses.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
"""Set on every response (JSON too: harmless there, and no HTML page can miss them)."""


def generate_token() -> str:
    """A new random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def dashboard_url(host: str, port: int, token: str) -> str:
    """The URL to open the dashboard with ``token`` (a wildcard bind shows localhost)."""
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?token={token}"


def with_token(settings: OrderServiceSettings) -> OrderServiceSettings:
    """``settings`` with an ADMIN_TOKEN: the configured one, or a new one, logged once.

    ``orders-api`` calls this in the gunicorn master, before the fork, so that every
    worker checks the same token.
    """
    if settings.admin_token:
        return settings
    token = generate_token()
    log.warning(
        "No ADMIN_TOKEN set: generated one for this run. Dashboard: %s",
        dashboard_url(settings.host, settings.port, token),
    )
    return replace(settings, admin_token=token)


def mask_email(address: str) -> str:
    """``ada@example.com`` -> ``a***@example.com``: what the public API shows of it."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if local else "***"


def _hostname(value: str) -> str | None:
    """The lower-case host name of a ``Host`` value (``[::1]:8000`` -> ``::1``), or None."""
    try:
        parts = urlsplit("//" + value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    return parts.hostname


def allowed_hosts(configured: tuple[str, ...], host: str) -> frozenset[str] | None:
    """The host names requests may name (None: any, from ``*``), ``HOST`` included."""
    if "*" in configured:
        return None
    names = {_hostname(h) for h in configured}
    if host not in ("0.0.0.0", "::", ""):
        names.add(_hostname(f"[{host}]" if ":" in host else host))
    return frozenset(n for n in names if n)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # never an error, whatever was sent


@dataclass(frozen=True)
class Credential:
    """The app's operator token and its allow-list of host names."""

    token: str
    hosts: frozenset[str] | None
    """Allowed host names; None allows any (``ALLOWED_HOSTS=*``)."""

    @property
    def cookie_value(self) -> str:
        """What the session cookie holds: an HMAC of the token (never the token)."""
        return hmac.new(
            self.token.encode(), b"orders-dashboard-session", hashlib.sha256
        ).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison with the token."""
        return hmac.compare_digest(_bytes(given), self.token.encode())

    def cookie_matches(self, given: str) -> bool:
        """Constant-time comparison with :attr:`cookie_value`."""
        return hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), self.cookie_value.encode()
        )


def init_app(app: Flask, settings: OrderServiceSettings) -> None:
    """Install the credential (:func:`with_token`) and the checks on ``app``."""
    settings = with_token(settings)
    hosts = allowed_hosts(settings.allowed_hosts, settings.host)
    app.extensions[EXTENSION] = Credential(settings.admin_token, hosts)
    app.register_blueprint(auth)


def credential() -> Credential:
    """The current app's credential."""
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class TooManyFailures(Exception):
    """The client sent too many wrong operator tokens: 429 until its bucket refills."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


def _throttle() -> RateLimiter:
    return app_limiter(
        THROTTLE, lambda settings: settings.auth_failures_per_minute, keys.auth_failures
    )


def token_accepted(given: str) -> bool:
    """Compare a presented token with ADMIN_TOKEN, throttled per client IP.

    Raises:
        TooManyFailures: the client's failures bucket is empty; nothing was compared.
    """
    throttle = _throttle()
    client = request.remote_addr
    decision = throttle.peek(client)
    if not decision.allowed:
        raise TooManyFailures(decision.retry_after)
    if credential().token_matches(given):
        return True
    throttle.check(client)
    return False


def is_operator() -> bool:
    """True if this request carries the operator credential (bearer token or cookie).

    Decided once per request. Raises :class:`TooManyFailures` for a bearer token from a
    client that sent too many wrong ones.
    """
    if "operator" not in g:
        bearer = _bearer()
        if bearer is not None:
            g.operator = token_accepted(bearer)
        else:
            cookie = request.cookies.get(COOKIE)
            g.operator = cookie is not None and credential().cookie_matches(cookie)
    return bool(g.operator)


@auth.app_errorhandler(TooManyFailures)
def too_many_failures(exc: TooManyFailures) -> Response:
    """429 with Retry-After: the login form where a person is, else problem+json."""
    log.warning("refused operator tokens from %s for %d s", request.remote_addr, exc.retry_after)
    if request.endpoint in LOGIN_ENDPOINTS:
        response = _login_form(
            429, f"Too many wrong tokens from this address: try again in {exc.retry_after} s."
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return too_many(
        "too-many-token-failures",
        "Too many wrong operator tokens",
        f"too many wrong operator tokens from {request.remote_addr} "
        f"(AUTH_FAILURES_PER_MINUTE); retry after {exc.retry_after} s",
        exc.retry_after,
    )


def _same_origin() -> bool:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return False
    parts = urlsplit(origin)
    return bool(parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower())


def _unauthorized(detail: str) -> Response:
    if request.endpoint == "dashboard.page":
        return _login_form(401, "")
    response = problem_response(
        Problem(401, "unauthorized", "Operator credential required", detail)
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="orders-api operator"'
    return response


@auth.before_app_request
def check_request() -> Response | None:
    """Host allow-list, same-origin for changes, and the credential off the public API."""
    cred = credential()
    if cred.hosts is not None and _hostname(request.host) not in cred.hosts:
        return problem_response(
            bad_request("Host", "this host name is not in ALLOWED_HOSTS (see docs/security.md)")
        )
    unsafe = request.method not in SAFE_METHODS
    if unsafe and "Origin" in request.headers and not _same_origin():
        return problem_response(
            Problem(
                403,
                "cross-origin",
                "Cross-origin request refused",
                "Origin: a state-changing request must come from this service's own origin",
                [{"field": "Origin", "message": "must be this service's own origin"}],
            )
        )
    if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
        return None  # 404/405 as usual; the public API
    if request.endpoint == "dashboard.page" and "token" in request.args:
        return _login_with(request.args.get("token", ""))
    if not is_operator():
        return _unauthorized(
            "send Authorization: Bearer <ADMIN_TOKEN>, or log in at /login (docs/security.md)"
        )
    if unsafe and _bearer() is None and not _same_origin():
        # The cookie alone: only with an Origin header naming this origin (CSRF).
        return problem_response(
            Problem(
                403,
                "cross-origin",
                "Origin required",
                "Origin: a change authenticated by the session cookie needs this origin",
                [{"field": "Origin", "message": "must be this service's own origin"}],
            )
        )
    return None


@auth.after_app_request
def security_headers(response: Response) -> Response:
    """The security headers on every response; operator answers are never cached."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint is not None and request.endpoint not in PUBLIC_ENDPOINTS:
        response.headers["Cache-Control"] = "no-store"
    return response


def _login_form(status: int, error: str) -> Response:
    html = render_template("login.html", error=error)
    return Response(html, status=status, mimetype="text/html")


def _login_with(token: str) -> Response:
    if not token_accepted(token):
        log.warning("dashboard: refused a login from %s", request.remote_addr)
        return _login_form(401, "That is not the token (ADMIN_TOKEN, or the one in the log).")
    response = current_app.make_response(redirect("/", code=303))
    response.set_cookie(
        COOKIE,
        credential().cookie_value,
        httponly=True,
        samesite="Strict",
        secure=request.is_secure,
        path="/",
    )
    return response


@auth.get("/login")
def login_page() -> Response:
    """The login form."""
    return _login_form(200, "")


@auth.post("/login")
def login() -> Response:
    """Check the token from the form; set the session cookie and go to the dashboard."""
    return _login_with(request.form.get("token", ""))
