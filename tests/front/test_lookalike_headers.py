"""Look-alike framing headers: ``Transfer_Encoding`` beside ``Content-Length`` is refused.

Over real sockets: the client's exact answer, and the origin never gets a byte
of the request (a server that maps "-" to "_" would read the look-alike as the
real field and frame the body differently: request smuggling).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import RunningProxy, exchange


@pytest.fixture
async def origin_hits() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A raw origin recording what it got; answers 200 with a look-alike on /bad."""
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        got.append(head)
        extra = b"Keep_Alive: timeout=5\r\n" if head.startswith(b"GET /bad ") else b""
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1]), got
    server.close()


@pytest.mark.parametrize(
    ("field", "real"),
    [
        (b"Transfer_Encoding: chunked", "Transfer-Encoding"),
        (b"content_length: 5", "Content-Length"),
        (b"Proxy_Connection: keep-alive", "Proxy-Connection"),
        (b"KEEP_ALIVE: 5", "Keep-Alive"),
    ],
)
async def test_lookalike_request_field_is_refused(
    proxy: RunningProxy, origin_hits: tuple[int, list[bytes]], field: bytes, real: str
) -> None:
    port, got = origin_hits
    name = field.partition(b":")[0].decode()
    request = (
        f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        + field
        + b"\r\nContent-Length: 5\r\n\r\nhello"
    )
    reply = await exchange(proxy.http, request)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply
    assert b"Proxy-Status: proxytap; error=http_request_error\r\n" in reply
    why = f"header name {name} looks like {real.lower()} ('_' for '-')\n"
    assert reply.partition(b"\r\n\r\n")[2] == why.encode()
    assert got == []
    # CONNECT heads go through the same rules
    connect = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n".encode() + field + b"\r\n\r\n"
    reply = await exchange(proxy.http, connect)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply
    assert reply.partition(b"\r\n\r\n")[2] == why.encode()


async def test_underscore_in_other_names_passes_and_lookalike_response_is_502(
    proxy: RunningProxy, origin_hits: tuple[int, list[bytes]]
) -> None:
    port, got = origin_hits
    head = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nX_Custom_Id: 1\r\nConnection: close\r\n\r\n"
    ok = await exchange(proxy.http, head.encode())
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nok"), ok
    assert b"X_Custom_Id: 1\r\n" in got[0]
    bad = await exchange(proxy.http, f"GET http://127.0.0.1:{port}/bad HTTP/1.1\r\n\r\n".encode())
    assert bad.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), bad
    assert b"Keep_Alive" not in bad
