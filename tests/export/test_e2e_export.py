"""Flow export end to end: real clients through the real proxy, read the way analyzers read.

Issue B acceptance. Every test starts the whole proxy (``App`` through the
``start_proxy`` fixture, uvloop, real listeners), connects its flow-socket
readers *before* any traffic, drives real clients (curl subprocesses,
python-socks, raw asyncio sockets) to real origins, and checks what an SF-TAP
analyzer (or an abstractor's loopback7) receives against what the client and
the origin independently saw.

Oracles are independent of the code under test wherever possible:

* the client's address is its own socket's address (``getsockname``, or curl's
  ``%{local_ip} %{local_port}``), the origin's is where it listens;
* "what the client and the server sent" is recorded at the origin: either a raw
  origin that keeps every byte, or ``Shim``, a recording TCP relay placed in
  front of a real aiohttp origin (the proxy connects to the shim, so the shim
  *is* the flow's destination and sees exactly the inner flow's bytes);
* endpoint order is computed here from the spec's rule (16-byte address, then
  port), not with ``proxytap.proto.sftap.flow_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import Config, ExportConfig, ListenerConfig
from proxytap.export.loopback7 import Loopback7Writer
from proxytap.export.sftap_server import Reader, SftapServer
from proxytap.proto.sftap import (
    CREATED,
    DATA,
    DESTROYED,
    HEADER_SIZE,
    Event,
    decode_binary,
    decode_text,
    encode_binary,
    encode_text,
)
from tests.certs import Pki
from tests.conftest import (
    BLOCK,
    Origin,
    ProxyFactory,
    RawServer,
    RunningProxy,
    here,
    pattern,
    pattern_sha256,
    run,
)
from tests.export.sftap_helpers import TapReader, check_stream, short_tmp, wait_for

Endpoint = tuple[str, int]

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
    ListenerConfig(kind="mixed", address="[::1]:0", name="mixed6"),
)

FORMATS = ["text", "binary"]


@pytest.fixture
def home() -> Any:
    with short_tmp() as d:
        yield d


def open_access() -> dict[str, Any]:
    """Let the proxy reach loopback origins on any port (the access policy denies them).

    The ``[access]`` section is being added while these tests are written: when
    ``Config`` has it, open it up for the test origins; before, there is no policy.
    """
    if "access" not in {f.name for f in dataclasses.fields(Config)}:
        return {}
    from proxytap.policy.acl import AccessConfig

    return {
        "access": AccessConfig(allow_dest=("127.0.0.0/8", "::1/128"), connect_ports=("1-65535",))
    }


def export_config(home: Path | None, **export: Any) -> Config:
    return Config(
        listeners=LISTENERS,
        export=ExportConfig(sftap_home=str(home) if home is not None else None, **export),
        **open_access(),
    )


def sftap_of(proxy: RunningProxy) -> SftapServer:
    return next(s for s in proxy.app.sinks if isinstance(s, SftapServer))


def loopback7_of(proxy: RunningProxy) -> Loopback7Writer:
    return next(s for s in proxy.app.sinks if isinstance(s, Loopback7Writer))


# -- the spec's endpoint order, computed independently ---------------------------------


def _addr16(ip: str, v6: bool) -> bytes:
    a = ipaddress.ip_address(ip)
    if a.version == 6:
        return a.packed
    if v6:  # one IPv4 side in an IPv6 flow: IPv4-mapped
        return bytes(10) + b"\xff\xff" + a.packed
    return a.packed + bytes(12)


def _ntop(packed: bytes, v6: bool) -> str:
    return (
        socket.inet_ntop(socket.AF_INET6, packed)
        if v6
        else socket.inet_ntop(socket.AF_INET, packed[:4])
    )


def spec_order(client: Endpoint, server: Endpoint) -> tuple[Endpoint, Endpoint, bool, str]:
    """(endpoint 1, endpoint 2, client is endpoint 1, l3) per spec section 1."""
    v6 = ":" in client[0] or ":" in server[0]
    c = (_addr16(client[0], v6), client[1])
    s = (_addr16(server[0], v6), server[1])
    client_is_1 = c <= s
    a, b = (c, s) if client_is_1 else (s, c)
    return (_ntop(a[0], v6), a[1]), (_ntop(b[0], v6), b[1]), client_is_1, ("ipv6" if v6 else "ipv4")


# -- reading flow sockets, keeping each header's raw bytes ------------------------------


@dataclasses.dataclass
class Ev:
    ev: Event
    body: bytes
    raw: bytes  # the header exactly as received (text line or 64 bytes)


def key_bytes(raw: bytes, binary: bool) -> bytes:
    """The bytes of a header that name the flow (addresses, ports, hop, l3, l4)."""
    if binary:
        return raw[0:32] + raw[48:52] + raw[56:59]
    return raw.split(b",event=", 1)[0]


class RawTap(TapReader):
    """``TapReader`` that also keeps every raw header."""

    async def event_raw(self) -> Ev:
        if self.binary:
            raw = await self.reader.readexactly(HEADER_SIZE)
            ev = decode_binary(raw)
        else:
            raw = await self.reader.readline()
            if not raw:
                raise EOFError
            ev = decode_text(raw)
        body = await self.reader.readexactly(ev.length) if ev.event == DATA else b""
        return Ev(ev, body, raw)

    async def read_flows(self, count: int = 1, within: float = 15.0) -> list[Ev]:
        """Every event up to the ``count``-th DESTROYED."""
        out: list[Ev] = []

        async def _run() -> None:
            seen = 0
            while seen < count:
                e = await self.event_raw()
                out.append(e)
                if e.ev.event == DESTROYED:
                    seen += 1

        await asyncio.wait_for(_run(), within)
        return out


async def connect_tap(server: SftapServer, name: str) -> RawTap:
    iface = server.interfaces[name]
    before = server.readers_accepted
    tap = await RawTap.connect(iface.path, iface.binary)
    await wait_for(lambda: server.readers_accepted == before + 1)
    return tap


class Taps:
    """A reader on every TCP flow socket, connected before any traffic."""

    def __init__(self, server: SftapServer, taps: dict[str, RawTap]) -> None:
        self.server = server
        self.taps = taps

    @classmethod
    async def open(cls, server: SftapServer) -> Taps:
        taps = {}
        for name in server.interfaces:
            if name.startswith("tcp/"):
                taps[name] = await connect_tap(server, name)
        return cls(server, taps)

    async def flows(self, name: str, count: int = 1) -> dict[str, list[Ev]]:
        """Read ``count`` whole flows from ``name``; check framing; events by flow, in order.

        Then check that no other flow socket got anything.
        """
        events = await self.taps[name].read_flows(count)
        check_stream([(e.ev, e.body) for e in events])  # framing, no orphans, one DESTROYED
        by_flow: dict[str, list[Ev]] = {}
        for e in events:
            by_flow.setdefault(e.ev.key.prefix, []).append(e)
        assert len(by_flow) == count
        others = [n for n in self.taps if n != name]
        quiet = await asyncio.gather(*(self.taps[n].nothing_within(0.05) for n in others))
        loud = [n for n, q in zip(others, quiet, strict=True) if not q]
        assert not loud, f"the flow also went to {loud}"
        return by_flow

    def close(self) -> None:
        for t in self.taps.values():
            t.close()


def flow_start(proxy: RunningProxy, client: Endpoint, server: Endpoint) -> float:
    """The start time the proxy recorded for the flow (client, server)."""
    starts = [f.start for f in proxy.recorder.flows() if (f.client, f.server) == (client, server)]
    assert len(starts) == 1, (
        client,
        server,
        [(f.client, f.server) for f in proxy.recorder.flows()],
    )
    return starts[0]


def verify_flow(
    evs: list[Ev],
    *,
    client: Endpoint,
    server: Endpoint,
    up: bytes,
    down: bytes,
    reason: str,
    start: float,
    t0: float,
    t1: float,
    binary: bool,
) -> None:
    """Every acceptance rule for one flow's events, as one analyzer received them."""
    (ip1, p1), (ip2, p2), client_is_1, l3 = spec_order(client, server)
    kinds = [e.ev.event for e in evs]
    assert kinds[0] == CREATED, kinds
    assert kinds[-1] == DESTROYED, kinds
    assert kinds.count(CREATED) == 1 and kinds.count(DESTROYED) == 1, kinds
    for e in evs:
        k = e.ev.key
        assert (k.ip1, k.port1, k.ip2, k.port2) == (ip1, p1, ip2, p2), (e.raw, client, server)
        assert (k.hop, k.l3, k.l4) == (0, l3, "tcp")
        # the wire bytes are the canonical encoding: field order, %.17g, padding
        assert e.raw == (encode_binary(e.ev) if binary else encode_text(e.ev)), e.raw
    assert len({key_bytes(e.raw, binary) for e in evs}) == 1, "key bytes differ between events"
    if not binary:
        prefix = f"ip1={ip1},ip2={ip2},port1={p1},port2={p2},hop=0,l3={l3},l4=tcp,event="
        assert all(e.raw.startswith(prefix.encode()) for e in evs)
        assert all(e.raw.endswith(b"\n") and not e.raw.endswith(b"\r\n") for e in evs)
    up_from = 1 if client_is_1 else 2
    data = [e for e in evs if e.ev.event == DATA]
    for e in data:
        assert e.ev.length == len(e.body) and 1 <= e.ev.length <= 65535
        if e.ev.match == "up":
            assert e.ev.from_ == up_from, e.raw
        else:
            assert e.ev.match == "down", e.raw
            assert e.ev.from_ == 3 - up_from, e.raw
    got_up = b"".join(e.body for e in data if e.ev.match == "up")
    got_down = b"".join(e.body for e in data if e.ev.match == "down")
    assert len(got_up) == len(up) and got_up == up
    assert len(got_down) == len(down) and got_down == down
    created, destroyed = evs[0].ev, evs[-1].ev
    assert destroyed.reason == reason
    tol = 1e-6 if binary else 0.0  # binary time is a timeval (microseconds)
    if binary:
        assert abs(created.time - start) <= tol
    else:
        assert created.time == start  # %.17g round-trips the float exactly
    assert t0 - tol <= created.time
    times = [e.ev.time for e in data]
    if data:
        assert created.time <= times[0]
        assert times == sorted(times)
        assert times[-1] <= destroyed.time
    assert created.time <= destroyed.time <= t1 + tol


