"""PROXY protocol listeners, end to end: handcrafted v1 and v2 headers against a real proxytap.

The test plays the load balancer: it connects from 127.0.0.1 (trusted by the
listener's ``proxy_protocol_from``) and writes a header naming a client from
a documentation range, then the client's own request. The oracle for "the
carried address is the client everywhere" is what a consumer outside the
process sees: the SF-TAP flow sockets, the JSON flow log, the access and
refusal lines on stderr, /metrics, the X-Forwarded-For an origin receives;
and the balancer's own address and ports never appear in any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxytap.config import from_dict
from proxytap.errors import ConfigError
from proxytap.proto.proxyproto import SIGNATURE_V2, v1_header, v2_header
from tests.export.sftap_helpers import TapReader
from tests.front.behind import Endpoint, Proxytap, flows_ended, key_endpoints, running

FRONTEND = ("203.0.113.80", 3128)  # the balancer's own frontend, as the header names it


# -- the proxy under test, as a process -----------------------------------------------


def proxytap(
    tmp_path: Path, extra: str, **listener: str
) -> contextlib.AbstractAsyncContextManager[Proxytap]:
    """proxytap with one listener ``edge`` (mixed, PROXY protocol) plus ``listener`` keys."""
    keys = "\n".join(f"{k} = {v}" for k, v in listener.items())
    config = f"""
