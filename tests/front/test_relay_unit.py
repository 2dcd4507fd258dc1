"""proxytap.front.relay on its own: two real TCP connections on 127.0.0.1, one relay.

Each test builds what the handshake hands the relay: the proxy's end of the
client connection and of the upstream connection as asyncio transports
(``loop.create_connection(sock=...)``), a flow, a hub with a recording
subscriber. The far ends (the "client" and the "server") are asyncio streams
the test drives. No proxy, no handshake: only the relay's own promises.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxytap.export.hub import Hub
from proxytap.flows.table import DOWN, UP, CloseReason, FlowTable, State
from proxytap.front.relay import PendingUpstream, Relay, reset
from proxytap.proto.classify import Classifier
from tests.conftest import Recorder, pattern, wait_until


def tcp_pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on 127.0.0.1 (``socketpair`` is AF_UNIX on Linux).

    ``buffer``: small kernel buffers on both, so backpressure shows after little data.
    """
    with socket.socket() as listener:
        if buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.socket()
        if buffer is not None:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            near.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        near.connect(listener.getsockname())
        far, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


@dataclass
class Tunnel:
    relay: Relay
    client: asyncio.Transport  # the proxy's end of the client connection
    server: asyncio.Transport  # the proxy's end of the upstream connection
    pending: PendingUpstream
    app_client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    app_server: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    recorder: Recorder
    done: list[CloseReason] = field(default_factory=list)

    def start(self, early: bytes = b"", high_water: int = 1 << 20) -> None:
        self.relay.start(self.client, self.server, self.pending, early, high_water)

    async def finished(self) -> CloseReason:
        await wait_until(lambda: self.done, what="the relay finished")
        return self.done[0]


@pytest.fixture
async def make_tunnel() -> AsyncIterator[Any]:
    made: list[Tunnel] = []

    async def _make(idle: float = 30.0, buffer: int | None = None) -> Tunnel:
        loop = asyncio.get_running_loop()
        proxy_client, app_client = tcp_pair(buffer)
        proxy_server, app_server = tcp_pair(buffer)
        client, _ = await loop.create_connection(asyncio.Protocol, sock=proxy_client)
        server, pending = await loop.create_connection(PendingUpstream, sock=proxy_server)
        hub = Hub(Classifier())
        recorder = Recorder()
        hub.subscribe(recorder)
        table = FlowTable()
        conn = table.open_connection(("127.0.0.1", 1), ("127.0.0.1", 2), "test", 0.0)
        flow = table.open_flow(conn, ("127.0.0.1", 3), "example.com", 3, 0.0)
        hub.opened(flow)
        done: list[CloseReason] = []

        def on_done(relay: Relay, reason: CloseReason) -> None:
            done.append(reason)
            hub.closed(relay.flow, reason, 0.0)

        tunnel = Tunnel(
            Relay(flow, hub, idle, on_done),
            client,
            server,
            pending,
            await asyncio.open_connection(sock=app_client),
            await asyncio.open_connection(sock=app_server),
            recorder,
            done,
        )
        made.append(tunnel)
        return tunnel

    yield _make
    for t in made:
        for transport in (t.client, t.server, t.app_client[1], t.app_server[1]):
            transport.close()


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


# -- bytes and half-close ----------------------------------------------------------------


async def test_bytes_both_ways_counted_and_tapped(make_tunnel: Any) -> None:
    t: Tunnel = await make_tunnel()
    t.start()
    (c_reader, c_writer), (s_reader, s_writer) = t.app_client, t.app_server
    c_writer.write(b"hello")
    assert await read_exactly(s_reader, 5) == b"hello"
    s_writer.write(b"world!")
    assert await read_exactly(c_reader, 6) == b"world!"
    flow = t.relay.flow
    assert (flow.bytes_up, flow.bytes_down, flow.chunks_up, flow.chunks_down) == (5, 6, 1, 1)
    assert t.recorder.data(flow, UP) == b"hello"
    assert t.recorder.data(flow, DOWN) == b"world!"


async def test_early_bytes_from_both_sides_come_first(make_tunnel: Any) -> None:
    t: Tunnel = await make_tunnel()
    (c_reader, c_writer), (s_reader, s_writer) = t.app_client, t.app_server
    s_writer.write(b"banner")  # the server spoke before the client had its reply
    await wait_until(lambda: t.pending.early.chunks, what="PendingUpstream kept the banner")
    t.start(early=b"early")
    c_writer.write(b"+later")
    assert await read_exactly(s_reader, 11) == b"early+later"
    assert await read_exactly(c_reader, 6) == b"banner"