# -- origins and clients ----------------------------------------------------------------


@dataclasses.dataclass
class ShimConn:
    up: bytearray = dataclasses.field(default_factory=bytearray)  # from the proxy
    down: bytearray = dataclasses.field(default_factory=bytearray)  # to the proxy
    errors: list[str] = dataclasses.field(default_factory=list)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Shim:
    """A recording TCP relay in front of a real origin; keeps half-closes, never resets."""

    def __init__(self, target: Endpoint, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.server: asyncio.Server | None = None
        self.conns: list[ShimConn] = []

    async def start(self) -> Shim:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = ShimConn()
        self.conns.append(conn)
        tr, tw = await asyncio.open_connection(*self.target)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, buf: bytearray
        ) -> None:
            try:
                while data := await src.read(1 << 18):
                    buf += data
                    dst.write(data)
                    with contextlib.suppress(ConnectionError):
                        await dst.drain()
            except ConnectionError as exc:
                conn.errors.append(repr(exc))
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if not dst.is_closing():
                        dst.write_eof()

        try:
            await asyncio.gather(pump(r, tw, conn.up), pump(tr, w, conn.down))
        finally:
            tw.close()
            w.close()
            conn.done.set()


def _slice(offset: int, n: int) -> bytes:
    """Bytes ``offset .. offset+n`` of the endless pattern."""
    out = bytearray()
    while n:
        i = offset % len(BLOCK)
        take = min(n, len(BLOCK) - i)
        out += BLOCK[i : i + take]
        offset += take
        n -= take
    return bytes(out)


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    return await run("curl", "-sS", "--max-time", "30", *args)


def curl_local(out: bytes) -> Endpoint:
    """curl's ``-w '%{local_ip} %{local_port}'``: the client socket connected to the proxy."""
    ip, port = out.decode().split()
    return ip, int(port)