[[listeners]]
name = "edge"
kind = "mixed"
address = "127.0.0.1:0"
proxy_protocol = true
{keys}
{extra}
"""
    return running(tmp_path, config)


# -- the balancer's side ----------------------------------------------------------------


@dataclass
class Via:
    """A connection as the balancer opens it: its own (real) endpoint, the streams."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    real: Endpoint = field(default=("", 0))

    @classmethod
    async def open(cls, port: int, header: bytes) -> Via:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        host, real_port = writer.get_extra_info("sockname")[:2]
        writer.write(header)
        return cls(reader, writer, (host, real_port))

    async def connect(self, dest_port: int) -> bytes:
        """An HTTP CONNECT; the response head."""
        self.writer.write(f"CONNECT 127.0.0.1:{dest_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)

    async def socks5(self, dest_port: int) -> bytes:
        self.writer.write(b"\x05\x01\x00")
        assert await asyncio.wait_for(self.reader.readexactly(2), 10) == b"\x05\x00"
        addr = socket.inet_aton("127.0.0.1") + struct.pack(">H", dest_port)
        self.writer.write(b"\x05\x01\x00\x01" + addr)
        return await asyncio.wait_for(self.reader.readexactly(10), 10)

    async def echo(self, payload: bytes) -> None:
        """Through the tunnel to the echo origin and back, then a clean close."""
        self.writer.write(payload)
        assert await asyncio.wait_for(self.reader.readexactly(len(payload)), 10) == payload
        self.writer.write_eof()
        assert await asyncio.wait_for(self.reader.read(), 10) == b""
        self.writer.close()

    async def closed_unanswered(self) -> bool:
        """The proxy closed this connection without sending a byte."""
        try:
            got = await asyncio.wait_for(self.reader.read(), 10)
        except ConnectionResetError:
            got = b""
        self.writer.close()
        return got == b""


@contextlib.asynccontextmanager
async def echo_origin() -> AsyncIterator[tuple[int, list[Endpoint]]]:
    """A TCP echo server: its port and the peers it accepted."""
    peers: list[Endpoint] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peers.append(w.get_extra_info("peername")[:2])
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()


@contextlib.asynccontextmanager
async def head_origin() -> AsyncIterator[int]:
    """An HTTP origin whose body is the request head it received."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(head) + head)
            await w.drain()
            await r.read()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def as_key(client: Endpoint, server: Endpoint) -> set[Endpoint]:
    """The two endpoints as an SF-TAP key shows them (IPv4 mapped when families differ)."""
    if (":" in client[0]) == (":" in server[0]):
        return {client, server}

    def v6(ep: Endpoint) -> Endpoint:
        if ":" in ep[0]:
            return ep
        packed = bytes(10) + b"\xff\xff" + socket.inet_aton(ep[0])
        return (socket.inet_ntop(socket.AF_INET6, packed), ep[1])

    return {v6(client), v6(server)}


# -- configuration ------------------------------------------------------------------------


def edge(**keys: Any) -> dict[str, Any]:
    return {"listeners": [{"name": "edge", "kind": "mixed", "address": "127.0.0.1:0", **keys}]}


@pytest.mark.parametrize(
    ("keys", "key", "problem"),
    [
        ({"proxy_protocol": True}, "proxy_protocol_from", "required with proxy_protocol = true"),
        (
            {"proxy_protocol": True, "proxy_protocol_from": []},
            "proxy_protocol_from",
            "required with proxy_protocol = true",
        ),
        ({"proxy_protocol_from": ["10.0.0.0/8"]}, "proxy_protocol_from", "has no effect"),
        (
            {"proxy_protocol": True, "proxy_protocol_from": ["10.0.0.1/8"]},
            "proxy_protocol_from[0]",
            "is not a network",
        ),
        ({"proxy_protocol": "yes"}, "proxy_protocol", "expected a bool"),
        ({"proxy_protocol": True, "proxy_protocol_from": "10.0.0.0/8"}, "proxy_protocol_from", ""),
    ],
)
def test_config_errors_name_the_key(keys: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(edge(**keys))
    assert info.value.key == f"listeners[0].{key}"
    assert problem in info.value.problem


def test_config_defaults_off_and_takes_cidrs() -> None:
    assert from_dict(edge()).listeners[0].proxy_protocol is False
    cfg = from_dict(edge(proxy_protocol=True, proxy_protocol_from=["10.0.0.5", "fd00::/8"]))
    assert cfg.listeners[0].proxy_protocol_from == ("10.0.0.5", "fd00::/8")


# -- tests --------------------------------------------------------------------------------


async def test_carried_clients_are_the_client_in_exports_flow_log_access_lines_and_headers(
    tmp_path: Path,
) -> None:
    extra = """
[access]
clients = ["192.0.2.0/24", "2001:db8::/32"]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[http]
forwarded_for = "on"
"""
    async with (
        echo_origin() as (echo_port, _),
        head_origin() as head_port,
        proxytap(tmp_path, extra, proxy_protocol_from='["127.0.0.0/8"]') as p,
    ):
        port = p.ports["edge"]
        default = await TapReader.connect(p.home / "tcp" / "default")
        http = await TapReader.connect(p.home / "tcp" / "http")
        try:
            # v1 TCP4, then HTTP CONNECT
            a_client = ("192.0.2.10", 56324)
            a = await Via.open(port, v1_header(a_client, FRONTEND))
            assert (await a.connect(echo_port)).startswith(b"HTTP/1.1 200")
            await a.echo(b"ping through a v1 header\n")
            # v2 TCP4 with an authority TLV, then SOCKS5
            b_client = ("192.0.2.11", 40001)
            b = await Via.open(port, v2_header(b_client, FRONTEND, tlvs=((0x02, b"proxy.test"),)))
            assert (await b.socks5(echo_port))[:2] == b"\x05\x00"
            await b.echo(b"ping through a v2 header\n")
            # v2 TCP6, then a plain HTTP request: the origin sees the carried client
            c_client = ("2001:db8::10", 40002)
            c = await Via.open(port, v2_header(c_client, ("2001:db8::80", 3128)))
            c.writer.write(
                f"GET http://127.0.0.1:{head_port}/who HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{head_port}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = await asyncio.wait_for(c.reader.read(), 10)
            c.writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"\r\nX-Forwarded-For: 2001:db8::10\r\n" in answer, answer
            assert b'for="[2001:db8::10]"' in answer, answer  # RFC 7239 Forwarded

            # SF-TAP flow sockets: the carried client is one end of every key
            tunnels = await asyncio.wait_for(flows_ended(default, 2), 10)
            assert [key_endpoints(ev) for ev in tunnels] == [
                as_key(a_client, ("127.0.0.1", echo_port)),
                as_key(b_client, ("127.0.0.1", echo_port)),
            ]
            (forwarded,) = await asyncio.wait_for(flows_ended(http, 1), 10)
            assert key_endpoints(forwarded) == as_key(c_client, ("127.0.0.1", head_port))
            assert forwarded.key.l3 == "ipv6"

            assert (
                await p.metric(
                    "proxytap_downstream_proxy_headers_total", listener="edge", result="accepted"
                )
                == 3
            )
            assert (
                await p.metric(
                    "proxytap_downstream_proxy_headers_total", listener="edge", result="malformed"
                )
                == 0
            )
        finally:
            default.close()
            http.close()
        stderr = await p.stop()

    # the JSON flow log: Zeek's originator is the carried client
    origins = sorted((r["id.orig_h"], r["id.orig_p"], r["tunnel"]) for r in p.flows())
    assert origins == [
        ("192.0.2.10", 56324, "http-connect"),
        ("192.0.2.11", 40001, "socks5"),
        ("2001:db8::10", 40002, "http-forward"),
    ]
    # access lines name the carried client; the balancer's endpoints appear nowhere
    assert re.search(r"tunnel http-connect 192\.0\.2\.10:56324 -> ", stderr), stderr
    assert re.search(r"tunnel socks5 192\.0\.2\.11:40001 -> ", stderr), stderr
    assert re.search(r"\[2001:db8::10\]:40002 GET 127\.0\.0\.1:\d+/who 200 ", stderr), stderr
    for via in (a, b, c):
        assert f"127.0.0.1:{via.real[1]}" not in stderr
        assert via.real[1] not in {r["id.orig_p"] for r in p.flows()}


async def test_client_acl_caps_and_local_headers_judge_the_right_address(
    tmp_path: Path,
) -> None:
    # the balancer's own address (127.0.0.1) is not an allowed client: only carried ones are
    extra = """
[access]
clients = ["192.0.2.0/24"]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[limits]
max_connections_per_client = 1
"""
    async with (
        echo_origin() as (echo_port, _),
        proxytap(tmp_path, extra, proxy_protocol_from='["127.0.0.0/8"]') as p,
    ):
        port = p.ports["edge"]
        # a carried client outside access.clients: refused by the client ACL
        outsider = await Via.open(port, v1_header(("198.51.100.7", 4242), FRONTEND))
        assert (await outsider.connect(echo_port)).startswith(b"HTTP/1.1 403")
        outsider.writer.close()
        # LOCAL (v2) and UNKNOWN (v1): the socket's peer is the client, and it is refused
        local = await Via.open(port, v2_header(None, local=True))
        assert (await local.connect(echo_port)).startswith(b"HTTP/1.1 403")
        local.writer.close()
        unknown = await Via.open(port, v1_header(None))
        assert (await unknown.socks5(echo_port))[:2] == b"\x05\x02"  # not allowed
        unknown.writer.close()
        # per-client caps count carried addresses: a second 192.0.2.20 is over the cap
        held = await Via.open(port, v2_header(("192.0.2.20", 1000), FRONTEND))
        assert (await held.connect(echo_port)).startswith(b"HTTP/1.1 200")
        again = await Via.open(port, v2_header(("192.0.2.20", 1001), FRONTEND))
        assert (await again.connect(echo_port)).startswith(b"HTTP/1.1 503")
        again.writer.close()
        other = await Via.open(port, v2_header(("192.0.2.21", 1002), FRONTEND))
        assert (await other.connect(echo_port)).startswith(b"HTTP/1.1 200")
        await other.echo(b"a different carried client is served\n")
        await held.echo(b"the first one still works\n")

        headers = {
            result: await p.metric(
                "proxytap_downstream_proxy_headers_total", listener="edge", result=result
            )
            for result in ("accepted", "local", "untrusted", "malformed")
        }
        assert headers == {"accepted": 4, "local": 2, "untrusted": 0, "malformed": 0}
        denied = await p.metric("proxytap_policy_denied_total", listener="edge", rule="client-acl")
        assert denied == 3
        stderr = await p.stop()

    assert "client 198.51.100.7:4242 refused by client-acl" in stderr, stderr
    # LOCAL and UNKNOWN: the real peer, port included, is the client
    assert f"client 127.0.0.1:{local.real[1]} refused by client-acl" in stderr, stderr
    assert f"client 127.0.0.1:{unknown.real[1]} refused by client-acl" in stderr, stderr
    assert "client 192.0.2.20:1001 refused by max-connections-per-client" in stderr, stderr
    origins = sorted((r["id.orig_h"], r["id.orig_p"]) for r in p.flows())
    assert origins == [("192.0.2.20", 1000), ("192.0.2.21", 1002)]


async def test_peers_outside_proxy_protocol_from_are_closed_unread(tmp_path: Path) -> None:
    extra = """
[access]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]
"""
    async with (
        echo_origin() as (echo_port, origin_peers),
        proxytap(tmp_path, extra, proxy_protocol_from='["10.0.0.0/8", "fd00::/8"]') as p,
    ):
        port = p.ports["edge"]
        # a well-formed header and request, from a peer the listener does not trust
        via = await Via.open(port, v2_header(("192.0.2.10", 5555), FRONTEND))
        via.writer.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await via.closed_unanswered()
        assert (
            await p.metric(
                "proxytap_downstream_proxy_headers_total", listener="edge", result="untrusted"
            )
            == 1
        )
        assert (
            await p.metric(
                "proxytap_downstream_proxy_headers_total", listener="edge", result="accepted"
            )
            == 0
        )
        stderr = await p.stop()

    assert origin_peers == []  # nothing was forwarded
    assert p.flows() == []
    line = f"connection from 127.0.0.1:{via.real[1]} on PROXY-protocol listener edge refused"
    assert f"{line} (untrusted): not in listeners.edge.proxy_protocol_from" in stderr, stderr
    assert "192.0.2.10" not in stderr  # the claimed client was never read


async def test_malformed_late_and_cut_headers_are_refused_and_others_still_served(
    tmp_path: Path,
) -> None:
    extra = """
