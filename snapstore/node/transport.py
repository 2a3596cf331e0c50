"""How SMPs read each other's chunks: shared memory on one host, TCP across hosts.

Parity and rebuilds need byte ranges of segments held by other nodes' SMPs.

- Same host (the embedded cluster, or several raylets on one machine): the
  reader maps the peer's segment file read-only and uses it in place, with
  no copy at all, as NCCL and Ray's object store do for same-host peers.
- Otherwise: every SMP runs a :class:`DataServer`, a small TCP server on its
  node's address that streams ranges of its segments, and answers checksum
  requests computed where the bytes are.

The ``tcp`` setting forces TCP even between same-host peers, to measure or
test the cross-host path on one machine.

The wire protocol (requests and replies sealed with AES-256-GCM under keys
derived from the store's token, limits) is :mod:`snapstore.node.wire`; the
server side :mod:`snapstore.node.dataserver`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from snapstore.coding import checksum
from snapstore.format.work import PeerInfo
from snapstore.node import wire
from snapstore.node.dataserver import DataServer
from snapstore.node.segments import MappingCache
from snapstore.node.wire import (
    ChunkUnavailableError,
    Sealer,
    check_name,
    recv_frame,
    recv_payload_into,
    recv_sealed,
    send_sealed,
    staging_buffer,
)

__all__ = ["ChunkUnavailableError", "DataServer", "PeerInfo", "Transport", "host_key"]

logger = logging.getLogger(__name__)

MAPPINGS_KEPT = 64
"""Peers' segments a Transport keeps mapped (a few per rank and parity holder it reads)."""
_POOL_IDLE = wire.IDLE_TIMEOUT / 2  # a client drops pooled connections the server may soon close


def host_key() -> str:
    """Identifies this machine (and boot): equal keys mean shared memory is shared."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


@dataclass
class _Conn:
    """A client connection: its socket, its two directions' sealers, a staging buffer."""

    sock: socket.socket
    requests: Sealer
    replies: Sealer
    staging: bytearray | None = None
    used: float = 0.0

    def fresh(self, now: float) -> bool:
        """Whether to reuse it: not idle long enough for the server to close it, and its
        keys not past :data:`~snapstore.node.wire.REKEY_BYTES`."""
        carried = self.requests.bytes + self.replies.bytes
        return now - self.used < _POOL_IDLE and carried < wire.REKEY_BYTES


