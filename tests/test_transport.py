"""Reading peers' segments: zero-copy maps on one host, the DataServer over TCP on loopback.

Every way a read can fail (bad token, a name that is no segment or escapes
the directory, a missing file, a range past the end) must surface as
ChunkUnavailableError, which the byte engine treats as a lost source, and
must leave the server answering the next request.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from snapstore.coding import checksum
from snapstore.node import wire
from snapstore.node.segments import Segment, data_name, parity_name
from snapstore.node.transport import (
    ChunkUnavailableError,
    DataServer,
    PeerInfo,
    Transport,
    host_key,
)

TOKEN = "secret"
NAME = data_name("job", 0, 3)
SIZE = 10_000


def _resolver(directory: Path) -> Callable[[str], np.ndarray]:
    def resolve(name: str) -> np.ndarray:
        try:
            return Segment.open(str(directory / name)).array
        except OSError as e:
            raise ChunkUnavailableError(f"{name}: {e.strerror}") from None

    return resolve


@pytest.fixture(scope="module")
def payload() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8)


def _write_node(d: Path, payload: np.ndarray) -> Path:
    d.mkdir()
    (d / NAME).write_bytes(payload.tobytes())
    return d


@pytest.fixture
def node_dir(tmp_path: Path, payload: np.ndarray) -> Path:
    """A node directory of one's own: same-host tests replace and delete its file."""
    return _write_node(tmp_path / "node", payload)


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory: pytest.TempPathFactory, payload: np.ndarray) -> Path:
    """The directory behind the shared server; nothing may change it."""
    return _write_node(tmp_path_factory.mktemp("served") / "node", payload)


@pytest.fixture(scope="module")
def server(served_dir: Path) -> Iterator[DataServer]:
    # One server for the module: stop() waits out a 0.5 s poll.
    s = DataServer("127.0.0.1", TOKEN, _resolver(served_dir))
    yield s
    s.stop()


def _peer(node_dir: Path, port: int = 0, host: str | None = None) -> PeerInfo:
    return PeerInfo("node-a", host or host_key(), str(node_dir), "127.0.0.1", port)


@pytest.fixture
def tcp(server: DataServer, served_dir: Path) -> Iterator[tuple[Transport, PeerInfo]]:
    t = Transport(host_key(), TOKEN, force_tcp=True)
    yield t, _peer(served_dir, server.port)
    t.close()


def test_peer_info_round_trips_through_a_dict(node_dir: Path) -> None:
    p = _peer(node_dir, 1234)
    assert PeerInfo.from_dict(p.to_dict()) == p
    assert host_key() == host_key()


# -- TCP ------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length"), [(0, SIZE), (0, 0), (1, 63), (4097, 3000)])
def test_tcp_reads_and_sums_ranges(
    tcp: tuple[Transport, PeerInfo], payload: np.ndarray, offset: int, length: int
) -> None:
    t, peer = tcp
    assert not t.same_host(peer), "force_tcp must not map same-host files"
    assert t.view(peer, NAME, offset, length) is None
    dest = np.full(length, 0xAA, dtype=np.uint8)
    t.read_into(peer, NAME, offset, dest)
    assert dest.tobytes() == payload[offset : offset + length].tobytes()
    assert t.checksum(peer, NAME, offset, length) == checksum(payload[offset : offset + length])


def test_tcp_read_spanning_many_records(tmp_path: Path) -> None:
    # Replies go out in sealed records of 256 KiB; one read spans 33 of them.
    big = np.random.default_rng(1).integers(0, 256, (8 << 20) + 4099, dtype=np.uint8)
    (tmp_path / NAME).write_bytes(big.tobytes())
    s = DataServer("127.0.0.1", TOKEN, _resolver(tmp_path))
    t = Transport(host_key(), TOKEN, force_tcp=True)
    try:
        dest = np.empty(len(big) - 5, dtype=np.uint8)
        t.read_into(_peer(tmp_path, s.port), NAME, 5, dest)
        assert np.array_equal(dest, big[5:])
    finally:
        t.close()
        s.stop()


def _assert_still_serving(t: Transport, peer: PeerInfo, payload: np.ndarray) -> None:
    dest = np.empty(100, dtype=np.uint8)
    t.read_into(peer, NAME, 10, dest)
    assert dest.tobytes() == payload[10:110].tobytes()