[access]
clients = ["192.0.2.0/24"]
allow_dest = ["127.0.0.0/8"]
connect_ports = ["1-65535"]

[timeouts]
handshake = 1.0
first_byte = 1.0
"""
    async with (
        echo_origin() as (echo_port, origin_peers),
        proxytap(tmp_path, extra, proxy_protocol_from='["127.0.0.0/8"]') as p,
    ):
        port = p.ports["edge"]
        malformed = [
            (f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode(), "first byte 0x43"),
            (b"\x05\x01\x00", "first byte 0x05"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 80\r\n", "port 65536 is over 65535"),
            (SIGNATURE_V2 + b"\x11\x11\x00\x0c" + bytes(12), "version 1, not 2"),
            (SIGNATURE_V2 + b"\x21\x11\x00\x0b" + bytes(11), "tcp4 needs 12 bytes"),
        ]
        for data, _ in malformed:
            via = await Via.open(port, data)
            assert await via.closed_unanswered(), data
        # half a header, then the balancer closes: "closed"
        cut = await Via.open(port, b"PROXY TCP4 192.0.2.1 ")
        cut.writer.write_eof()
        assert await cut.closed_unanswered()
        # half a header, then nothing: closed at timeouts.handshake
        late = await Via.open(port, SIGNATURE_V2[:7])
        assert await late.closed_unanswered()
        # and the listener still serves a good one
        good = await Via.open(port, v1_header(("192.0.2.30", 3000), FRONTEND))
        assert (await good.connect(echo_port)).startswith(b"HTTP/1.1 200")
        await good.echo(b"still serving\n")

        counts = {
            result: await p.metric(
                "proxytap_downstream_proxy_headers_total", listener="edge", result=result
            )
            for result in ("accepted", "local", "untrusted", "malformed", "timeout", "closed")
        }
        assert counts == {
            "accepted": 1,
            "local": 0,
            "untrusted": 0,
            "malformed": len(malformed),
            "timeout": 1,
            "closed": 1,
        }
        stderr = await p.stop()

    assert len(origin_peers) == 1  # only the good one reached the origin
    for _, reason in malformed:
        assert re.search(rf"refused \(malformed\): .*{re.escape(reason)}", stderr), reason
    assert "refused (closed): connection closed after 21 bytes of it" in stderr, stderr
    assert "refused (timeout): no whole PROXY header within timeouts.handshake" in stderr
    assert [r["id.orig_h"] for r in p.flows()] == ["192.0.2.30"]
