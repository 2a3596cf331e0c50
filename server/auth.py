"""The token rule, the bearer check and the Host check.

Rule: a server bound to a loopback address (127.0.0.0/8, ::1, ``localhost``)
needs no token unless one is given; bound to anything else (including
``0.0.0.0`` and ``::``, and any host name other than ``localhost``) it
requires one: the one given (``--token``, over ``$SNAPSTORE_REST_TOKEN``),
else one generated here, which the server writes into its ready file so that
``snapstore up`` can print it once. When a token is in force every endpoint
except the dashboard's static files and the OpenAPI schema answers 401
without ``Authorization: Bearer <token>``.

Host rule (against DNS rebinding: a web page whose name an attacker points
at 127.0.0.1 would otherwise read a loopback server from the victim's
browser): a server bound to an address answers only requests whose
``Host`` header names that address, or, bound to loopback, ``127.0.0.1``,
``localhost`` or ``::1``; anything else is 400. Names to accept besides
(a host name, a proxy's) are given with ``--allow-host`` (``*``: any). A
server bound to a wildcard address (``0.0.0.0``, ``::``) accepts any Host
unless names are given: it requires a token, which a rebinding page lacks.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HostCheck",
    "TokenDecision",
    "allowed_hosts",
    "check_bearer",
    "decide_token",
    "host_of",
    "is_loopback",
]

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


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(bind_host: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The Host names a server bound to ``bind_host`` answers (None: any; see the rule)."""
    names = [h.strip().lower().strip("[]") for h in extra if h.strip()]
    if "*" in names:
        return None
    h = bind_host.strip().lower().strip("[]")
    if is_loopback(h):
        return sorted({h, *_LOOPBACK_NAMES, *names})
    try:
        wildcard = ipaddress.ip_address(h).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        return sorted(set(names)) or None
    return sorted({h, *names})


def host_of(header: str) -> str:
    """The host part of a ``Host`` header value: ``[::1]:8470`` -> ``::1``, ``a:80`` -> ``a``."""
    v = header.strip().lower()
    if v.startswith("["):
        return v[1 : v.find("]")] if "]" in v else v
    name, _, _port = v.partition(":")
    return name


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HostCheck:
    """ASGI middleware: 400 for an HTTP request whose Host is not one of ``allowed``.

    Starlette's ``TrustedHostMiddleware`` does the same, but cuts an IPv6
    literal's ``[::1]:port`` at its first colon; this one parses it.
    """

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], allowed: Sequence[str]
    ):
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                body = json.dumps(
                    {"detail": f"Host {host!r:.80} is not served here (DNS rebinding guard)"}
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