@pytest.mark.parametrize(
    ("name", "offset", "length", "why"),
    [
        ("../node/" + NAME, 0, 10, "not a segment name"),
        ("sub/" + NAME, 0, 10, "not a segment name"),
        ("passwd", 0, 10, "not a segment name"),
        (data_name("job", 9, 3), 0, 10, "No such file"),
        (parity_name("job", 3, 0), 0, 10, "No such file"),
        (NAME, SIZE - 5, 6, "outside"),
        (NAME, SIZE + 1, 0, "outside"),
        (NAME, -1, 10, "non-negative"),
    ],
    ids=[
        "dotdot",
        "slash",
        "no-pattern",
        "unknown-data",
        "unknown-parity",
        "past-end",
        "start-past-end",
        "negative",
    ],
)
def test_tcp_bad_requests_are_chunk_unavailable_and_server_keeps_serving(
    tcp: tuple[Transport, PeerInfo],
    payload: np.ndarray,
    name: str,
    offset: int,
    length: int,
    why: str,
) -> None:
    t, peer = tcp
    with pytest.raises(ChunkUnavailableError, match=why):
        t.read_into(peer, name, offset, np.empty(length, dtype=np.uint8))
    with pytest.raises(ChunkUnavailableError, match=why):
        t.checksum(peer, name, offset, length)
    _assert_still_serving(t, peer, payload)


def test_tcp_bad_token_is_refused_and_server_keeps_serving(
    server: DataServer, served_dir: Path, payload: np.ndarray
) -> None:
    peer = _peer(served_dir, server.port)
    intruder = Transport(host_key(), "wrong", force_tcp=True)
    good = Transport(host_key(), TOKEN, force_tcp=True)
    try:
        with pytest.raises(ChunkUnavailableError, match="bad token"):
            intruder.read_into(peer, NAME, 0, np.empty(10, dtype=np.uint8))
        with pytest.raises(ChunkUnavailableError, match="bad token"):
            intruder.checksum(peer, NAME, 0, 10)
        _assert_still_serving(good, peer, payload)
    finally:
        intruder.close()
        good.close()


