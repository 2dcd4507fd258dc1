"""Plain HTTP forwarding end to end: curl, aiohttp and raw sockets through the proxy.

Origins are aiohttp apps (``tests.conftest``) or raw asyncio servers that record
every byte they receive and send, so the rewritten requests and the tap can be
checked byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxytap.config import Config, ListenerConfig
from proxytap.flows.table import DOWN, UP, CloseReason
from proxytap.front.http_forward import MAX_IDLE_UPSTREAMS, HttpForwarder
from proxytap.front.upstream import SystemResolver
from proxytap.policy.auth import AuthConfig, basic_credentials
from proxytap.policy.headers import HttpConfig
from tests.conftest import (
    TEST_ACCESS,
    Origin,
    ProxyFactory,
    RawServer,
    RunningProxy,
    check_curl_download,
    check_curl_upload,
    closed_port,
    curl,
    exchange,
    pattern,
    pattern_sha256,
)

VIA = b"Via: 1.1 proxytap\r\n"


# -- reading HTTP messages off raw streams -----------------------------------------------


@dataclass
class Message:
    raw: bytes  # every byte of the message as it came
    start: bytes  # the start line
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}

    @property
    def status(self) -> int:
        return int(self.start.split()[1])


async def read_message(
    reader: asyncio.StreamReader, *, request: bool = False, bodyless: bool = False
) -> Message:
    """One request or response; ``bodyless`` for answers to HEAD (and 1xx/204/304)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    msg = Message(head, lines[0].encode(), headers, b"")
    status = 0 if request else msg.status
    if bodyless or (status < 200 and not request) or status in (204, 304):
        return msg
    raw = bytearray(head)
    body = bytearray()
    te = msg.get("transfer-encoding")
    cl = msg.get("content-length")
    if te is not None:
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = await reader.readuntil(b"\r\n")
                    raw += line
                    if line == b"\r\n":
                        break
                break
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            body += chunk[:-2]
    elif cl is not None:
        body += await reader.readexactly(int(cl))
        raw += body
    elif not request:
        body += await reader.read()
        raw += body
    msg.raw = bytes(raw)
    msg.body = bytes(body)
    return msg


# -- scripted origins ---------------------------------------------------------------------


@dataclass
class Script:
    """A raw origin: per request, the bytes to answer; records both directions."""

    answers: list[bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]]
    received: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    requests: list[Message] = field(default_factory=list)
    connections: int = 0
    close_after: bool = False  # close the connection after each answer

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while self.answers:
            try:
                msg = await read_message(reader, request=True)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            self.received += msg.raw
            self.requests.append(msg)
            answer = self.answers.pop(0)
            if isinstance(answer, bytes):
                writer.write(answer)
                self.sent += answer
                await writer.drain()
            else:
                await answer(reader, writer)
            if self.close_after:
                return
        await reader.read()  # until the proxy lets go


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def start_script(raw_server: ProxyFactory, *answers: bytes) -> tuple[Script, RawServer]:
    script = Script(list(answers))
    server: RawServer = await raw_server(script)
    return script, server


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def client(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*proxy.http)


# -- curl and aiohttp -------------------------------------------------------------------------