class Transport:
    """Reads byte ranges of peers' segments. Thread-safe.

    ``_seal=False`` (with a server made the same way) sends plaintext, only
    to measure what sealing costs.
    """

    def __init__(
        self, host: str, token: str, force_tcp: bool = False, *, _seal: bool = True
    ) -> None:
        self._host = host
        self._token = token
        self._seal = _seal
        self._force_tcp = force_tcp
        self._lock = threading.Lock()
        self._maps = MappingCache(MAPPINGS_KEPT)
        self._conns: dict[tuple[str, int], list[_Conn]] = {}

    def same_host(self, peer: PeerInfo) -> bool:
        return not self._force_tcp and peer.host == self._host

    # -- reading -------------------------------------------------------------

    def view(self, peer: PeerInfo, name: str, offset: int, length: int) -> np.ndarray | None:
        """A zero-copy read-only view of the range, or None when the peer is on another host."""
        if not self.same_host(peer):
            return None
        check_name(name)
        path = os.path.join(peer.directory, name)
        try:
            with self._lock:
                seg, _ = self._maps.get(path)
        except OSError as e:
            raise ChunkUnavailableError(
                f"node {peer.node_id[:12]}: cannot map {name}: {e.strerror}"
            ) from None
        try:
            return seg.view(offset, length)
        except ValueError as e:
            raise ChunkUnavailableError(f"node {peer.node_id[:12]}: {e}") from None

    def read_into(self, peer: PeerInfo, name: str, offset: int, dest: np.ndarray) -> None:
        """Copy ``len(dest)`` bytes at ``offset`` of the peer's segment into ``dest``."""
        v = self.view(peer, name, offset, len(dest))
        if v is not None:
            np.copyto(dest, v)
            return
        reply = self._request(
            peer, {"op": "read", "name": name, "offset": offset, "length": len(dest)}, dest
        )
        if reply.get("length") != len(dest):
            raise ChunkUnavailableError(f"node {peer.node_id[:12]}: short read of {name}")

    def checksum(self, peer: PeerInfo, name: str, offset: int, length: int) -> int:
        """Checksum of a range, computed where the bytes are."""
        v = self.view(peer, name, offset, length)
        if v is not None:
            return checksum(v)
        reply = self._request(peer, {"op": "sum", "name": name, "offset": offset, "length": length})
        return int(reply["sum"])

    def forget(self, directory: str) -> None:
        """Drop cached mappings of a peer's directory (its node was lost)."""
        with self._lock:
            self._maps.drop_under(directory)

    def close(self) -> None:
        with self._lock:
            self._maps.close()
            for conns in self._conns.values():
                for c in conns:
                    c.sock.close()
            self._conns.clear()

    # -- TCP -----------------------------------------------------------------

    def _connect(self, key: tuple[str, int]) -> _Conn:
        sock = socket.create_connection(key, timeout=wire.CONNECT_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            body = recv_frame(sock, wire.MAX_REPLY, time.monotonic() + wire.CONNECT_TIMEOUT)
            hello = msgpack.unpackb(body, raw=False)
            if not isinstance(hello, dict) or hello.get("v") != wire.PROTOCOL:
                found = hello.get("v") if isinstance(hello, dict) else None
                raise ValueError(f"data server speaks protocol {found!r}, not {wire.PROTOCOL}")
            server_salt = hello.get("salt")
            if not isinstance(server_salt, bytes) or len(server_salt) != wire.SALT:
                raise ValueError("data server sent no salt")
            client_salt = wire.new_salt()
            k_req, k_rep = wire.keys(self._token, server_salt, client_salt)
            sock.settimeout(wire.IO_TIMEOUT)
            sock.sendall(client_salt)
        except BaseException:
            sock.close()
            raise
        seal = self._seal
        return _Conn(sock, Sealer(k_req if seal else None), Sealer(k_rep if seal else None))

    def _pooled(self, key: tuple[str, int]) -> _Conn | None:
        now = time.monotonic()
        with self._lock:
            pool = self._conns.setdefault(key, [])
            while pool:
                c = pool.pop()
                if c.fresh(now):
                    return c
                c.sock.close()
        return None

    def _request(
        self, peer: PeerInfo, req: dict[str, Any], dest: np.ndarray | None = None
    ) -> dict[str, Any]:
        key = (peer.address, peer.port)
        conn = self._pooled(key)
        try:
            if conn is None:
                conn = self._connect(key)
            reply = self._exchange(conn, req, dest)
        except (
            OSError,
            EOFError,
            ValueError,
            OverflowError,
            TypeError,
            msgpack.UnpackException,
        ) as e:
            if conn is not None:
                conn.sock.close()
            raise ChunkUnavailableError(
                f"node {peer.node_id[:12]} at {peer.address}:{peer.port}: {e}"
            ) from None
        except BaseException:
            if conn is not None:
                conn.sock.close()
            raise
        conn.used = time.monotonic()
        with self._lock:
            self._conns.setdefault(key, []).append(conn)
        if not reply.get("ok"):
            raise ChunkUnavailableError(
                f"node {peer.node_id[:12]}: {reply.get('error', 'request failed')}"
            )
        return reply

    def _exchange(
        self, conn: _Conn, req: dict[str, Any], dest: np.ndarray | None
    ) -> dict[str, Any]:
        """One sealed request and its reply, opened; the connection stays usable unless
        this raises (then ``dest`` holds bytes that mean nothing)."""
        send_sealed(conn.sock, conn.requests, msgpack.packb(req, use_bin_type=True))
        head = recv_sealed(
            conn.sock, conn.replies, wire.MAX_REPLY, time.monotonic() + wire.IO_TIMEOUT
        )
        reply = msgpack.unpackb(head, raw=False)
        if not isinstance(reply, dict):
            raise ValueError("reply header is not a map")
        n = reply.get("length", 0) if reply.get("ok") else 0
        if type(n) is not int or n < 0 or n > (0 if dest is None else len(dest)):
            raise ValueError(f"reply announces {n!r:.40} bytes for a {req.get('length')}-byte read")
        if n:
            assert dest is not None
            conn.staging = conn.staging or staging_buffer()
            recv_payload_into(conn.sock, conn.replies, dest.data.cast("B")[:n], conn.staging)
        return reply
