"""The data servers' wire protocol: framing, keys, MACs and limits (no I/O policy).

:mod:`snapstore.node.transport` (the client) and
:mod:`snapstore.node.dataserver` (the server) speak it.

Version 2 (nothing is unpickled; headers are msgpack)::

    server, on accept:  [u32 n][msgpack {"v": 2, "nonce": 16 random bytes}]
    client, request i:  [u32 n][msgpack {"op", "name", "offset", "length", "seq": i}]
                        [32-byte HMAC-SHA256(K_req, nonce | body)]
    server, reply i:    [u32 n][msgpack {"ok", "length", "sum" | "error"}][length bytes]
                        [32-byte HMAC-SHA256(K_rep, nonce | i as u64 | header | payload)]

``K_req`` and ``K_rep`` are derived from the store's secret token (in the
0600 state file, given to SMPs through the authenticated Ray cluster); the
token itself never crosses the network. The server checks a request's MAC
before parsing it, so an unauthenticated peer never reaches the msgpack
decoder, and ``seq`` must count up from 0 on the connection, so a request
recorded on the wire cannot be replayed (the nonce is fresh per
connection). The client checks every reply's MAC, so bytes injected or
altered in transit are refused. Not protected: confidentiality. Snapshot
bytes cross between hosts in the clear (docs/operating.md, Security: run
the cluster network private, or under IPsec/WireGuard).

Limits (a data server faces every host of the cluster network): at most
:data:`MAX_CONNECTIONS` connections, of which at most
:data:`MAX_UNAUTHENTICATED` have not yet sent an authenticated request (past
that, the oldest of those is dropped); a request header of at most
:data:`MAX_REQUEST` bytes, arriving whole within :data:`HEADER_TIMEOUT` once
begun; a first request within :data:`AUTH_TIMEOUT`, later ones within
:data:`IDLE_TIMEOUT`; every send and receive of bytes within
:data:`IO_TIMEOUT`; ``offset``, ``length`` and ``seq`` must be msgpack
integers, the range inside the segment. A flood of connections can slow
reads down (denial of service), not read or alter a byte.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import time
from typing import Any

from snapstore.errors import SnapstoreError
from snapstore.node.segments import parse_name

__all__ = [
    "AUTH_TIMEOUT",
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "IO_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "MAX_UNAUTHENTICATED",
    "PROTOCOL",
    "ChunkUnavailableError",
    "Mac",
    "NoMac",
    "check_name",
    "keys",
    "recv_exact_into",
    "recv_frame",
    "wait_readable",
]

PROTOCOL = 2
HDR = struct.Struct("!I")
SEQ = struct.Struct("!Q")
NONCE = 16
TAG = 32
MAX_REQUEST = 4096
"""Largest request header a server reads (a request is ~100 bytes)."""
MAX_REPLY = 1 << 16
IO_BLOCK = 8 << 20
MAX_CONNECTIONS = 256
MAX_UNAUTHENTICATED = 32
AUTH_TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
IO_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0


class ChunkUnavailableError(SnapstoreError):
    """A peer's chunk cannot be read: its node or SMP is gone, or the file is missing."""


def check_name(name: str) -> None:
    if "/" in name or parse_name(name) is None:
        raise ChunkUnavailableError(f"not a segment name: {name!r:.80}")


def keys(token: str) -> tuple[bytes, bytes]:
    """(K_req, K_rep): the request and reply MAC keys of a store token."""
    secret = token.encode()
    return (
        hmac.digest(secret, b"snapstore data server v2: requests", "sha256"),
        hmac.digest(secret, b"snapstore data server v2: replies", "sha256"),
    )


class Mac:
    """HMAC-SHA256 of one message, fed in pieces (OpenSSL; releases the GIL on big pieces)."""

    def __init__(self, key: bytes) -> None:
        self._h = hmac.new(key, digestmod=hashlib.sha256)

    def update(self, data: Any) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()


class NoMac(Mac):
    """No authentication: only :mod:`snapstore.bench.transport` uses it, to measure the MAC."""

    def __init__(self, key: bytes) -> None:
        pass

    def update(self, data: Any) -> None:
        pass

    def digest(self) -> bytes:
        return bytes(TAG)


def recv_exact_into(sock: socket.socket, buf: memoryview, deadline: float | None = None) -> None:
    """Fill ``buf``; with ``deadline`` (monotonic), all of it by then (a trickle is cut off)."""
    while len(buf):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("peer too slow to send a header")
            sock.settimeout(left)
        n = sock.recv_into(buf, min(len(buf), IO_BLOCK))
        if n == 0:
            raise EOFError("connection closed mid-transfer")
        buf = buf[n:]


def recv_frame(sock: socket.socket, limit: int, deadline: float) -> bytes:
    """One length-prefixed frame of at most ``limit`` bytes, whole by ``deadline``."""
    raw = bytearray(HDR.size)
    recv_exact_into(sock, memoryview(raw), deadline)
    (n,) = HDR.unpack(raw)
    if n > limit:
        raise ValueError(f"header of {n} bytes exceeds {limit}")
    body = bytearray(n)
    recv_exact_into(sock, memoryview(body), deadline)
    sock.settimeout(IO_TIMEOUT)
    return bytes(body)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether a byte (or EOF) arrives within ``timeout``; the byte stays in the socket."""
    sock.settimeout(timeout)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return False
    return True
