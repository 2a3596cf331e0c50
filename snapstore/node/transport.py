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

The wire protocol (authenticated requests and replies, limits) is
:mod:`snapstore.node.wire`; the server side :mod:`snapstore.node.dataserver`.
"""

from __future__ import annotations

import hmac
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
    Mac,
    NoMac,
    check_name,
    recv_exact_into,
    recv_frame,
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
    """A client connection: its socket, the server's nonce, the next sequence number."""

    sock: socket.socket
    nonce: bytes
    seq: int = 0
    used: float = 0.0


class Transport:
    """Reads byte ranges of peers' segments. Thread-safe.

    ``_authenticate=False`` (with a server made the same way) drops the MACs,
    only to measure what they cost.
    """

    def __init__(
        self, host: str, token: str, force_tcp: bool = False, *, _authenticate: bool = True
    ) -> None:
        self._host = host
        self._req_key, self._rep_key = wire.keys(token)
        self._mac: type[Mac] = Mac if _authenticate else NoMac
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
            nonce = hello.get("nonce")
            if not isinstance(nonce, bytes) or len(nonce) != wire.NONCE:
                raise ValueError("data server sent no nonce")
            sock.settimeout(wire.IO_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, nonce)

    def _pooled(self, key: tuple[str, int]) -> _Conn | None:
        now = time.monotonic()
        with self._lock:
            pool = self._conns.setdefault(key, [])
            while pool:
                c = pool.pop()
                if now - c.used < _POOL_IDLE:
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
        """One authenticated request and its verified reply; the connection stays usable
        unless this raises."""
        seq = conn.seq
        conn.seq += 1
        body = msgpack.packb(dict(req, seq=seq), use_bin_type=True)
        mac = self._mac(self._req_key)
        mac.update(conn.nonce + body)
        conn.sock.sendall(wire.HDR.pack(len(body)) + body + mac.digest())
        head = recv_frame(conn.sock, wire.MAX_REPLY, time.monotonic() + wire.IO_TIMEOUT)
        tag = self._mac(self._rep_key)
        tag.update(conn.nonce + wire.SEQ.pack(seq) + head)
        reply = msgpack.unpackb(head, raw=False)
        if not isinstance(reply, dict):
            raise ValueError("reply header is not a map")
        n = reply.get("length", 0) if reply.get("ok") else 0
        if type(n) is not int or n < 0 or n > (0 if dest is None else len(dest)):
            raise ValueError(f"reply announces {n!r:.40} bytes for a {req.get('length')}-byte read")
        if n:
            assert dest is not None
            view = dest.data.cast("B")[:n]
            for at in range(0, n, wire.IO_BLOCK):
                block = view[at : at + wire.IO_BLOCK]
                recv_exact_into(conn.sock, block)
                tag.update(block)
        got = bytearray(wire.TAG)
        recv_exact_into(conn.sock, memoryview(got))
        if not hmac.compare_digest(bytes(got), tag.digest()):
            # Nothing of this reply is trusted; the connection is dropped.
            raise ValueError(
                "reply fails authentication (altered in transit, or the peer holds another "
                f"store token; it said {reply.get('error', 'ok')!s:.200})"
            )
        return reply