@pytest.mark.parametrize("first", ["client", "server"])
async def test_half_close_keeps_the_other_direction(make_tunnel: Any, first: str) -> None:
    t: Tunnel = await make_tunnel()
    t.start()
    ends = {"client": t.app_client, "server": t.app_server}
    other = "server" if first == "client" else "client"
    (f_reader, f_writer), (o_reader, o_writer) = ends[first], ends[other]
    f_writer.write(b"last words")
    f_writer.write_eof()
    assert await read_eof(o_reader) == b"last words"  # the EOF went through as an EOF
    assert t.relay.flow.state is State.HALF_CLOSED and not t.done
    o_writer.write(b"still answering" * 1000)  # the other way keeps flowing
    assert await read_exactly(f_reader, 15000) == b"still answering" * 1000
    o_writer.write_eof()
    assert await t.finished() is CloseReason.NORMAL
    assert await read_eof(f_reader) == b""
    assert t.recorder.reason(t.relay.flow) is CloseReason.NORMAL


@pytest.mark.parametrize("first", ["client", "server"])
async def test_a_reset_on_one_side_resets_the_other(make_tunnel: Any, first: str) -> None:
    t: Tunnel = await make_tunnel()
    t.start()
    ends = {"client": t.app_client, "server": t.app_server}
    other = "server" if first == "client" else "client"
    (_, f_writer), (o_reader, o_writer) = ends[first], ends[other]
    o_writer.write(b"unread by the side that resets")  # so a plain close would be an RST too
    reset(f_writer.transport)
    assert await t.finished() is CloseReason.RESET
    with pytest.raises(ConnectionResetError):
        await read_eof(o_reader)
    assert t.recorder.reason(t.relay.flow) is CloseReason.RESET


# -- backpressure and the export hold ----------------------------------------------------


async def test_backpressure_pauses_the_feeding_side(make_tunnel: Any) -> None:
    high = 64 << 10
    t: Tunnel = await make_tunnel(buffer=64 << 10)
    t.start(high_water=high)
    (_, c_writer), (s_reader, _) = t.app_client, t.app_server
    size = 16 << 20  # far more than the kernel buffers and the high-water mark hold
    data = pattern(size)
    c_writer.write(data)
    sender = asyncio.ensure_future(c_writer.drain())  # done once the relay took it all
    # the server reads nothing: the upstream write buffer fills, the client is not read
    await wait_until(lambda: t.relay.down.full, what="the upstream write buffer full")
    assert not t.client.is_reading()
    assert t.server.is_reading()  # the other direction is not held up
    assert t.server.get_write_buffer_size() < high + (1 << 20)  # bounded, not 16 MiB
    got = hashlib.sha256()
    read = 0
    while read < size:  # bounded: the relay resumes the client as the server drains
        chunk = await asyncio.wait_for(s_reader.read(1 << 20), 10)
        assert chunk, "EOF before every byte arrived"
        got.update(chunk)
        read += len(chunk)
    assert got.digest() == hashlib.sha256(data).digest()
    await asyncio.wait_for(sender, 10)
    assert not t.relay.down.full and t.client.is_reading()


async def test_export_hold_pauses_both_sides_and_release_resumes(make_tunnel: Any) -> None:
    t: Tunnel = await make_tunnel()
    t.start()
    (c_reader, c_writer), (s_reader, s_writer) = t.app_client, t.app_server
    flow = t.relay.flow
    assert flow.valve is t.relay
    consumer = object()
    flow.hold(consumer)  # an export consumer under "wait" is behind
    assert t.relay.held
    assert not t.client.is_reading() and not t.server.is_reading()
    c_writer.write(b"up while held")
    s_writer.write(b"down while held")
    flow.release(consumer)
    assert t.client.is_reading() and t.server.is_reading()
    assert await read_exactly(s_reader, 13) == b"up while held"
    assert await read_exactly(c_reader, 15) == b"down while held"


async def test_hold_before_start_is_honoured(make_tunnel: Any) -> None:
    t: Tunnel = await make_tunnel()
    consumer = object()
    t.relay.flow.hold(consumer)  # behind on the early bytes already
    t.start(early=b"early")
    assert t.relay.held and not t.client.is_reading() and not t.server.is_reading()
    t.relay.flow.release(consumer)
    assert t.client.is_reading() and t.server.is_reading()


# -- idle timeout ------------------------------------------------------------------------


async def test_idle_timeout_closes_a_quiet_tunnel(make_tunnel: Any) -> None:
    t: Tunnel = await make_tunnel(idle=0.1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    t.start()
    assert await t.finished() is CloseReason.TIMEOUT
    assert loop.time() - start >= 0.09
    for reader, _ in (t.app_client, t.app_server):
        assert await read_eof(reader) == b""  # closed, not reset


async def test_traffic_keeps_the_idle_timer_away(make_tunnel: Any) -> None:
    idle = 0.15
    t: Tunnel = await make_tunnel(idle=idle)
    t.start()
    loop = asyncio.get_running_loop()
    (_, c_writer), (s_reader, _) = t.app_client, t.app_server
    start = loop.time()
    for _ in range(8):  # 8 x idle/3: over two idle periods with bytes in every one
        c_writer.write(b"x")
        assert await read_exactly(s_reader, 1) == b"x"
        await asyncio.sleep(idle / 3)  # a slow client: the behaviour under test
    assert not t.done
    assert loop.time() - start > 2 * idle
    last = loop.time()
    assert await t.finished() is CloseReason.TIMEOUT
    assert loop.time() - last >= idle * 0.9