def test_tcp_unreachable_peer_is_chunk_unavailable(node_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        t = Transport(host_key(), TOKEN, force_tcp=True)
        with pytest.raises(ChunkUnavailableError, match="node-a"):
            t.checksum(_peer(node_dir, port), NAME, 0, 10)
        t.close()


def _frame(s: socket.socket) -> bytes | None:
    head = s.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("!I", head)
    return s.recv(n, socket.MSG_WAITALL)


def _raw_request(port: int, body: bytes, token: str = TOKEN) -> dict[str, object] | None:
    """Send one request sealed with ``token``'s key as protocol 3 does; return the opened
    reply header, ``{"refused": True}`` for a refusal, or None if the server hung up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        frame = _frame(s)
        assert frame is not None, "the server hung up before its hello"
        hello = msgpack.unpackb(frame, raw=False)
        client_salt = os.urandom(wire.SALT)
        k_req, k_rep = wire.keys(token, hello["salt"], client_salt)
        record = wire.Sealer(k_req).seal(body)
        s.sendall(client_salt + struct.pack("!I", len(record)) + record)
        head = s.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            return None
        (n,) = struct.unpack("!I", head)
        if n == wire.REFUSED:
            return {"refused": True}
        reply: dict[str, object] = msgpack.unpackb(
            wire.Sealer(k_rep).open(s.recv(n, socket.MSG_WAITALL)), raw=False
        )
        return reply


def _req(**kw: object) -> bytes:
    return msgpack.packb({"op": "read", "name": NAME, "offset": 0, "length": 1, **kw})


@pytest.mark.parametrize(
    ("body", "answered"),
    [
        (b"\xc1\xc1\xc1", True),  # authenticated, not msgpack: an error, then hang up
        (msgpack.packb([1, 2, 3]), True),  # not a map: an error, then hang up
        (_req(op="sum", offset="x"), True),
        (_req(op="dance"), True),
        (_req(name=5), True),
        (_req(offset=float("inf")), True),
        (_req(length=2**64 - 1), True),
    ],
    ids=[
        "garbage",
        "not-a-map",
        "bad-offset",
        "unknown-op",
        "name-not-str",
        "offset-inf",
        "length-huge",
    ],
)
def test_malformed_requests_never_stop_the_server(
    tcp: tuple[Transport, PeerInfo], payload: np.ndarray, body: bytes, answered: bool
) -> None:
    t, peer = tcp
    reply = _raw_request(peer.port, body)
    assert reply is not None and reply.get("ok") is False and reply.get("error")
    _assert_still_serving(t, peer, payload)


def test_unauthenticated_requests_are_refused_before_parsing(
    tcp: tuple[Transport, PeerInfo], payload: np.ndarray
) -> None:
    t, peer = tcp
    for body in (_req(), b"\xc1"):
        assert _raw_request(peer.port, body, token="guess") == {"refused": True}
    _assert_still_serving(t, peer, payload)


def test_oversized_header_is_dropped(tcp: tuple[Transport, PeerInfo], payload: np.ndarray) -> None:
    t, peer = tcp
    with socket.create_connection(("127.0.0.1", peer.port), timeout=10) as s:
        assert _frame(s) is not None  # the hello
        s.sendall(os.urandom(wire.SALT) + struct.pack("!I", 1 << 30))  # salt, then a huge length
        assert s.recv(4) == b""  # the server hangs up rather than buffer a gigabyte
    _assert_still_serving(t, peer, payload)


def test_tcp_offset_beyond_64_bits_is_chunk_unavailable(
    tcp: tuple[Transport, PeerInfo],
) -> None:
    t, peer = tcp
    with pytest.raises(ChunkUnavailableError):
        t.checksum(peer, NAME, 1 << 64, 1)


def test_stopped_server_serves_no_pooled_connection(node_dir: Path) -> None:
    s = DataServer("127.0.0.1", TOKEN, _resolver(node_dir))
    t = Transport(host_key(), TOKEN, force_tcp=True)
    peer = _peer(node_dir, s.port)
    try:
        t.checksum(peer, NAME, 0, 10)  # leaves a pooled connection
        s.stop()
        with pytest.raises(ChunkUnavailableError):
            t.checksum(peer, NAME, 0, 10)
    finally:
        t.close()


# -- same host ------------------------------------------------------------------


def test_same_host_view_is_zero_copy_and_read_only(node_dir: Path, payload: np.ndarray) -> None:
    t = Transport(host_key(), TOKEN)
    peer = _peer(node_dir)
    assert t.same_host(peer)
    v = t.view(peer, NAME, 100, 50)
    assert v is not None and v.tobytes() == payload[100:150].tobytes()
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[0] = 1
    # Zero copy: a write by the owner through its own mapping shows in the view.
    owner = Segment.open(str(node_dir / NAME), writable=True)
    owner.array[100] ^= 0xFF
    assert v[0] == payload[100] ^ 0xFF
    owner.array[100] ^= 0xFF
    owner.close()
    dest = np.empty(50, dtype=np.uint8)
    t.read_into(peer, NAME, 100, dest)
    assert dest.tobytes() == payload[100:150].tobytes()
    assert t.checksum(peer, NAME, 100, 50) == checksum(payload[100:150])
    t.close()


def test_same_host_view_follows_a_file_replaced_under_the_same_name(
    node_dir: Path, payload: np.ndarray
) -> None:
    t = Transport(host_key(), TOKEN)
    peer = _peer(node_dir)
    old = t.view(peer, NAME, 0, 16)
    assert old is not None
    new = Segment.create(str(node_dir / NAME), SIZE)  # a new step reuses the name
    new.array[:] = 0x5A
    v = t.view(peer, NAME, 0, 16)
    assert v is not None and v.tobytes() == b"\x5a" * 16
    # The earlier view still shows the bytes it was taken from, not the new file.
    assert old.tobytes() == payload[:16].tobytes()
    # Same inode, new size: noticed too.
    new.close()
    os.truncate(node_dir / NAME, 2 * SIZE)
    v = t.view(peer, NAME, 2 * SIZE - 8, 8)
    assert v is not None and v.tobytes() == b"\0" * 8
    t.close()


def test_segment_still_current(node_dir: Path) -> None:
    path = str(node_dir / NAME)
    seg = Segment.open(path)
    assert seg.still_current()
    Segment.create(path, SIZE).close()
    assert not seg.still_current()
    seg.close()
    seg = Segment.open(path)
    os.unlink(path)
    assert not seg.still_current()
    seg.close()


@pytest.mark.parametrize(
    ("name", "offset", "length", "why"),
    [
        ("sub/" + NAME, 0, 1, "not a segment name"),
        ("passwd", 0, 1, "not a segment name"),
        (data_name("job", 9, 3), 0, 1, "cannot map"),
        (NAME, SIZE, 1, "outside"),
        (NAME, -1, 1, "outside"),
    ],
    ids=["slash", "no-pattern", "missing", "past-end", "negative"],
)
def test_same_host_bad_reads_are_chunk_unavailable(
    node_dir: Path, name: str, offset: int, length: int, why: str
) -> None:
    t = Transport(host_key(), TOKEN)
    peer = _peer(node_dir)
    with pytest.raises(ChunkUnavailableError, match=why):
        t.view(peer, name, offset, length)
    with pytest.raises(ChunkUnavailableError, match=why):
        t.checksum(peer, name, offset, length)
    t.close()


def test_other_host_peer_gets_no_view(node_dir: Path) -> None:
    t = Transport(host_key(), TOKEN)
    assert t.view(_peer(node_dir, host="elsewhere/boot"), NAME, 0, 1) is None


def test_a_file_gone_is_unavailable_even_when_mapped_before(
    node_dir: Path, payload: np.ndarray
) -> None:
    t = Transport(host_key(), TOKEN)
    peer = _peer(node_dir)
    assert t.checksum(peer, NAME, 0, 10) == checksum(payload[:10])
    os.unlink(node_dir / NAME)
    # The cached mapping still holds the old bytes; it must not answer for a lost file.
    with pytest.raises(ChunkUnavailableError):
        t.checksum(peer, NAME, 0, 10)
    # After forget() (the node was lost) a node that comes back is read afresh.
    t.forget(str(node_dir))
    (node_dir / NAME).write_bytes(payload[::-1].tobytes())
    assert t.checksum(peer, NAME, 0, 10) == checksum(payload[::-1][:10].copy())
    t.close()


def test_a_slot_renamed_from_step_to_step_stays_one_mapping(node_dir: Path) -> None:
    """A peer reads the same slot under a new name each step: no new mapping, no growth."""
    t = Transport(host_key(), TOKEN)
    peer = _peer(node_dir)
    first = t.view(peer, NAME, 0, 8)
    assert first is not None
    for step in range(4, 200):
        name = data_name("job", 0, step)
        os.rename(node_dir / data_name("job", 0, step - 1), node_dir / name)
        v = t.view(peer, name, 0, 8)
        # The same memory as the first view: the mapping was reused, not redone.
        assert v is not None and v.ctypes.data == first.ctypes.data
    assert len(t._maps) == 1
    t.close()


def test_mappings_are_bounded_and_a_deleted_file_is_unmapped(node_dir: Path) -> None:
    """Readers must not keep a dropped slot's memory alive, nor map without bound."""
    from snapstore.node.segments import MappingCache

    closed: list[tuple[int, int]] = []
    cache = MappingCache(3, on_close=lambda key, seg: closed.append(key))
    paths = []
    for i in range(5):
        p = node_dir / data_name("job", 1, i)
        p.write_bytes(bytes([i]) * 64)
        paths.append(str(p))
        cache.get(paths[-1])
    assert len(cache) == 3 and len(closed) == 2  # the two least recently used went
    seg, key = cache.get(paths[2])  # a hit moves it to the back
    _, deleted = cache.get(paths[3])
    os.unlink(paths[3])
    cache.get(paths[0])  # a miss: the deleted file's mapping goes first
    assert closed[2:] == [deleted]
    assert len(cache) == 3 and key not in closed
    assert seg.array[0] == 2
    with pytest.raises(FileNotFoundError):
        cache.get(paths[3])
    cache.close()
    assert len(cache) == 0


def test_stop_wakes_the_accept_loop_instead_of_waiting_for_its_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accept loop polls for its stop flag rarely (an idle SMP pays per wakeup); stop()
    must not wait for that poll: with a poll of a minute, it still returns at once."""
    import threading

    from snapstore.node import dataserver

    monkeypatch.setattr(dataserver, "POLL_INTERVAL", 60.0)
    s = DataServer("127.0.0.1", TOKEN, _resolver(tmp_path))
    done = threading.Event()

    def stop() -> None:
        s.stop()
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    assert done.wait(20.0), "stop() waited for the accept loop's poll"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=1.0).close()
