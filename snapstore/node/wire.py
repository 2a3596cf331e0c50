"""The data servers' wire protocol: framing, keys, sealed records and limits (no I/O policy).

:mod:`snapstore.node.transport` (the client) and
:mod:`snapstore.node.dataserver` (the server) speak it.

Version 3: after a two-line handshake every byte is sealed with AES-256-GCM
(authenticated encryption), requests and replies alike; headers are msgpack,
nothing is unpickled::

    server, on accept:  [u32 n][msgpack {"v": 3, "salt": S}]      S: 16 random bytes
    client, once:       [C]                                        C: 16 random bytes
    client, request:    [u32 n][sealed msgpack {"op", "name", "offset", "length"}]
    server, reply:      [u32 n][sealed msgpack {"ok", "length", "sum" | "error"}]
                        then ``length`` payload bytes as sealed records of
                        :data:`RECORD` bytes (the last one shorter), no prefix

A sealed record is the ciphertext and its 16-byte GCM tag. Each direction of
each connection has its own key, ``HKDF-SHA256(ikm=token, salt=S | C,
info=direction)``: the store's secret token (in the 0600 state file, given
to SMPs through the authenticated Ray cluster) never crosses the network,
and since both ends add fresh randomness to the salt, neither a replayed
hello nor a replayed client can make an honest end reuse a key. The nonce
of a record is its number in its direction (a 96-bit counter from 0), so no
(key, nonce) pair is ever used twice, and a record that is replayed,
reordered, dropped or altered fails to open: the receiver drops the
connection and trusts nothing of it. The server opens a request before
parsing it, so an unauthenticated peer never reaches the msgpack decoder; a
request that fails to open is answered with the plain length
:data:`REFUSED` ("bad token"), and the server hangs up. A client reconnects
(fresh keys) once a connection has carried :data:`REKEY_BYTES`.

What a peer on the cluster network sees: connection timing, record sizes
(so the lengths of requests and replies), the salts. Not the token, not a
segment name, range or checksum, not a byte of any snapshot.

Limits (a data server faces every host of the cluster network): at most
:data:`MAX_CONNECTIONS` connections, of which at most
:data:`MAX_UNAUTHENTICATED` have not yet sent an authenticated request (past
that, the oldest of those is dropped); a request record of at most
:data:`MAX_REQUEST` bytes, arriving whole within :data:`HEADER_TIMEOUT` once
begun (the client's salt with the first); a first request within
:data:`AUTH_TIMEOUT`, later ones within :data:`IDLE_TIMEOUT`; every send and
receive of bytes within :data:`IO_TIMEOUT`; ``offset`` and ``length`` must
be msgpack integers, the range inside the segment. A flood of connections
can slow reads down (denial of service), not read or alter a byte.
"""

from __future__ import annotations

import secrets
import socket
import struct
import time
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
    "RECORD",
    "REFUSED",
    "REKEY_BYTES",
    "AuthenticationError",
    "ChunkUnavailableError",
    "Sealer",
    "check_name",
    "keys",
    "new_salt",
    "plain_hello",
    "recv_exact_into",
    "recv_frame",
    "recv_payload_into",
    "recv_sealed",
    "send_payload",
    "send_sealed",
    "staging_buffer",
    "wait_readable",
]

PROTOCOL = 3
HDR = struct.Struct("!I")
SALT = 16
TAG = 16
KEY = 32
REFUSED = 0xFFFFFFFF
"""The length a server sends instead of a reply to a request that fails to open."""
RECORD = 256 << 10
"""Payload bytes per sealed record (a staging buffer per connection this big). A record
this small stays in cache between sealing and sending, opening and placing: read through
bench.transport's pair, interleaved in one process, 256 KiB records took 1.65x the plaintext
path's time where 1 MiB ones took 1.9x."""
REKEY_BYTES = 1 << 36
"""Bytes a client sends and receives on one connection (one pair of keys) before it
reconnects: AES-GCM's margin stays near 2**-64 per key."""
MAX_REQUEST = 4096
"""Largest request a server opens (a request is ~100 bytes)."""
MAX_REPLY = 1 << 16
IO_BLOCK = 8 << 20
MAX_CONNECTIONS = 256
MAX_UNAUTHENTICATED = 32
AUTH_TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
IO_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0

_INFO_REQ = b"snapstore data server v3: requests"
_INFO_REP = b"snapstore data server v3: replies"


class ChunkUnavailableError(SnapstoreError):
    """A peer's chunk cannot be read: its node or SMP is gone, or the file is missing."""


class AuthenticationError(ValueError):
    """A record failed to open (another store's token, or bytes altered, replayed or
    reordered in transit), or the server refused ours. Nothing of the connection is
    trusted; it is dropped."""


def check_name(name: str) -> None:
    if "/" in name or parse_name(name) is None:
        raise ChunkUnavailableError(f"not a segment name: {name!r:.80}")


def new_salt() -> bytes:
    return secrets.token_bytes(SALT)


def keys(
    token: str,
    server_salt: bytes,
    client_salt: bytes,
    labels: tuple[bytes, bytes] = (_INFO_REQ, _INFO_REP),
) -> tuple[bytes, bytes]:
    """(K_req, K_rep): one connection's request and reply keys, from the store token;
    ``labels``: the HKDF info of each (the control channel has its own)."""
    if len(server_salt) != SALT or len(client_salt) != SALT:
        raise ValueError(f"salts must be {SALT} bytes")
    secret, salt = token.encode(), server_salt + client_salt

    def derive(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY, salt=salt, info=info).derive(secret)

    return derive(labels[0]), derive(labels[1])


