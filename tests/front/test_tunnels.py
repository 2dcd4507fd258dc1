"""CONNECT and SOCKS tunnels end to end: real clients, real origins, real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import pytest
from python_socks import ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.flows.table import DOWN, UP, CloseReason
from tests.certs import Pki
from tests.conftest import (
    Origin,
    ProxyFactory,
    RawServer,
    RunningProxy,
    check_curl_download,
    check_curl_upload,
    curl,
    pattern,
)

SIZES = [0, 1024, 100 << 20]


@pytest.mark.parametrize("size", SIZES)
async def test_connect_https_download_and_upload(
    proxy: RunningProxy, tls_origin: Origin, pki: Pki, tmp_path: Path, size: int
) -> None:
    client = ("-x", proxy.http_url, "--cacert", str(pki.ca_pem))
    await check_curl_download(tmp_path, f"{tls_origin.url}/bytes/{size}", size, *client)
    await check_curl_upload(tmp_path, f"{tls_origin.url}/upload", size, *client)

    await proxy.recorder.wait_destroyed(2)
    flows = proxy.recorder.flows()
    assert [f.tunnel for f in flows] == ["http-connect", "http-connect"]
    for flow in flows:
        assert flow.server == ("127.0.0.1", tls_origin.port)
        assert flow.requested_host == "127.0.0.1"
        assert flow.l7 == "ssl"
        # curl may close while the origin's TLS close_notify is still unread, and
        # the kernel then sends an RST: both endings are the client's real ones.
        assert proxy.recorder.reason(flow) in (CloseReason.NORMAL, CloseReason.RESET)
    # the exported bytes are exactly the tunnel's bytes: the TLS records, not the CONNECT
    first_up = proxy.recorder.data(flows[0], UP)
    assert first_up[:1] == b"\x16" and b"CONNECT" not in first_up[:64]
    assert len(first_up) == flows[0].bytes_up
    assert len(proxy.recorder.data(flows[0], DOWN)) == flows[0].bytes_down


@pytest.mark.parametrize(
    ("flag", "host", "tunnel"),
    [
        ("--socks4", "127.0.0.1", "socks4"),
        ("--socks4a", "localhost", "socks4a"),
        ("--socks5", "127.0.0.1", "socks5"),
        ("--socks5-hostname", "localhost", "socks5"),
    ],
)
@pytest.mark.parametrize("size", [0, 1024, 100 << 20])
async def test_curl_socks(
    proxy: RunningProxy,
    origin: Origin,
    tmp_path: Path,
    flag: str,
    host: str,
    tunnel: str,
    size: int,
) -> None:
    socks = "{}:{}".format(*proxy.socks)
    base = f"http://{host}:{origin.port}"
    await check_curl_download(tmp_path, f"{base}/bytes/{size}", size, flag, socks)
    await check_curl_upload(tmp_path, f"{base}/upload", size, flag, socks)
    await proxy.recorder.wait_destroyed(2)
    flows = proxy.recorder.flows()
    assert {f.tunnel for f in flows} == {tunnel}
    for flow in flows:
        assert flow.requested_host == host
        assert flow.server == ("127.0.0.1", origin.port)
        assert flow.l7 in ("http", "http_client")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@pytest.mark.parametrize(
    ("scheme", "host", "tunnel"),
    [
        ("socks4", "127.0.0.1", "socks4"),
        ("socks4", "localhost", "socks4a"),
        ("socks5", "127.0.0.1", "socks5"),
        ("socks5", "localhost", "socks5"),
        ("socks5", "::1", "socks5"),
        ("http", "127.0.0.1", "http-connect"),
        ("http", "::1", "http-connect"),
    ],
)
async def test_python_socks(
    proxy: RunningProxy, raw_server: ProxyFactory, scheme: str, host: str, tunnel: str
) -> None:
    bind = "::1" if host == "::1" else "127.0.0.1"
    server: RawServer = await raw_server(echo, bind)
    listener = proxy.http if scheme == "http" else proxy.socks
    ptype = {"socks4": ProxyType.SOCKS4, "socks5": ProxyType.SOCKS5, "http": ProxyType.HTTP}
    client = Proxy(ptype[scheme], *listener, rdns=host == "localhost")
    sock = await client.connect(host, server.port, timeout=5)
    client_addr = tuple(sock.getsockname()[:2])
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = pattern(300_000)
    writer.write(payload)
    got = await reader.readexactly(len(payload))
    assert got == payload
    writer.close()
    await writer.wait_closed()
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert flow.tunnel == tunnel
    assert flow.server == (bind, server.port)
    assert flow.client == client_addr
    assert proxy.recorder.data(flow, UP) == payload
    assert proxy.recorder.data(flow, DOWN) == payload


async def test_mixed_listener_speaks_both(proxy: RunningProxy, origin: Origin) -> None:
    mixed = "{}:{}".format(*proxy.mixed)
    for args in (["--socks5", mixed], ["--socks4a", mixed], ["-x", f"http://{mixed}", "-p"]):
        rc, body, err = await curl(*args, "--fail", f"http://localhost:{origin.port}/hello")
        assert rc == 0, (args, err)
        assert body == b"hello GET /hello"


async def test_connect_early_data_is_not_lost(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    server: RawServer = await raw_server(echo)
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(
        f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
        "early bytes".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert await reader.readexactly(11) == b"early bytes"
    writer.close()


async def test_socks5_early_data_is_not_lost(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    server: RawServer = await raw_server(echo)
    reader, writer = await asyncio.open_connection(*proxy.socks)
    req = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
    writer.write(req + server.port.to_bytes(2, "big") + b"hello")
    assert await reader.readexactly(2) == b"\x05\x00"
    reply = await reader.readexactly(10)
    assert reply[:4] == b"\x05\x00\x00\x01"
    assert await reader.readexactly(5) == b"hello"
    writer.close()


@pytest.mark.both_loops
@pytest.mark.parametrize("size", [1 << 10, 2 << 20])
@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_bytes_and_half_close_sent_before_the_reply_all_arrive(
    proxy: RunningProxy, raw_server: ProxyFactory, kind: str, size: int
) -> None:
    """The request, the payload and a half-close in one go, before the reply: the proxy
    keeps reading while it connects (pausing past a bound: 2 MiB), and the relay replays
    it all, the half-close included (it arrives while connecting: 1 KiB)."""
    payload = pattern(size)

    async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner\r\n")  # the server speaks first, before the client has its reply
        got = await reader.read()
        writer.write(hashlib.sha256(got).digest() + len(got).to_bytes(8, "big"))

    server: RawServer = await raw_server(digest_after_eof)
    if kind == "http":
        reader, writer = await asyncio.open_connection(*proxy.http)
        writer.write(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\n\r\n".encode() + payload)
        writer.write_eof()
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    else:
        reader, writer = await asyncio.open_connection(*proxy.socks)
        req = b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
        writer.write(req + server.port.to_bytes(2, "big") + payload)
        writer.write_eof()
        assert await reader.readexactly(2) == b"\x05\x00"
        assert (await reader.readexactly(10))[:4] == b"\x05\x00\x00\x01"
    assert await reader.readexactly(8) == b"banner\r\n"
    answer = await asyncio.wait_for(reader.read(), 30)
    assert answer == hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "big")
    writer.close()
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.data(flow, UP) == payload
    assert proxy.recorder.reason(flow) is CloseReason.NORMAL


async def test_socks_bind_address_is_upstream_local_address(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    server: RawServer = await raw_server(echo)
    reader, writer = await asyncio.open_connection(*proxy.socks)
    writer.write(b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1"))
    writer.write(server.port.to_bytes(2, "big"))
    await reader.readexactly(2)
    reply = await reader.readexactly(10)
    bnd = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
    await asyncio.sleep(0.05)
    _, upstream_writer = server.accepted[0]
    assert upstream_writer.get_extra_info("peername")[:2] == bnd
    writer.close()


async def test_half_close_keeps_the_other_direction(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    """The client shuts its write side; the server keeps sending; every byte arrives."""
    payload = pattern(5 << 20)

    async def respond_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF arrives through the proxy
        writer.write(hashlib.sha256(request).digest())
        for i in range(0, len(payload), 65536):
            writer.write(payload[i : i + 65536])
            await writer.drain()
            await asyncio.sleep(0)

    server: RawServer = await raw_server(respond_after_eof)
    for kind in ("http", "socks"):
        tunnel = Proxy(ProxyType.HTTP if kind == "http" else ProxyType.SOCKS5, *proxy.addr(kind))
        sock = await tunnel.connect("127.0.0.1", server.port)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"question")
        writer.write_eof()
        digest = await reader.readexactly(32)
        assert digest == hashlib.sha256(b"question").digest()
        rest = await reader.read()
        assert rest == payload
        writer.close()
    await proxy.recorder.wait_destroyed(2)
    for flow in proxy.recorder.flows():
        assert proxy.recorder.reason(flow) is CloseReason.NORMAL


async def test_origin_reset_resets_the_client(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    async def abort(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"partial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server: RawServer = await raw_server(abort)
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", server.port)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"ping")
    assert await reader.readexactly(7) == b"partial"
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await reader.readexactly(1)
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.reason(flow) is CloseReason.RESET


async def test_idle_timeout_closes_the_tunnel(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy(idle=0.3)
    server: RawServer = await raw_server(echo)
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", server.port)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    assert await asyncio.wait_for(reader.read(), 3) == b""
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.reason(flow) is CloseReason.TIMEOUT


async def test_python_socks_reports_refusal(proxy: RunningProxy) -> None:
    from tests.conftest import closed_port

    with pytest.raises(ProxyError) as info:
        await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", closed_port())
    assert info.value.error_code == 0x05
