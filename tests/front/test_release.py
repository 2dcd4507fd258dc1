"""A closed connection's objects are freed by reference counting alone.

proxytap tunes the cyclic collector to run rarely (``proxytap.app.serve``), so
a reference cycle left by a closed tunnel or forwarder connection keeps its
objects (transports, flow, handshake, buffers: kilobytes each) for a long
time. These tests turn the collector off, close a connection and wait for
weak references to its objects to die: a cycle reintroduced anywhere in them
keeps one alive and fails the test.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest

from proxytap.front.handshake import ClientConnection
from proxytap.front.http_exchange import Exchange
from proxytap.front.http_forward import HttpForwarder
from proxytap.front.http_upstream import UpstreamConnection
from proxytap.front.inspect import HelloInspector
from proxytap.front.relay import _FINISHED, PendingUpstream, Relay, _Side
from tests.conftest import Origin, ProxyFactory, RawServer, RunningProxy, closed_port

# Every per-connection class of the tunnel and forwarder paths (some have __slots__
# without __weakref__: they are found by a census of the collector's objects).
TRACKED = (
    ClientConnection,
    HelloInspector,
    PendingUpstream,
    Relay,
    _Side,
    HttpForwarder,
    UpstreamConnection,
    Exchange,
)


def census() -> Counter[str]:
    """Live instances of the tracked classes (a freed object is not listed any more)."""
    return Counter(
        type(o).__name__
        for o in gc.get_objects()
        if isinstance(o, TRACKED) and o is not _FINISHED  # the one shared by all tunnels
    )


@contextmanager
def collector_off() -> Iterator[None]:
    """No cyclic collection inside: an object in a cycle stays in the census."""
    enabled = gc.isenabled()
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        assert census() == Counter()
        yield
    finally:
        if enabled:
            gc.enable()


async def wait_freed(proxy: RunningProxy) -> None:
    """Wait (bounded) until the proxy has closed everything and freed every tracked object."""
    services = proxy.app.services
    deadline = time.monotonic() + 5
    while services.live or services.table.connections or census():
        if time.monotonic() > deadline:
            raise AssertionError(f"still alive without the cyclic collector: {census()}")
        await asyncio.sleep(0.02)


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that echoes until the proxy closes."""
    while data := await reader.read(65536):
        writer.write(data)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def connect_tunnel(
    proxy: RunningProxy, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
    assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
    return reader, writer


async def socks5_tunnel(
    proxy: RunningProxy, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy.socks)
    writer.write(b"\x05\x01\x00")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
    assert (await asyncio.wait_for(reader.readexactly(10), 5))[:2] == b"\x05\x00"
    return reader, writer


Opener = Callable[[RunningProxy, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.mark.parametrize("open_tunnel", [connect_tunnel, socks5_tunnel], ids=["connect", "socks5"])
@pytest.mark.parametrize(
    "payload",
    [b"", b"ping", b"\x16\x03\x01\x00\x05hello"],
    ids=["idle", "bytes", "malformed-hello"],
)
@pytest.mark.parametrize("who_closes", ["client", "origin"])
async def test_tunnel_freed_on_close(
    proxy: RunningProxy,
    raw_server: ProxyFactory,
    open_tunnel: Opener,
    payload: bytes,
    who_closes: str,
) -> None:
    server: RawServer = await raw_server(hold)
    with collector_off():
        reader, writer = await open_tunnel(proxy, server.port)
        if payload:
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
        assert census() >= Counter({"_Side": 2, "Relay": 1, "ClientConnection": 1})
        if who_closes == "client":
            writer.close()
        else:
            server.accepted[0][1].close()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await wait_freed(proxy)


async def test_idle_timeout_tunnel_freed(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy(idle=0.2)
    server: RawServer = await raw_server(hold)
    with collector_off():
        reader, writer = await connect_tunnel(proxy, server.port)
        assert census()["Relay"] == 1
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed it
        writer.close()
        await wait_freed(proxy)


async def websocket_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    await hold(reader, writer)


def get(port: int, path: str = "/hello") -> bytes:
    return f"GET http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def test_forwarder_freed_after_keep_alive_requests(
    proxy: RunningProxy, origin: Origin
) -> None:
    with collector_off():
        reader, writer = await asyncio.open_connection(*proxy.http)
        for _ in range(3):
            writer.write(get(origin.port))
            assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readuntil(b"hello GET /hello"), 5)
        assert census() >= Counter({"HttpForwarder": 1, "UpstreamConnection": 1})
        writer.close()
        await wait_freed(proxy)


async def test_forwarder_freed_after_a_failed_connect(proxy: RunningProxy) -> None:
    with collector_off():
        reader, writer = await asyncio.open_connection(*proxy.http)
        writer.write(get(closed_port()))
        assert (await read_head(reader)).startswith(b"HTTP/1.1 502")
        writer.close()
        await wait_freed(proxy)


async def test_forwarder_freed_after_an_upload_cut_off(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    server: RawServer = await raw_server(hold)
    with collector_off():
        _, writer = await asyncio.open_connection(*proxy.http)
        port = server.port
        writer.write(
            b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Length: 100000\r\n\r\n%b" % (port, port, b"x" * 5000)
        )
        deadline = time.monotonic() + 5
        while not server.accepted:  # the request is on its way: a request mid-body, upstream
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert census() >= Counter({"HttpForwarder": 1, "UpstreamConnection": 1, "Exchange": 1})
        writer.close()
        await wait_freed(proxy)


async def test_forwarder_freed_after_a_websocket(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    server: RawServer = await raw_server(websocket_origin)
    with collector_off():
        reader, writer = await asyncio.open_connection(*proxy.http)
        port = server.port
        writer.write(
            b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (port, port)
        )
        assert (await read_head(reader)).startswith(b"HTTP/1.1 101")
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert census() >= Counter({"HttpForwarder": 1, "UpstreamConnection": 1})
        writer.close()
        await wait_freed(proxy)
