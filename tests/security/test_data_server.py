"""Finding 6: the SMPs' TCP data server had no timeouts or limits, and the token and
every byte crossed the network in plaintext.

The review held 301 threads with 300 idle unauthenticated connections,
blocked a thread forever with half a header, and killed a handler with
``offset: inf``. Now: a bounded number of unauthenticated connections,
deadlines on every header, integers checked; requests and replies carry
HMACs keyed from the store's token (which never crosses the wire), so a
byte altered in transit is refused.
"""

from __future__ import annotations

import hmac
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from snapstore.node import transport as tr
from snapstore.node import wire
from snapstore.node.segments import Segment, data_name
from snapstore.node.transport import ChunkUnavailableError, DataServer, PeerInfo, Transport

TOKEN = "store-secret-token"
NAME = data_name("job", 0, 3)
SIZE = 6 << 20
PAYLOAD = np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8)


def _resolver(directory: Path) -> Callable[[str], np.ndarray]:
    def resolve(name: str) -> np.ndarray:
        try:
            return Segment.open(str(directory / name)).array
        except OSError as e:
            raise ChunkUnavailableError(f"{name}: {e.strerror}") from None

    return resolve


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DataServer]:
    for name, value in (("AUTH_TIMEOUT", 0.5), ("HEADER_TIMEOUT", 0.5), ("IDLE_TIMEOUT", 1.0)):
        monkeypatch.setattr(wire, name, value)
    (tmp_path / NAME).write_bytes(PAYLOAD.tobytes())
    s = DataServer("127.0.0.1", TOKEN, _resolver(tmp_path))
    yield s
    s.stop()


def _peer(port: int) -> PeerInfo:
    return PeerInfo("node-a", "another-host", "/nonexistent", "127.0.0.1", port)


def _read(t: Transport, port: int, n: int = 1000, offset: int = 0) -> bytes:
    dest = np.empty(n, dtype=np.uint8)
    t.read_into(_peer(port), NAME, offset, dest)
    return dest.tobytes()


def _hello(s: socket.socket) -> bytes:
    (n,) = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))
    nonce: bytes = msgpack.unpackb(s.recv(n, socket.MSG_WAITALL))["nonce"]
    return nonce


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
        assert _read(good, server.port) == PAYLOAD[:1000].tobytes()
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
        _hello(s)
        s.sendall(b"\x00\x00")  # half of the length prefix, then nothing (or a byte now and then)
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


def _signed(nonce: bytes, body: bytes, token: str = TOKEN) -> bytes:
    mac = hmac.digest(wire.keys(token)[0], nonce + body, "sha256")
    return struct.pack("!I", len(body)) + body + mac


@pytest.mark.parametrize(
    ("offset", "length"),
    [(float("inf"), 1), (0, float("nan")), (2**64 - 1, 1), (-(2**63), 1), (SIZE, 2**64 - 1)],
)
def test_forged_numbers_are_refused_and_the_server_keeps_serving(
    server: DataServer, offset: object, length: object
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        nonce = _hello(s)
        body = msgpack.packb(
            {"op": "read", "name": NAME, "offset": offset, "length": length, "seq": 0}
        )
        s.sendall(_signed(nonce, body))
        (n,) = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))
        reply = msgpack.unpackb(s.recv(n, socket.MSG_WAITALL))
        assert reply["ok"] is False and reply["error"]
    t = Transport("here", TOKEN, force_tcp=True)
    assert _read(t, server.port, 10, 5) == PAYLOAD[5:15].tobytes()
    assert _read(t, server.port, SIZE) == PAYLOAD.tobytes()
    t.close()


def test_the_token_never_crosses_the_wire() -> None:
    seen = bytearray()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def fake_server() -> None:
            conn, _ = listener.accept()
            with conn:
                hello = msgpack.packb({"v": wire.PROTOCOL, "nonce": b"n" * 16})
                conn.sendall(struct.pack("!I", len(hello)) + hello)
                conn.settimeout(0.3)
                try:
                    while chunk := conn.recv(4096):
                        seen.extend(chunk)
                except OSError:
                    pass

        th = threading.Thread(target=fake_server)
        th.start()
        t = Transport("here", TOKEN, force_tcp=True)
        with pytest.raises(ChunkUnavailableError):
            _read(t, listener.getsockname()[1])
        t.close()
        th.join(10)
    assert seen and NAME.encode() in seen
    assert TOKEN.encode() not in seen


@pytest.mark.parametrize("n", [20_000, SIZE])
def test_a_byte_altered_in_transit_is_refused(server: DataServer, n: int) -> None:
    """A man in the middle flips one byte of the reply's payload: the read fails."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stop = threading.Event()

        def pump(src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
            seen = 0
            try:
                while not stop.is_set() and (chunk := src.recv(65536)):
                    data = bytearray(chunk)
                    if flip_at is not None and seen <= flip_at < seen + len(data):
                        data[flip_at - seen] ^= 0x01
                    seen += len(data)
                    dst.sendall(data)
            except OSError:
                pass

        def proxy() -> None:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", server.port))
            a = threading.Thread(target=pump, args=(client, upstream, None))
            b = threading.Thread(target=pump, args=(upstream, client, n - 5000))
            a.start()
            b.start()
            a.join(10)
            b.join(10)
            client.close()
            upstream.close()

        th = threading.Thread(target=proxy)
        th.start()
        t = Transport("here", TOKEN, force_tcp=True)
        try:
            with pytest.raises(ChunkUnavailableError, match="fails authentication"):
                _read(t, listener.getsockname()[1], n)
        finally:
            t.close()
            stop.set()
            th.join(10)


def test_an_idle_authenticated_connection_is_closed_and_the_client_reconnects(
    server: DataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tr, "_POOL_IDLE", 0.5)
    t = Transport("here", TOKEN, force_tcp=True)
    try:
        assert _read(t, server.port, 10) == PAYLOAD[:10].tobytes()
        time.sleep(1.5)  # past the server's idle timeout: it closed the pooled connection
        assert server.connections() == (0, 0)
        assert _read(t, server.port, 10) == PAYLOAD[:10].tobytes()
    finally:
        t.close()
