"""Finding 6, across hosts: "the token and all snapshot bytes travel in plaintext".

Protocol 3 seals every request and reply with AES-256-GCM under per-connection,
per-direction keys derived from the store's token and two fresh salts
(:mod:`snapstore.node.wire`). These tests stand where another host of the
cluster network stands -- on the wire, as a man in the middle, or as a peer
without the token -- and check that it can neither read, alter, replay nor
forge, and that the server keeps serving the store's own peers.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from snapstore.coding import checksum
from snapstore.node import transport as tr
from snapstore.node import wire
from snapstore.node.transport import ChunkUnavailableError, DataServer, Transport

from .peers import NAME, PAYLOAD, TOKEN, RawClient, proxy, read, request, serve

HELLO = len(wire.plain_hello(v=wire.PROTOCOL, salt=bytes(wire.SALT)))
"""Bytes of the server's hello on the wire."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataServer]:
    s = serve(tmp_path_factory.mktemp("sealed"))
    yield s
    s.stop()


def _windows(data: np.ndarray, n: int = 8, width: int = 32) -> list[bytes]:
    """``n`` spread-out ``width``-byte windows of ``data``: would any cross in the clear?"""
    step = max(1, (len(data) - width) // n)
    return [data[i : i + width].tobytes() for i in range(0, len(data) - width, step)][:n]


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plaintext-control"])
def test_no_snapshot_byte_name_or_checksum_crosses_the_wire_in_the_clear(
    tmp_path: Path, seal: bool
) -> None:
    """A peer on the wire sees neither the bytes read, nor what was asked for.

    The control run (sealing off, the benchmark's private switch) shows the
    same probe finds them all in plaintext, so the sealed run's "absent" means
    something.
    """
    s = serve(tmp_path, seal=seal)
    n = 3 << 20
    t = Transport("here", TOKEN, force_tcp=True, _seal=seal)
    try:
        with proxy(s.port) as (port, seen):
            assert read(t, port, n) == PAYLOAD[:n].tobytes()
            total = t.checksum(tr.PeerInfo("node-a", "h", "/x", "127.0.0.1", port), NAME, 0, n)
            assert total == checksum(PAYLOAD[:n])
            t.close()
    finally:
        s.stop()
    up, down = bytes(seen["up"]), bytes(seen["down"])
    assert len(down) >= n
    found = {
        "payload": [w in down for w in _windows(PAYLOAD[:n])],
        "name": [NAME.encode() in up],
        "checksum": [msgpack.packb(total) in down],
        "token": [TOKEN.encode() in up + down],
    }
    if seal:
        assert not any(any(v) for v in found.values()), found
    else:
        assert all(found["payload"]) and found["name"] == [True] and not found["token"][0]


def test_the_token_never_crosses_the_wire() -> None:
    """Not even to a server that is not the store's: the client sends its salt and a
    sealed record, never the token or the request in the clear."""
    seen = bytearray()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def fake_server() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(wire.plain_hello(v=wire.PROTOCOL, salt=b"s" * wire.SALT))
                conn.settimeout(0.3)
                try:
                    while chunk := conn.recv(4096):
                        seen.extend(chunk)
                except OSError:
                    pass

        th = threading.Thread(target=fake_server, daemon=True)
        th.start()
        t = Transport("here", TOKEN, force_tcp=True)
        with pytest.raises(ChunkUnavailableError):
            read(t, listener.getsockname()[1])
        t.close()
        th.join(10)
    assert len(seen) > wire.SALT + 4 + wire.TAG  # the salt and a whole request record
    assert TOKEN.encode() not in seen and NAME.encode() not in seen


def test_a_replayed_hello_cannot_make_the_client_reuse_a_key() -> None:
    """A server (or a man in the middle) sending the same salt every time: the client's
    own salt still makes each connection's keys new, so the same request seals apart."""
    firsts: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def fake_server() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(wire.plain_hello(v=wire.PROTOCOL, salt=b"s" * wire.SALT))
                    got = conn.recv(wire.SALT + 4, socket.MSG_WAITALL)
                    (n,) = struct.unpack("!I", got[-4:])
                    firsts.append(conn.recv(n, socket.MSG_WAITALL))

        th = threading.Thread(target=fake_server, daemon=True)
        th.start()
        port = listener.getsockname()[1]
        for _ in range(2):
            t = Transport("here", TOKEN, force_tcp=True)
            with pytest.raises(ChunkUnavailableError):
                read(t, port, 10)
            t.close()
        th.join(10)
    assert len(firsts) == 2 and len(firsts[0]) == len(firsts[1])
    assert firsts[0] != firsts[1]


def _flip(direction: str, at: int) -> Callable[[str, bytearray], bytearray]:
    """An ``alter`` for :func:`proxy` that flips one bit at stream offset ``at``."""
    seen = {"up": 0, "down": 0}

    def alter(d: str, data: bytearray) -> bytearray:
        start = seen[d]
        seen[d] += len(data)
        if d == direction and start <= at < start + len(data):
            data[at - start] ^= 0x01
        return data

    return alter


N = 1 << 20


@pytest.mark.parametrize(
    ("direction", "at"),
    [
        ("down", HELLO - 3),  # the server's salt (the hello's last bytes): other keys
        ("down", HELLO + 8),  # the reply header record
        ("down", HELLO + 200 + N // 2),  # the middle of the payload
        ("down", -1),  # the last byte: the payload record's tag
        ("up", 3),  # the client's salt
        ("up", wire.SALT + 10),  # the request record
    ],
    ids=["server-salt", "reply-header", "payload", "payload-tag", "client-salt", "request"],
)
def test_a_bit_altered_in_transit_is_refused(server: DataServer, direction: str, at: int) -> None:
    if at < 0:  # the last byte of the stream a read of N bytes produces
        clean_t = Transport("here", TOKEN, force_tcp=True)
        with proxy(server.port) as (port, seen):
            read(clean_t, port, N)
            clean_t.close()
        at = len(seen["down"]) - 1
    t = Transport("here", TOKEN, force_tcp=True)
    try:
        with proxy(server.port, _flip(direction, at)) as (port, _):
            with pytest.raises(ChunkUnavailableError, match="fails authentication"):
                read(t, port, N)
            t.close()
    finally:
        t.close()
    good = Transport("here", TOKEN, force_tcp=True)
    assert read(good, server.port, 10) == PAYLOAD[:10].tobytes()
    good.close()


def test_a_wrong_token_is_refused_and_the_server_keeps_serving(server: DataServer) -> None:
    for guess in ("", "store-secret-tokeN", TOKEN + " "):
        intruder = Transport("here", guess, force_tcp=True)
        with pytest.raises(ChunkUnavailableError, match="bad token"):
            read(intruder, server.port, 10)
        with pytest.raises(ChunkUnavailableError, match="bad token"):
            intruder.checksum(tr.PeerInfo("n", "h", "/x", "127.0.0.1", server.port), NAME, 0, 10)
        intruder.close()
    good = Transport("here", TOKEN, force_tcp=True)
    assert read(good, server.port, 10) == PAYLOAD[:10].tobytes()
    good.close()


def test_a_replayed_request_is_refused(server: DataServer) -> None:
    raw = RawClient(server.port)
    try:
        frame = raw.sealed(request(op="sum", length=100))
        raw.sock.sendall(frame)
        assert raw.reply_record()  # answered
        raw.sock.sendall(frame)  # the same record again, on the same connection
        assert raw.reply_record() == b""  # refused
        assert raw.reply_record() is None  # and the server hung up
    finally:
        raw.close()
    # The whole recorded opening (salt and request) replayed on a new connection: the
    # server's new salt makes other keys.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.recv(HELLO, socket.MSG_WAITALL)
        s.sendall(raw.client_salt + frame)
        assert s.recv(4, socket.MSG_WAITALL) == struct.pack("!I", wire.REFUSED)


def test_replayed_or_reordered_replies_do_not_open(server: DataServer) -> None:
    raw = RawClient(server.port)
    try:
        records = []
        for offset in (0, 100):
            raw.sock.sendall(raw.sealed(request(op="sum", offset=offset, length=100)))
            record = raw.reply_record()
            assert record
            records.append(record)
    finally:
        raw.close()
    opener = wire.Sealer(raw.k_rep)
    assert msgpack.unpackb(opener.open(records[0]))["sum"] == checksum(PAYLOAD[:100])
    with pytest.raises(wire.AuthenticationError):
        opener.open(records[0])  # replayed as the second reply
    with pytest.raises(wire.AuthenticationError):
        wire.Sealer(raw.k_rep).open(records[1])  # the second reply first


def test_a_connection_is_rekeyed_after_its_byte_budget(
    server: DataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "REKEY_BYTES", 50_000)
    connects = []
    connect = Transport._connect

    def counted(self: Transport, key: tuple[str, int]) -> object:
        connects.append(key)
        return connect(self, key)

    monkeypatch.setattr(Transport, "_connect", counted)
    t = Transport("here", TOKEN, force_tcp=True)
    try:
        for _ in range(3):
            assert read(t, server.port, 20_000) == PAYLOAD[:20_000].tobytes()
        assert len(connects) == 1  # 60 KB on one connection: the last read began below 50 KB
        assert read(t, server.port, 10) == PAYLOAD[:10].tobytes()
        assert len(connects) == 2  # past the budget: fresh salts, fresh keys
    finally:
        t.close()
