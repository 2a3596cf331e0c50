"""The data server: one SMP's segments, served to peers on other hosts over TCP.

Protocol, authentication and limits: :mod:`snapstore.node.wire`. The
limits are read from that module at each use (tests shorten them).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from snapstore.coding import checksum
from snapstore.node import wire
from snapstore.node.wire import (
    AuthenticationError,
    ChunkUnavailableError,
    Sealer,
    check_name,
    recv_exact_into,
    recv_sealed,
    send_payload,
    send_sealed,
    staging_buffer,
    wait_readable,
)

__all__ = ["DataServer"]

POLL_INTERVAL = 1.0
"""Seconds between the accept loop's checks that it was stopped (stop() wakes it at once)."""


class _Refused(Exception):
    """A request the server answers with an error; ``close``: then hang up."""

    def __init__(self, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.close = close


def _uint(req: dict[str, Any], field: str) -> int:
    v = req.get(field)
    if type(v) is not int or v < 0:
        raise _Refused(f"{field} must be a non-negative integer, got {v!r:.40}")
    return v


class DataServer:
    """Serves ranges and checksums of one node's segments over TCP (protocol above).

    ``resolve(name)`` maps a segment name to a read-only numpy view of the
    whole segment, or raises ChunkUnavailableError; it is the SMP's, so the
    server never opens files the SMP does not vouch for. One thread per
    connection, at most :data:`~snapstore.node.wire.MAX_CONNECTIONS`.
    """

    def __init__(
        self,
        address: str,
        token: str,
        resolve: Callable[[str], np.ndarray],
        *,
        _seal: bool = True,
    ) -> None:
        self._token = token
        self._seal = _seal
        self._resolve = resolve
        self._conns: set[socket.socket] = set()
        self._pending: collections.OrderedDict[socket.socket, None] = collections.OrderedDict()
        self._conns_lock = threading.Lock()
        self._stopped = False
        self.refused_connections = 0
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    outer._serve(self.request)
                finally:
                    outer._release(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128  # socketserver's 5 makes a burst of peers wait seconds

            def verify_request(self, request: Any, client_address: Any) -> bool:
                return outer._admit(request)

        self._server = Server((address, 0), Handler)
        self.address = address
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # The accept loop wakes this often only to see whether it is stopped: stop()
            # wakes it at once by connecting (20 wakeups a second cost an idle SMP about
            # 2 ms of CPU a second, py-spy; the idle 4-node store's budget is 100).
            kwargs={"poll_interval": POLL_INTERVAL},
            name="snapstore-data-server",
            daemon=True,
        )
        self._thread.start()

    # -- connection accounting ------------------------------------------------

    def _admit(self, sock: socket.socket) -> bool:
        """Whether to serve a new connection (before a thread is spent on it).

        Past :data:`~snapstore.node.wire.MAX_UNAUTHENTICATED` connections that have not yet sent
        an authenticated request, the oldest of them is dropped for the new
        one: a peer that authenticates at once (an SMP) gets through a flood
        of idle connections, which cannot hold more than that many threads.
        """
        evicted: socket.socket | None = None
        with self._conns_lock:
            if self._stopped or len(self._conns) >= wire.MAX_CONNECTIONS:
                self.refused_connections += 1
                return False
            if len(self._pending) >= wire.MAX_UNAUTHENTICATED:
                evicted, _ = self._pending.popitem(last=False)
                self.refused_connections += 1
            self._conns.add(sock)
            self._pending[sock] = None
        if evicted is not None:
            with contextlib.suppress(OSError):
                evicted.shutdown(socket.SHUT_RDWR)
        return True

    def _authenticated(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._pending.pop(sock, None)

    def _release(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(sock)
            self._pending.pop(sock, None)

    def connections(self) -> tuple[int, int]:
        """(open connections, of which not yet authenticated)."""
        with self._conns_lock:
            return len(self._conns), len(self._pending)

    # -- serving ----------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        """Serve one connection until it closes, idles out or misbehaves."""
        server_salt = wire.new_salt()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(wire.IO_TIMEOUT)
            sock.sendall(wire.plain_hello(v=wire.PROTOCOL, salt=server_salt))
            if not wait_readable(sock, wire.AUTH_TIMEOUT):
                return
            deadline = time.monotonic() + wire.HEADER_TIMEOUT  # the salt and the first request
            client_salt = bytearray(wire.SALT)
            recv_exact_into(sock, memoryview(client_salt), deadline)
            k_req, k_rep = wire.keys(self._token, server_salt, bytes(client_salt))
            requests = Sealer(k_req if self._seal else None)
            replies = Sealer(k_rep if self._seal else None)
            staging: bytearray | None = None
            authenticated = False
            while True:
                try:
                    body = recv_sealed(sock, requests, wire.MAX_REQUEST, deadline)
                except AuthenticationError:
                    sock.sendall(wire.HDR.pack(wire.REFUSED))
                    return
                if not authenticated:
                    authenticated = True
                    self._authenticated(sock)
                close = False
                try:
                    reply, payload = self._answer(body)
                except _Refused as e:
                    reply, payload, close = {"ok": False, "error": str(e)}, None, e.close
                send_sealed(sock, replies, msgpack.packb(reply, use_bin_type=True))
                if payload is not None:
                    staging = staging or staging_buffer()
                    send_payload(sock, replies, payload.data.cast("B"), staging)
                if close or not wait_readable(sock, wire.IDLE_TIMEOUT):
                    return
                deadline = time.monotonic() + wire.HEADER_TIMEOUT
        except (OSError, EOFError, ValueError):
            return

    def _answer(self, body: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
        """The reply to an authenticated request body; _Refused for a bad one."""
        try:
            req = msgpack.unpackb(body, raw=False)
        except (msgpack.UnpackException, ValueError, TypeError) as e:
            raise _Refused(f"request is not msgpack: {e}", close=True) from None
        if not isinstance(req, dict):
            raise _Refused("request is not a map", close=True)
        name = req.get("name")
        if not isinstance(name, str):
            raise _Refused(f"name must be a string, got {name!r:.40}")
        off, ln = _uint(req, "offset"), _uint(req, "length")
        try:
            check_name(name)
            whole = self._resolve(name)
        except ChunkUnavailableError as e:
            raise _Refused(str(e)) from None
        if off + ln > len(whole):
            raise _Refused(f"range [{off}, {off + ln}) outside {name} ({len(whole)} bytes)")
        view = whole[off : off + ln]
        op = req.get("op")
        if op == "sum":
            return {"ok": True, "sum": checksum(view), "length": 0}, None
        if op == "read":
            return {"ok": True, "length": ln}, view
        raise _Refused(f"unknown op {op!r:.40}")

    def stop(self) -> None:
        """Stop accepting, and close the connections being served."""
        with self._conns_lock:
            self._stopped = True
            conns = list(self._conns)
        # shutdown() waits for the accept loop to see its flag: connect until it has, each
        # connection waking the loop (and refused: stopped) instead of a poll interval.
        waiting = threading.Thread(target=self._server.shutdown, name="data-server-stop")
        waiting.start()
        while waiting.is_alive():
            with contextlib.suppress(OSError):
                socket.create_connection((self.address, self.port), timeout=0.2).close()
            waiting.join(0.01)
        with contextlib.suppress(OSError):
            self._server.server_close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()
