"""Every error reply, triggered for real and checked byte for byte.

A closed port for refusals, an injected resolver for names that do not
resolve, an injected connector for connects that never complete.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from proxytap.front.upstream import SockAddr, SocketConnector, SystemResolver
from tests.conftest import ProxyFactory, RunningProxy, closed_port, exchange

NX = "no-such-host.invalid"
BLACKHOLE_PORT = 9  # the injected connector never completes a connect to this port


class FailingResolver(SystemResolver):
    async def resolve(self, host: str, port: int) -> list[Any]:
        if host == NX:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await super().resolve(host, port)


class HangingConnector(SocketConnector):
    async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket:
        if sockaddr[1] == BLACKHOLE_PORT:
            await asyncio.Event().wait()
        return await super().connect(family, sockaddr)


class ErrnoConnector(SocketConnector):
    """Fails connects to chosen ports with a chosen errno, like the kernel would."""

    def __init__(self, errors: dict[int, int]) -> None:
        self.errors = errors

    async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket:
        code = self.errors.get(sockaddr[1])
        if code is not None:
            raise OSError(code, "simulated")
        return await super().connect(family, sockaddr)


def http_error(status: int, phrase: str, error: str, body: str) -> bytes:
    text = body + "\n"
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(text.encode())}\r\n"
        f"Proxy-Status: proxytap; error={error}\r\n"
        "Connection: close\r\n"
        "\r\n"
        f"{text}"
    ).encode()


@pytest.fixture
async def eproxy(start_proxy: ProxyFactory) -> RunningProxy:
    import errno

    connector = ErrnoConnector({7001: errno.ENETUNREACH, 7002: errno.EHOSTUNREACH})
    hanging = HangingConnector()

    class Both(SocketConnector):
        async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket:
            if sockaddr[1] == BLACKHOLE_PORT:
                return await hanging.connect(family, sockaddr)
            return await connector.connect(family, sockaddr)

    return await start_proxy(resolver=FailingResolver(), connector=Both(), connect=0.5)  # type: ignore[no-any-return]


def connect_req(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


async def test_connect_refused(eproxy: RunningProxy) -> None:
    port = closed_port()
    got = await exchange(eproxy.http, connect_req(f"127.0.0.1:{port}"))
    assert got == http_error(
        502, "Bad Gateway", "connection_refused", "the destination refused the connection"
    )


async def test_connect_dns_error(eproxy: RunningProxy) -> None:
    got = await exchange(eproxy.http, connect_req(f"{NX}:443"))
    assert got == http_error(
        502, "Bad Gateway", "dns_error", "the destination name could not be resolved"
    )


async def test_connect_timeout(eproxy: RunningProxy) -> None:
    got = await exchange(eproxy.http, connect_req(f"127.0.0.1:{BLACKHOLE_PORT}"))
    assert got == http_error(
        504, "Gateway Timeout", "connection_timeout", "connecting to the destination timed out"
    )


async def test_connect_unreachable(eproxy: RunningProxy) -> None:
    got = await exchange(eproxy.http, connect_req("127.0.0.1:7001"))
    assert got == http_error(
        502, "Bad Gateway", "destination_ip_unroutable", "the destination network is unreachable"
    )
    got = await exchange(eproxy.http, connect_req("127.0.0.1:7002"))
    assert got == http_error(
        502, "Bad Gateway", "destination_unavailable", "the destination host is unreachable"
    )


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "[::1:443",
        "::1:443",
        "user@127.0.0.1:443",
        "127.0.0.1:443/path",
        "127.0.0.1:+443",
        "bad host:443",
    ],
)
async def test_connect_malformed_target(eproxy: RunningProxy, target: str) -> None:
    got = await exchange(eproxy.http, connect_req(target))
    assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Proxy-Status: proxytap; error=http_request_error\r\n" in got
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in got
    assert b"Errno" not in got and b"Traceback" not in got


def socks5(host: bytes, port: int, atyp: int = 1, cmd: int = 1) -> bytes:
    return b"\x05\x01\x00" + bytes([5, cmd, 0, atyp]) + host + port.to_bytes(2, "big")


def socks5_reply(code: int) -> bytes:
    return b"\x05\x00" + bytes([5, code, 0, 1]) + b"\x00" * 6


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (socks5(socket.inet_aton("127.0.0.1"), 7001), 0x03),
        (socks5(socket.inet_aton("127.0.0.1"), 7002), 0x04),
        (socks5(bytes([len(NX)]) + NX.encode(), 443, atyp=3), 0x04),
        (socks5(socket.inet_aton("127.0.0.1"), BLACKHOLE_PORT), 0x06),
        (socks5(socket.inet_aton("127.0.0.1"), 1, cmd=2), 0x07),  # BIND
        (socks5(socket.inet_aton("127.0.0.1"), 1, cmd=4), 0x07),  # no such command
        (socks5(socket.inet_aton("127.0.0.1"), 1, atyp=9), 0x08),
    ],
)
async def test_socks5_reply_codes(eproxy: RunningProxy, request_bytes: bytes, code: int) -> None:
    assert await exchange(eproxy.socks, request_bytes) == socks5_reply(code)


async def test_socks5_refused(eproxy: RunningProxy) -> None:
    got = await exchange(eproxy.socks, socks5(socket.inet_aton("127.0.0.1"), closed_port()))
    assert got == socks5_reply(0x05)


async def test_socks5_no_acceptable_method(eproxy: RunningProxy) -> None:
    assert await exchange(eproxy.socks, b"\x05\x01\x02") == b"\x05\xff"


async def test_socks4_failures_are_5b(eproxy: RunningProxy) -> None:
    reject = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
    refused = b"\x04\x01" + closed_port().to_bytes(2, "big") + socket.inet_aton("127.0.0.1")
    assert await exchange(eproxy.socks, refused + b"u\x00") == reject
    nx = b"\x04\x01\x01\xbb\x00\x00\x00\x01u\x00" + NX.encode() + b"\x00"
    assert await exchange(eproxy.socks, nx) == reject
    bind = b"\x04\x02\x01\xbb\x7f\x00\x00\x01u\x00"
    assert await exchange(eproxy.socks, bind) == reject


async def test_socks_listener_rejects_http_and_unknown_versions(eproxy: RunningProxy) -> None:
    assert await exchange(eproxy.socks, b"GET / HTTP/1.1\r\n\r\n") == b""
    assert await exchange(eproxy.socks, b"\x06\x01\x00") == b""


async def test_bad_request_keeps_others_served(eproxy: RunningProxy) -> None:
    """A broken client gets its answer; a parallel good client is unaffected."""
    server = await asyncio.start_server(lambda r, w: w.write(b"ok") or w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bad = [exchange(eproxy.http, b"\x00\x01garbage\r\n\r\n") for _ in range(20)]
    good = exchange(eproxy.http, connect_req(f"127.0.0.1:{port}"))
    results = await asyncio.gather(*bad, good)
    assert all(r.startswith(b"HTTP/1.1 400 ") for r in results[:-1])
    assert results[-1] == b"HTTP/1.1 200 Connection established\r\n\r\nok"
    server.close()


async def test_handshake_timeout(start_proxy: ProxyFactory) -> None:
    proxy: RunningProxy = await start_proxy(handshake=0.3)
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")  # never finishes its head
    got = await asyncio.wait_for(reader.read(), 5)
    assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    reader, writer = await asyncio.open_connection(*proxy.socks)
    writer.write(b"\x05\x01")
    assert await asyncio.wait_for(reader.read(), 5) == b""