async def test_curl_get(proxy: RunningProxy, origin: Origin) -> None:
    rc, body, err = await curl("-x", proxy.http_url, "--fail", f"{origin.url}/hello?x=1")
    assert rc == 0, err
    assert body == b"hello GET /hello?x=1"
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert flow.tunnel == "http-forward"
    assert flow.server == ("127.0.0.1", origin.port)
    assert flow.requested_host == "127.0.0.1"
    assert flow.http_host == f"127.0.0.1:{origin.port}"
    assert flow.l7 in ("http", "http_client")
    up = proxy.recorder.data(flow, UP)
    assert up.startswith(b"GET /hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % origin.port)
    assert proxy.recorder.data(flow, DOWN).startswith(b"HTTP/1.1 200 OK\r\n")
    assert proxy.recorder.reason(flow) is CloseReason.NORMAL
    assert not proxy.app.services.table.connections


async def test_aiohttp_client_through_proxy(proxy: RunningProxy, origin: Origin) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            async with session.get(f"{origin.url}/hello?i={i}", proxy=proxy.http_url) as resp:
                assert resp.status == 200
                assert await resp.text() == f"hello GET /hello?i={i}"
                assert resp.headers["Via"] == "1.1 proxytap"
        data = pattern(100_000)
        async with session.post(f"{origin.url}/upload", data=data, proxy=proxy.http_url) as resp:
            assert await resp.text() == f"{len(data)} {hashlib.sha256(data).hexdigest()}"


@pytest.mark.parametrize("size", [0, 1024, 20 << 20])
async def test_content_length_both_directions(
    proxy: RunningProxy, origin: Origin, tmp_path: Path, size: int
) -> None:
    await check_curl_download(tmp_path, f"{origin.url}/bytes/{size}", size, "-x", proxy.http_url)
    await check_curl_upload(tmp_path, f"{origin.url}/upload", size, "-x", proxy.http_url)


async def test_chunked_upload(proxy: RunningProxy, origin: Origin, tmp_path: Path) -> None:
    size = 3 << 20
    await check_curl_upload(
        tmp_path,
        f"{origin.url}/upload",
        size,
        "-x",
        proxy.http_url,
        header="Transfer-Encoding: chunked",
    )


async def test_chunked_download(proxy: RunningProxy, tmp_path: Path) -> None:
    size = 5 << 20

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        data = pattern(size)
        for i in range(0, size, 100_000):
            await resp.write(data[i : i + 100_000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        out = tmp_path / "down"
        rc, headers, err = await curl(
            "-x",
            proxy.http_url,
            "--fail",
            "-D",
            "-",
            "-o",
            str(out),
            f"http://127.0.0.1:{port}/stream",
        )
        assert rc == 0, err
        assert b"Transfer-Encoding: chunked" in headers
        assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(size)
    finally:
        await runner.cleanup()


async def test_websocket_through_the_proxy(proxy: RunningProxy) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo " + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port}/ws", proxy=proxy.http_url) as ws,
        ):
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "echo hello"
            blob = pattern(300_000)
            await ws.send_bytes(blob)
            assert await ws.receive_bytes(timeout=5) == blob
        await proxy.recorder.wait_destroyed(1)
        (flow,) = proxy.recorder.flows()
        up = proxy.recorder.data(flow, UP)
        down = proxy.recorder.data(flow, DOWN)
        assert up.startswith(b"GET /ws HTTP/1.1\r\n")
        assert b"Upgrade: websocket\r\n" in up and b"Connection: Upgrade\r\n" in up
        assert down.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert len(up) > 300_000 and len(down) > 300_000  # the frames were tapped too
        assert flow.bytes_up == len(up) and flow.bytes_down == len(down)
    finally:
        await runner.cleanup()


# -- routing, reuse, the tap -------------------------------------------------------------------


async def test_each_request_goes_to_its_own_origin(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    a, server_a = await start_script(raw_server, ok(b"from a"), ok(b"from a again"))
    b, server_b = await start_script(raw_server, ok(b"from b"))
    reader, writer = await client(proxy)
    for script_port, path, expect in (
        (server_a.port, "/one?q=1", b"from a"),
        (server_b.port, "/two", b"from b"),
        (server_a.port, "/three", b"from a again"),
    ):
        writer.write(
            f"GET http://127.0.0.1:{script_port}{path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{script_port}\r\nX-Test: 1\r\n\r\n".encode()
        )
        resp = await read_message(reader)
        assert resp.body == expect
        assert resp.get("Connection") == "keep-alive"
    writer.close()
    await writer.wait_closed()

    def expected(port: int, path: str) -> bytes:
        return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Test: 1\r\n%b\r\n" % (
            path.encode(),
            port,
            VIA,
        )

    assert [r.raw for r in a.requests] == [
        expected(server_a.port, "/one?q=1"),
        expected(server_a.port, "/three"),
    ]
    assert [r.raw for r in b.requests] == [expected(server_b.port, "/two")]
    assert a.connections == 1 and b.connections == 1  # the connection to a was reused

    # the tap: one flow per upstream connection, bytes exactly as on the wire
    await proxy.recorder.wait_destroyed(2)
    flows = {f.server[1]: f for f in proxy.recorder.flows()}
    assert set(flows) == {server_a.port, server_b.port}
    for script, port in ((a, server_a.port), (b, server_b.port)):
        flow = flows[port]
        assert proxy.recorder.data(flow, UP) == bytes(script.received)
        assert proxy.recorder.data(flow, DOWN) == bytes(script.sent)
        assert flow.bytes_up == len(script.received)
        assert flow.bytes_down == len(script.sent)
        assert flow.outer is flows[server_a.port].outer
        assert proxy.recorder.reason(flow) is CloseReason.NORMAL


async def test_pipelined_requests_answered_in_order(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    a, server_a = await start_script(raw_server, ok(b"first"), ok(b"third"))
    _, server_b = await start_script(raw_server, ok(b"second"))
    reader, writer = await client(proxy)
    writer.write(
        b"".join(
            b"GET http://127.0.0.1:%d/%d HTTP/1.1\r\n\r\n" % (port, i)
            for i, port in enumerate((server_a.port, server_b.port, server_a.port))
        )
    )
    bodies = [(await read_message(reader)).body for _ in range(3)]
    assert bodies == [b"first", b"second", b"third"]
    assert [r.start for r in a.requests] == [b"GET /0 HTTP/1.1", b"GET /2 HTTP/1.1"]
    writer.close()


async def test_stale_pooled_connection_is_retried(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    """The origin drops a kept-alive connection; the next GET goes over a new one."""
    script = Script([ok(b"one"), ok(b"two")], close_after=True)
    server: RawServer = await raw_server(script)
    reader, writer = await client(proxy)
    for body in (b"one", b"two"):
        writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
        await asyncio.sleep(0.1)  # the origin's close reaches the proxy, or not: both work
        assert (await read_message(reader)).body == body
    assert script.connections == 2
    writer.close()


# -- header rewriting ---------------------------------------------------------------------------


async def test_hop_by_hop_headers_removed_both_ways(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    answer = ok(
        b"hi",
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nConnection: X-Origin-Private\r\n"
        b"X-Origin-Private: 1\r\nUpgrade: h2c\r\nTrailer: X-T\r\nX-End: 2\r\n",
    )
    script, server = await start_script(raw_server, answer)
    reader, writer = await client(proxy)
    writer.write(
        b"GET http://127.0.0.1:%d/p HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Keep-Alive: 300\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n"
        b"Connection: X-Secret, keep-alive\r\n"
        b"X-Secret: s\r\n"
        b"Upgrade: h2c\r\n"
        b"Accept: */*\r\n\r\n" % (server.port, server.port)
    )
    resp = await read_message(reader)
    (req,) = script.requests
    assert req.raw == (
        b"GET /p HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\n%b\r\n" % (server.port, VIA)
    )
    assert resp.raw == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-End: 2\r\n"
        + VIA
        + b"Connection: keep-alive\r\n\r\nhi"
    )
    writer.close()


async def test_host_header_must_match_the_uri(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    script, server = await start_script(raw_server, ok(), ok())
    reader, writer = await client(proxy)
    # same host and port, other spelling: accepted, Host rebuilt from the URI
    writer.write(
        b"GET http://127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1.:%d\r\n\r\n"
        % (server.port, server.port)
    )
    await read_message(reader)
    writer.write(b"OPTIONS http://127.0.0.1:%d HTTP/1.1\r\nX: y\r\n\r\n" % server.port)
    await read_message(reader)
    first, second = script.requests
    assert first.raw == b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%b\r\n" % (server.port, VIA)
    assert second.raw == (
        b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX: y\r\n%b\r\n" % (server.port, VIA)
    )
    writer.close()
    # another host or port: 400, nothing sent (cache poisoning, routing tricks)
    for host in (b"evil.example", b"127.0.0.1", b"127.0.0.1:1"):
        got = await exchange(
            proxy.http,
            b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: %b\r\n\r\n" % (server.port, host),
        )
        assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got
        assert got.endswith(b"the Host header field does not match the request target\n")
    assert len(script.requests) == 2


# -- message framing ------------------------------------------------------------------------------


async def test_head_response_has_no_body(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    script, server = await start_script(
        raw_server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ok(b"after"),
    )
    reader, writer = await client(proxy)
    url = b"http://127.0.0.1:%d/" % server.port
    writer.write(b"HEAD %b HTTP/1.1\r\n\r\n" % url)
    resp = await read_message(reader, bodyless=True)
    assert resp.status == 200 and resp.get("Content-Length") == "1000"
    writer.write(b"HEAD %b HTTP/1.1\r\n\r\n" % url)
    resp = await read_message(reader, bodyless=True)
    assert resp.get("Transfer-Encoding") is None
    writer.write(b"GET %b HTTP/1.1\r\n\r\n" % url)
    assert (await read_message(reader)).body == b"after"
    assert script.connections == 1
    writer.close()


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_no_body_statuses(
    proxy: RunningProxy, raw_server: ProxyFactory, status: bytes
) -> None:
    script, server = await start_script(
        raw_server, b'HTTP/1.1 %b\r\nETag: "e"\r\n\r\n' % status, ok(b"next")
    )
    reader, writer = await client(proxy)
    for _ in range(2):
        writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    resp = await read_message(reader)
    assert resp.raw == b'HTTP/1.1 %b\r\nETag: "e"\r\n%bConnection: keep-alive\r\n\r\n' % (
        status,
        VIA,
    )
    assert (await read_message(reader)).body == b"next"
    assert script.connections == 1
    writer.close()


async def test_http10_client(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    script, server = await start_script(raw_server, ok(b"plain"))
    _, server2 = await start_script(raw_server, chunked)
    for srv, expect in ((server, ok(b"plain")), (server2, b"")):
        reader, writer = await client(proxy)
        writer.write(
            b"GET http://127.0.0.1:%d/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % srv.port
        )
        raw = await asyncio.wait_for(reader.read(), 5)  # the proxy closes after the response
        if expect:
            assert raw == (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n%bConnection: close\r\n\r\nplain"
                % b"Via: 1.1 proxytap\r\n"
            )
        else:  # chunked is not for HTTP/1.0: the body is close-delimited
            assert raw == b"HTTP/1.1 200 OK\r\n%bConnection: close\r\n\r\nhello" % VIA
        writer.close()
    assert script.requests[0].raw == (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nVia: 1.0 proxytap\r\n\r\n" % server.port
    )


async def test_expect_100_continue(proxy: RunningProxy, origin: Origin) -> None:
    reader, writer = await client(proxy)
    body = pattern(5000)
    writer.write(
        b"POST %b/upload HTTP/1.1\r\nContent-Length: %d\r\n"
        b"Expect: 100-continue\r\n\r\n" % (origin.url.encode(), len(body))
    )
    interim = await asyncio.wait_for(read_message(reader), 5)  # before we send the body
    assert interim.start == b"HTTP/1.1 100 Continue"
    writer.write(body)
    final = await read_message(reader)
    assert final.status == 200
    assert final.body.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
    writer.close()


async def test_close_delimited_response(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    async def close_delimited(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + pattern(200_000))
        await writer.drain()
        writer.close()

    script = Script([close_delimited, ok(b"again")], close_after=True)
    server: RawServer = await raw_server(script)
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    resp = await read_message(reader)
    # chunked for an HTTP/1.1 client: the client connection stays usable
    assert resp.get("Transfer-Encoding") == "chunked"
    assert resp.get("Connection") == "keep-alive"
    assert resp.body == pattern(200_000)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    assert (await read_message(reader)).body == b"again"
    writer.close()
    await proxy.recorder.wait_destroyed(2)
    assert all(proxy.recorder.reason(f) is CloseReason.NORMAL for f in proxy.recorder.flows())


async def test_chunked_trailers_and_sizes_relayed(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nX-Checksum: 42\r\n\r\n"
    )
    script, server = await start_script(raw_server, answer, ok())
    reader, writer = await client(proxy)
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nxy\r\n0\r\nX-Up: 1\r\n\r\n" % server.port
    )
    resp = await read_message(reader)
    # the next chunked request has no trailers: none of the first one's either
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" % server.port
    )
    await read_message(reader)
    assert script.requests[1].raw.endswith(b"\r\n\r\n0\r\n\r\n")
    # to an HTTP/1.1 client the chunked body goes as it came: extensions, sizes, trailers
    assert resp.raw == (
        b"HTTP/1.1 200 OK\r\n%bTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        b"3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nX-Checksum: 42\r\n\r\n" % VIA
    )
    assert script.requests[0].raw == (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%bTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nxy\r\n0\r\nX-Up: 1\r\n\r\n" % (server.port, VIA)
    )
    writer.close()


async def test_h2c_upgrade_is_forwarded_as_plain_request(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    script, server = await start_script(raw_server, ok(b"no h2c here"))
    reader, writer = await client(proxy)
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\n"
        b"hello" % server.port
    )
    assert (await read_message(reader)).body == b"no h2c here"
    assert script.requests[0].raw == (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 5\r\n%b\r\nhello"
        % (server.port, VIA)
    )
    writer.close()


# -- refusals and failures ------------------------------------------------------------------------


def error_reply(status: bytes, error: bytes, text: bytes) -> bytes:
    body = text + b"\n"
    return (
        b"HTTP/1.1 %b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Proxy-Status: proxytap; error=%b\r\nConnection: close\r\n\r\n%b"
        % (status, len(body), error, body)
    )


async def test_origin_form_is_refused(proxy: RunningProxy) -> None:
    got = await exchange(proxy.http, b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert got == error_reply(
        b"400 Bad Request",
        b"http_request_error",
        b"proxytap is a forward proxy, not a reverse proxy: "
        b"the request target must be an absolute http:// URI",
    )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"501 "),
        (b"GET ftp://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"501 "),
        (b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n", b"400 "),
        (b"GET http://u:p@example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"400 "),
        (b"GET http://exa mple/ HTTP/1.1\r\n\r\n", b"400 "),
        (b"GET http://127.0.0.1:0/ HTTP/1.1\r\n\r\n", b"400 "),
        (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400 "),
        (b"GET http://a/ HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", b"431 "),
        (b"GET http://a/" + b"y" * 9000 + b" HTTP/1.1\r\n\r\n", b"414 "),
    ],
)
async def test_refusals(proxy: RunningProxy, request_bytes: bytes, status: bytes) -> None:
    got = await exchange(proxy.http, request_bytes)
    assert got.startswith(b"HTTP/1.1 " + status), got[:200]
    assert b"\r\nProxy-Status: proxytap; error=http_request_error\r\n" in got


async def test_malformed_second_request(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    _, server = await start_script(raw_server, ok(), ok())
    reader, writer = await client(proxy)
    bad = b"GET http://x/ HTTP/1.1\r\nBad Header\r\n\r\n"
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port + bad)
    assert (await read_message(reader)).status == 200  # the good one is still answered
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_connect_after_plain_requests_opens_a_tunnel(
    proxy: RunningProxy, raw_server: ProxyFactory, pipelined: bool
) -> None:
    """A CONNECT on a kept-alive connection is a tunnel, as if it had come first."""
    script, server = await start_script(raw_server, ok(b"one"), ok(b"two"))
    target: RawServer = await raw_server(echo)
    get = b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port
    connect = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (
        target.port,
        target.port,
    )
    reader, writer = await client(proxy)
    if pipelined:  # the CONNECT and its first tunnel bytes wait for the answers before it
        writer.write(get + get + connect + b"early ")
        assert (await read_message(reader)).body == b"one"
        assert (await read_message(reader)).body == b"two"
    else:
        for body in (b"one", b"two"):
            writer.write(get)
            assert (await read_message(reader)).body == body
        writer.write(connect)
    assert await reader.readexactly(39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    writer.write(b"through the tunnel")
    want = (b"early " if pipelined else b"") + b"through the tunnel"
    assert await reader.readexactly(len(want)) == want
    writer.close()
    await proxy.recorder.wait_destroyed(2)
    http_flow, tunnel_flow = proxy.recorder.flows()
    assert (http_flow.requested_port, tunnel_flow.requested_port) == (server.port, target.port)
    assert proxy.recorder.reason(http_flow) is CloseReason.NORMAL  # closed on the hand-over
    assert proxy.recorder.data(tunnel_flow, UP) == want
    assert proxy.recorder.data(tunnel_flow, DOWN) == want
    assert script.connections == 1  # both requests on one upstream connection
    stats = proxy.app.services.stats
    assert stats.tunnel_results[("http", "http-connect", "200")] == 1
    # one client connection, counted once, by its first protocol
    assert dict(stats.downstream) == {("http", "http-forward"): 1}


async def test_connect_after_plain_requests_is_judged_like_a_first_one(
    auth_proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    """Authentication: the same 407 as on a fresh connection, then the connection closes."""
    _, server = await start_script(raw_server, ok())
    connect = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % server.port
    first = await exchange(auth_proxy.http, connect)
    assert first.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), first
    creds = basic_credentials("alice", "s3cret").encode()
    reader, writer = await client(auth_proxy)
    writer.write(
        b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nProxy-Authorization: %b\r\n\r\n%b"
        % (server.port, creds, connect)
    )
    assert (await read_message(reader)).status == 200
    later = await asyncio.wait_for(reader.read(), 5)
    assert later == first
    writer.close()


async def test_connection_refused(proxy: RunningProxy, caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    caplog.set_level(logging.INFO, "proxytap.access")
    got = await exchange(proxy.http, b"GET http://127.0.0.1:%d/x?q HTTP/1.1\r\n\r\n" % port)
    assert got == error_reply(
        b"502 Bad Gateway", b"connection_refused", b"the destination refused the connection"
    )
    # the access line carries the proxy's own answer, and no query string
    lines = [r.getMessage() for r in caplog.records if r.name == "proxytap.access"]
    assert len(lines) == 1 and f" GET 127.0.0.1:{port}/x 502 up=0 down=0 " in lines[0], lines


async def test_origin_closes_before_response(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 O")
        await writer.drain()

    server: RawServer = await raw_server(hang_up)
    got = await exchange(proxy.http, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    assert got == error_reply(
        b"502 Bad Gateway",
        b"http_response_incomplete",
        b"the destination closed the connection before a complete response",
    )


async def test_invalid_response(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    _, server = await start_script(raw_server, b"SSH-2.0-OpenSSH\r\n\r\n")
    got = await exchange(proxy.http, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    assert got.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"error=http_protocol_error" in got


async def test_origin_reset_mid_response(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    async def partial_then_rst(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.1)
        rst(writer)

    script = Script([partial_then_rst])
    server: RawServer = await raw_server(script)
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert await reader.readexactly(10) == b"0123456789"
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(990), 5)
    writer.close()
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.reason(flow) is CloseReason.RESET


# -- timeouts and shutdown -------------------------------------------------------------------------


async def test_keepalive_timeout(start_proxy: ProxyFactory, raw_server: ProxyFactory) -> None:
    proxy: RunningProxy = await start_proxy(http_keepalive=0.3)
    _, server = await start_script(raw_server, ok())
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    await read_message(reader)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - t0 < 2
    await proxy.recorder.wait_destroyed(1)
    assert not proxy.app.services.live


async def test_idle_timeout_answers_504(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy(idle=0.3)

    async def silent(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()  # never answer; the proxy gives up and closes

    script = Script([silent])
    server: RawServer = await raw_server(script)
    got = await exchange(proxy.http, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    assert got == error_reply(
        b"504 Gateway Timeout", b"http_response_timeout", b"the destination did not answer in time"
    )
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.reason(flow) is CloseReason.TIMEOUT


async def test_shutdown_closes_idle_keepalive_connections(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy()
    _, server = await start_script(raw_server, ok())
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    await read_message(reader)
    await asyncio.wait_for(proxy.app.stop(5), 3)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    assert not proxy.app.services.live


# -- backpressure, retries, odd origins and clients ------------------------------------------


def forwarders(proxy: RunningProxy) -> list[HttpForwarder]:
    return [o for o in proxy.app.services.live if isinstance(o, HttpForwarder)]


async def test_slow_client_pauses_the_origin(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    size = 40 << 20

    async def flood(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        data = pattern(size)
        for i in range(0, size, 1 << 20):
            writer.write(data[i : i + (1 << 20)])
            await writer.drain()

    server: RawServer = await raw_server(Script([flood]))
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(0.5)  # not reading: the proxy must not buffer the rest
    (fwd,) = forwarders(proxy)
    high = proxy.app.config.limits.write_buffer_high
    assert fwd.transport.get_write_buffer_size() <= high + (1 << 20)
    assert fwd.client_blocked
    (up,) = fwd.upstreams
    assert not up.reading
    h = hashlib.sha256()
    got = 0
    while got < size:
        chunk = await reader.read(1 << 20)
        assert chunk
        h.update(chunk)
        got += len(chunk)
    assert h.hexdigest() == pattern_sha256(size)
    writer.close()


async def test_slow_origin_pauses_the_client(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    size = 40 << 20
    go = asyncio.Event()

    async def stall_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await go.wait()
        h = hashlib.sha256()
        left = size
        while left:
            chunk = await reader.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
        writer.write(ok(h.hexdigest().encode()))
        await writer.drain()
        await reader.read()

    server: RawServer = await raw_server(stall_then_read)
    reader, writer = await client(proxy)
    writer.write(
        b"PUT http://127.0.0.1:%d/ HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (server.port, size)
    )

    async def upload() -> None:
        data = pattern(size)
        for i in range(0, size, 1 << 20):
            writer.write(data[i : i + (1 << 20)])
            await writer.drain()

    task = asyncio.create_task(upload())
    await asyncio.sleep(0.5)
    assert not task.done()  # the client is held back
    (fwd,) = forwarders(proxy)
    (up,) = fwd.upstreams
    assert up.transport is not None
    high = proxy.app.config.limits.write_buffer_high
    assert up.transport.get_write_buffer_size() <= high + (1 << 20)
    assert not fwd.reading
    go.set()
    await asyncio.wait_for(task, 20)
    resp = await read_message(reader)
    assert resp.body.decode() == pattern_sha256(size)
    writer.close()


async def test_reused_connection_dropped_by_origin_is_retried(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    connections = 0

    async def drop_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_message(reader, request=True)
        writer.write(ok(b"conn %d" % connections))
        await writer.drain()
        if connections == 1:
            await read_message(reader, request=True)  # the reused connection: hang up
            return
        await reader.read()

    server: RawServer = await raw_server(drop_second)
    reader, writer = await client(proxy)
    for expect in (b"conn 1", b"conn 2"):
        writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
        assert (await read_message(reader)).body == expect
    writer.close()


async def test_interim_responses(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + ok(b"final")
    _, server = await start_script(raw_server, answer, answer)
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    interim = await read_message(reader)
    assert interim.raw == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n%b\r\n" % VIA
    assert (await read_message(reader)).body == b"final"
    writer.close()
    # not to an HTTP/1.0 client (RFC 9110 section 15.2)
    got = await exchange(proxy.http, b"GET http://127.0.0.1:%d/ HTTP/1.0\r\n\r\n" % server.port)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"final")


async def test_heads_split_across_reads(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    async def dribble(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in (b"HTTP/1.1 200 OK\r\nContent-Len", b"gth: 5\r\n\r", b"\nhel", b"lo"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)

    server: RawServer = await raw_server(Script([dribble, dribble]))
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    assert (await read_message(reader)).body == b"hello"
    writer.write(b"HEAD http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    resp = await read_message(reader, bodyless=True)
    assert resp.get("Content-Length") == "5"
    writer.close()


async def test_oversized_response_head(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"y" * 70000 + b"\r\n\r\n"
    _, server = await start_script(raw_server, big)
    got = await exchange(proxy.http, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    assert got.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"error=http_response_header_section_size" in got


async def test_bytes_after_a_response_end_the_upstream_connection(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    script = Script([ok(b"one") + b"HTTP/1.1 200 OK\r\n\r\nsmuggled", ok(b"two")])
    server: RawServer = await raw_server(script)
    reader, writer = await client(proxy)
    for expect in (b"one", b"two"):
        writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
        assert (await read_message(reader)).body == expect
    assert script.connections == 2
    writer.close()


async def test_early_response_closes_the_connection(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    server: RawServer = await raw_server(refuse)
    reader, writer = await client(proxy)
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" % server.port
    )
    writer.write(b"x" * 1000)
    resp = await read_message(reader)
    assert resp.status == 413 and resp.get("Connection") == "close"
    writer.write(b"x" * 1000)  # still sending: the proxy drains, then closes
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_client_half_close_after_request(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    async def slow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        writer.write(ok(b"late"))
        await writer.drain()

    server: RawServer = await raw_server(Script([slow]))
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 5)
    assert raw.endswith(b"\r\n\r\nlate")
    writer.close()


async def test_client_gone_mid_upload(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    script = Script([ok()])
    server: RawServer = await raw_server(script)
    _, writer = await client(proxy)
    writer.write(
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" % server.port
    )
    writer.write(b"x" * 5000)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await proxy.recorder.wait_destroyed(1)
    assert not proxy.app.services.table.connections
    assert not forwarders(proxy)


async def test_bad_chunk_in_upload(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    async def swallow(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()

    server: RawServer = await raw_server(swallow)
    got = await exchange(
        proxy.http,
        b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\n" % server.port,
    )
    assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_idle_upstreams_are_bounded(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    scripts = [await start_script(raw_server, ok(), ok()) for _ in range(MAX_IDLE_UPSTREAMS + 1)]
    reader, writer = await client(proxy)
    for _, server in scripts:
        writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
        await read_message(reader)
    (fwd,) = forwarders(proxy)
    assert len(fwd.idle) == MAX_IDLE_UPSTREAMS
    assert ("127.0.0.1", scripts[0][1].port) not in fwd.idle  # the oldest went
    writer.close()


async def test_draining_proxy_finishes_the_response(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    release = asyncio.Event()

    async def wait(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(ok(b"last"))
        await writer.drain()

    server: RawServer = await raw_server(Script([wait]))
    reader, writer = await client(proxy)
    writer.write(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % server.port)
    await asyncio.sleep(0.1)
    (fwd,) = forwarders(proxy)
    fwd.shutdown(False)
    assert not fwd.closed
    release.set()
    resp = await read_message(reader)
    assert resp.body == b"last" and resp.get("Connection") == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""


# -- policy on the plain-HTTP path ---------------------------------------------------------------


@pytest.fixture
async def auth_proxy(start_proxy: ProxyFactory, tmp_path: Path) -> RunningProxy:
    path = tmp_path / "htpasswd"
    proc = await asyncio.create_subprocess_exec("htpasswd", "-bcB", str(path), "alice", "s3cret")
    assert await proc.wait() == 0
    cfg = Config(
        listeners=(ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),),
        access=TEST_ACCESS,
        auth=AuthConfig(htpasswd=str(path)),
    )
    return await start_proxy(cfg)  # type: ignore[no-any-return]


async def test_proxy_authentication(auth_proxy: RunningProxy, origin: Origin) -> None:
    url = f"{origin.url}/hello"
    rc, body, err = await curl("-x", auth_proxy.http_url, "--proxy-user", "alice:s3cret", url)
    assert rc == 0, err
    assert body == b"hello GET /hello"
    for args in (["--proxy-user", "alice:wrong"], []):
        rc, _, err = await curl("-x", auth_proxy.http_url, "--fail", *args, url)
        assert rc != 0 and b"407" in err, err
    # a 407 to a request read whole keeps the connection (test_407_keeps_the_connection)
    reader, writer = await client(auth_proxy)
    writer.write(b"GET %b HTTP/1.1\r\n\r\n" % url.encode())
    got = (await read_message(reader)).raw
    writer.close()
    assert got.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="proxytap", charset="UTF-8"\r\n' in got
    assert auth_proxy.app.services.refusals[("auth", "bad credentials")] == 1

    # one check per connection: the same credentials again are not re-verified
    auth = auth_proxy.app.services.auth
    assert auth is not None
    before = auth.successes
    reader, writer = await client(auth_proxy)
    creds = basic_credentials("alice", "s3cret").encode()
    for _ in range(3):
        writer.write(b"GET %b HTTP/1.1\r\nProxy-Authorization: %b\r\n\r\n" % (url.encode(), creds))
        assert (await read_message(reader)).body == b"hello GET /hello"
    assert auth.successes == before + 1
    (fwd,) = forwarders(auth_proxy)
    assert fwd.conn.user == "alice"
    writer.close()


REQUIRED = b"proxy authentication required\n"
WRONG = b"wrong user name or password\n"


def proxy_407(text: bytes, close: bool) -> bytes:
    return (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Proxy-Status: proxytap; error=http_request_denied\r\n"
        b'Proxy-Authenticate: Basic realm="proxytap", charset="UTF-8"\r\n%b\r\n%b'
        % (len(text), b"Connection: close\r\n" if close else b"", text)
    )


async def test_407_keeps_the_connection(auth_proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    """Missing or wrong credentials on a request read whole: 407, the connection kept."""
    script, server = await start_script(raw_server, ok())
    post = b"POST http://127.0.0.1:%d/up HTTP/1.1\r\nContent-Length: 5\r\n%%b\r\nhello" % (
        server.port
    )
    wrong = basic_credentials("alice", "wrong").encode()
    good = basic_credentials("alice", "s3cret").encode()
    reader, writer = await client(auth_proxy)
    writer.write(post % b"")
    assert (await read_message(reader)).raw == proxy_407(REQUIRED, close=False)
    writer.write(post % b"Proxy-Authorization: %b\r\n" % wrong)  # checked in a thread
    assert (await read_message(reader)).raw == proxy_407(WRONG, close=False)
    writer.write(post % b"Proxy-Authorization: %b\r\n" % good)
    assert (await read_message(reader)).body == b"ok"
    writer.close()
    (req,) = script.requests  # only the authenticated one, its body whole
    assert (req.start, req.body, script.connections) == (b"POST /up HTTP/1.1", b"hello", 1)
    assert auth_proxy.app.services.stats.downstream[("http", "http-forward")] == 1


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        b"Content-Length: 2000000\r\n\r\n",
    ],
)
async def test_407_closes_when_the_body_is_not_waited_for(
    auth_proxy: RunningProxy, framing: bytes
) -> None:
    """Chunked, Expect: 100-continue or over DRAIN_MAX: answered at once, then closed."""
    got = await exchange(auth_proxy.http, b"POST http://127.0.0.1:1/ HTTP/1.1\r\n" + framing)
    assert got == proxy_407(REQUIRED, close=True)


async def test_curl_retries_its_authentication_on_the_same_connection(
    auth_proxy: RunningProxy, origin: Origin
) -> None:
    rc, out, err = await curl(
        "-x",
        auth_proxy.http_url,
        "--proxy-anyauth",
        "--proxy-user",
        "alice:s3cret",
        "-w",
        " connects=%{num_connects}",
        f"{origin.url}/hello",
    )
    assert rc == 0, err
    assert out == b"hello GET /hello connects=1"
    assert auth_proxy.app.services.stats.downstream[("http", "http-forward")] == 1


async def test_destination_policy_and_dns_errors(start_proxy: ProxyFactory) -> None:
    class Resolver(SystemResolver):
        async def resolve(self, host: str, port: int) -> list[Any]:
            if host == "no-such-host.invalid":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return await super().resolve(host, port)

    cfg = Config(listeners=(ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),))
    proxy: RunningProxy = await start_proxy(cfg, resolver=Resolver())
    got = await exchange(proxy.http, b"GET http://no-such-host.invalid/ HTTP/1.1\r\n\r\n")
    assert got == error_reply(
        b"502 Bad Gateway", b"dns_error", b"the destination name could not be resolved"
    )
    # loopback is not a destination by default (an open proxy into the host)
    got = await exchange(proxy.http, b"GET http://127.0.0.1:1/ HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n")


# -- WebSocket handshakes, raw ---------------------------------------------------------------

WS_HEAD = (
    b"GET http://127.0.0.1:%d/ws HTTP/1.1\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5a2V5\r\n\r\n"
)


async def test_websocket_tunnel_bytes_exact(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    received = bytearray()
    sent = bytearray()

    async def ws(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        received.extend(head)
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\nserver-first"
        )
        writer.write(answer)
        sent.extend(answer)
        for _ in range(2):
            data = await reader.readexactly(5)
            received.extend(data)
            writer.write(data)
            sent.extend(data)
            await writer.drain()

    server: RawServer = await raw_server(ws)
    reader, writer = await client(proxy)
    writer.write(WS_HEAD % server.port + b"early")  # sent before the 101: held, then relayed
    head = await reader.readuntil(b"\r\n\r\n")
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n"
        + VIA
        + b"Connection: Upgrade\r\n\r\n"
    )
    assert await reader.readexactly(12) == b"server-first"
    assert await reader.readexactly(5) == b"early"
    writer.write(b"later")
    assert await reader.readexactly(5) == b"later"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the origin closed: so do we
    writer.close()
    assert received.startswith(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    assert b"\r\nVia: 1.1 proxytap\r\nConnection: Upgrade\r\n\r\nearlylater" in received
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.data(flow, UP) == bytes(received)
    assert proxy.recorder.data(flow, DOWN) == bytes(sent)


async def test_websocket_refused_by_origin(proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    script, server = await start_script(
        raw_server, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", ok(b"next")
    )
    reader, writer = await client(proxy)
    writer.write(WS_HEAD % server.port)
    resp = await read_message(reader)
    assert resp.status == 403 and resp.body == b"no"
    writer.write(b"GET http://127.0.0.1:%d/next HTTP/1.1\r\n\r\n" % server.port)
    assert (await read_message(reader)).body == b"next"
    assert script.connections == 1
    writer.close()


async def test_pipelined_requests_with_bodies(proxy: RunningProxy, origin: Origin) -> None:
    reader, writer = await client(proxy)
    url = f"{origin.url}/upload".encode()
    writer.write(
        b"POST %b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"POST %b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET %b/hello HTTP/1.1\r\n\r\n" % (url, url, origin.url.encode())
    )
    first, second, third = [await read_message(reader) for _ in range(3)]
    assert first.body.decode() == f"5 {hashlib.sha256(b'hello').hexdigest()}"
    assert second.body.decode() == f"3 {hashlib.sha256(b'abc').hexdigest()}"
    assert third.body == b"hello GET /hello"
    writer.close()


# -- the header rules' configuration ([http]) ----------------------------------------------


def http_config(**http: Any) -> Config:
    return Config(
        listeners=(ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),),
        access=TEST_ACCESS,
        http=HttpConfig(**http),
    )


async def test_forwarded_for_via_and_rules(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    cfg = http_config(
        via="edge7",
        forwarded_for="on",
        request_rules=(
            {"action": "remove", "name": "Cookie"},
            {"action": "set", "name": "User-Agent", "value": "proxytap"},
        ),
        response_rules=(
            {"action": "remove", "name": "Server"},
            {"action": "add", "name": "X-Content-Type-Options", "value": "nosniff"},
        ),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    script, server = await start_script(raw_server, ok(b"hi", b"Server: origin/1.0\r\n"))
    reader, writer = await client(proxy)
    writer.write(
        b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nCookie: a=1\r\nUser-Agent: curl\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9\r\n\r\n" % server.port
    )
    resp = await read_message(reader)
    writer.close()
    (req,) = script.requests
    assert req.raw == (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\nForwarded: for=203.0.113.9, for=127.0.0.1\r\n"
        b"User-Agent: proxytap\r\nVia: 1.1 edge7\r\n\r\n" % server.port
    )
    assert resp.raw == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Content-Type-Options: nosniff\r\n"
        b"Via: 1.1 edge7\r\nConnection: keep-alive\r\n\r\nhi"
    )


async def test_default_forwarded_for_deletes_and_via_off(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy(http_config(via=""))
    script, server = await start_script(raw_server, ok())
    reader, writer = await client(proxy)
    writer.write(
        b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nX-Forwarded-For: 10.9.9.9\r\n"
        b"Forwarded: for=10.9.9.9\r\nX-A: 1\r\n\r\n" % server.port
    )
    resp = await read_message(reader)
    writer.close()
    assert script.requests[0].raw == b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-A: 1\r\n\r\n" % (
        server.port
    )
    assert "via" not in resp.names()


async def test_methods_outside_the_configured_set(
    start_proxy: ProxyFactory, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy(http_config(methods=("GET", "HEAD")))
    script, server = await start_script(raw_server, ok())
    for method in (b"DELETE", b"POST"):
        got = await exchange(
            proxy.http, b"%b http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n" % (method, server.port)
        )
        assert got == error_reply(
            b"501 Not Implemented",
            b"http_request_denied",
            b"method %b is not allowed" % method,
        )
    got = await exchange(proxy.http, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % server.port)
    assert got.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    assert script.connections == 0


# -- the access line counts what the flow log counts ---------------------------------------

ACCESS_LINE = re.compile(
    r"INFO proxytap\.access: 127\.0\.0\.1:(\d+) GET (\S+) (\d+) up=(\d+) down=(\d+) "
)


async def test_access_line_bytes_equal_the_flow_logs(origin: Origin, tmp_path: Path) -> None:
    """The real process, as an operator runs it: a 64 MiB GET on a connection of its own
    (one request, one upstream connection, so its access line and its flow record
    describe the same bytes), then two requests on one kept-alive connection (one flow:
    its access lines add up to it)."""
    flows = tmp_path / "flows.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxytap",
        "run",
        "--http",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--allow-dest",
        "127.0.0.0/8",
        "--log-flows",
        str(flows),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    lines: list[str] = []

    async def line_matching(pattern: re.Pattern[str]) -> re.Match[str]:
        while True:
            line = (await asyncio.wait_for(stderr.readline(), 60)).decode()
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)
            if m := pattern.search(line):
                return m

    async def records(count: int) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            got = flows.read_text().splitlines() if flows.exists() else []
            if len(got) >= count:
                return [json.loads(x) for x in got]
            assert asyncio.get_running_loop().time() < deadline, got
            await asyncio.sleep(0.02)

    size = 64 << 20
    try:
        port = int((await line_matching(re.compile(r"listening: http on \S+:(\d+)")))[1])
        await line_matching(re.compile("proxytap ready"))
        proxy_url = f"http://127.0.0.1:{port}"
        out = tmp_path / "down"
        rc, _, err = await curl(
            "--fail", "-o", str(out), "-x", proxy_url, f"{origin.url}/bytes/{size}"
        )
        assert rc == 0, err
        assert out.stat().st_size == size
        big = await line_matching(ACCESS_LINE)
        (record,) = await records(1)
        assert big[2] == f"127.0.0.1:{origin.port}/bytes/{size}" and big[3] == "200"
        assert int(big[1]) == record["id.orig_p"]
        assert (int(big[4]), int(big[5])) == (record["orig_bytes"], record["resp_bytes"])
        assert record["resp_bytes"] > size  # the body and the response head
        assert record["orig_bytes"] > 0  # the request head

        # two requests, one client connection, one upstream connection: one flow
        rc, body, err = await curl(
            "--fail", "-x", proxy_url, f"{origin.url}/hello", f"{origin.url}/bytes/5000"
        )
        assert rc == 0, err
        assert body == b"hello GET /hello" + pattern(5000)
        first, second = await line_matching(ACCESS_LINE), await line_matching(ACCESS_LINE)
        _, kept = await records(2)
        assert int(first[1]) == int(second[1]) == kept["id.orig_p"]
        assert int(first[4]) + int(second[4]) == kept["orig_bytes"]
        assert int(first[5]) + int(second[5]) == kept["resp_bytes"]
        assert int(second[5]) > 5000 > int(first[5]) > 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0


# -- Max-Forwards (RFC 9110 section 7.6.2) -----------------------------------------------


async def test_options_and_trace_with_max_forwards_zero_are_answered_by_the_proxy(
    auth_proxy: RunningProxy,
) -> None:
    """Nothing is forwarded (the target port is closed); the connection stays open."""
    port = closed_port()
    creds = basic_credentials("alice", "s3cret").encode()
    reader, writer = await client(auth_proxy)
    writer.write(
        b"OPTIONS http://127.0.0.1:%d/ HTTP/1.1\r\nProxy-Authorization: %b\r\n"
        b"Max-Forwards: 0\r\n\r\n" % (port, creds)
    )
    got = await read_message(reader)
    assert got.raw == (
        b"HTTP/1.1 200 OK\r\nAllow: GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH\r\n"
        b"Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"
    )
    trace_head = (
        b"TRACE http://127.0.0.1:%d/a?b HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Max-Forwards: 0\r\nX-Probe: 1\r\n" % (port, port)
    )
    # credentials are never echoed: the proxy's own, nor those meant for the origin
    writer.write(
        trace_head + b"Proxy-Authorization: %b\r\nAuthorization: Basic Ym9iOnB3\r\n"
        b"Cookie: sid=42\r\n\r\n" % creds
    )
    got = await read_message(reader)
    echoed = trace_head + b"\r\n"
    assert got.raw == (
        b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: %d\r\n"
        b"Connection: keep-alive\r\n\r\n%b" % (len(echoed), echoed)
    )
    writer.close()
    stats = auth_proxy.app.services.stats
    assert stats.http_responses[("http", "2xx", "proxy")] == 2
    assert auth_proxy.app.services.stats.connect_errors == {}


async def test_max_forwards_is_decremented_for_options_and_trace_only(
    proxy: RunningProxy, raw_server: ProxyFactory
) -> None:
    script, server = await start_script(raw_server, ok(), ok(), ok())
    reader, writer = await client(proxy)
    # GET with Max-Forwards: 0 is forwarded, untouched: the field is not for GET
    for method, hops in ((b"OPTIONS", 3), (b"TRACE", 1), (b"GET", 0)):
        writer.write(
            b"%b http://127.0.0.1:%d/ HTTP/1.1\r\nMax-Forwards: %d\r\n\r\n"
            % (method, server.port, hops)
        )
        assert (await read_message(reader)).status == 200
    writer.close()
    assert [r.get("Max-Forwards") for r in script.requests] == ["2", "0", "0"]


@pytest.mark.parametrize("value", [b"-1", b"x", b"1.5", b"", b"+2"])
async def test_malformed_max_forwards_is_refused(proxy: RunningProxy, value: bytes) -> None:
    got = await exchange(
        proxy.http, b"TRACE http://127.0.0.1:1/ HTTP/1.1\r\nMax-Forwards: %b\r\n\r\n" % value
    )
    assert got == error_reply(
        b"400 Bad Request",
        b"http_request_error",
        b"invalid Max-Forwards value '%b': it must be a non-negative integer" % value,
    )


async def test_refused_trace_stays_refused_with_max_forwards_zero(
    start_proxy: ProxyFactory,
) -> None:
    proxy: RunningProxy = await start_proxy(http_config(methods=("GET", "OPTIONS")))
    got = await exchange(
        proxy.http, b"TRACE http://127.0.0.1:1/ HTTP/1.1\r\nMax-Forwards: 0\r\n\r\n"
    )
    assert got == error_reply(
        b"501 Not Implemented", b"http_request_denied", b"method TRACE is not allowed"
    )
    # and OPTIONS lists only what this proxy forwards
    got = await exchange(
        proxy.http,
        b"OPTIONS http://127.0.0.1:1/ HTTP/1.1\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
    )
    assert got == (
        b"HTTP/1.1 200 OK\r\nAllow: GET, OPTIONS\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
