"""Writing into an abstractor's loopback7: a stand-in abstractor checks spec section 4.

The stand-in reads the stream the way the original's ``read_loopback7`` does
(one header line, then ``len`` body bytes) and records every rule it sees
broken. That a header and its body go out in *one* send cannot be seen from
the receiving side (stream sockets merge and split at will), so the tests wrap
the writer's socket and check every ``sendmsg()`` call: each must be exactly
one header line plus exactly its ``len`` body bytes, and the kernel must take
all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from proxytap.export.hub import Hub
from proxytap.export.loopback7 import Loopback7Writer
from proxytap.flows.table import DOWN, UP, CloseReason, Flow, FlowTable
from proxytap.proto.classify import Classifier
from proxytap.proto.sftap import CREATED, DATA, DESTROYED, Event, decode_text, flow_key
from tests.export.sftap_helpers import make_flow, short_tmp, wait_for

CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + os.urandom(200)
SERVER_HELLO = bytes.fromhex("160303005a020000560303") + os.urandom(100)


@dataclass
class Conn:
    events: list[tuple[Event, bytes]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    closed: bool = False


class Abstractor:
    """A loopback7 listener that checks every rule of spec section 4 on what it reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: asyncio.Server | None = None
        self.conns: list[Conn] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def kill(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self._writers:
            w.transport.abort()
        self.path.unlink(missing_ok=True)
        self.server = None

    @property
    def conn(self) -> Conn:
        return self.conns[-1]

    def destroyed(self, port: int) -> bool:
        return any(
            ev.event == DESTROYED and port in (ev.key.port1, ev.key.port2)
            for c in self.conns
            for ev, _ in c.events
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn()
        self.conns.append(conn)
        self._writers.append(writer)
        try:
            await self.gate.wait()
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._check(conn, line, reader)
                ev = decode_text(line)
                body = await reader.readexactly(ev.length) if ev.event == DATA else b""
                conn.lines.append(line)
                conn.events.append((ev, body))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:
            conn.errors.append(repr(exc))
        finally:
            conn.closed = True

    @staticmethod
    def _check(conn: Conn, line: bytes, reader: asyncio.StreamReader) -> None:
        def bad(why: str) -> None:
            conn.errors.append(f"{why}: {line!r}")

        ev = decode_text(line)
        k = ev.key
        if b"\r" in line or not line.endswith(b"\n"):
            bad("line ending")
        # rule 1: normalized, the smaller endpoint first
        _, first_is_1 = flow_key((k.ip1, k.port1), (k.ip2, k.port2))
        if not first_is_1 and (k.ip1, k.port1) != (k.ip2, k.port2):
            bad("endpoint 1 is not the smaller")
        # rule 2: hop 0 and vlan=-1 right after port2
        if k.hop != 0:
            bad("hop")
        if f",port2={k.port2},vlan=-1,hop=".encode() not in line:
            bad("vlan=-1 not after port2")
        # rule 5: UDP is DATA only
        if k.l4 == "udp" and ev.event != DATA:
            bad("CREATED/DESTROYED for udp")
        # rule 3: CREATED first, one DESTROYED
        if k.l4 == "tcp":
            if ev.event == CREATED:
                if k.prefix in conn.live:
                    bad("second CREATED")
                conn.live.add(k.prefix)
            elif k.prefix not in conn.live:
                bad(f"{ev.event} of a flow not created on this connection")
            elif ev.event == DESTROYED:
                conn.live.discard(k.prefix)
        # rule 4: 1 <= len <= 16384, from=1|2
        if ev.event == DATA:
            if not 1 <= ev.length <= 16384:
                bad("len out of 1..16384")
            if ev.from_ not in (1, 2):
                bad("from")


class RecordingSocket:
    """Wraps the writer's socket and keeps what every ``sendmsg()`` call sent."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def sendmsg(self, parts: list[bytes]) -> int:
        data = b"".join(parts)
        sent = int(self.inner.sendmsg(parts))
        assert sent == len(data), "the kernel took part of a message"
        self.writes.append(data)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def check_one_event_per_write(writes: list[bytes]) -> None:
    for w in writes:
        line, nl, rest = w.partition(b"\n")
        assert nl, "a write without a complete header line"
        ev = decode_text(line + nl)
        assert len(rest) == (ev.length if ev.event == DATA else 0), "header and body split"


@pytest.fixture
async def home() -> AsyncIterator[Path]:
    with short_tmp() as d:
        yield d


@contextlib.asynccontextmanager
async def running(writer: Loopback7Writer) -> AsyncIterator[Hub]:
    hub = Hub(Classifier())
    await writer.start()
    hub.subscribe(writer)
    try:
        yield hub
    finally:
        await writer.stop()


def tls_flow(hub: Hub, table: FlowTable, client: tuple[str, int], server: tuple[str, int]) -> Flow:
    flow = make_flow(table, client=client, server=server)
    hub.opened(flow)
    hub.data(flow, UP, CLIENT_HELLO, flow.start + 0.1)
    hub.data(flow, DOWN, SERVER_HELLO, flow.start + 0.2)
    assert flow.l7 == "ssl"
    return flow


def fast_writer(path: Path, **kw: Any) -> Loopback7Writer:
    return Loopback7Writer(str(path), backoff_initial=0.01, backoff_max=0.05, **kw)


async def test_writes_follow_spec_section_4(home: Path) -> None:
    ab = Abstractor(home / "loopback7")
    await ab.start()
    writer = fast_writer(home / "loopback7")
    async with running(writer) as hub:
        await wait_for(lambda: writer.link_up)
        channel = writer._channel
        assert channel is not None
        rec = RecordingSocket(channel.sock)
        channel.sock = cast(socket.socket, rec)
        table = FlowTable()
        # the server is the smaller endpoint: the client's bytes are from=2
        f1 = tls_flow(hub, table, ("10.0.0.9", 50000), ("10.0.0.1", 443))
        big_up, big_down = os.urandom(40_000), os.urandom(100_000)
        hub.data(f1, UP, big_up, f1.start + 1)
        hub.data(f1, UP, b"", f1.start + 1.5)  # never a len=0 DATA
        hub.data(f1, DOWN, big_down, f1.start + 2)
        hub.closed(f1, CloseReason.NORMAL, f1.start + 3)
        f2 = tls_flow(hub, table, ("192.0.2.1", 40001), ("2001:db8::1", 443))
        hub.closed(f2, CloseReason.RESET, f2.start + 1)
        f3 = make_flow(table, client=("10.0.0.7", 40002))  # closed before any byte
        hub.opened(f3)
        hub.closed(f3, CloseReason.TIMEOUT, f3.start + 1)
        writer.datagram(("10.0.0.1", 5353), ("224.0.0.251", 5353), b"mdns", 9.0)
        writer.datagram(("10.0.0.1", 5353), ("224.0.0.251", 5353), b"", 9.0)
        writer.datagram(("10.0.0.1", 5353), ("224.0.0.251", 5353), os.urandom(20_000), 9.0)
        # every event written (nothing queued) and read by the abstractor stand-in
        await wait_for(
            lambda: (
                ab.destroyed(40002)
                and any(e.key.l4 == "udp" for e, _ in ab.conn.events)
                and channel.queued == 0
                and len(ab.conn.events) == writer.events_sent
            )
        )
        conn = ab.conn
        assert conn.errors == []
        assert conn.live == set()
        check_one_event_per_write(rec.writes)
        assert len(rec.writes) == len(conn.events) == writer.events_sent
        assert b"".join(rec.writes) == b"".join(
            line + body for line, (_, body) in zip(conn.lines, conn.events, strict=True)
        )
        f1_events = [(e, b) for e, b in conn.events if 50000 in (e.key.port1, e.key.port2)]
        assert f1_events[0][0].event == CREATED and f1_events[0][0].key.ip1 == "10.0.0.1"
        assert f1_events[-1][0].event == DESTROYED and f1_events[-1][0].reason == "NORMAL"
        up = b"".join(b for e, b in f1_events if e.event == DATA and e.from_ == 2)
        down = b"".join(b for e, b in f1_events if e.event == DATA and e.from_ == 1)
        assert up == CLIENT_HELLO + big_up and down == SERVER_HELLO + big_down
        assert [e.length for e, _ in f1_events if e.event == DATA and e.from_ == 2] == [
            len(CLIENT_HELLO),
            16384,
            16384,
            40_000 - 2 * 16384,
        ]
        f2_key = next(e.key for e, _ in conn.events if 40001 in (e.key.port1, e.key.port2))
        assert (f2_key.l3, f2_key.ip1, f2_key.ip2) == ("ipv6", "::ffff:192.0.2.1", "2001:db8::1")
        f3_events = [e.event for e, _ in conn.events if 40002 in (e.key.port1, e.key.port2)]
        assert f3_events == [CREATED, DESTROYED]
        udp = [(e, b) for e, b in conn.events if e.key.l4 == "udp"]
        assert [(e.event, e.from_, b) for e, b in udp] == [(DATA, 1, b"mdns")]
        assert writer.drops == {"oversize": 1}
        assert writer.flows == 0
    await ab.kill()


async def test_abstractor_absent_then_up(home: Path) -> None:
    path = home / "loopback7"
    writer = fast_writer(path)
    async with running(writer) as hub:
        table = FlowTable()
        early = tls_flow(hub, table, ("10.0.0.2", 41000), ("10.0.0.1", 443))
        assert not writer.link_up
        assert writer.drops["not_connected"] >= 1
        await wait_for(lambda: writer.connect_failures >= 2)
        assert writer.last_error
        ab = Abstractor(path)
        await ab.start()
        await wait_for(lambda: writer.link_up)
        assert writer.connects == 1 and writer.reconnects == 0
        # the flow that started before the link is announced on it, with its later bytes
        hub.data(early, UP, b"late", early.start + 1)
        hub.closed(early, CloseReason.NORMAL, early.start + 2)
        later = tls_flow(hub, table, ("10.0.0.2", 42000), ("10.0.0.1", 443))
        hub.closed(later, CloseReason.NORMAL, later.start + 2)
        await wait_for(lambda: ab.destroyed(42000))
        assert ab.conn.errors == []
        early_events = [(e, b) for e, b in ab.conn.events if 41000 in (e.key.port1, e.key.port2)]
        assert [(e.event, b) for e, b in early_events] == [
            (CREATED, b""),
            (DATA, b"late"),
            (DESTROYED, b""),
        ]
        assert {e.key.port1 for e, _ in ab.conn.events} | {
            e.key.port2 for e, _ in ab.conn.events
        } == {443, 41000, 42000}
        assert writer.dropped_bytes["not_connected"] >= len(CLIENT_HELLO) + len(SERVER_HELLO)
    await ab.kill()


async def test_abstractor_restart_mid_run(home: Path) -> None:
    path = home / "loopback7"
    ab = Abstractor(path)
    await ab.start()
    writer = fast_writer(path)
    async with running(writer) as hub:
        await wait_for(lambda: writer.link_up)
        table = FlowTable()
        old = tls_flow(hub, table, ("10.0.0.3", 43000), ("10.0.0.1", 443))
        await wait_for(lambda: bool(ab.conns) and len(ab.conn.events) == 3)
        first = ab.conn
        await ab.kill()  # the abstractor dies
        await wait_for(lambda: not writer.link_up)
        t0 = time.perf_counter()
        hub.data(old, UP, os.urandom(50_000), old.start + 1)  # proxying goes on
        assert time.perf_counter() - t0 < 0.05
        assert writer.drops["not_connected"] >= 1
        await ab.start()  # and comes back
        await wait_for(lambda: writer.link_up)
        assert writer.reconnects == 1
        assert writer.reannounced == 1
        hub.data(old, DOWN, b"after restart", old.start + 2)
        hub.closed(old, CloseReason.NORMAL, old.start + 3)  # announced again: it ends there
        new = tls_flow(hub, table, ("10.0.0.3", 44000), ("10.0.0.1", 443))
        hub.closed(new, CloseReason.NORMAL, new.start + 1)
        await wait_for(lambda: ab.destroyed(44000))
        assert ab.conn is not first
        assert ab.conn.errors == [] and first.errors == []
        assert [e.event for e, _ in first.events] == [CREATED, DATA, DATA]
        old_events = [(e, b) for e, b in ab.conn.events if 43000 in (e.key.port1, e.key.port2)]
        assert [e.event for e, _ in old_events] == [CREATED, DATA, DESTROYED]
        assert old_events[0][0].time == pytest.approx(old.start)  # its original start
        assert old_events[1][1] == b"after restart"
        new_events = [e.event for e, _ in ab.conn.events if 44000 in (e.key.port1, e.key.port2)]
        assert new_events == [CREATED, DATA, DATA, DESTROYED]
    await ab.kill()


async def test_buffer_full_drops_data_never_blocks(home: Path) -> None:
    path = home / "loopback7"
    ab = Abstractor(path)
    ab.gate.clear()  # accepts, then does not read
    await ab.start()
    writer = fast_writer(path, buffer_limit=128 << 10, sndbuf=128 << 10)
    async with running(writer) as hub:
        await wait_for(lambda: writer.link_up)
        table = FlowTable()
        flows = [tls_flow(hub, table, ("10.0.0.4", 45000 + i), ("10.0.0.1", 443)) for i in range(4)]
        worst = 0.0
        for seq in range(60):  # 4 x 60 x 32 KiB = 7.5 MiB
            for flow in flows:
                t0 = time.perf_counter()
                hub.data(flow, DOWN, os.urandom(32 << 10), flow.start + seq)
                worst = max(worst, time.perf_counter() - t0)
        for flow in flows:
            hub.closed(flow, CloseReason.NORMAL, flow.start + 99)
        assert worst < 0.05
        assert writer.drops["buffer_full"] > 0 and writer.dropped_bytes["buffer_full"] > 0
        assert writer.link_up and "overflow" not in writer.drops, (writer.drops, writer.last_error)
        ab.gate.set()  # the abstractor catches up
        await wait_for(lambda: ab.destroyed(45003), within=10)
        assert ab.conn.errors == [] and ab.conn.live == set()
        destroyed = [e for e, _ in ab.conn.events if e.event == DESTROYED]
        assert len(destroyed) == 4
    await ab.kill()


async def test_overflow_drops_connection_and_reconnects(home: Path) -> None:
    path = home / "loopback7"
    ab = Abstractor(path)
    ab.gate.clear()
    await ab.start()
    writer = fast_writer(path, buffer_limit=32 << 10, control_headroom=2048, sndbuf=128 << 10)
    async with running(writer) as hub:
        await wait_for(lambda: writer.link_up)
        table = FlowTable()
        f = tls_flow(hub, table, ("10.0.0.5", 46000), ("10.0.0.1", 443))
        for i in range(100):
            hub.data(f, DOWN, os.urandom(16 << 10), f.start + i)
        await wait_for(lambda: writer.buffered > 0)
        for i in range(200):
            g = tls_flow(hub, table, ("10.0.0.5", 47000 + i), ("10.0.0.1", 443))
            hub.closed(g, CloseReason.NORMAL, g.start + 1)
        assert writer.drops["overflow"] == 1
        ab.gate.set()
        await wait_for(lambda: writer.reconnects >= 1)
        assert hub.subscriber_errors == 0
    await ab.kill()


async def test_stop_closes_the_link(home: Path) -> None:
    path = home / "loopback7"
    ab = Abstractor(path)
    await ab.start()
    writer = fast_writer(path)
    async with running(writer):
        await wait_for(lambda: writer.link_up)
    assert not writer.link_up
    await wait_for(lambda: ab.conn.closed)
    await writer.stop()  # twice is fine
    await ab.kill()
