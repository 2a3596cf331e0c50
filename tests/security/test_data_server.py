"""Finding 6: the SMPs' TCP data server had no timeouts or limits.

The review held 301 threads with 300 idle unauthenticated connections,
blocked a thread forever with half a header, and killed a handler with
``offset: inf``. Now: a bounded number of unauthenticated connections,
deadlines on every header, integers checked. (What crosses the wire, and
who can read or alter it: ``test_data_server_sealing.py``.)
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from snapstore.node import transport as tr
from snapstore.node import wire
from snapstore.node.transport import DataServer, Transport

from .peers import PAYLOAD, SIZE, TOKEN, RawClient, hello, read, request, serve


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DataServer]:
    for name, value in (("AUTH_TIMEOUT", 0.5), ("HEADER_TIMEOUT", 0.5), ("IDLE_TIMEOUT", 1.0)):
        monkeypatch.setattr(wire, name, value)
    s = serve(tmp_path)
    yield s
    s.stop()


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_idle_unauthenticated_connections_hold_a_bounded_number_of_threads(
    server: DataServer,
) -> None:
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= wire.MAX_UNAUTHENTICATED + 2
        assert server.connections()[1] <= wire.MAX_UNAUTHENTICATED
        # A peer that authenticates at once still gets through the flood.
        good = Transport("here", TOKEN, force_tcp=True)
        assert read(good, server.port) == PAYLOAD[:1000].tobytes()
        good.close()
        # And the idle ones are cut off once their time to authenticate is up.
        assert _closed_within(idle[-1], 5.0)
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while server.connections()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections() == (0, 0)


@pytest.mark.parametrize("trickle", [False, True])
def test_a_half_sent_header_is_cut_off(server: DataServer, trickle: bool) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        hello(s)
        # The client's salt, half of a length prefix, then nothing (or a byte now and then).
        s.sendall(os.urandom(wire.SALT) + b"\x00\x00")
        t0 = time.monotonic()
        if trickle:
            for _ in range(20):
                time.sleep(0.1)
                try:
                    s.sendall(b"\x00")
                except OSError:
                    break
        assert _closed_within(s, 5.0)
        assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize(
    ("offset", "length"),
    [(float("inf"), 1), (0, float("nan")), (2**64 - 1, 1), (-(2**63), 1), (SIZE, 2**64 - 1)],
)
def test_forged_numbers_are_refused_and_the_server_keeps_serving(
    server: DataServer, offset: object, length: object
) -> None:
    raw = RawClient(server.port)
    try:
        raw.sock.sendall(raw.sealed(request(offset=offset, length=length)))
        record = raw.reply_record()
        assert record
        reply = msgpack.unpackb(wire.Sealer(raw.k_rep).open(record))
        assert reply["ok"] is False and reply["error"]
    finally:
        raw.close()
    t = Transport("here", TOKEN, force_tcp=True)
    assert read(t, server.port, 10, 5) == PAYLOAD[5:15].tobytes()
    assert read(t, server.port, SIZE) == PAYLOAD.tobytes()
    t.close()


def test_an_idle_authenticated_connection_is_closed_and_the_client_reconnects(
    server: DataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tr, "_POOL_IDLE", 0.5)
    t = Transport("here", TOKEN, force_tcp=True)
    try:
        assert read(t, server.port, 10) == PAYLOAD[:10].tobytes()
        time.sleep(1.5)  # past the server's idle timeout: it closed the pooled connection
        assert server.connections() == (0, 0)
        assert read(t, server.port, 10) == PAYLOAD[:10].tobytes()
    finally:
        t.close()
