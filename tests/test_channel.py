"""The control channel (snapstore.node.channel): calls to an SMP past Ray, on loopback.

A call must come back as Ray would bring it (the value, or snapstore's error of
the same class), never reach a server without the store's token or another
node's server, and fail as an unavailable actor when the server goes away in
the middle of it; what cannot connect says so before anything is sent, so the
fabric can make the call through Ray instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

from snapstore.control.rayfabric import CHANNEL_METHODS, RayFabric
from snapstore.control.smp import SMP
from snapstore.errors import (
    ActorUnavailableError,
    MemoryBudgetError,
    SnapstoreError,
    StoreTimeoutError,
)
from snapstore.format.work import PeerInfo
from snapstore.node import channel as channel_mod
from snapstore.node import wire
from snapstore.node.channel import ChannelClient, Channels, ChannelServer, ChannelUnreachable

TOKEN = "channel-secret"
NODE = "node-a"


async def _handler(method: str, args: list[Any]) -> Any:
    if method == "echo":
        return args[0]
    if method == "sleep":
        await asyncio.sleep(args[0])
        return "slept"
    if method == "late":
        raise StoreTimeoutError("the step did not finish in time")
    if method == "budget":
        raise MemoryBudgetError("job", NODE, 10, 5, 8)
    if method == "bug":
        return 1 // 0
    if method == "unencodable":
        return object()
    raise SnapstoreError(f"no method {method!r}")


def _run(test: Callable[[ChannelServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = ChannelServer("127.0.0.1", TOKEN, NODE, _handler)
        await server.start()
        try:
            await test(server)
        finally:
            server.close()

    asyncio.run(main())


def test_values_and_errors_come_back_as_ray_would_bring_them() -> None:
    async def test(server: ChannelServer) -> None:
        ch = Channels(TOKEN)
        call = lambda m, *a: ch.call(NODE, "127.0.0.1", server.port, m, *a)  # noqa: E731
        assert await call("echo", b"\x00" * 70_000) == b"\x00" * 70_000
        assert await call("echo", {3: "a", 5: None}) == {3: "a", 5: None}
        assert await call("echo", [1, 2.5, "x", None]) == [1, 2.5, "x", None]
        with pytest.raises(StoreTimeoutError, match="did not finish"):
            await call("late")
        # A class that takes more than a message: snapstore's base class, the message kept.
        with pytest.raises(SnapstoreError, match="needs 10 more bytes"):
            await call("budget")
        with pytest.raises(SnapstoreError, match="bug failed: integer division"):
            await call("bug")
        with pytest.raises(SnapstoreError, match="unencodable"):
            await call("unencodable")
        # The connection outlived every error.
        assert await call("echo", 7) == 7
        ch.close()

    _run(test)


def test_calls_run_concurrently_and_a_caller_that_gives_up_drops_the_late_reply() -> None:
    async def test(server: ChannelServer) -> None:
        ch = Channels(TOKEN)
        call = lambda m, *a: ch.call(NODE, "127.0.0.1", server.port, m, *a)  # noqa: E731
        t = time.monotonic()
        assert await asyncio.gather(*(call("sleep", 0.3) for _ in range(40))) == ["slept"] * 40
        assert time.monotonic() - t < 3.0  # 40 x 0.3 s one after another would be 12 s
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call("sleep", 0.5), 0.05)
        await asyncio.sleep(0.6)  # its reply arrives for nobody
        assert await call("echo", "next") == "next"
        assert server.connections() == 1
        ch.close()

    _run(test)


def test_a_wrong_token_or_another_nodes_server_is_unreachable_and_nothing_is_called() -> None:
    calls: list[str] = []

    async def test(server: ChannelServer) -> None:
        async def counting(method: str, args: list[Any]) -> Any:
            calls.append(method)
            return await _handler(method, args)

        server._handler = counting
        with pytest.raises(ChannelUnreachable, match="another store's token"):
            await Channels("guessed").call(NODE, "127.0.0.1", server.port, "echo", 1)
        with pytest.raises(ChannelUnreachable, match="node node-a's, not node-b's"):
            await Channels(TOKEN).call("node-b", "127.0.0.1", server.port, "echo", 1)
        assert calls == []
        # The server still serves its own store's callers.
        assert await Channels(TOKEN).call(NODE, "127.0.0.1", server.port, "echo", 2) == 2
        assert calls == ["echo"]

    _run(test)


def test_a_server_gone_mid_call_is_an_unavailable_actor_then_unreachable() -> None:
    async def test(server: ChannelServer) -> None:
        ch = Channels(TOKEN)
        pending = asyncio.ensure_future(ch.call(NODE, "127.0.0.1", server.port, "sleep", 30))
        await asyncio.sleep(0.2)
        server.close()
        with pytest.raises(ActorUnavailableError, match="closed the connection"):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(ChannelUnreachable, match=r"Connect call failed|refused"):
            await ch.call(NODE, "127.0.0.1", server.port, "echo", 1)
        # Remembered for a moment: the next call does not try to connect again.
        t = time.monotonic()
        with pytest.raises(ChannelUnreachable, match="unreachable moments ago"):
            await ch.call(NODE, "127.0.0.1", server.port, "echo", 1)
        assert time.monotonic() - t < 0.1

    _run(test)


async def _raw_hello(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    (n,) = wire.HDR.unpack(await reader.readexactly(4))
    hello = msgpack.unpackb(await reader.readexactly(n))
    assert hello["v"] == channel_mod.CHANNEL_PROTOCOL
    return reader, writer, hello["salt"]


def test_unauthenticated_bytes_never_reach_the_parser_and_the_server_keeps_serving() -> None:
    async def test(server: ChannelServer) -> None:
        # A request sealed with no key at all: plain msgpack, refused, the connection ended.
        reader, writer, _ = await _raw_hello(server.port)
        writer.write(b"\x01" * wire.SALT)
        body = msgpack.packb([1, "echo", [1]])
        writer.write(wire.HDR.pack(len(body)) + body)
        assert await asyncio.wait_for(reader.read(), 5) == wire.HDR.pack(wire.REFUSED)
        writer.close()
        # A first record larger than any hello: cut off without reading it.
        reader, writer, _ = await _raw_hello(server.port)
        writer.write(b"\x01" * wire.SALT + wire.HDR.pack(1 << 30))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert await Channels(TOKEN).call(NODE, "127.0.0.1", server.port, "echo", 3) == 3

    _run(test)


def test_a_silent_connection_is_dropped_at_the_auth_timeout(monkeypatch: Any) -> None:
    monkeypatch.setattr(wire, "AUTH_TIMEOUT", 0.3)

    async def test(server: ChannelServer) -> None:
        reader, writer, _ = await _raw_hello(server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing said
        writer.close()
        assert server.connections() == 0

    _run(test)


def test_the_channel_serves_only_control_methods_the_smp_has() -> None:
    for method in CHANNEL_METHODS:
        assert inspect.iscoroutinefunction(getattr(SMP, method)), method
    # Death watches must fail through Ray; trainers and tools keep Ray's calls.
    for method in ("watch", "destroy", "set_fault", "stage_and_wait", "lease", "info"):
        assert method not in CHANNEL_METHODS


class _FakeHandle:
    """A Ray actor handle stand-in: ``handle.method.remote(*args)`` is an awaitable."""

    def __init__(self, seen: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._seen = seen

    def __getattr__(self, method: str) -> Any:
        seen = self._seen

        class _Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                seen.append((method, args))

                async def done() -> None:
                    return None

                return done()

        return _Method()


def _peer(port: int) -> PeerInfo:
    return PeerInfo(NODE, "host", "/dir", "127.0.0.1", 1, port)


def test_the_fabric_calls_over_the_channel_and_through_ray_when_it_cannot() -> None:
    async def main() -> None:
        calls: list[Any] = []
        ray_calls: list[tuple[str, tuple[Any, ...]]] = []

        async def handler(method: str, args: list[Any]) -> Any:
            calls.append(method)

        server = ChannelServer("127.0.0.1", TOKEN, NODE, handler)
        await server.start()
        fabric = RayFabric("ns")

        async def get(name: str) -> Any:
            return _FakeHandle(ray_calls)

        fabric._handles.get = get  # type: ignore[method-assign]
        where: dict[str, PeerInfo] = {}
        fabric.use_channels(TOKEN, where.get)
        node = fabric.node(NODE)
        await node.forget("job")  # where the node is, unknown: through Ray
        assert ray_calls == [("forget", ("job",))] and calls == []
        where[NODE] = _peer(server.port)
        await node.forget("job")
        await node.release("tok")
        assert calls == ["forget", "release"] and len(ray_calls) == 1
        server.close()
        # The node's SMP restarted elsewhere: nothing answers at the old port, Ray does.
        await asyncio.sleep(0.1)
        await node.forget("job")
        assert ray_calls[-1] == ("forget", ("job",)) and calls == ["forget", "release"]

    asyncio.run(main())


class _ServerThread:
    """A ChannelServer on its own loop and thread, for the blocking client."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.server = ChannelServer("127.0.0.1", TOKEN, NODE, _handler)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        time.sleep(0.1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_the_blocking_client_a_trainer_saves_over() -> None:
    srv = _ServerThread()
    try:
        client = ChannelClient(TOKEN, NODE, "127.0.0.1", srv.server.port)
        assert client.call("echo", b"staged", timeout=5) == b"staged"
        with pytest.raises(StoreTimeoutError, match="did not finish"):
            client.call("late", timeout=5)
        # No answer in time: a timeout, the connection dropped, the next call on a new one.
        with pytest.raises(StoreTimeoutError, match="no answer within"):
            client.call("sleep", 2.0, timeout=0.2)
        assert client.call("echo", 1, timeout=5) == 1
        assert srv.server.connections() == 1
        with pytest.raises(ChannelUnreachable, match="not node node-b's"):
            ChannelClient(TOKEN, "node-b", "127.0.0.1", srv.server.port).call("echo", 1, timeout=5)
        with pytest.raises(ChannelUnreachable, match="another store's token"):
            ChannelClient("guessed", NODE, "127.0.0.1", srv.server.port).call("echo", 1, timeout=5)
    finally:
        srv.stop()
    # The server went away while the connection was idle (a restarted SMP): the client
    # notices before sending, and says it cannot reach it rather than failing a save.
    with pytest.raises(ChannelUnreachable):
        client.call("echo", 2, timeout=5)
    client.close()


def test_the_blocking_client_fails_a_call_whose_server_dies_during_it() -> None:
    srv = _ServerThread()
    client = ChannelClient(TOKEN, NODE, "127.0.0.1", srv.server.port)
    assert client.call("echo", 0, timeout=5) == 0
    import threading

    threading.Timer(0.3, srv.stop).start()
    with pytest.raises(ActorUnavailableError, match="channel failed"):
        client.call("sleep", 30, timeout=20)
    client.close()
