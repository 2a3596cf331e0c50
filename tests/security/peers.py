"""A data server over one segment, and a hand-driven protocol-3 client, for the wire tests."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np

from snapstore.node import wire
from snapstore.node.segments import Segment, data_name
from snapstore.node.transport import ChunkUnavailableError, DataServer, PeerInfo, Transport

TOKEN = "store-secret-token"
NAME = data_name("job", 0, 3)
SIZE = 6 << 20
PAYLOAD = np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8)


def resolver(directory: Path) -> Callable[[str], np.ndarray]:
    def resolve(name: str) -> np.ndarray:
        try:
            return Segment.open(str(directory / name)).array
        except OSError as e:
            raise ChunkUnavailableError(f"{name}: {e.strerror}") from None

    return resolve


def serve(directory: Path, seal: bool = True) -> DataServer:
    """A data server over ``directory``, holding :data:`PAYLOAD` as :data:`NAME`."""
    (directory / NAME).write_bytes(PAYLOAD.tobytes())
    return DataServer("127.0.0.1", TOKEN, resolver(directory), _seal=seal)


def peer(port: int) -> PeerInfo:
    return PeerInfo("node-a", "another-host", "/nonexistent", "127.0.0.1", port)


def read(t: Transport, port: int, n: int = 1000, offset: int = 0) -> bytes:
    dest = np.empty(n, dtype=np.uint8)
    t.read_into(peer(port), NAME, offset, dest)
    return dest.tobytes()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    return s.recv(n, socket.MSG_WAITALL)


def hello(s: socket.socket) -> bytes:
    """Read the server's hello; its salt."""
    (n,) = struct.unpack("!I", recv_exactly(s, 4))
    salt: bytes = msgpack.unpackb(recv_exactly(s, n))["salt"]
    return salt


def request(**fields: object) -> bytes:
    return msgpack.packb({"op": "read", "name": NAME, "offset": 0, "length": 1, **fields})


class RawClient:
    """Protocol 3 by hand on one connection: handshake, sealed records, raw bytes."""

    def __init__(self, port: int, token: str = TOKEN) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.client_salt = os.urandom(wire.SALT)
        self.server_salt = hello(self.sock)
        k_req, self.k_rep = wire.keys(token, self.server_salt, self.client_salt)
        self.requests = wire.Sealer(k_req)
        self.sock.sendall(self.client_salt)

    def sealed(self, body: bytes) -> bytes:
        """``body`` as the next request record, framed (not sent)."""
        record = self.requests.seal(body)
        return struct.pack("!I", len(record)) + record

    def reply_record(self) -> bytes | None:
        """The next framed reply record, raw; None when the server hung up; b"" for a
        refusal."""
        head = recv_exactly(self.sock, 4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack("!I", head)
        return b"" if n == wire.REFUSED else recv_exactly(self.sock, n)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def proxy(
    port: int, alter: Callable[[str, bytearray], bytearray] | None = None
) -> Iterator[tuple[int, dict[str, bytearray]]]:
    """A man in the middle on loopback: ``(its port, every byte seen each way)``.

    ``alter(direction, chunk)`` (direction ``"up"`` to the server, ``"down"``
    to the client) may change each chunk before it is passed on. One client
    connection.
    """
    seen = {"up": bytearray(), "down": bytearray()}
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def pump(src: socket.socket, dst: socket.socket, direction: str) -> None:
            try:
                while not stop.is_set() and (chunk := src.recv(1 << 16)):
                    data = bytearray(chunk)
                    seen[direction].extend(data)
                    dst.sendall(alter(direction, data) if alter else data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        def run() -> None:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: no client came
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            pumps = [
                threading.Thread(target=pump, args=(client, upstream, "up"), daemon=True),
                threading.Thread(target=pump, args=(upstream, client, "down"), daemon=True),
            ]
            for p in pumps:
                p.start()
            for p in pumps:
                p.join(10)
            client.close()
            upstream.close()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        try:
            yield listener.getsockname()[1], seen
        finally:
            stop.set()
            th.join(10)