class Sealer:
    """One direction of one connection: its records sealed (or opened) in order.

    The nonce of record ``i`` is ``i`` (96 bits, big-endian), so each
    (key, nonce) pair seals one record only. ``key=None`` seals nothing
    (records travel as plaintext, without tags): only
    :mod:`snapstore.bench.transport` uses it, to measure what sealing costs.
    Used by one thread at a time, as a connection is.
    """

    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None
        self._count = 0
        self.bytes = 0
        """Plaintext bytes sealed or opened so far."""
        self.tag = TAG if key is not None else 0
        """Bytes a sealed record adds to its plaintext."""

    def _nonce(self, size: int) -> bytes:
        n = self._count
        self._count = n + 1
        self.bytes += size
        return n.to_bytes(12, "big")

    def seal(self, data: bytes) -> bytes:
        nonce = self._nonce(len(data))
        return data if self._aead is None else self._aead.encrypt(nonce, data, None)

    def seal_into(self, data: memoryview, staging: bytearray) -> memoryview:
        """``data`` sealed, in ``staging`` (at least ``len(data) + tag`` bytes)."""
        nonce = self._nonce(len(data))
        if self._aead is None:
            return data
        out = memoryview(staging)[: len(data) + TAG]
        self._aead.encrypt_into(nonce, data, None, out)
        return out

    def open(self, record: bytes) -> bytes:
        nonce = self._nonce(len(record) - self.tag)
        if self._aead is None:
            return record
        try:
            return self._aead.decrypt(nonce, record, None)
        except InvalidTag:
            raise AuthenticationError(_FAILED) from None

    def open_into(self, record: memoryview, dest: memoryview) -> None:
        """Open ``record`` into ``dest`` (``len(record) - tag`` bytes). When this raises,
        ``dest`` holds bytes that mean nothing."""
        nonce = self._nonce(len(dest))
        if self._aead is None:
            if record is not dest:
                dest[:] = record
            return
        try:
            self._aead.decrypt_into(nonce, record, None, dest)
        except InvalidTag:
            raise AuthenticationError(_FAILED) from None


_FAILED = (
    "a record fails authentication (the peer holds another store's token, or the bytes "
    "were altered, replayed or reordered in transit)"
)


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
    """One length-prefixed frame of at most ``limit`` bytes, whole by ``deadline``.

    The length :data:`REFUSED` (a server's answer to a request that failed
    to open) raises :class:`AuthenticationError`.
    """
    raw = bytearray(HDR.size)
    recv_exact_into(sock, memoryview(raw), deadline)
    (n,) = HDR.unpack(raw)
    if n == REFUSED:
        raise AuthenticationError(
            "bad token: the data server refused the request (it fails authentication: this "
            "process holds another store's token, or the bytes were altered in transit)"
        )
    if n > limit:
        raise ValueError(f"header of {n} bytes exceeds {limit}")
    body = bytearray(n)
    recv_exact_into(sock, memoryview(body), deadline)
    sock.settimeout(IO_TIMEOUT)
    return bytes(body)


def send_sealed(sock: socket.socket, sealer: Sealer, data: bytes) -> None:
    """One framed record: ``[u32 n][sealed data]``."""
    record = sealer.seal(data)
    sock.sendall(HDR.pack(len(record)) + record)


def recv_sealed(sock: socket.socket, opener: Sealer, limit: int, deadline: float) -> bytes:
    """The plaintext of one framed record of at most ``limit`` plaintext bytes."""
    return opener.open(recv_frame(sock, limit + opener.tag, deadline))


def _pieces(sealer: Sealer) -> int:
    """Payload bytes per record: :data:`RECORD` sealed; unsealed (the benchmark's
    baseline), :data:`IO_BLOCK`, the plaintext path at its fastest."""
    return RECORD if sealer.tag else IO_BLOCK


def send_payload(sock: socket.socket, sealer: Sealer, data: memoryview, staging: bytearray) -> None:
    """``data`` as sealed records of :data:`RECORD` bytes, no prefixes."""
    step = _pieces(sealer)
    for at in range(0, len(data), step):
        sock.sendall(sealer.seal_into(data[at : at + step], staging))


def recv_payload_into(
    sock: socket.socket, opener: Sealer, dest: memoryview, staging: bytearray
) -> None:
    """Fill ``dest`` from the records :func:`send_payload` sends."""
    step = _pieces(opener)
    for at in range(0, len(dest), step):
        part = dest[at : at + step]
        if not opener.tag:  # unsealed: straight into place
            recv_exact_into(sock, part)
            opener.open_into(part, part)
            continue
        record = memoryview(staging)[: len(part) + opener.tag]
        recv_exact_into(sock, record)
        opener.open_into(record, part)


def staging_buffer() -> bytearray:
    """A buffer for one sealed payload record."""
    return bytearray(RECORD + TAG)


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether a byte (or EOF) arrives within ``timeout``; the byte stays in the socket."""
    sock.settimeout(timeout)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return False
    return True


def plain_hello(**fields: Any) -> bytes:
    """A framed plaintext msgpack map (the server's hello)."""
    body = msgpack.packb(fields, use_bin_type=True)
    return HDR.pack(len(body)) + body
