"""Finding 8: the loopback REST server answered any Host header (DNS rebinding).

A page on ``attacker.example`` whose DNS answer turns to 127.0.0.1 makes the
victim's browser send same-origin requests to the loopback server, with
``Host: attacker.example``. The server now answers only its own address
(or names configured with ``--allow-host``).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection

from snapstore.server.app import create_app
from snapstore.server.auth import allowed_hosts, host_of
from snapstore.server.poller import Poller
from tests.test_server_app import Clock, FakeSource, make_snapshot


def _client(hosts: list[str] | None, token: str | None = None) -> TestClient:
    poller = Poller(FakeSource(make_snapshot()), stale_after=5.0, clock=Clock())
    assert poller.poll_once()
    return TestClient(create_app(poller, token, hosts))


@pytest.mark.parametrize(
    ("bind", "extra", "expected"),
    [
        ("127.0.0.1", [], ["127.0.0.1", "::1", "localhost"]),
        ("localhost", ["box.lan"], ["127.0.0.1", "::1", "box.lan", "localhost"]),
        ("::1", [], ["127.0.0.1", "::1", "localhost"]),
        ("10.0.0.5", [], ["10.0.0.5"]),
        ("10.0.0.5", ["Box.LAN"], ["10.0.0.5", "box.lan"]),
        ("0.0.0.0", [], None),  # wildcard: a token is required, any Host
        ("::", ["box.lan"], ["box.lan"]),
        ("127.0.0.1", ["*"], None),
    ],
)
def test_allowed_hosts(bind: str, extra: list[str], expected: list[str] | None) -> None:
    assert allowed_hosts(bind, extra) == expected


@pytest.mark.parametrize(
    ("header", "host"),
    [("[::1]:8470", "::1"), ("127.0.0.1:80", "127.0.0.1"), ("LocalHost", "localhost"), ("", "")],
)
def test_host_of(header: str, host: str) -> None:
    assert host_of(header) == host


@pytest.mark.parametrize("path", ["/healthz", "/v1/jobs", "/metrics", "/", "/openapi.json"])
def test_a_rebinding_host_gets_400_on_every_path(path: str) -> None:
    c = _client(allowed_hosts("127.0.0.1"))
    for host in ("attacker.example", "attacker.example:8470", "127.0.0.1.attacker.example"):
        r = c.get(path, headers={"Host": host})
        assert r.status_code == 400, (path, host, r.status_code)
        assert "DNS rebinding" in r.json()["detail"]
    for host in ("127.0.0.1:8470", "localhost:8470", "[::1]:8470", "localhost"):
        assert c.get(path, headers={"Host": host}).status_code in (200, 503), (path, host)


def test_the_host_check_comes_before_the_token() -> None:
    c = _client(allowed_hosts("10.0.0.5"), token="t0k")
    assert c.get("/v1/jobs", headers={"Host": "evil"}).status_code == 400
    assert c.get("/v1/jobs", headers={"Host": "10.0.0.5:8470"}).status_code == 401
    ok = c.get("/v1/jobs", headers={"Host": "10.0.0.5", "Authorization": "Bearer t0k"})
    assert ok.status_code == 200


def test_no_host_list_answers_any_host() -> None:
    c: Any = _client(None)
    assert c.get("/healthz", headers={"Host": "anything"}).status_code == 200


# -- schemathesis over the app as the server process builds it: Host check and token on ---------

_TOKEN = "schema-token"
_poller = Poller(FakeSource(make_snapshot()), stale_after=5.0, clock=Clock())  # stays fresh
_poller.poll_once()
# The schema loads through the ASGI test transport, whose Host is "testserver".
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(_poller, _TOKEN, allowed_hosts("127.0.0.1", ["testserver"]))
)


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_conformance_behind_the_host_check_and_token(case: Any) -> None:
    """No 500s, documented statuses and bodies, with the headers a real client sends.

    Negative cases are not judged here: the real Host and token sent over them undo a
    case's missing or malformed header, so schemathesis would count an accepted request it
    believes had no token. test_server_app's conformance test judges them, unmodified.
    """
    case.call_and_validate(
        headers={"Host": "127.0.0.1:8470", "Authorization": f"Bearer {_TOKEN}"},
        excluded_checks=[negative_data_rejection],
    )