async def socks_connect(
    listener: Endpoint, host: str, port: int, ptype: ProxyType = ProxyType.SOCKS5
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Endpoint]:
    """A python-socks tunnel as asyncio streams, with the client socket's own address."""
    sock = await Proxy(ptype, *listener).connect(host, port, timeout=5)
    client = (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
    r, w = await asyncio.open_connection(sock=sock, limit=1 << 22)
    return r, w, client


# == curl through CONNECT to a TLS origin: tcp/ssl =======================================


@pytest.mark.parametrize("fmt", FORMATS)
async def test_curl_connect_tls_lands_on_ssl(
    home: Path, start_proxy: ProxyFactory, tls_origin: Origin, pki: Pki, tmp_path: Path, fmt: str
) -> None:
    formats = {"tcp/ssl": "binary"} if fmt == "binary" else {}
    proxy = await start_proxy(export_config(home, formats=formats))
    server = sftap_of(proxy)
    assert server.interfaces["tcp/ssl"].binary is (fmt == "binary")
    assert not server.interfaces["tcp/http"].binary  # the per-socket format is per socket
    shim = await Shim((tls_origin.host, tls_origin.port)).start()
    taps = await Taps.open(server)
    try:
        size = 300_000
        out = tmp_path / "body"
        t0 = time.time()
        rc, wout, err = await curl(
            "-x",
            proxy.http_url,
            "--cacert",
            str(pki.ca_pem),
            "--http1.1",
            "-H",
            "Connection: close",  # the origin closes first: no RST from curl's side
            "--fail",
            "-o",
            str(out),
            "-w",
            "%{local_ip} %{local_port}",
            f"https://127.0.0.1:{shim.port}/bytes/{size}",
        )
        assert rc == 0, err
        assert out.read_bytes() == pattern(size)
        client = curl_local(wout)
        flows = await taps.flows("tcp/ssl")
        t1 = time.time()
        await asyncio.wait_for(shim.conns[0].done.wait(), 5)
        (evs,) = flows.values()
        sc = shim.conns[0]
        assert sc.up[:1] == b"\x16" and b"CONNECT" not in sc.up  # TLS records, not the CONNECT
        origin_ep = ("127.0.0.1", shim.port)
        verify_flow(
            evs,
            client=client,
            server=origin_ep,
            up=bytes(sc.up),
            down=bytes(sc.down),
            reason="NORMAL",
            start=flow_start(proxy, client, origin_ep),
            t0=t0,
            t1=t1,
            binary=fmt == "binary",
        )
        assert len(sc.down) > 65535  # so the chunk limit (32 KiB by default) was exercised
    finally:
        taps.close()
        shim.close()


# == curl --socks5-hostname / --socks4a to an HTTP origin: tcp/http ======================


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("flag", "interface"),
    [
        # client 127.0.0.2 > origin 127.0.0.1: the server is endpoint 1 (by address)
        ("--socks5-hostname", "127.0.0.2"),
        # both on 127.0.0.1: ordered by port
        ("--socks4a", "127.0.0.1"),
    ],
)
async def test_curl_socks_lands_on_http(
    home: Path,
    start_proxy: ProxyFactory,
    origin: Origin,
    tmp_path: Path,
    flag: str,
    interface: str,
    fmt: str,
) -> None:
    proxy = await start_proxy(export_config(home, format=fmt))
    server = sftap_of(proxy)
    shim = await Shim((origin.host, origin.port)).start()
    taps = await Taps.open(server)
    try:
        size = 150_000
        out = tmp_path / "body"
        t0 = time.time()
        rc, wout, err = await curl(
            flag,
            "{}:{}".format(*proxy.socks),
            "--interface",
            interface,
            "--fail",
            "-o",
            str(out),
            "-w",
            "%{local_ip} %{local_port}",
            f"http://localhost:{shim.port}/bytes/{size}",
        )
        assert rc == 0, err
        assert out.read_bytes() == pattern(size)
        client = curl_local(wout)
        assert client[0] == interface
        flows = await taps.flows("tcp/http")
        t1 = time.time()
        (evs,) = flows.values()
        await asyncio.wait_for(shim.conns[0].done.wait(), 5)
        sc = shim.conns[0]
        assert sc.up.startswith(b"GET /bytes/%d HTTP/1.1\r\n" % size)  # not the SOCKS handshake
        origin_ep = ("127.0.0.1", shim.port)
        if interface == "127.0.0.2":
            assert spec_order(client, origin_ep)[2] is False  # the case it claims to be
        verify_flow(
            evs,
            client=client,
            server=origin_ep,
            up=bytes(sc.up),
            down=bytes(sc.down),
            reason="NORMAL",
            start=flow_start(proxy, client, origin_ep),
            t0=t0,
            t1=t1,
            binary=fmt == "binary",
        )
    finally:
        taps.close()
        shim.close()


# == plain HTTP keep-alive, one client connection, two origins: two flows ================


@dataclasses.dataclass
class HttpOriginLog:
    received: bytearray = dataclasses.field(default_factory=bytearray)
    sent: bytearray = dataclasses.field(default_factory=bytearray)


def keepalive_origin(name: str, log: HttpOriginLog) -> Callable[..., Any]:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            log.received += head
            body = f"hello from {name}".encode()
            resp = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                % len(body)
                + body
            )
            log.sent += resp
            w.write(resp)
            await w.drain()

    return handler


