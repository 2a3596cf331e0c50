"""How SMPs read each other's chunks: shared memory on one host, TCP across hosts.

Parity and rebuilds need byte ranges of segments held by other nodes' SMPs.

- Same host (the embedded cluster, or several raylets on one machine): the
  reader maps the peer's segment file read-only and uses it in place, with
  no copy at all, as NCCL and Ray's object store do for same-host peers.
- Otherwise: every SMP runs a :class:`DataServer`, a small TCP server on its
  node's address that streams ranges of its segments, and answers checksum
  requests computed where the bytes are. Requests carry the store's token.

Requests and replies are msgpack headers followed by raw bytes; nothing is
unpickled. The ``tcp`` setting forces TCP even between same-host peers, to
measure or test the cross-host path on one machine.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from snapstore.coding import checksum
from snapstore.errors import SnapstoreError
from snapstore.format.work import PeerInfo
from snapstore.node.segments import MappingCache, parse_name

__all__ = ["ChunkUnavailableError", "DataServer", "PeerInfo", "Transport", "host_key"]

logger = logging.getLogger(__name__)

_HDR = struct.Struct("!I")
_MAX_HEADER = 1 << 16
_IO_BLOCK = 8 << 20
MAPPINGS_KEPT = 64
"""Peers' segments a Transport keeps mapped (a few per rank and parity holder it reads)."""


class ChunkUnavailableError(SnapstoreError):
    """A peer's chunk cannot be read: its node or SMP is gone, or the file is missing."""


def host_key() -> str:
    """Identifies this machine (and boot): equal keys mean shared memory is shared."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


def _check_name(name: str) -> None:
    if "/" in name or parse_name(name) is None:
        raise ChunkUnavailableError(f"not a segment name: {name!r}")


class Transport:
    """Reads byte ranges of peers' segments. Thread-safe."""

    def __init__(self, host: str, token: str, force_tcp: bool = False) -> None:
        self._host = host
        self._token = token
        self._force_tcp = force_tcp
        self._lock = threading.Lock()
        self._maps = MappingCache(MAPPINGS_KEPT)
        self._conns: dict[tuple[str, int], list[socket.socket]] = {}

    def same_host(self, peer: PeerInfo) -> bool:
        return not self._force_tcp and peer.host == self._host

    # -- reading -------------------------------------------------------------

    def view(self, peer: PeerInfo, name: str, offset: int, length: int) -> np.ndarray | None:
        """A zero-copy read-only view of the range, or None when the peer is on another host."""
        if not self.same_host(peer):
            return None
        _check_name(name)
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
            for socks in self._conns.values():
                for s in socks:
                    s.close()
            self._conns.clear()

    # -- TCP -----------------------------------------------------------------

    def _request(
        self, peer: PeerInfo, req: dict[str, Any], dest: np.ndarray | None = None
    ) -> dict[str, Any]:
        key = (peer.address, peer.port)
        with self._lock:
            pool = self._conns.setdefault(key, [])
            sock = pool.pop() if pool else None
        try:
            if sock is None:
                sock = socket.create_connection(key, timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            req = dict(req, token=self._token)
            body = msgpack.packb(req, use_bin_type=True)
            sock.sendall(_HDR.pack(len(body)) + body)
            reply = _recv_header(sock)
            if not reply.get("ok"):
                raise ChunkUnavailableError(
                    f"node {peer.node_id[:12]}: {reply.get('error', 'request failed')}"
                )
            n = int(reply.get("length", 0))
            if n:
                if dest is None or n > len(dest):
                    raise ChunkUnavailableError(f"node {peer.node_id[:12]}: unexpected payload")
                _recv_exact_into(sock, dest.data[:n])
        except (OSError, EOFError, ValueError, OverflowError, TypeError) as e:
            if sock is not None:
                sock.close()
            raise ChunkUnavailableError(
                f"node {peer.node_id[:12]} at {peer.address}:{peer.port}: {e}"
            ) from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        with self._lock:
            self._conns.setdefault(key, []).append(sock)
        return reply


def _recv_exact_into(sock: socket.socket, buf: memoryview) -> None:
    while len(buf):
        n = sock.recv_into(buf, min(len(buf), _IO_BLOCK))
        if n == 0:
            raise EOFError("connection closed mid-transfer")
        buf = buf[n:]


def _recv_header(sock: socket.socket) -> dict[str, Any]:
    raw = bytearray(_HDR.size)
    _recv_exact_into(sock, memoryview(raw))
    (n,) = _HDR.unpack(raw)
    if n > _MAX_HEADER:
        raise ValueError(f"header of {n} bytes exceeds {_MAX_HEADER}")
    body = bytearray(n)
    _recv_exact_into(sock, memoryview(body))
    doc = msgpack.unpackb(bytes(body), raw=False)
    if not isinstance(doc, dict):
        raise ValueError("header is not a map")
    return doc


class DataServer:
    """Serves ranges and checksums of one node's segments over TCP.

    ``resolve(name)`` maps a segment name to a read-only numpy view of the
    whole segment, or raises ChunkUnavailableError; it is the SMP's, so the
    server never opens files the SMP does not vouch for.
    """

    def __init__(self, address: str, token: str, resolve: Callable[[str], np.ndarray]) -> None:
        self._token = token.encode()
        self._resolve = resolve
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopped = False
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._conns_lock:
                    if outer._stopped:
                        return
                    outer._conns.add(self.request)
                try:
                    outer._serve(self.request)
                finally:
                    with outer._conns_lock:
                        outer._conns.discard(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((address, 0), Handler)
        self.address = address
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="snapstore-data-server",
            daemon=True,
        )
        self._thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                req = _recv_header(sock)
            except (OSError, EOFError, ValueError, msgpack.UnpackException):
                return
            try:
                token = str(req.get("token", "")).encode()
                if not hmac.compare_digest(token, self._token):
                    raise ChunkUnavailableError("bad token")
                name = str(req.get("name", ""))
                _check_name(name)
                off, ln = int(req.get("offset", -1)), int(req.get("length", -1))
                whole = self._resolve(name)
                if off < 0 or ln < 0 or off + ln > len(whole):
                    raise ChunkUnavailableError(f"range [{off}, {off + ln}) outside {name}")
                view = whole[off : off + ln]
                if req.get("op") == "sum":
                    reply: dict[str, Any] = {"ok": True, "sum": checksum(view), "length": 0}
                    payload = None
                elif req.get("op") == "read":
                    reply = {"ok": True, "length": ln}
                    payload = view
                else:
                    raise ChunkUnavailableError(f"unknown op {req.get('op')!r}")
            except (ChunkUnavailableError, TypeError, ValueError) as e:
                reply, payload = {"ok": False, "error": str(e)}, None
            body = msgpack.packb(reply, use_bin_type=True)
            try:
                sock.sendall(_HDR.pack(len(body)) + body)
                if payload is not None:
                    mv = payload.data
                    for at in range(0, len(mv), _IO_BLOCK):
                        sock.sendall(mv[at : at + _IO_BLOCK])
            except OSError:
                return

    def stop(self) -> None:
        """Stop accepting, and close the connections being served."""
        with self._conns_lock:
            self._stopped = True
            conns = list(self._conns)
        self._server.shutdown()
        with contextlib.suppress(OSError):
            self._server.server_close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()
