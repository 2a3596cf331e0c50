"""The control channel: control-plane calls to an SMP (or the coordinator) over one
authenticated socket.

Why: a Ray actor call costs about 1.7 ms of the callee's CPU and 0.9 ms of the
caller's on this project's 2-core machines (task events off, as the store runs
Ray), and a step's commit makes about a dozen of them between the SMPs of a
group (the leader's orders to each member, the members' notices to it): about
half of the SMPs' CPU per save (docs/performance-store.md). The same call over
an asyncio socket costs about 0.1 ms on each side. So each SMP also serves its
control methods on a TCP socket next to its data server, on its event loop
(:class:`ChannelServer`), and so does the coordinator; the control plane's Ray
fabric (:mod:`snapstore.control.rayfabric`) makes its calls to them over it
(:class:`Channels`), and a trainer's client its saves (:class:`ChannelClient`,
blocking). Ray keeps what it is there for: placing and restarting actors, the
death watch (a pending Ray call fails the moment the SMP dies), a node's first
registration, and the trainers' leases and restores.

Protocol (version 1). The data server's handshake and sealing
(:mod:`snapstore.node.wire`), with keys of its own::

    server, on accept:  [u32 n][msgpack {"v": 1, "channel": 1, "salt": S}]
    client, once:       [C]
    then, both ways:    [u32 n][sealed msgpack]
        request:        [id, method, args]
        reply:          [id, true, value]  or  [id, false, error class, message]

Each direction of a connection has its own key, HKDF-SHA256 of the store's
token over ``S | C`` with the channel's own labels (a record of the data
server's never opens as the channel's, nor the reverse). The first request of
a connection is the client's hello (method ``""``), answered with the node the
server belongs to: a connection that fails to authenticate, or reaches another
node's SMP (a port taken again after a restart), is refused before any call
travels on it. A server opens each request before it parses it, so an
unauthenticated peer never reaches the msgpack decoder; a record that fails to
open ends the connection (the data server's rule).

Calls run concurrently, each as a task on the server's loop (as Ray runs an
async actor's calls); replies come back as they finish. A call whose
connection closes before its reply raises :class:`ActorUnavailableError`, as
a Ray call to a dead actor does. A connection that cannot be made raises
:class:`ChannelUnreachable` before anything is sent: the caller then makes
the call through Ray, which finds the node's SMP wherever it is now.

Limits: at most :data:`MAX_CONNECTIONS` connections to a server; the hello
within :data:`wire.AUTH_TIMEOUT` of the accept; a record of at most
:data:`wire.MAX_REQUEST` bytes until the hello, :data:`MAX_RECORD` after, and
once a record's length has arrived, all of it within :data:`wire.HEADER_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from snapstore import errors
from snapstore.errors import ActorUnavailableError, SnapstoreError
from snapstore.node import wire
from snapstore.node.wire import HDR, SALT, AuthenticationError, Sealer

__all__ = [
    "CHANNEL_PROTOCOL",
    "MAX_CONNECTIONS",
    "MAX_RECORD",
    "ChannelClient",
    "ChannelServer",
    "ChannelUnreachable",
    "Channels",
]

logger = logging.getLogger(__name__)

CHANNEL_PROTOCOL = 1
MAX_CONNECTIONS = 1024
"""Connections one server keeps: its group's members, the leaders of its relay region
and the coordinator each hold one."""
MAX_RECORD = 256 << 20
"""Largest record after the hello (a group's prepared slice is tens of KiB)."""
CONNECT_TIMEOUT = 2.0
"""Seconds to connect and authenticate before the call goes through Ray instead."""
UNREACHABLE_FOR = 2.0
"""Seconds a server that could not be reached is not tried again (its calls go through
Ray): a node whose host is gone would otherwise cost every call a connect timeout."""
KEEPALIVE = 30
"""Seconds of silence from a peer's host before its connection is given up (keepalive
probes: 10 s idle, then 4 probes 5 s apart)."""
_LABELS = (b"snapstore control channel v1: requests", b"snapstore control channel v1: replies")
HELLO = ""
"""The method of a connection's first request: the server answers with its node."""

Handler = Callable[[str, list[Any]], Awaitable[Any]]
"""The server's dispatch: (method, args) -> the reply's value; raises to answer an error."""


class ChannelUnreachable(Exception):
    """No authenticated connection to that node's channel could be made (nothing was sent)."""


async def _read_record(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One length-prefixed record; once its length arrived, all of it within the header
    timeout (a trickle is cut off)."""
    (n,) = HDR.unpack(await reader.readexactly(HDR.size))
    if n == wire.REFUSED:
        raise AuthenticationError(
            "the channel refused the connection's key (another store's token)"
        )
    if n > limit:
        raise ValueError(f"record of {n} bytes exceeds {limit}")
    return await asyncio.wait_for(reader.readexactly(n), wire.HEADER_TIMEOUT)


def _tune(sock: socket.socket | None) -> None:
    """No Nagle delay (a call is one small record), and TCP keepalives: a connection to a
    host that vanished (no reset ever comes) fails its calls within about
    :data:`KEEPALIVE` seconds, as Ray fails a call to a node it declared dead, instead of
    leaving them to their callers' timeouts."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE // 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE // 6)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def _frame(sealer: Sealer, obj: Any) -> bytes:
    record = sealer.seal(_packb(obj))
    return HDR.pack(len(record)) + record


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _sealers(token: str, server_salt: bytes, client_salt: bytes) -> tuple[Sealer, Sealer]:
    """A connection's (requests, replies) sealers, keyed with the channel's own labels."""
    k_req, k_rep = wire.keys(token, server_salt, client_salt, _LABELS)
    return Sealer(k_req), Sealer(k_rep)


def _server_salt(hello: Any) -> bytes:
    """The salt of a server's hello; ValueError when it is not a channel's of this version."""
    if not isinstance(hello, dict) or hello.get("v") != CHANNEL_PROTOCOL:
        raise ValueError(f"not a snapstore control channel v{CHANNEL_PROTOCOL}")
    return bytes(hello.get("salt") or b"")


_CONNECT_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    TimeoutError,
    AuthenticationError,
    msgpack.UnpackException,
)
"""What a connection attempt fails with: the channel is unreachable (nothing was sent)."""


def _unreachable(node: str, address: str, port: int, e: BaseException) -> ChannelUnreachable:
    return ChannelUnreachable(f"no channel to node {node[:12]} at {address}:{port}: {e}")


def _unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def _error(kind: object, message: object) -> SnapstoreError:
    """The error a call's reply names, as snapstore's class of that name where it takes a
    message alone (ActorUnavailableError, StoreTimeoutError...), else SnapstoreError."""
    cls = getattr(errors, str(kind), None) if str(kind) in errors.__all__ else None
    if isinstance(cls, type) and issubclass(cls, SnapstoreError):
        with contextlib.suppress(TypeError):
            return cls(str(message))
    return SnapstoreError(str(message))


class ChannelServer:
    """One SMP's control channel: serves ``handler`` to authenticated peers.

    The socket is bound when this is made (its :attr:`port` known at once);
    :meth:`start` begins accepting, on the running loop."""

    def __init__(self, address: str, token: str, node: str, handler: Handler) -> None:
        self._token = token
        self._node = node
        self._handler = handler
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, 0))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.address = address
        self.port = int(sock.getsockname()[1])
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._calls: set[asyncio.Task[None]] = set()
        self.refused_connections = 0
        self.calls = 0
        """Calls taken (hellos not counted): the SMP reports it with its counters."""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._calls):
            t.cancel()

    def connections(self) -> int:
        return len(self._writers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            self.refused_connections += 1
            writer.close()
            return
        self._writers.add(writer)
        try:
            _tune(writer.get_extra_info("socket"))
            server_salt = wire.new_salt()
            writer.write(wire.plain_hello(v=CHANNEL_PROTOCOL, channel=1, salt=server_salt))
            deadline = time.monotonic() + wire.AUTH_TIMEOUT
            client_salt = await asyncio.wait_for(reader.readexactly(SALT), wire.AUTH_TIMEOUT)
            requests, replies = _sealers(self._token, server_salt, client_salt)
            body = await asyncio.wait_for(
                _read_record(reader, wire.MAX_REQUEST + wire.TAG), deadline - time.monotonic()
            )
            while True:
                try:
                    plain = requests.open(body)
                except AuthenticationError:
                    writer.write(HDR.pack(wire.REFUSED))
                    return
                self._take(plain, writer, replies)
                body = await _read_record(reader, MAX_RECORD + wire.TAG)
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _take(self, plain: bytes, writer: asyncio.StreamWriter, replies: Sealer) -> None:
        """An opened request: the hello answered at once, a call started as a task."""
        try:
            call_id, method, args = _unpack(plain)
            if not (
                isinstance(call_id, int) and isinstance(method, str) and isinstance(args, list)
            ):
                raise TypeError("not [id, method, args]")
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ValueError(f"malformed request: {e}") from None  # ends the connection
        if method == HELLO:
            writer.write(_frame(replies, [call_id, True, self._node]))
            return
        self.calls += 1
        task = asyncio.get_running_loop().create_task(
            self._call(call_id, method, args, writer, replies)
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(
        self,
        call_id: int,
        method: str,
        args: list[Any],
        writer: asyncio.StreamWriter,
        replies: Sealer,
    ) -> None:
        try:
            reply = [call_id, True, await self._handler(method, args)]
        except asyncio.CancelledError:
            reply = [call_id, False, "ActorUnavailableError", f"{method}: the SMP is stopping"]
        except SnapstoreError as e:
            reply = [call_id, False, type(e).__name__, str(e)]
        except Exception as e:  # what a Ray call would wrap: the caller sees it as an error
            from snapstore.rpc import describe

            reply = [call_id, False, "SnapstoreError", f"{method} failed: {describe(e)}"]
        if writer.is_closing():
            return
        try:
            writer.write(_frame(replies, reply))
        except (TypeError, ValueError) as e:  # a value msgpack cannot carry: a bug, said so
            writer.write(_frame(replies, [call_id, False, "SnapstoreError", f"{method}: {e}"]))


class _Conn:
    """One authenticated connection to a server, its calls in flight by id."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sealers: tuple[Sealer, Sealer],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self._requests, self._replies = sealers
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self.closed = False
        self._reading = self.loop.create_task(self._read())

    def send(self, method: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.closed:
            raise ActorUnavailableError("the connection to the SMP's channel closed")
        call_id = self._next
        self._next += 1
        fut = self.loop.create_future()
        self._pending[call_id] = fut
        self._writer.write(_frame(self._requests, [call_id, method, list(args)]))
        return fut

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        fut = self.send(method, args)
        try:
            return await fut
        finally:
            if not fut.done():
                fut.cancel()  # the caller gave up (its timeout): a late reply is dropped

    async def _read(self) -> None:
        why = "the SMP's channel closed the connection (the SMP stopped or died)"
        try:
            while True:
                body = await _read_record(self._reader, MAX_RECORD + wire.TAG)
                reply = _unpack(self._replies.open(body))
                fut = self._pending.pop(reply[0], None)
                if fut is None or fut.done():
                    continue
                if reply[1]:
                    fut.set_result(reply[2])
                else:
                    fut.set_exception(_error(reply[2], reply[3]))
        except (OSError, EOFError, asyncio.IncompleteReadError) as e:
            if not isinstance(e, asyncio.IncompleteReadError):
                why = f"the connection to the SMP's channel failed ({e})"
        except (
            ValueError,
            TypeError,
            LookupError,
            AuthenticationError,
            msgpack.UnpackException,
        ) as e:
            why = f"the SMP's channel sent a bad reply ({e})"
        finally:
            self.close(why)

    def close(self, why: str = "closed") -> None:
        self.closed = True
        self._writer.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ActorUnavailableError(why))
        if asyncio.current_task() is not self._reading:
            self._reading.cancel()


class Channels:
    """This process's connections to SMPs' channels, one per server, made on first use."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._conns: dict[tuple[str, str, int], _Conn] = {}
        self._connecting: dict[tuple[str, str, int], asyncio.Task[_Conn]] = {}
        self._unreachable: dict[tuple[str, str, int], float] = {}

    async def call(self, node: str, address: str, port: int, method: str, *args: Any) -> Any:
        """``method(*args)`` on ``node``'s SMP, whose channel is at (address, port).

        Raises ChannelUnreachable when no connection could be made (nothing sent),
        ActorUnavailableError when the connection closed before the reply, and the
        callee's error (a SnapstoreError) when the call raised."""
        conn = await self._conn((node, address, port))
        return await conn.call(method, args)

    async def _conn(self, key: tuple[str, str, int]) -> _Conn:
        conn = self._conns.get(key)
        if conn is not None:
            if not conn.closed and conn.loop is asyncio.get_running_loop():
                return conn
            del self._conns[key]  # its server went away (or its loop did)
        if time.monotonic() < self._unreachable.get(key, 0.0):
            raise ChannelUnreachable(f"{key[1]}:{key[2]} was unreachable moments ago")
        task = self._connecting.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.get_running_loop().create_task(self._connect(key))
            self._connecting[key] = task
            task.add_done_callback(lambda _t: self._connecting.pop(key, None))
        try:
            conn = await asyncio.shield(task)
        except ChannelUnreachable:
            now = time.monotonic()
            if len(self._unreachable) > MAX_CONNECTIONS:  # restarted nodes' old ports
                self._unreachable = {k: t for k, t in self._unreachable.items() if t > now}
            self._unreachable[key] = now + UNREACHABLE_FOR
            raise
        self._conns[key] = conn
        return conn

    async def _connect(self, key: tuple[str, str, int]) -> _Conn:
        node, address, port = key
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(address, port)
                _tune(writer.get_extra_info("socket"))
                server_salt = _server_salt(_unpack(await _read_record(reader, 1024)))
                client_salt = wire.new_salt()
                writer.write(client_salt)
                conn = _Conn(reader, writer, _sealers(self._token, server_salt, client_salt))
                try:
                    who = await conn.send(HELLO, ())
                except ActorUnavailableError as e:
                    raise ValueError(str(e)) from None
                if who != node:
                    conn.close("another node's SMP")
                    raise ValueError(f"the channel is node {str(who)[:12]}'s, not {node[:12]}'s")
                return conn
        except _CONNECT_ERRORS as e:
            if writer is not None:
                writer.close()
            raise _unreachable(node, address, port, e) from None

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


class ChannelClient:
    """A blocking caller of one server's channel, one call at a time: a trainer's follower
    thread asking its SMP for a save's outcome. The protocol of :class:`Channels`."""

    def __init__(self, token: str, node: str, address: str, port: int) -> None:
        self._token = token
        self.node, self.address, self.port = node, address, port
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._sealers: tuple[Sealer, Sealer] | None = None
        self._next = 1

    def call(self, method: str, *args: Any, timeout: float) -> Any:
        """``method(*args)`` on the server, its answer within ``timeout`` seconds.

        ChannelUnreachable when no connection could be made (nothing sent);
        ActorUnavailableError when the connection failed during the call;
        StoreTimeoutError when the answer did not come in time (the connection is
        dropped: a late answer has nowhere to go); the callee's error when it raised."""
        with self._lock:
            if self._sock is not None and _closed_by_peer(self._sock):
                self._drop()  # its server went away while idle (a restarted SMP)
            if self._sock is None:
                self._connect()
            sock, sealers = self._sock, self._sealers
            assert sock is not None and sealers is not None
            call_id, self._next = self._next, self._next + 1
            try:
                wire.send_sealed(sock, sealers[0], _packb([call_id, method, list(args)]))
                body = wire.recv_sealed(sock, sealers[1], MAX_RECORD, time.monotonic() + timeout)
                reply = _unpack(body)
                if reply[0] != call_id:
                    raise ValueError(f"a reply to call {reply[0]!r:.20}, not {call_id}")
            except TimeoutError:
                self._drop()
                raise errors.StoreTimeoutError(
                    f"{method} over the channel: no answer within {timeout:.0f} s"
                ) from None
            except (OSError, EOFError) as e:
                self._drop()
                raise ActorUnavailableError(f"{method}: the SMP's channel failed ({e})") from None
            except (ValueError, TypeError, LookupError, AuthenticationError) as e:
                self._drop()
                raise ActorUnavailableError(f"{method}: a bad reply on the channel ({e})") from None
        if not reply[1]:
            raise _error(reply[2], reply[3])
        return reply[2]

    def _connect(self) -> None:
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self.address, self.port), CONNECT_TIMEOUT)
            _tune(sock)
            deadline = time.monotonic() + CONNECT_TIMEOUT
            server_salt = _server_salt(_unpack(wire.recv_frame(sock, 1024, deadline)))
            client_salt = wire.new_salt()
            sock.sendall(client_salt)
            requests, replies = _sealers(self._token, server_salt, client_salt)
            wire.send_sealed(sock, requests, _packb([0, HELLO, []]))
            who = _unpack(wire.recv_sealed(sock, replies, 1024, deadline))
            if who != [0, True, self.node]:
                raise ValueError(f"the channel is not node {self.node[:12]}'s")
        except _CONNECT_ERRORS as e:
            if sock is not None:
                sock.close()
            raise _unreachable(self.node, self.address, self.port, e) from None
        self._sock, self._sealers = sock, (requests, replies)

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._sealers = None, None

    def close(self) -> None:
        with self._lock:
            self._drop()


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle connection with something to read: its peer closed it (nothing else is ever
    sent unasked)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