async def read_response(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    m = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
    assert m is not None, head
    return head, await r.readexactly(int(m.group(1)))


async def test_plain_http_keepalive_two_origins_two_flows(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy = await start_proxy(export_config(home))
    server = sftap_of(proxy)
    log_a, log_b = HttpOriginLog(), HttpOriginLog()
    # client on 127.0.0.2: origin A (127.0.0.1) is endpoint 1, origin B (127.0.0.3) endpoint 2
    a: RawServer = await raw_server(keepalive_origin("a", log_a), "127.0.0.1")
    b: RawServer = await raw_server(keepalive_origin("b", log_b), "127.0.0.3")
    taps = await Taps.open(server)
    try:
        t0 = time.time()
        r, w = await asyncio.open_connection(*proxy.http, local_addr=("127.0.0.2", 0))
        client = (str(w.get_extra_info("sockname")[0]), int(w.get_extra_info("sockname")[1]))
        for host, port, path, name in (
            ("127.0.0.1", a.port, "/one", "a"),
            ("127.0.0.3", b.port, "/two", "b"),
        ):
            w.write(
                f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: e2e\r\nAccept: */*\r\n\r\n".encode()
            )
            head, body = await read_response(r)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert body == f"hello from {name}".encode()
        w.close()  # ends the keep-alive session, and with it both upstream connections
        flows = await taps.flows("tcp/http", count=2)
        t1 = time.time()
    finally:
        taps.close()
    assert log_a.received.startswith(b"GET /one HTTP/1.1\r\n")  # origin-form upstream
    assert log_b.received.startswith(b"GET /two HTTP/1.1\r\n")
    by_server = {}
    for evs in flows.values():
        k = evs[0].ev.key
        ends = {(k.ip1, k.port1), (k.ip2, k.port2)}
        assert client in ends, (client, ends)  # the same client connection for both flows
        (other,) = ends - {client}
        by_server[other] = evs
    assert set(by_server) == {("127.0.0.1", a.port), ("127.0.0.3", b.port)}
    for origin_ep, log in ((("127.0.0.1", a.port), log_a), (("127.0.0.3", b.port), log_b)):
        verify_flow(
            by_server[origin_ep],
            client=client,
            server=origin_ep,
            up=bytes(log.received),
            down=bytes(log.sent),
            reason="NORMAL",
            start=flow_start(proxy, client, origin_ep),
            t0=t0,
            t1=t1,
            binary=False,
        )


@pytest.mark.parametrize("ending", ["reset", "timeout"])
async def test_plain_http_flow_endings(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory, ending: str
) -> None:
    """RESET: the origin aborts mid-body; TIMEOUT: it never answers (idle=0.5)."""
    idle = {"idle": 0.5} if ending == "timeout" else {}
    proxy = await start_proxy(export_config(home), **idle)
    server = sftap_of(proxy)
    log = HttpOriginLog()
    client_got_part = asyncio.Event()
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        log.received += await r.readuntil(b"\r\n\r\n")
        if ending == "timeout":
            with contextlib.suppress(ConnectionError):
                await r.read()
            return
        w.write(partial)
        log.sent += partial
        await w.drain()
        await client_got_part.wait()
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        w.transport.abort()  # RST

    o: RawServer = await raw_server(origin)
    taps = await Taps.open(server)
    try:
        t0 = time.time()
        r, w = await asyncio.open_connection(*proxy.http)
        client = (str(w.get_extra_info("sockname")[0]), int(w.get_extra_info("sockname")[1]))
        w.write(
            f"GET http://127.0.0.1:{o.port}/slow HTTP/1.1\r\nHost: 127.0.0.1:{o.port}\r\n"
            "\r\n".encode()
        )
        sent_at = time.time()
        if ending == "reset":
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(r.readexactly(10), 5) == b"0123456789"
            client_got_part.set()
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(r.read(), 5)  # the proxy ends the cut response
        else:
            head, _ = await read_response(r)
            assert head.startswith(b"HTTP/1.1 504 "), head
        w.close()
        # no response bytes: classified at close, as http_client (up: HTTP, down: anything)
        name = "tcp/http" if ending == "reset" else "tcp/http_client"
        flows = await taps.flows(name)
        t1 = time.time()
    finally:
        taps.close()
    (evs,) = flows.values()
    origin_ep = ("127.0.0.1", o.port)
    assert log.received.startswith(b"GET /slow HTTP/1.1\r\n")
    verify_flow(
        evs,
        client=client,
        server=origin_ep,
        up=bytes(log.received),
        down=bytes(log.sent),
        reason=ending.upper(),
        start=flow_start(proxy, client, origin_ep),
        t0=t0,
        t1=t1,
        binary=False,
    )
    if ending == "timeout":
        assert evs[-1].ev.time - sent_at >= 0.45


# == an SSH banner exchange: tcp/ssh, and the three ways a flow ends ======================

SERVER_BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"
CLIENT_BANNER = b"SSH-2.0-proxytap_e2e_1.0\r\n"
_LINGER0 = struct.pack("ii", 1, 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ending", ["normal", "reset", "timeout"])
async def test_ssh_banner_lands_on_ssh(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory, ending: str, fmt: str
) -> None:
    idle = {"idle": 0.5} if ending == "timeout" else {}
    proxy = await start_proxy(export_config(home, format=fmt), **idle)
    server = sftap_of(proxy)
    got: list[bytes] = []

    async def ssh_origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(SERVER_BANNER)
        await w.drain()
        got.append(await r.readuntil(b"\r\n"))
        if ending == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            w.transport.abort()  # RST
            return
        with contextlib.suppress(ConnectionError):
            await r.read()  # until the client's (normal) or the proxy's (timeout) close

    # origin on 127.0.0.2, client on 127.0.0.1: the client is endpoint 1 (by address)
    ssh: RawServer = await raw_server(ssh_origin, "127.0.0.2")
    taps = await Taps.open(server)
    try:
        t0 = time.time()
        r, w, client = await socks_connect(proxy.socks, "127.0.0.2", ssh.port)
        assert await asyncio.wait_for(r.readexactly(len(SERVER_BANNER)), 5) == SERVER_BANNER
        w.write(CLIENT_BANNER)
        await w.drain()
        sent_at = time.time()
        if ending == "normal":
            await wait_for(lambda: bool(got))
            w.close()
        else:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(), 5) == b""  # the proxy closed us
            w.close()
        flows = await taps.flows("tcp/ssh")
        t1 = time.time()
    finally:
        taps.close()
    assert got == [CLIENT_BANNER]
    (evs,) = flows.values()
    origin_ep = ("127.0.0.2", ssh.port)
    assert spec_order(client, origin_ep)[2] is True
    verify_flow(
        evs,
        client=client,
        server=origin_ep,
        up=CLIENT_BANNER,
        down=SERVER_BANNER,
        reason=ending.upper(),
        start=flow_start(proxy, client, origin_ep),
        t0=t0,
        t1=t1,
        binary=fmt == "binary",
    )
    if ending == "timeout":
        assert evs[-1].ev.time - sent_at >= 0.45  # idle=0.5 after the last byte, not before


# == IPv6 ===================================================================================


@pytest.mark.parametrize(
    ("via", "listener"),
    [
        ("socks5", "mixed6"),  # ::1 client -> ::1 origin
        ("connect", "mixed6"),
        ("socks5", "socks"),  # 127.0.0.1 client -> ::1 origin: IPv4-mapped, l3=ipv6
    ],
)
async def test_ipv6_flow(
    home: Path, start_proxy: ProxyFactory, origin6: Origin, via: str, listener: str
) -> None:
    proxy = await start_proxy(export_config(home, format="binary"))
    server = sftap_of(proxy)
    taps = await Taps.open(server)
    try:
        ptype = ProxyType.SOCKS5 if via == "socks5" else ProxyType.HTTP
        t0 = time.time()
        r, w, client = await socks_connect(proxy.addr(listener), "::1", origin6.port, ptype)
        request = (
            f"GET /hello HTTP/1.1\r\nHost: [::1]:{origin6.port}\r\nConnection: close\r\n\r\n"
        ).encode()
        w.write(request)
        response = await asyncio.wait_for(r.read(), 10)  # the origin closes after it
        assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"hello GET /hello")
        w.close()
        flows = await taps.flows("tcp/http")
        t1 = time.time()
    finally:
        taps.close()
    (evs,) = flows.values()
    assert evs[0].ev.key.l3 == "ipv6"
    assert evs[0].raw[57] == 41  # l3_proto in the binary header
    origin_ep = ("::1", origin6.port)
    if listener == "socks":
        assert client[0] == "127.0.0.1"
        assert spec_order(client, origin_ep)[1] == ("::ffff:127.0.0.1", client[1])
    verify_flow(
        evs,
        client=client,
        server=origin_ep,
        up=request,
        down=response,
        reason="NORMAL",
        start=flow_start(proxy, client, origin_ep),
        t0=t0,
        t1=t1,
        binary=True,
    )


# == loopback7: a stand-in abstractor, killed and restarted mid-run =========================

_L7_LINE = re.compile(
    rb"ip1=(?P<ip1>[0-9a-f.:]+),ip2=(?P<ip2>[0-9a-f.:]+),port1=(?P<p1>[0-9]+),"
    rb"port2=(?P<p2>[0-9]+),vlan=-1,hop=0,l3=ipv[46],l4=(?P<l4>tcp|udp),event="
    rb"(?:CREATED,time=[-+.e0-9]+"
    rb"|DATA,from=[12],match=(?:up|down|none),len=[0-9]+,time=[-+.e0-9]+"
    rb"|DESTROYED,reason=(?:NORMAL|RESET|TIMEOUT|COMPROMISED),time=[-+.e0-9]+)\n"
)


@dataclasses.dataclass
class L7Flow:
    created: Event
    up: bytearray = dataclasses.field(default_factory=bytearray)
    down: bytearray = dataclasses.field(default_factory=bytearray)
    froms: set[tuple[str | None, int | None]] = dataclasses.field(default_factory=set)
    destroyed: Event | None = None


@dataclasses.dataclass
class L7Conn:
    live: dict[str, L7Flow] = dataclasses.field(default_factory=dict)
    done: list[L7Flow] = dataclasses.field(default_factory=list)
    udp: list[tuple[Event, bytes]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    events: int = 0
    closed: bool = False

    def flow(self, port: int) -> L7Flow | None:
        for f in [*self.done, *self.live.values()]:
            if port in (f.created.key.port1, f.created.key.port2):
                return f
        return None


class StandIn:
    """An abstractor's loopback7 for the test: reads like ``read_loopback7``, checks spec 4."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: asyncio.Server | None = None
        self.conns: list[L7Conn] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, str(self.path))

    async def kill(self) -> None:
        """Die like a crashed process: connections torn down, socket file gone."""
        assert self.server is not None
        self.server.close()
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
        self.path.unlink(missing_ok=True)
        self.server = None

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = L7Conn()
        self.conns.append(conn)
        self._writers.append(w)
        try:
            while True:
                line = await r.readline()
                if not line:
                    break
                ev = self._check(conn, line)
                body = await r.readexactly(ev.length) if ev.event == DATA else b""
                self._apply(conn, ev, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a malformed line: record it, stop reading like the original
            conn.errors.append(f"{exc!r}")
        finally:
            conn.closed = True

    @staticmethod
    def _check(conn: L7Conn, line: bytes) -> Event:
        ev = decode_text(line)
        conn.events += 1

        def bad(why: str) -> None:
            conn.errors.append(f"{why}: {line[:200]!r}")

        if _L7_LINE.fullmatch(line) is None:  # rule 2 (hop=0, vlan=-1 after port2), order, \n
            bad("line does not have the spec's fields in order with vlan=-1 and hop=0")
        k = ev.key
        v6 = k.l3 == "ipv6"
        if (_addr16(k.ip1, v6), k.port1) > (_addr16(k.ip2, v6), k.port2):  # rule 1
            bad("endpoint 1 is not the smaller")
        if k.l4 == "udp":
            if ev.event != DATA:  # rule 5
                bad("CREATED/DESTROYED for UDP")
        elif ev.event == CREATED:  # rule 3
            if k.prefix in conn.live:
                bad("second CREATED")
        elif k.prefix not in conn.live:
            bad(f"{ev.event} of a flow not CREATED on this connection")
        if ev.event == DATA and not 1 <= ev.length <= 16384:  # rule 4
            bad("len outside 1..16384")
        return ev

    @staticmethod
    def _apply(conn: L7Conn, ev: Event, body: bytes) -> None:
        k = ev.key.prefix
        if ev.key.l4 == "udp":
            conn.udp.append((ev, body))
        elif ev.event == CREATED:
            conn.live[k] = L7Flow(ev)
        elif ev.event == DATA:
            f = conn.live.get(k)
            if f is not None:
                (f.up if ev.match == "up" else f.down).extend(body)
                f.froms.add((ev.match, ev.from_))
        else:
            f = conn.live.pop(k, None)
            if f is not None:
                f.destroyed = ev
                conn.done.append(f)


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


async def echo_flow(proxy: RunningProxy, port: int, payload: bytes) -> Endpoint:
    """One SOCKS5 tunnel to the echo origin: send, read it back, close; the client address."""
    r, w, client = await socks_connect(proxy.socks, "127.0.0.1", port)
    w.write(payload)
    assert await asyncio.wait_for(r.readexactly(len(payload)), 10) == payload
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 10) == b""
    w.close()
    return client


def check_l7_flow(conn: L7Conn, client: Endpoint, server: Endpoint, up: bytes, down: bytes) -> None:
    f = conn.flow(client[1])
    assert f is not None, f"flow of {client} not on this connection"
    assert f.destroyed is not None and f.destroyed.reason == "NORMAL"
    (ip1, p1), (ip2, p2), client_is_1, _ = spec_order(client, server)
    k = f.created.key
    assert (k.ip1, k.port1, k.ip2, k.port2) == (ip1, p1, ip2, p2)
    assert bytes(f.up) == up and bytes(f.down) == down
    up_from = 1 if client_is_1 else 2
    assert f.froms == {("up", up_from), ("down", 3 - up_from)}


async def test_loopback7_through_the_proxy_with_abstractor_restart(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    path = home / "loopback7"
    standin = StandIn(path)
    await standin.start()
    proxy = await start_proxy(export_config(None, loopback7=str(path)))
    writer = loopback7_of(proxy)
    await wait_for(lambda: writer.link_up)
    echo_server: RawServer = await raw_server(echo)
    origin_ep = ("127.0.0.1", echo_server.port)

    part1, part2 = 16 << 20, 1 << 20
    gate = asyncio.Event()

    async def big_origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        sent = 0
        while sent < part1:  # paced: still flowing while the abstractor dies and comes back
            n = min(1 << 16, part1 - sent)
            w.write(_slice(sent, n))
            sent += n
            await w.drain()
            await asyncio.sleep(0.001)
        await gate.wait()
        w.write(_slice(sent, part2))
        await w.drain()

    big: RawServer = await raw_server(big_origin)
    payload = pattern(100_000)  # > 16384: split on loopback7

    # before the restart
    before = [await echo_flow(proxy, echo_server.port, payload) for _ in range(3)]
    first = standin.conns[0]
    await wait_for(lambda: all(first.flow(c[1]) and first.flow(c[1]).destroyed for c in before))

    # a flow that is quiet while the abstractor is away, and talks again after
    qr, qw, quiet_client = await socks_connect(proxy.socks, "127.0.0.1", echo_server.port)
    hello = pattern(5000)  # > 4096 bytes a side: classified (and CREATED) at once
    qw.write(hello)
    assert await asyncio.wait_for(qr.readexactly(len(hello)), 5) == hello
    await wait_for(lambda: (f := first.flow(quiet_client[1])) is not None and f.down == hello)

    # the long transfer, killed and restarted under it
    r, w, big_client = await socks_connect(proxy.socks, "127.0.0.1", big.port)
    request = b"GET /big HTTP/1.1\r\nHost: big\r\n\r\n"
    w.write(request)
    h = hashlib.sha256()
    received = 0

    async def drain_big() -> None:
        nonlocal received
        while chunk := await r.read(1 << 20):
            h.update(chunk)
            received += len(chunk)

    reading = asyncio.create_task(drain_big())
    await wait_for(lambda: received >= 2 << 20, within=10)
    await standin.kill()
    await wait_for(lambda: not writer.link_up)
    await asyncio.sleep(0.2)  # proxying goes on with no abstractor
    await standin.start()
    await wait_for(lambda: writer.link_up and writer.connects == 2, within=10)
    assert not reading.done() and received < part1 + part2  # the transfer spans the restart

    # after the restart: new flows arrive well formed on the new connection
    after = [await echo_flow(proxy, echo_server.port, payload) for _ in range(3)]
    qw.write(b"after the restart")  # a flow created on the old connection: announced again
    assert await asyncio.wait_for(qr.readexactly(17), 5) == b"after the restart"
    qw.close()
    # UDP goes DATA-only; the proxy has no UDP front yet, so feed the writer one datagram
    writer.datagram(("127.0.0.1", 5353), ("127.0.0.9", 40000), b"\x00\x01udp", time.time())
    gate.set()
    await asyncio.wait_for(reading, 30)
    w.close()
    assert received == part1 + part2
    assert h.hexdigest() == pattern_sha256(part1 + part2)  # the proxied transfer is intact
    second = standin.conns[1]
    await wait_for(lambda: all(second.flow(c[1]) and second.flow(c[1]).destroyed for c in after))
    await wait_for(lambda: len(second.udp) == 1)
    for c in (big_client, quiet_client):  # ended after the restart: their DESTROYED comes
        await wait_for(lambda c=c: (f := second.flow(c[1])) is not None and f.destroyed)

    assert len(standin.conns) == 2
    for conn in standin.conns:
        assert conn.errors == [], conn.errors[:5]
    for c in before:
        check_l7_flow(first, c, origin_ep, payload, payload)
        assert first.flow(c[1]) not in second.done
    for c in after:
        check_l7_flow(second, c, origin_ep, payload, payload)
    # the long flow: on the first connection until it died, announced again on the
    # second (its original start time) with the bytes that came after, and its end
    long_flow = first.flow(big_client[1])
    assert long_flow is not None and long_flow.destroyed is None
    assert bytes(long_flow.up) == request
    long_again = second.flow(big_client[1])
    assert long_again is not None and long_again.destroyed is not None
    assert long_again.created.time == long_flow.created.time
    assert bytes(long_again.down).endswith(_slice(part1, part2))
    quiet = first.flow(quiet_client[1])
    assert quiet is not None and quiet.destroyed is None
    assert bytes(quiet.up) == bytes(quiet.down) == hello
    quiet_again = second.flow(quiet_client[1])
    assert quiet_again is not None and quiet_again.destroyed is not None
    assert bytes(quiet_again.up) == bytes(quiet_again.down) == b"after the restart"
    assert writer.reannounced >= 2
    assert not second.live  # every flow of the live connection got exactly one DESTROYED
    (ev, body) = second.udp[0]
    assert body == b"\x00\x01udp" and ev.from_ in (1, 2)
    # what could not be delivered (sent while the abstractor was away) is counted
    assert writer.drops.get("not_connected", 0) >= 1
    assert writer.dropped_bytes.get("not_connected", 0) > 0
    assert proxy.app.hub.subscriber_errors == 0
    await standin.kill()


async def test_proxy_stop_destroys_every_open_flow_once(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    """Shutdown is a close path too: every open flow gets its one DESTROYED, everywhere."""
    path = home / "loopback7"
    standin = StandIn(path)
    await standin.start()
    proxy = await start_proxy(export_config(home, loopback7=str(path)))
    server = sftap_of(proxy)
    writer = loopback7_of(proxy)
    await wait_for(lambda: writer.link_up)
    log = HttpOriginLog()
    http_origin: RawServer = await raw_server(keepalive_origin("idle", log))
    echo_server: RawServer = await raw_server(echo)
    taps = await Taps.open(server)
    hello = pattern(5000)  # > 4096 bytes a side: classified, CREATED at once
    try:
        # a CONNECT tunnel and a SOCKS5 tunnel, both open and quiet
        tunnels = []
        for listener, ptype in ((proxy.http, ProxyType.HTTP), (proxy.socks, ProxyType.SOCKS5)):
            r, w, client = await socks_connect(listener, "127.0.0.1", echo_server.port, ptype)
            w.write(hello)
            assert await asyncio.wait_for(r.readexactly(len(hello)), 5) == hello
            tunnels.append((r, w, client))
        # a plain-HTTP keep-alive connection with an idle upstream connection
        hr, hw = await asyncio.open_connection(*proxy.http)
        hw.write(
            f"GET http://127.0.0.1:{http_origin.port}/x HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{http_origin.port}\r\n\r\n".encode()
        )
        await read_response(hr)
        http_client = hw.get_extra_info("sockname")[:2]
        l7 = standin.conns[0]
        await wait_for(lambda: len(l7.live) == 3)
        await proxy.app.stop(0)
        default = await taps.taps["tcp/default"].read_flows(2)
        http = await taps.taps["tcp/http"].read_flows(1)
        for _, tw, _ in tunnels:
            tw.close()
        hw.close()
    finally:
        taps.close()
    assert len(check_stream([(e.ev, e.body) for e in default])) == 2
    assert len(check_stream([(e.ev, e.body) for e in http])) == 1
    # the tunnels were still open when the (zero) grace ran out: reset, and said so;
    # the idle keep-alive connection was closed normally as the drain began
    assert [e.ev.reason for e in default if e.ev.event == DESTROYED] == ["SHUTDOWN"] * 2
    assert [e.ev.reason for e in http if e.ev.event == DESTROYED] == ["NORMAL"]
    await wait_for(lambda: l7.closed)  # the writer closed its connection after the flows
    assert l7.errors == [] and not l7.live and len(l7.done) == 3
    ports = {c[1] for _, _, c in tunnels} | {http_client[1]}
    assert {p for f in l7.done for p in (f.created.key.port1, f.created.key.port2)} >= ports
    # loopback7 knows no SHUTDOWN: the tunnels go in as RESET there
    reasons = sorted(f.destroyed.reason for f in l7.done if f.destroyed is not None)
    assert reasons == ["NORMAL", "RESET", "RESET"]
    await standin.kill()


# == slow and dead readers: 200 MiB through one tunnel =====================================

DRAINER = r"""
import hashlib, json, socket, sys
from proxytap.proto.sftap import HEADER_SIZE, decode_binary, decode_text
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
f = s.makefile("rb", buffering=1 << 20)
print("connected", flush=True)
h = {"up": hashlib.sha256(), "down": hashlib.sha256()}
n = {"up": 0, "down": 0}
kinds = []
keys = set()
while True:
    line = f.readline()
    if not line:
        break
    ev = decode_text(line)
    keys.add(line.split(b",event=")[0])
    if ev.event == "DATA":
        body = f.read(ev.length)
        assert len(body) == ev.length
        h[ev.match].update(body)
        n[ev.match] += len(body)
        if not kinds or kinds[-1] != "DATA":
            kinds.append("DATA")
    else:
        kinds.append(ev.event)
    if ev.event == "DESTROYED":
        break
print(json.dumps({"kinds": kinds, "keys": len(keys), "up": [n["up"], h["up"].hexdigest()],
                  "down": [n["down"], h["down"].hexdigest()]}), flush=True)
"""


async def test_slow_and_dead_readers_200mib(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    size = 200 << 20
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    request = b"GET /big HTTP/1.1\r\nHost: big\r\n\r\n"

    async def big_origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(head)
        for _ in range(size // len(BLOCK)):
            w.write(BLOCK)
            await w.drain()

    origin: RawServer = await raw_server(big_origin)
    # 64 MiB per reader: ample slack for analyzer C (see the client's pacing below);
    # the stalled reader A still overflows it by far.
    proxy = await start_proxy(export_config(home, reader_buffer=64 << 20))
    proxy.app.hub.unsubscribe(proxy.recorder)  # it would keep all 200 MiB
    server = sftap_of(proxy)
    iface = server.interfaces["tcp/http"]

    def newest() -> Reader:
        return iface.readers[-1]

    # A: connected, then never reads until the transfer is over
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(iface.path))
    await wait_for(lambda: len(iface.readers) == 1)
    reader_a = newest()
    # B: reads a little, then dies mid-flow
    dead = await RawTap.connect(iface.path)
    await wait_for(lambda: len(iface.readers) == 2)
    reader_b = newest()
    # C: another process draining everything (a real analyzer would be one)
    drainer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DRAINER,
        str(iface.path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(here().parent),
    )
    try:
        assert drainer.stdout is not None
        assert await asyncio.wait_for(drainer.stdout.readline(), 10) == b"connected\n"
        await wait_for(lambda: len(iface.readers) == 3)
        reader_c = newest()

        t0 = time.monotonic()
        r, w, client = await socks_connect(proxy.socks, "127.0.0.1", origin.port)
        w.write(request)
        h = hashlib.sha256()
        received = 0
        b_events: list[Ev] = []
        b_data = 0
        while received < len(head) + size:
            chunk = await asyncio.wait_for(r.read(1 << 20), 30)
            assert chunk, "the proxy closed the tunnel early"
            h.update(chunk)
            received += len(chunk)
            # The client (not the proxy) keeps pace with analyzer C, so that C, an
            # ordinary Python process on a possibly busy box, can be asked to get every
            # byte: the proxy itself never waits for any reader (A proves it).
            async with asyncio.timeout(30):
                while reader_c.buffered > (8 << 20) and not reader_c.closed:
                    await asyncio.sleep(0.001)
            if not dead.writer.transport.is_closing() and received > (8 << 20):
                # B has a few MiB waiting; take some of it, then die abruptly
                while b_data < (1 << 20):
                    e = await asyncio.wait_for(dead.event_raw(), 5)
                    b_events.append(e)
                    b_data += len(e.body)
                dead.close()
        w.close()
        elapsed = time.monotonic() - t0
        expected = hashlib.sha256(head)
        for _ in range(size // len(BLOCK)):
            expected.update(BLOCK)
        assert received == len(head) + size
        assert h.hexdigest() == expected.hexdigest()  # byte-exact through the proxy

        out, err = await asyncio.wait_for(drainer.communicate(), 60)
        assert drainer.returncode == 0, err.decode()
    finally:
        if drainer.returncode is None:
            drainer.kill()
            await drainer.wait()
    # C, the second reader, got everything, exactly
    c = json.loads(out.decode().splitlines()[-1])
    assert c["kinds"] == ["CREATED", "DATA", "DESTROYED"]
    assert c["keys"] == 1
    assert c["up"] == [len(request), hashlib.sha256(request).hexdigest()]
    assert c["down"] == [len(head) + size, expected.hexdigest()]
    assert reader_c.drops == {} and reader_c.bytes_dropped == 0
    # B died mid-flow: what it read was well framed; the server forgot it
    assert b_events[0].ev.event == CREATED and reader_b.closed
    assert reader_b not in iface.readers
    # A: drops counted, never disconnected
    assert reader_a.drops.get("buffer_full", 0) > 0
    assert reader_a.bytes_dropped > 0
    assert server.bytes_dropped >= reader_a.bytes_dropped
    assert server.readers_overflowed == 0 and not reader_a.closed
    assert proxy.app.hub.subscriber_errors == 0
    # A resumes reading: a well-framed stream, no orphans, every byte accounted for
    ar, aw = await asyncio.open_unix_connection(sock=stalled, limit=1 << 22)
    tap_a = RawTap(ar, aw)
    events = await tap_a.read_flows(1, within=30)
    (rec,) = check_stream([(e.ev, e.body) for e in events]).values()
    assert rec.created.key == events[0].ev.key and events[0].ev.event == CREATED
    assert rec.destroyed is not None and rec.destroyed.reason == "NORMAL"
    assert bytes(rec.up) == request
    got = len(rec.up) + len(rec.down)
    assert got + reader_a.bytes_dropped == len(request) + len(head) + size
    assert bytes(rec.down).startswith(head + BLOCK[:4096])  # the first chunks, before any drop
    assert len({key_bytes(e.raw, False) for e in events}) == 1
    k = rec.created.key
    assert {(k.ip1, k.port1), (k.ip2, k.port2)} == {client, ("127.0.0.1", origin.port)}
    tap_a.close()
    print(f"200 MiB through the proxy with 3 readers in {elapsed:.1f}s")


# == proxytap tap as a real subprocess ======================================================


def parse_tap_output(text: str) -> list[tuple[Event, bytes, str]]:
    """Header lines and, after each DATA header, its hexdump parsed back to bytes."""
    out: list[tuple[Event, bytes, str]] = []
    body = bytearray()
    for line in text.splitlines():
        if line.startswith("ip1="):
            if out:
                out[-1] = (out[-1][0], bytes(body), out[-1][2])
            body = bytearray()
            out.append((decode_text(line.encode() + b"\n"), b"", line))
        else:  # 00000010  xx xx xx xx xx xx xx xx  xx xx xx xx xx xx xx xx  |text............|
            assert line[8:10] == "  " and line[33:35] == "  " and line[58:61] == "  |", line
            assert line.endswith("|"), line
            assert int(line[:8], 16) == len(body), line
            row = bytes.fromhex(line[10:33] + line[35:58])
            assert 1 <= len(row) <= 16 and len(line) == 62 + len(row), line
            body += row
    if out:
        out[-1] = (out[-1][0], bytes(body), out[-1][2])
    return out


@pytest.mark.parametrize("fmt", FORMATS)
async def test_tap_cli_subprocess(
    home: Path, start_proxy: ProxyFactory, raw_server: ProxyFactory, fmt: str
) -> None:
    request = b"GET /tap HTTP/1.1\r\nHost: tap.test\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nhello from the tap\r\n"

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(response)
        await w.drain()
        with contextlib.suppress(ConnectionError):
            await r.read()

    o: RawServer = await raw_server(origin)
    proxy = await start_proxy(export_config(home, format=fmt))
    server = sftap_of(proxy)
    path = str(server.interfaces["tcp/http"].path)
    extra = ["--binary"] if fmt == "binary" else []
    cmd = [sys.executable, "-m", "proxytap", "tap", path, *extra]
    procs = []
    for args in (["--count", "4"], ["--hexdump"]):
        before = len(server.interfaces["tcp/http"].readers)
        procs.append(
            await asyncio.create_subprocess_exec(
                *cmd,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(here().parent),
            )
        )
        await wait_for(lambda b=before: len(server.interfaces["tcp/http"].readers) == b + 1, 15)
    witness = await connect_tap(server, "tcp/http")  # what an analyzer got, to compare
    try:
        r, w, client = await socks_connect(proxy.socks, "127.0.0.1", o.port)
        w.write(request)
        assert await asyncio.wait_for(r.readexactly(len(response)), 5) == response
        w.close()
        seen = await witness.read_flows(1)
        count_out, count_err = await asyncio.wait_for(procs[0].communicate(), 15)
        assert procs[0].returncode == 0, count_err.decode()
        await wait_for(lambda: server.flows == 0 and not proxy.app.services.live)
        await server.stop()  # end of stream for the --hexdump tap
        dump_out, dump_err = await asyncio.wait_for(procs[1].communicate(), 15)
        assert procs[1].returncode == 0, dump_err.decode()
    finally:
        witness.close()
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    counted = count_out.decode().splitlines()
    assert len(counted) == 4 and all(line.startswith("ip1=") for line in counted)
    dumped = parse_tap_output(dump_out.decode())
    assert [line for _, _, line in dumped][:4] == counted  # same events, same lines
    # every event printed as the text header of what the socket carried (binary: rendered)
    assert [line for _, _, line in dumped] == [encode_text(e.ev).decode()[:-1] for e in seen]
    if fmt == "text":
        assert [line.encode() + b"\n" for _, _, line in dumped] == [e.raw for e in seen]
    assert [body for _, body, _ in dumped] == [e.body for e in seen]
    kinds = [ev.event for ev, _, _ in dumped]
    assert kinds[0] == CREATED and kinds[-1] == DESTROYED and set(kinds[1:-1]) == {DATA}
    (ip1, p1), (ip2, p2), client_is_1, _ = spec_order(client, ("127.0.0.1", o.port))
    up_from = 1 if client_is_1 else 2
    up, down = bytearray(), bytearray()
    for ev, body, line in dumped:
        assert (ev.key.ip1, ev.key.port1, ev.key.ip2, ev.key.port2) == (ip1, p1, ip2, p2), line
        assert (ev.key.hop, ev.key.l3, ev.key.l4) == (0, "ipv4", "tcp"), line
        if ev.event == DATA:
            assert len(body) == ev.length
            assert ev.from_ == (up_from if ev.match == "up" else 3 - up_from)
            (up if ev.match == "up" else down).extend(body)
    assert bytes(up) == request and bytes(down) == response
    assert dumped[-1][0].reason == "NORMAL"
    assert "00000000  47 45 54 20 2f 74 61 70  20 48 54 54 50 2f 31 2e  |GET /tap HTTP/1.|" in (
        dump_out.decode().splitlines()
    )
