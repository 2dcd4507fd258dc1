"""Serving SF-TAP flow sockets: the real Hub, real Flow objects, real AF_UNIX readers."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxytap.errors import ConfigError
from proxytap.export import sftap_server
from proxytap.export.hub import Hub
from proxytap.export.sftap_server import SftapServer
from proxytap.flows.table import DOWN, UP, CloseReason, FlowTable
from proxytap.proto.classify import DEFAULT_RULES, Classifier, Rule, interface_for
from proxytap.proto.sftap import CREATED, DATA, DESTROYED, encode_text, flow_hash, flow_key
from tests.conftest import TEST_ACCESS
from tests.export.sftap_helpers import TapReader, check_stream, make_flow, short_tmp, wait_for

REQ = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.fixture
def home() -> Any:
    with short_tmp() as d:
        yield d


async def started(home: Path, **kw: Any) -> tuple[Hub, SftapServer]:
    rules = kw.pop("rules", DEFAULT_RULES)
    hub = Hub(Classifier(rules))
    server = SftapServer(home, hub.classifier, **kw)
    await server.start()
    hub.subscribe(server)
    return hub, server


@pytest.fixture
async def served(home: Path) -> AsyncIterator[tuple[Hub, SftapServer]]:
    hub, server = await started(home)
    yield hub, server
    await server.stop()


async def tap(server: SftapServer, name: str, binary: bool = False) -> TapReader:
    iface = server.interfaces[name]
    before = len(iface.readers)
    reader = await TapReader.connect(iface.path, binary)
    await wait_for(lambda: len(iface.readers) == before + 1)
    return reader


def http_flow(hub: Hub, table: FlowTable, **kw: Any) -> Any:
    flow = make_flow(table, **kw)
    hub.opened(flow)
    hub.data(flow, UP, REQ, flow.start + 0.001)
    hub.data(flow, DOWN, RESP, flow.start + 0.002)
    assert flow.l7 == "http"
    return flow


def is_destroyed(ev: Any) -> bool:
    return bool(ev.event == DESTROYED)


# -- sockets ----------------------------------------------------------------------


def sockets(home: Path) -> dict[str, int]:
    """Socket files under ``home``, by relative path, with their permission bits."""
    out = {}
    for p in home.glob("*/*"):
        st = os.stat(p)
        if stat.S_ISSOCK(st.st_mode):
            out[p.relative_to(home).as_posix()] = stat.S_IMODE(st.st_mode)
    return out


async def test_sockets_created_with_mode_and_removed(home: Path) -> None:
    stale = home / "tcp" / "ssl"
    stale.parent.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # a socket file nobody serves any more
    s.close()
    rules = [Rule("http", 100, ports=frozenset({80}), balance=3), *DEFAULT_RULES[3:]]
    _, server = await started(home, rules=rules, socket_mode=0o640)
    served = sockets(home)
    expected = {f"tcp/http{i}" for i in range(3)} | {"tcp/ssl", "tcp/default", "udp/dns"}
    assert expected | {"udp/default"} <= set(served)
    assert set(served) == {i for i in server.interfaces}
    assert set(served.values()) == {0o640}
    await server.stop()
    assert sockets(home) == {}


async def test_refuses_to_replace_a_file_or_a_live_socket(home: Path) -> None:
    (home / "tcp").mkdir()
    (home / "tcp" / "http").write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        await started(home)
    assert (home / "tcp" / "http").read_text() == "not a socket"
    assert not (home / "tcp" / "ssl").exists()  # cleaned up what it had opened
    (home / "tcp" / "http").unlink()
    _, first = await started(home)
    try:
        with pytest.raises(OSError, match="another process"):
            await started(home)
    finally:
        await first.stop()


def test_bad_formats_are_config_errors(home: Path) -> None:
    c = Classifier()
    with pytest.raises(ConfigError):
        SftapServer(home, c, formats={"tcp/htpp": "binary"})
    with pytest.raises(ConfigError):
        SftapServer(home, c, formats={"tcp/http": "json"})
    with pytest.raises(ConfigError):
        SftapServer(home, c, default_format="json")


# -- event order and payload ----------------------------------------------------------


async def test_created_data_destroyed_byte_exact(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    reader = await tap(server, "tcp/http")
    table = FlowTable()
    flow = make_flow(table, client=("10.0.0.1", 40000), server=("93.184.216.34", 80))
    hub.opened(flow)
    up = [REQ, os.urandom(3000), b"x"]
    down = [RESP, os.urandom(70000), b"", os.urandom(10)]
    t = flow.start
    hub.data(flow, UP, up[0], t + 1)
    hub.data(flow, DOWN, down[0], t + 2)
    for i in range(1, 4):
        if i < len(up):
            hub.data(flow, UP, up[i], t + 2 + i)
        hub.data(flow, DOWN, down[i], t + 2.5 + i)
    hub.closed(flow, CloseReason.NORMAL, t + 10)
    events = await reader.until(is_destroyed)
    assert events[0][0].event == CREATED
    assert events[0][0].time == flow.start
    assert events[-1][0].event == DESTROYED and events[-1][0].reason == "NORMAL"
    assert events[-1][0].time == t + 10
    flows = check_stream(events)
    (rec,) = flows.values()
    assert bytes(rec.up) == b"".join(up)
    assert bytes(rec.down) == b"".join(down)
    key = rec.created.key
    assert (key.ip1, key.port1, key.ip2, key.port2, key.hop) == (
        "10.0.0.1",
        40000,
        "93.184.216.34",
        80,
        0,
    )
    froms = {(ev.match, ev.from_) for ev, _ in events if ev.event == DATA}
    assert froms == {("up", 1), ("down", 2)}
    assert all(ev.length > 0 for ev, _ in events if ev.event == DATA)
    assert server.flows == 0


async def test_from_follows_the_smaller_endpoint(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    reader = await tap(server, "tcp/http")
    flow = http_flow(hub, FlowTable(), client=("192.168.1.9", 50000), server=("10.1.1.1", 80))
    hub.closed(flow, CloseReason.RESET, flow.start + 1)
    events = await reader.until(is_destroyed)
    data = [ev for ev, _ in events if ev.event == DATA]
    assert data[0].key.ip1 == "10.1.1.1"  # the server is endpoint 1
    assert (data[0].match, data[0].from_) == ("up", 2)
    assert (data[1].match, data[1].from_) == ("down", 1)
    assert events[-1][0].reason == "RESET"


async def test_reasons(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    reader = await tap(server, "tcp/http")
    table = FlowTable()
    got = []
    for i, reason in enumerate(CloseReason):
        flow = http_flow(hub, table, client=("10.0.0.1", 40000 + i))
        hub.closed(flow, reason, flow.start + 1)
        got.append((await reader.until(is_destroyed))[-1][0].reason)
    assert got == ["NORMAL", "RESET", "TIMEOUT", "RESET", "SHUTDOWN"]


@pytest.mark.parametrize("chunk", [None, 65535])
async def test_large_chunk_split(home: Path, chunk: int | None) -> None:
    """32 KiB by default (one kernel socket buffer per message); up to 65535 when set."""
    hub, server = await started(home, **({} if chunk is None else {"chunk": chunk}))
    try:
        size = chunk or 32768
        reader = await tap(server, "tcp/http")
        flow = http_flow(hub, FlowTable())
        big = os.urandom(200_000)
        hub.data(flow, DOWN, big, flow.start + 1)
        hub.closed(flow, CloseReason.NORMAL, flow.start + 2)
        events = await reader.until(is_destroyed)
        lens = [ev.length for ev, _ in events if ev.event == DATA]
        whole, rest = divmod(200_000, size)
        assert lens == [len(REQ), len(RESP), *[size] * whole, rest]
        (rec,) = check_stream(events).values()
        assert bytes(rec.down) == RESP + big
    finally:
        await server.stop()


async def test_binary_format(home: Path) -> None:
    hub, server = await started(home, formats={"tcp/http": "binary"}, chunk=65535)
    try:
        reader = await tap(server, "tcp/http", binary=True)
        flow = http_flow(hub, FlowTable(), server=("2001:db8::1", 80), client=("2001:db8::2", 1))
        hub.data(flow, UP, os.urandom(100_000), flow.start + 0.25)
        hub.closed(flow, CloseReason.TIMEOUT, flow.start + 0.5)
        events = await reader.until(is_destroyed)
        (rec,) = check_stream(events).values()
        assert rec.created.key.l3 == "ipv6"
        assert rec.created.time == pytest.approx(flow.start, abs=1e-6)
        assert rec.destroyed is not None and rec.destroyed.reason == "TIMEOUT"
        assert max(len(c) for c in rec.chunks) == 65535
        assert bytes(rec.up[: len(REQ)]) == REQ
        assert server.interfaces["tcp/ssl"].format == "text"
    finally:
        await server.stop()


async def test_classified_interface_only(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    http = await tap(server, "tcp/http")
    default = await tap(server, "tcp/default")
    table = FlowTable()
    odd = make_flow(table, client=("10.0.0.1", 1234))
    hub.opened(odd)
    hub.data(odd, UP, b"\x00\x01binary", odd.start)
    hub.closed(odd, CloseReason.NORMAL, odd.start + 1)  # final: default
    events = await default.until(is_destroyed)
    assert [ev.event for ev, _ in events] == [CREATED, DATA, DESTROYED]
    assert odd.l7 == "default"
    assert await http.nothing_within(0.05)


# -- readers coming and going -------------------------------------------------------


async def test_no_reader_no_encoding(
    served: tuple[Hub, SftapServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, server = served

    def boom(*a: object, **k: object) -> Any:
        raise AssertionError("encoding work with nobody listening")

    for fn in ("flow_key", "FlowHeaders"):
        monkeypatch.setattr(sftap_server, fn, boom)
    table = FlowTable()
    for i in range(50):
        flow = http_flow(hub, table, client=("10.0.0.1", 30000 + i))
        hub.data(flow, UP, os.urandom(100_000), flow.start + 1)
        hub.closed(flow, CloseReason.NORMAL, flow.start + 2)
    assert hub.subscriber_errors == 0
    assert server.flows_unheard == 50 and server.flows_exported == 0 and server.flows == 0


async def test_mid_flow_reader_sees_nothing_of_that_flow(
    served: tuple[Hub, SftapServer],
) -> None:
    hub, server = served
    early = await tap(server, "tcp/http")
    table = FlowTable()
    a = http_flow(hub, table, client=("10.0.0.1", 1000))
    late = await tap(server, "tcp/http")
    hub.data(a, UP, b"more of a", a.start + 1)
    b = http_flow(hub, table, client=("10.0.0.1", 2000))
    hub.closed(a, CloseReason.NORMAL, a.start + 2)
    hub.data(b, DOWN, b"more of b", b.start + 3)
    hub.closed(b, CloseReason.NORMAL, b.start + 4)
    b_port = lambda ev: ev.event == DESTROYED and ev.key.port1 == 2000  # noqa: E731
    late_events = await late.until(b_port)
    assert {ev.key.port1 for ev, _ in late_events} == {2000}
    (late_flow,) = check_stream(late_events).values()
    assert late_flow.created.key.port1 == 2000
    early_flows = check_stream(await early.until(b_port))
    assert len(early_flows) == 2


async def test_killed_reader_does_not_disturb_others(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    victim = await tap(server, "tcp/http")
    survivor = await tap(server, "tcp/http")
    flow = http_flow(hub, FlowTable())
    sent = bytearray(RESP)
    victim.close()  # the analyzer process dies mid-flow
    for i in range(200):
        chunk = os.urandom(20_000)
        sent += chunk
        hub.data(flow, DOWN, chunk, flow.start + i)
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the loop notice the dead socket
    hub.closed(flow, CloseReason.NORMAL, flow.start + 999)
    events = await survivor.until(is_destroyed)
    (rec,) = check_stream(events).values()
    assert bytes(rec.down) == bytes(sent)
    assert hub.subscriber_errors == 0
    await wait_for(lambda: len(server.readers) == 1)


async def test_reader_chatter_is_ignored_and_eof_closes(
    served: tuple[Hub, SftapServer],
) -> None:
    hub, server = served
    reader = await tap(server, "tcp/http")
    reader.writer.write(b"hello abstractor\n" * 10000)
    await reader.writer.drain()
    flow = http_flow(hub, FlowTable())
    hub.closed(flow, CloseReason.NORMAL, flow.start + 1)
    assert len(check_stream(await reader.until(is_destroyed))) == 1
    reader.writer.write_eof()
    await wait_for(lambda: not server.readers)


async def test_stop_closes_readers(home: Path) -> None:
    hub, server = await started(home)
    reader = await tap(server, "tcp/http")
    flow = http_flow(hub, FlowTable())
    await server.stop()
    events = []
    with pytest.raises((EOFError, asyncio.IncompleteReadError)):
        while True:
            events.append(await reader.event())
    assert [ev.event for ev, _ in events] == [CREATED, DATA, DATA]
    hub.closed(flow, CloseReason.NORMAL, flow.start + 1)  # after stop: nothing, no error
    assert hub.subscriber_errors == 0


# -- slow readers ---------------------------------------------------------------------


def _chunk(flow_no: int, seq: int, size: int) -> bytes:
    head = struct.pack("!II", flow_no, seq)
    return head + bytes([(flow_no + seq) & 0xFF]) * (size - len(head))


@pytest.mark.parametrize("on_gap", ["skip", "cut"])
async def test_slow_reader_drops_data_keeps_framing(home: Path, on_gap: str) -> None:
    hub, server = await started(home, reader_buffer=256 << 10, on_gap=on_gap)
    try:
        slow = await tap(server, "tcp/http")
        fast = await tap(server, "tcp/http")
        slow_reader, fast_reader = server.readers
        slow.writer.transport.pause_reading()  # type: ignore[attr-defined]
        table = FlowTable()
        flows = [http_flow(hub, table, client=("10.0.0.1", 20000 + i)) for i in range(8)]
        total = 0
        fast_task = asyncio.create_task(fast.until(lambda ev: False, within=30))
        for seq in range(40):  # 8 flows x 40 x 48 KiB = 15 MiB
            for n, flow in enumerate(flows):
                # synchronous: the hub cannot wait for the stalled reader
                hub.data(flow, UP if seq % 2 else DOWN, _chunk(n, seq, 48 << 10), flow.start + seq)
                total += 48 << 10
            # the fast reader keeps up: it has read what it was sent
            await wait_for(lambda: fast_reader.buffered == 0 and fast_reader.unread == 0)
        for flow in flows:
            hub.closed(flow, CloseReason.NORMAL, flow.start + 100)
        marker = http_flow(hub, table, client=("10.0.0.2", 1))
        hub.closed(marker, CloseReason.NORMAL, marker.start + 101)
        assert hub.subscriber_errors == 0
        assert slow_reader.drops["buffer_full"] > 0 and slow_reader.bytes_dropped > 0
        assert slow_reader.buffered <= (256 << 10) + (49 << 10) + (1 << 20)
        # the slow analyzer wakes up: its stream must be intact, without orphans
        slow.writer.transport.resume_reading()  # type: ignore[attr-defined]
        is_marker = lambda ev: ev.event == DESTROYED and ev.key.ip1 == "10.0.0.2"  # noqa: E731
        slow_events = await slow.until(is_marker, within=20)
        slow_flows = check_stream(slow_events)
        assert len(slow_flows) == 9
        for rec in slow_flows.values():
            for body in rec.chunks:
                if len(body) == 48 << 10:
                    n, seq = struct.unpack("!II", body[:8])
                    assert body == _chunk(n, seq, 48 << 10)
        reasons = {rec.destroyed.reason for rec in slow_flows.values() if rec.destroyed}
        if on_gap == "cut":
            assert "COMPROMISED" in reasons
            assert slow_reader.drops.get("cut", 0) > 0
        else:
            assert reasons == {"NORMAL"}
        fast_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fast_task
        assert fast_reader.drops == {}
        assert server.drops.get("buffer_full", 0) == slow_reader.drops["buffer_full"]
    finally:
        await server.stop()


async def test_overflow_drops_the_reader(home: Path) -> None:
    hub, server = await started(
        home, reader_buffer=64 << 10, control_headroom=4096, sndbuf=128 << 10
    )
    try:
        slow = await tap(server, "tcp/http")
        slow.writer.transport.pause_reading()  # type: ignore[attr-defined]
        table = FlowTable()
        flow = http_flow(hub, table)
        for i in range(100):
            hub.data(flow, DOWN, os.urandom(16 << 10), flow.start + i)
        reader = server.readers[0]
        await wait_for(lambda: reader.paused)
        for i in range(200):  # CREATED/DESTROYED pile up beyond the headroom
            f = http_flow(hub, table, client=("10.0.0.3", 1000 + i))
            hub.closed(f, CloseReason.NORMAL, f.start + 1)
        assert reader.drops.get("overflow") == 1
        assert server.readers_overflowed == 1
        await wait_for(lambda: not server.readers)
        assert hub.subscriber_errors == 0
    finally:
        await server.stop()


# -- balance and UDP --------------------------------------------------------------------


async def test_balance_by_flow_hash(home: Path) -> None:
    rules = [
        r if r.name != "http" else Rule("http", 100, r.up, r.down, balance=2) for r in DEFAULT_RULES
    ]
    hub, server = await started(home, rules=rules)
    try:
        readers = [await tap(server, "tcp/http0"), await tap(server, "tcp/http1")]
        table = FlowTable()
        expected: dict[str, set[int]] = {"http0": set(), "http1": set()}
        http_rule = next(r for r in hub.classifier.rules if r.name == "http")
        for i in range(20):
            flow = http_flow(hub, table, client=("10.0.0.1", 40000 + i * 7))
            hub.closed(flow, CloseReason.NORMAL, flow.start + 1)
            key, _ = flow_key(flow.client, flow.server)
            expected[interface_for(http_rule, flow_hash(key))].add(40000 + i * 7)
        assert expected["http0"] and expected["http1"]
        for name, reader in zip(("http0", "http1"), readers, strict=True):
            want = expected[name]
            got: set[int] = set()

            def last(ev: Any, got: set[int] = got, want: set[int] = want) -> bool:
                if ev.event == DESTROYED:
                    got.add(ev.key.port1)
                return got == want

            check_stream(await reader.until(last))
            assert got == want
    finally:
        await server.stop()


async def test_udp_datagrams(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    dns = await tap(server, "udp/dns")
    other = await tap(server, "udp/default")
    # through the hub, as a SOCKS5 UDP relay will send them
    hub.datagram(("10.0.0.1", 5000), ("10.0.0.53", 53), b"\x12\x34query", 5.5)
    hub.datagram(("10.0.0.53", 53), ("10.0.0.1", 5000), b"\x12\x34answer", 5.75)
    hub.datagram(("10.0.0.1", 5000), ("10.0.0.9", 9999), b"other", 6.0)
    hub.datagram(("10.0.0.1", 5000), ("10.0.0.9", 9999), b"", 6.0)
    (q, qb), (a, ab) = await dns.event(), await dns.event()
    assert (q.event, q.key.l4, q.match, q.from_, qb) == (DATA, "udp", "none", 1, b"\x12\x34query")
    assert (q.key.ip1, q.key.port1, q.key.ip2, q.key.port2) == ("10.0.0.1", 5000, "10.0.0.53", 53)
    assert (a.from_, ab) == (2, b"\x12\x34answer")
    ev, body = await other.event()
    assert body == b"other" and ev.time == 6.0
    assert await other.nothing_within(0.05)


# -- stats ------------------------------------------------------------------------------


async def test_stats(served: tuple[Hub, SftapServer]) -> None:
    hub, server = served
    before = time.time()
    reader = await tap(server, "tcp/http")
    flow = http_flow(hub, FlowTable())
    (r,) = server.readers
    assert r.interface == "tcp/http"
    assert before - 1 <= r.connected_at <= time.time()
    assert r.flows == 1 and server.flows == 1
    hub.closed(flow, CloseReason.NORMAL, flow.start + 1)
    events = await reader.until(is_destroyed)
    assert r.events_sent == len(events) == 4
    assert r.bytes_sent == sum(len(encode_text(ev)) + len(body) for ev, body in events)
    assert r.flows == 0 and r.buffered == 0 and r.drops == {} and r.bytes_dropped == 0
    assert server.events_sent == 4 and server.readers_accepted == 1
    assert server.flows_exported == 1
    reader.close()
    await wait_for(lambda: not server.readers)
    assert server.events_sent == 4  # kept after the reader left


# -- end to end: the proxy's composition root, a real CONNECT tunnel ----------------------


async def test_connect_tunnel_end_to_end(home: Path, start_proxy: Any) -> None:
    from proxytap.config import Config, ExportConfig, ListenerConfig

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(RESP)
        await w.drain()
        w.close()

    origin_server = await asyncio.start_server(origin, "127.0.0.1", 0)
    oport = origin_server.sockets[0].getsockname()[1]
    cfg = Config(
        listeners=(ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),),
        export=ExportConfig(sftap_home=str(home)),
        access=TEST_ACCESS,
    )
    proxy = await start_proxy(cfg)
    server = next(s for s in proxy.app.sinks if isinstance(s, SftapServer))
    reader = await tap(server, "tcp/http")
    r, w = await asyncio.open_connection(*proxy.http)
    w.write(f"CONNECT 127.0.0.1:{oport} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode())
    assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    client_port = w.get_extra_info("sockname")[1]
    w.write(REQ)
    assert await r.read() == RESP
    w.close()
    events = await reader.until(is_destroyed)
    (rec,) = check_stream(events).values()
    assert bytes(rec.up) == REQ and bytes(rec.down) == RESP
    key = rec.created.key
    assert {(key.ip1, key.port1), (key.ip2, key.port2)} == {
        ("127.0.0.1", client_port),
        ("127.0.0.1", oport),
    }
    origin_server.close()
