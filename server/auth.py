"""The token rule and the bearer check.

Rule: a server bound to a loopback address (127.0.0.0/8, ::1, ``localhost``)
needs no token unless one is given; bound to anything else (including
``0.0.0.0`` and ``::``, and any host name other than ``localhost``) it
requires one: the one given (``--token``, over ``$SNAPSTORE_REST_TOKEN``),
else one generated here, which the server writes into its ready file so that
``snapstore up`` can print it once. When a token is in force every endpoint
except the dashboard's static files and the OpenAPI schema answers 401
without ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass

__all__ = ["TokenDecision", "check_bearer", "decide_token", "is_loopback"]

TOKEN_ENV = "SNAPSTORE_REST_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``.

    Host names other than ``localhost`` count as not loopback without being
    resolved: a name may resolve differently later, and requiring a token is
    the safe side.
    """
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TokenDecision:
    """The token the server enforces (None: none) and whether it was generated here."""

    token: str | None
    generated: bool


def decide_token(host: str, given: str | None) -> TokenDecision:
    """Apply the token rule to a bind address and the token given (if any)."""
    if given:
        return TokenDecision(given, False)
    if is_loopback(host):
        return TokenDecision(None, False)
    return TokenDecision(secrets.token_urlsafe(24), True)


def check_bearer(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (constant-time compare)."""
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(value.strip().encode(), token.encode())
