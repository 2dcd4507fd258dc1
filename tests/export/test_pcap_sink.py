"""PCAP export through a real proxy, checked with tshark: files, rotation, faults, PCAP-over-IP.

Sessions are real: curl through CONNECT and SOCKS5 to a local origin that
records what it received and sent; tshark then reads what proxytap wrote.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import re
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import AdminConfig, Config, ExportConfig, ListenerConfig, PcapConfig, load
from proxytap.export.pcap_sink import PcapFileSink, PcapServer
from proxytap.flows.table import DOWN, UP, CloseReason, FlowTable
from tests.certs import Pki
from tests.conftest import (
    BLOCK,
    TEST_ACCESS,
    Origin,
    ProxyFactory,
    RawServer,
    RunningProxy,
    curl,
    pattern,
    pattern_sha256,
    run,
    wait_until,
)
from tests.export.sftap_helpers import make_flow
from tests.proto.test_pcap import parse_file

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)
CHECKS = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
BODY = 150_000  # ~100 segments each way's worth of analysis


def pcap_config(tmp: Path | None, **kw: Any) -> Config:
    pcap = PcapConfig(dir=str(tmp) if tmp else None, **kw)
    return Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        export=ExportConfig(pcap=pcap),
        admin=AdminConfig(address="127.0.0.1:0"),
    )


async def tshark(*args: str, input: bytes | None = None) -> str:
    if input is None:
        rc, out, err = await run("tshark", *args)
    else:
        # a real pipe on stdin, as in ``nc host port | tshark -r -`` (tshark refuses the
        # socketpair uvloop's subprocesses get)
        proc = await asyncio.to_thread(
            subprocess.run, ["tshark", *args], input=input, capture_output=True, timeout=60
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    assert rc == 0, err.decode()
    return out.decode()


def sink_of(proxy: RunningProxy, kind: type[Any]) -> Any:
    return next(s for s in proxy.app.sinks if isinstance(s, kind))


def pcap_files(d: Path) -> list[Path]:
    return sorted(d.glob("proxytap-*.pcap"))


class RecordingOrigin:
    """A raw HTTP origin: one response of ``body`` pattern bytes per connection, then
    close; keeps (bytes received, bytes sent) per connection."""

    def __init__(self, body: int = BODY) -> None:
        self.body = body
        self.conns: list[tuple[bytes, bytes]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        out = (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % self.body
            + pattern(self.body)
        )
        w.write(out)
        await w.drain()
        self.conns.append((head, out))


def follow_raw(text: str) -> tuple[int, bytes, bytes]:
    """tshark's ``follow,tcp,raw`` output: (node 0's port, bytes from node 0, from node 1)."""
    node0 = re.search(r"^Node 0: .*:(\d+)$", text, re.M)
    assert node0, text[:500]
    a, b = bytearray(), bytearray()
    body = text.split("Node 1:", 1)[1].split("\n", 1)[1]
    for line in body.splitlines():
        if line.startswith("====="):
            break
        if line.startswith("\t"):
            b += bytes.fromhex(line.strip())
        elif line.strip():
            a += bytes.fromhex(line.strip())
    return int(node0.group(1)), bytes(a), bytes(b)


async def check_tcp_streams(
    path: Path, sessions: dict[int, tuple[bytes, bytes]], origin_port: int, proxy_ports: set[int]
) -> None:
    """conv, follow (both ways, exact), analysis flags and checksums of ``path``:
    ``sessions`` maps the client's port to what the origin received and sent."""
    conv = await tshark("-r", str(path), "-q", "-z", "conv,tcp")
    pairs = re.findall(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s", conv, re.M)
    assert sorted((a, int(p), b, int(q)) for a, p, b, q in pairs) == sorted(
        ("127.0.0.1", port, "127.0.0.1", origin_port) for port in sessions
    ), conv
    for port in proxy_ports:
        assert f":{port} " not in conv  # the true endpoints, never the proxy
    for index in range(len(sessions)):
        client_port, up, down = follow_raw(
            await tshark("-r", str(path), "-q", "-z", f"follow,tcp,raw,{index}")
        )
        received, sent = sessions[client_port]
        assert up == received and down == sent
    assert await tshark("-r", str(path), "-Y", "tcp.analysis.flags", *CHECKS) == ""
    verbose = await tshark("-r", str(path), "-V", *CHECKS)
    assert "[Checksum Status: Good]" in verbose and "[Header checksum status: Good]" in verbose
    assert "Bad" not in verbose


# -- files, from real sessions ---------------------------------------------------------------------


async def test_connect_and_socks5_sessions_as_packets(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    d = tmp_path / "pcap"
    origin_app = RecordingOrigin()
    origin: RawServer = await raw_server(origin_app.handle)
    proxy: RunningProxy = await start_proxy(pcap_config(d))
    url = f"http://127.0.0.1:{origin.port}"
    fmt = ("-w", "%{local_port}", "-o", os.devnull)
    rc, connect_port, err = await curl("-p", "-x", proxy.http_url, *fmt, f"{url}/tunnel")
    assert rc == 0, err
    socks = "socks5://{}:{}".format(*proxy.socks)
    rc, socks_port, err = await curl("-x", socks, *fmt, f"{url}/socks")
    assert rc == 0, err
    await proxy.recorder.wait_destroyed(2)
    sink: PcapFileSink = sink_of(proxy, PcapFileSink)
    await sink.flush()
    (path,) = pcap_files(d)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    by_path = {b"/tunnel": int(connect_port), b"/socks": int(socks_port)}
    sessions = {by_path[head.split(b" ")[1]]: (head, sent) for head, sent in origin_app.conns}
    proxies = {proxy.http[1], proxy.socks[1]}
    await check_tcp_streams(path, sessions, origin.port, proxies)
    # HTTP inside a plain tunnel is dissected as HTTP, on the origin's real port
    requests = await tshark(
        "-r", str(path), "-Y", "http.request", "-T", "fields", "-e", "http.request.uri",
        "-e", "tcp.dstport",
    )  # fmt: skip
    assert sorted(requests.split("\n")[:-1]) == [
        f"/socks\t{origin.port}",
        f"/tunnel\t{origin.port}",
    ]
    # normal ends: FIN both ways, no RST
    fins = await tshark(
        "-r", str(path), "-Y", "tcp.flags.fin==1", "-T", "fields", "-e", "tcp.srcport"
    )
    assert sorted(fins.split()) == sorted(
        [str(origin.port)] * 2 + [connect_port.decode(), socks_port.decode()]
    )
    assert await tshark("-r", str(path), "-Y", "tcp.flags.reset==1") == ""
    stats = sink.stats()
    assert stats.kind == "pcap" and stats.events["packet"] > 200
    assert stats.drops == {"buffer_full": 0, "write_error": 0}


async def test_ipv6_and_mixed_families(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    """An IPv6 client of an IPv6 origin is IPv6 end to end; an IPv4 client of the same
    origin is written as IPv6 too, from its IPv4-mapped address."""
    d = tmp_path / "pcap"
    origin_app = RecordingOrigin(body=20_000)
    origin: RawServer = await raw_server(origin_app.handle, host="::1")
    cfg = dataclasses.replace(
        pcap_config(d),
        listeners=(
            ListenerConfig(kind="socks", address="[::1]:0", name="socks6"),
            ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks4"),
        ),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    fmt = ("-w", "%{local_port}", "-o", os.devnull)
    ports = []
    t0 = time.time() - 0.001  # pcap keeps microseconds
    for name in ("socks6", "socks4"):
        host, port = proxy.addr(name)
        bracketed = f"[{host}]" if ":" in host else host
        rc, out, err = await curl(
            "-x", f"socks5://{bracketed}:{port}", *fmt, f"http://[::1]:{origin.port}/{name}"
        )
        assert rc == 0, err
        ports.append(int(out))
    await proxy.recorder.wait_destroyed(2)
    await sink_of(proxy, PcapFileSink).flush()
    (path,) = pcap_files(d)
    fields = await tshark(
        "-r", str(path), "-Y", "tcp.flags.syn==1 && tcp.flags.ack==0", "-T", "fields",
        "-e", "ipv6.src", "-e", "tcp.srcport", "-e", "ipv6.dst", "-e", "tcp.dstport",
    )  # fmt: skip
    assert fields.splitlines() == [
        f"::1\t{ports[0]}\t::1\t{origin.port}",
        f"::ffff:127.0.0.1\t{ports[1]}\t::1\t{origin.port}",
    ]
    assert await tshark("-r", str(path), "-Y", "ip") == ""  # no IPv4 packet
    # every packet is stamped with when the proxy saw it: within the sessions, in order
    times = [
        float(t)
        for t in (await tshark("-r", str(path), "-T", "fields", "-e", "frame.time_epoch")).split()
    ]
    assert t0 <= times[0] and times[-1] <= time.time() and times == sorted(times)
    assert await tshark("-r", str(path), "-Y", "tcp.analysis.flags", *CHECKS) == ""
    verbose = await tshark("-r", str(path), "-V", *CHECKS)
    assert "[Checksum Status: Good]" in verbose and "Bad" not in verbose
    sessions = {b"/socks6": ports[0], b"/socks4": ports[1]}
    by_port = {sessions[head.split(b" ")[1]]: (head, sent) for head, sent in origin_app.conns}
    for index in range(2):
        client_port, up, down = follow_raw(
            await tshark("-r", str(path), "-q", "-z", f"follow,tcp,raw,{index}")
        )
        assert (up, down) == by_port[client_port]


async def test_a_reset_flow_ends_with_rst(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    async def abort(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(5)
        w.write(b"bye\n")
        await w.drain()
        sock = w.get_extra_info("socket")
        # unread data and linger 0: the kernel answers with RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    origin: RawServer = await raw_server(abort)
    d = tmp_path / "pcap"
    proxy: RunningProxy = await start_proxy(pcap_config(d))
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", origin.port)
    client_port = sock.getsockname()[1]
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"hello and more bytes the origin never reads")
    got = b""
    with pytest.raises(ConnectionResetError):  # the proxy passes the reset on
        for _ in range(10):
            chunk = await asyncio.wait_for(reader.read(100), 5)
            got += chunk
    assert got == b"bye\n"
    writer.close()
    await proxy.recorder.wait_destroyed(1)
    (flow,) = proxy.recorder.flows()
    assert proxy.recorder.reason(flow) == CloseReason.RESET
    await sink_of(proxy, PcapFileSink).flush()
    (path,) = pcap_files(d)
    rst = await tshark(
        "-r", str(path), "-Y", "tcp.flags.reset==1", "-T", "fields", "-e", "tcp.srcport",
        "-e", "tcp.dstport",
    )  # fmt: skip
    assert rst == f"{client_port}\t{origin.port}\n"
    assert await tshark("-r", str(path), "-Y", "tcp.flags.fin==1") == ""
    assert await tshark("-r", str(path), "-Y", "tcp.analysis.flags", *CHECKS) == ""
    _, _, pkts = parse_file(path.read_bytes())
    assert pkts[-1].flags & 0x04  # the RST is the last packet


async def test_rotation_by_size_spreads_everything_over_files(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    d = tmp_path / "pcap"
    origin_app = RecordingOrigin(body=400_000)
    origin: RawServer = await raw_server(origin_app.handle)
    proxy: RunningProxy = await start_proxy(pcap_config(d, rotate_bytes=60_000))
    socks = "socks5://{}:{}".format(*proxy.socks)
    fmt = ("-w", "%{local_port}", "-o", os.devnull)
    rc, port, err = await curl("-x", socks, *fmt, f"http://127.0.0.1:{origin.port}/big")
    assert rc == 0, err
    await proxy.recorder.wait_destroyed(1)
    sink: PcapFileSink = sink_of(proxy, PcapFileSink)
    await sink.flush()
    files = pcap_files(d)
    assert len(files) >= 5 and sink.rotations == len(files) - 1
    for f in files:
        assert "1 " in await tshark("-r", str(f), "-c", "1")  # each file stands alone
    merged = tmp_path / "all.pcap"
    rc, _, err = await run("mergecap", "-F", "pcap", "-w", str(merged), *map(str, files))
    assert rc == 0, err
    ((head, sent),) = origin_app.conns
    await check_tcp_streams(merged, {int(port): (head, sent)}, origin.port, {proxy.socks[1]})


async def test_unwritable_directory_keeps_proxying_and_counts_write_errors(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    origin_app = RecordingOrigin(body=1000)
    origin: RawServer = await raw_server(origin_app.handle)
    proxy: RunningProxy = await start_proxy(pcap_config(blocker / "pcap"))
    socks = "socks5://{}:{}".format(*proxy.socks)
    rc, out, err = await curl("-x", socks, f"http://127.0.0.1:{origin.port}/x")
    assert rc == 0 and out == pattern(1000), err
    await proxy.recorder.wait_destroyed(1)
    sink: PcapFileSink = sink_of(proxy, PcapFileSink)
    await sink.flush()
    assert sink.drops["write_error"] >= 1 and sink.last_error
    assert proxy.app.admin is not None
    host, admin_port = proxy.app.admin.addresses()[0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{admin_port}/metrics") as resp,
    ):
        text = await resp.text()
    m = re.search(
        r'^proxytap_export_dropped_events_total\{reason="write_error",sink="pcap"\} (\S+)$'
        r'|^proxytap_export_dropped_events_total\{sink="pcap",reason="write_error"\} (\S+)$',
        text,
        re.M,
    )
    assert m, [line for line in text.splitlines() if "dropped_events" in line]
    assert float(m.group(1) or m.group(2)) >= 1


# -- acceptance: plain HTTP, TLS in a tunnel, a big flow, a disk failing mid-transfer ----------


def bad_checksums(path: Path) -> list[str]:
    """tshark's filters for a packet whose IPv4 or TCP checksum is not Good (status 1)."""
    return ["-r", str(path), *CHECKS, "-Y", "tcp.checksum.status!=1 || ip.checksum.status!=1"]


async def test_plain_http_forwarding_dissects_as_http(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    """An absolute-form request (no tunnel) is written as the client's HTTP conversation
    with the origin: Host, the request's path, the response's status."""
    d = tmp_path / "pcap"
    origin_app = RecordingOrigin(body=30_000)
    origin: RawServer = await raw_server(origin_app.handle)
    proxy: RunningProxy = await start_proxy(pcap_config(d))
    out = tmp_path / "body"
    rc, _, err = await curl(
        "-x", proxy.http_url, "-o", str(out), f"http://127.0.0.1:{origin.port}/plain/path?q=1"
    )
    assert rc == 0, err
    assert out.read_bytes() == pattern(30_000)
    await proxy.recorder.wait_destroyed(1)
    await sink_of(proxy, PcapFileSink).flush()
    (path,) = pcap_files(d)
    as_http = ("-d", f"tcp.port=={origin.port},http")
    requests = await tshark(
        "-r", str(path), *as_http, "-Y", "http.request", "-T", "fields",
        "-e", "http.host", "-e", "http.request.uri", "-e", "tcp.dstport",
    )  # fmt: skip
    assert requests == f"127.0.0.1:{origin.port}\t/plain/path?q=1\t{origin.port}\n"
    responses = await tshark(
        "-r", str(path), *as_http, "-Y", "http.response", "-T", "fields",
        "-e", "http.response.code", "-e", "tcp.srcport",
    )  # fmt: skip
    assert responses == f"200\t{origin.port}\n"
    conv = await tshark("-r", str(path), "-q", "-z", "conv,tcp")
    pairs = re.findall(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s", conv, re.M)
    assert len(pairs) == 1 and pairs[0][2:] == ("127.0.0.1", str(origin.port)), conv
    assert f":{proxy.http[1]} " not in conv
    ((head, sent),) = origin_app.conns
    _, up, down = follow_raw(await tshark("-r", str(path), "-q", "-z", "follow,tcp,raw,0"))
    assert up == head and down == sent  # the request as the origin got it, its answer
    assert await tshark("-r", str(path), "-Y", "tcp.analysis.flags", *CHECKS) == ""
    assert await tshark(*bad_checksums(path)) == ""


async def test_connect_tls_passthrough_dissects_as_tls_with_the_sni(
    start_proxy: ProxyFactory, tls_origin: Origin, pki: Pki, tmp_path: Path
) -> None:
    d = tmp_path / "pcap"
    proxy: RunningProxy = await start_proxy(pcap_config(d))
    url = f"https://localhost:{tls_origin.port}/hello"
    fmt = ("-w", "%{local_port}", "-o", str(tmp_path / "body"))
    rc, port, err = await curl(
        "-p", "-x", proxy.http_url, "--cacert", str(pki.ca_pem), "--resolve",
        f"localhost:{tls_origin.port}:127.0.0.1", *fmt, url,
    )  # fmt: skip
    assert rc == 0, err
    assert (tmp_path / "body").read_text() == "hello GET /hello"
    await proxy.recorder.wait_destroyed(1)
    await sink_of(proxy, PcapFileSink).flush()
    (path,) = pcap_files(d)
    as_tls = ("-d", f"tcp.port=={tls_origin.port},tls")
    hello = await tshark(
        "-r", str(path), *as_tls, "-Y", "tls.handshake.type==1", "-T", "fields",
        "-e", "tls.handshake.extensions_server_name", "-e", "tcp.srcport", "-e", "tcp.dstport",
    )  # fmt: skip
    assert hello == f"localhost\t{int(port)}\t{tls_origin.port}\n"
    server_hello = await tshark(
        "-r", str(path), *as_tls, "-Y", "tls.handshake.type==2", "-T", "fields",
        "-e", "tcp.srcport",
    )  # fmt: skip
    assert server_hello == f"{tls_origin.port}\n"
    app_data = await tshark(
        "-r", str(path), *as_tls, "-Y", "tls.app_data", "-T", "fields",
        "-e", "tcp.srcport",
    )  # fmt: skip
    assert {int(p) for p in app_data.split()} == {int(port), tls_origin.port}
    conv = await tshark("-r", str(path), "-q", "-z", "conv,tcp")
    pairs = re.findall(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s", conv, re.M)
    assert pairs == [("127.0.0.1", str(int(port)), "127.0.0.1", str(tls_origin.port))], conv
    assert await tshark("-r", str(path), *as_tls, "-Y", "tcp.analysis.flags", *CHECKS) == ""
    assert await tshark(*bad_checksums(path), *as_tls) == ""
    assert (
        await tshark("-r", str(path), *as_tls, "-Y", "_ws.malformed || _ws.expert.severity>=error")
        == ""
    )
    frames = await tshark("-r", str(path), "-T", "fields", "-e", "frame.number")
    assert len(frames.split()) > 10  # handshake, TLS records, FIN exchange


class BigOrigin:
    """A raw origin answering one request with ``size`` pattern bytes, streamed; keeps the
    request it read."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"

    def __init__(self, size: int) -> None:
        self.size = size
        self.heads: list[bytes] = []

    def sent_sha256(self) -> str:
        h = hashlib.sha256(self.HEAD % self.size)
        reps, rest = divmod(self.size, len(BLOCK))
        for _ in range(reps):
            h.update(BLOCK)
        h.update(BLOCK[:rest])
        return h.hexdigest()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.heads.append(await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10))
        w.write(self.HEAD % self.size)
        left = self.size
        while left:
            step = min(left, len(BLOCK))
            w.write(BLOCK[:step])
            await w.drain()
            left -= step


def hash_follow(path: Path) -> tuple[int, str, str, int, int]:
    """``follow,tcp,raw`` output streamed from ``path``: (node 0's port, sha256 of node 0's
    bytes, of node 1's, their lengths), never holding the stream in memory."""
    a, b = hashlib.sha256(), hashlib.sha256()
    na = nb = 0
    node0 = -1
    with path.open() as f:
        for line in f:
            if line.startswith("Node 0: "):
                node0 = int(line.rsplit(":", 1)[1])
            elif line.startswith("Node 1: "):
                break
        for line in f:
            if line.startswith("====="):
                break
            if line.startswith("\t"):
                chunk = bytes.fromhex(line.strip())
                b.update(chunk)
                nb += len(chunk)
            elif line.strip():
                chunk = bytes.fromhex(line.strip())
                a.update(chunk)
                na += len(chunk)
    assert node0 > 0
    return node0, a.hexdigest(), b.hexdigest(), na, nb


async def tshark_to(out: Path, *args: str) -> None:
    with out.open("wb") as f:
        proc = await asyncio.create_subprocess_exec(
            "tshark", *args, stdout=f, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, err.decode()


# no reassembly above TCP: an HTTP body of 100 MiB reassembled takes tshark minutes, and
# follow, conv, the analysis flags and the checksums are all TCP's own
FLAT = ("-o", "tcp.desegment_tcp_streams:FALSE")


async def check_big_flow(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path, size: int
) -> None:
    d = tmp_path / "pcap"
    origin_app = BigOrigin(size)
    origin: RawServer = await raw_server(origin_app.handle)
    proxy: RunningProxy = await start_proxy(pcap_config(d, rotate_bytes=0, buffer=64 << 20))
    body = tmp_path / "body"
    fmt = ("-w", "%{local_port}", "-o", str(body))
    rc, port, err = await curl(
        "-p", "-x", proxy.http_url, *fmt, f"http://127.0.0.1:{origin.port}/big"
    )
    assert rc == 0, err
    h = hashlib.sha256()
    with body.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == pattern_sha256(size)
    await proxy.recorder.wait_destroyed(1)
    sink: PcapFileSink = sink_of(proxy, PcapFileSink)
    await sink.flush()
    assert sink.stats().drops == {"buffer_full": 0, "write_error": 0}, sink.drops
    (path,) = pcap_files(d)
    conv = await tshark("-r", str(path), *FLAT, "-q", "-z", "conv,tcp")
    pairs = re.findall(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s", conv, re.M)
    assert pairs == [("127.0.0.1", str(int(port)), "127.0.0.1", str(origin.port))], conv
    follow = tmp_path / "follow.txt"
    await tshark_to(follow, "-r", str(path), *FLAT, "-q", "-z", "follow,tcp,raw,0")
    node0, up_sha, down_sha, n_up, n_down = await asyncio.to_thread(hash_follow, follow)
    (head,) = origin_app.heads
    assert node0 == int(port)
    assert (up_sha, n_up) == (hashlib.sha256(head).hexdigest(), len(head))
    assert (down_sha, n_down) == (origin_app.sent_sha256(), len(BigOrigin.HEAD % size) + size)
    assert await tshark("-r", str(path), *FLAT, "-Y", "tcp.analysis.flags", *CHECKS) == ""
    assert await tshark(*bad_checksums(path), *FLAT) == ""
    frames = await tshark_count(path)
    assert frames > size // 1460
    # every packet's checksums checked and Good, counted without -V's pages per packet
    assert await tshark_count(path, "tcp.checksum.status==1 && ip.checksum.status==1") == frames


async def tshark_count(path: Path, display_filter: str = "") -> int:
    """Packets of ``path`` (matching ``display_filter``), counted from a file."""
    out = path.with_suffix(".frames")
    flt = ("-Y", display_filter) if display_filter else ()
    await tshark_to(
        out, "-r", str(path), *FLAT, *CHECKS, *flt, "-T", "fields", "-e", "frame.number"
    )
    with out.open() as f:
        return sum(1 for _ in f)


async def test_a_16_mib_flow_reads_back_exactly(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    await check_big_flow(start_proxy, raw_server, tmp_path, 16 << 20)


@pytest.mark.slow
async def test_a_100_mib_flow_reads_back_exactly(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    await check_big_flow(start_proxy, raw_server, tmp_path, 100 << 20)


async def admin_metric(proxy: RunningProxy, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` on the admin listener, whatever its label order."""
    assert proxy.app.admin is not None
    host, admin_port = proxy.app.admin.addresses()[0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{admin_port}/metrics") as resp,
    ):
        text = await resp.text()
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    raise AssertionError([line for line in text.splitlines() if name in line])


async def test_a_disk_failing_mid_transfer_loses_packets_not_traffic_and_writing_resumes(
    start_proxy: ProxyFactory, raw_server: Any, tmp_path: Path
) -> None:
    """ENOSPC from the writer while a transfer runs (root ignores a read-only directory,
    so the sink's write call is the fault): the transfer completes exactly, the loss is
    counted on /metrics, and once the disk works again a later flow is in a new file."""
    size = 8 << 20
    go = asyncio.Event()

    async def in_two_halves(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
        w.write(pattern(size // 2))
        await w.drain()
        await asyncio.wait_for(go.wait(), 10)  # the disk fails here
        w.write(pattern(size)[size // 2 :])
        await w.drain()

    small_app = RecordingOrigin(body=1000)
    small: RawServer = await raw_server(small_app.handle)
    origin: RawServer = await raw_server(in_two_halves)
    d = tmp_path / "pcap"
    proxy: RunningProxy = await start_proxy(pcap_config(d, rotate_bytes=1 << 20))
    sink: PcapFileSink = sink_of(proxy, PcapFileSink)
    full = threading.Event()
    real_write = sink.os_write

    def disk(fd: int, data: memoryview) -> int:
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    sink.os_write = disk
    body = tmp_path / "body"
    fmt = ("-w", "%{local_port}", "-o", str(body))
    socks = "socks5://{}:{}".format(*proxy.socks)
    transfer = asyncio.ensure_future(curl("-x", socks, *fmt, f"http://127.0.0.1:{origin.port}/big"))
    try:
        # the first half is on disk, over rotations: the transfer is running
        await wait_until(lambda: sink.bytes_written > size // 4 and sink.rotations >= 1, 10)
        assert not transfer.done()
        files_before = set(pcap_files(d))
        full.set()
        go.set()
        await wait_until(lambda: sink.drops.get("write_error", 0) > 0, 10, "a write error")
        assert sink.last_error and "space" in sink.last_error
        assert sink.stats().connected == 0  # the file with the torn record is closed
        full.clear()
        rc, _, err = await transfer
    finally:
        go.set()
        full.clear()
        if not transfer.done():
            transfer.cancel()
    assert rc == 0, err
    assert hashlib.sha256(body.read_bytes()).hexdigest() == pattern_sha256(size)
    lost = await admin_metric(
        proxy, "proxytap_export_dropped_events_total", sink="pcap", reason="write_error"
    )
    assert lost > 0 and lost == sink.drops["write_error"]
    await proxy.recorder.wait_destroyed(1)
    # later flows, until one is written (its first packets may fall in the back-off)
    later: set[int] = set()
    ports_in: dict[Path, set[int]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not any(later & ports for ports in ports_in.values()):
        assert loop.time() < deadline, (later, ports_in, sink.stats())
        url = f"http://127.0.0.1:{small.port}/"
        rc, out, err = await curl("-x", socks, "-w", "%{local_port}", "-o", os.devnull, url)
        assert rc == 0, err
        later.add(int(out))
        await proxy.recorder.wait_destroyed(1 + len(later))
        await sink.flush()
        for f in pcap_files(d):
            if f not in files_before:
                conv = await tshark("-r", str(f), "-q", "-z", "conv,tcp")
                pairs = re.findall(r"^\S+:(\d+)\s+<->\s+\S+:(\d+)\s", conv, re.M)
                ports_in[f] = {int(p) for pair in pairs for p in pair}
    (path,) = [f for f, ports in ports_in.items() if later & ports]
    assert path not in files_before and sink.stats().connected == 1  # writing again
    assert await tshark("-r", str(path), "-Y", "tcp.analysis.flags", *CHECKS) == ""
    assert await tshark(*bad_checksums(path)) == ""


# -- the file sink on its own: time rotation, recovery, a full disk --------------------------------


async def test_time_rotation_and_reopen(tmp_path: Path) -> None:
    sink = PcapFileSink(tmp_path, rotate_seconds=0.3, rotate_bytes=0)
    await sink.start()
    try:
        flow = make_flow(FlowTable(), client=("127.0.0.1", 40001), server=("127.0.0.1", 80))
        sink.flow_created(flow, flow.start)
        sink.flow_data(flow, UP, b"GET / HTTP/1.0\r\n\r\n", flow.start + 0.1)
        await sink.flush()
        await wait_until(lambda: sink.path is not None and sink.rotations == 1, 3)
        sink.flow_data(flow, DOWN, b"HTTP/1.0 200 OK\r\n\r\n", flow.start + 0.5)
        await sink.flush()
        sink.reopen()
        sink.flow_destroyed(flow, CloseReason.NORMAL, flow.start + 1)
        await sink.flush()
    finally:
        await sink.stop()
    files = pcap_files(tmp_path)
    assert len(files) == 3 and sink.files == 3
    payloads = [[p.payload for p in parse_file(f.read_bytes())[2]] for f in files]
    assert b"GET / HTTP/1.0\r\n\r\n" in payloads[0]
    assert payloads[1][0] == b"HTTP/1.0 200 OK\r\n\r\n"  # a new file mid-flow: no handshake
    assert payloads[2] == [b""] * 4  # the FIN exchange


async def test_writing_resumes_after_a_failure(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.write_text("not a directory yet")
    sink = PcapFileSink(d)
    await sink.start()  # does not raise: the proxy must start anyway
    try:
        table = FlowTable()
        first = make_flow(table, client=("127.0.0.1", 40002), server=("127.0.0.1", 80))
        sink.flow_created(first, first.start)
        await sink.flush()
        assert sink.drops == {"write_error": 1} and sink.last_error
        d.unlink()
        d.mkdir()
        second = make_flow(table, client=("127.0.0.1", 40003), server=("127.0.0.1", 80))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not pcap_files(d):  # retried after the back-off (1 s)
            assert loop.time() < deadline
            sink.flow_data(second, UP, b"x", second.start)
            await sink.flush()
            await asyncio.sleep(0.1)
    finally:
        await sink.stop()
    (path,) = pcap_files(d)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert any(p.payload == b"x" for p in parse_file(path.read_bytes())[2])


async def test_a_full_disk_loses_packets_counted_and_closes_the_file(tmp_path: Path) -> None:
    sink = PcapFileSink(tmp_path)
    await sink.start()
    try:
        flow = make_flow(FlowTable(), client=("127.0.0.1", 40004), server=("127.0.0.1", 80))
        sink.flow_created(flow, flow.start)
        await sink.flush()
        assert sink.path is not None and sink.stats().connected == 1
        real_write = sink.os_write

        def full(fd: int, data: memoryview) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        sink.os_write = full
        sink.flow_data(flow, UP, b"y" * 5000, flow.start + 1)
        await sink.flush()
        sink.os_write = real_write
        assert sink.drops == {"write_error": 1} and sink.dropped_bytes == {"write_error": 5000}
        assert sink.last_error and "space" in sink.last_error
        assert sink.stats().connected == 0  # the file is closed
    finally:
        await sink.stop()


async def test_a_full_buffer_drops_data_whole(tmp_path: Path) -> None:
    sink = PcapFileSink(tmp_path, buffer_limit=10_000)
    # not started: nothing drains the buffer
    flow = make_flow(FlowTable(), client=("127.0.0.1", 40005), server=("127.0.0.1", 80))
    sink.flow_created(flow, flow.start)
    sink.flow_data(flow, UP, b"a" * 6000, flow.start)
    sink.flow_data(flow, UP, b"b" * 6000, flow.start)  # does not fit: dropped, counted
    assert sink.drops == {"buffer_full": 1} and sink.dropped_bytes == {"buffer_full": 6000}
    assert sink.stats().buffered <= 10_000


# -- PCAP-over-IP ---------------------------------------------------------------------------------


def read_until_eof(sock: socket.socket) -> bytes:
    """An ``nc``-like reader in its own thread: everything until end of file."""
    sock.settimeout(20)  # bounded: the test fails rather than hangs
    got = bytearray()
    while chunk := sock.recv(1 << 16):
        got += chunk
    return bytes(got)


async def test_pcap_over_ip_streams_to_readers_and_a_slow_one_blocks_nobody(
    start_proxy: ProxyFactory, raw_server: Any
) -> None:
    origin_app = RecordingOrigin(body=6_000_000)
    origin: RawServer = await raw_server(origin_app.handle)
    cfg = pcap_config(None, listen="127.0.0.1:0", buffer=1_000_000)
    proxy: RunningProxy = await start_proxy(cfg)
    server: PcapServer = sink_of(proxy, PcapServer)
    assert server.address is not None and server.address[0] == "127.0.0.1"
    fast = socket.create_connection(server.address)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(server.address)  # never reads
    reading = asyncio.ensure_future(asyncio.to_thread(read_until_eof, fast))
    try:
        await wait_until(lambda: len(server.readers) == 2, 3)
        by_peer = {r.peer[1]: r for r in server.readers}
        fast_reader, slow_reader = by_peer[fast.getsockname()[1]], by_peer[slow.getsockname()[1]]
        socks = "socks5://{}:{}".format(*proxy.socks)
        fmt = ("-w", "%{local_port}", "-o", os.devnull)
        rc, port, err = await curl("-x", socks, *fmt, f"http://127.0.0.1:{origin.port}/live")
        assert rc == 0, err
        await proxy.recorder.wait_destroyed(1)
        stats = server.stats()
        assert stats.connected == 2 and stats.drops["buffer_full"] == slow_reader.drops > 0
        assert fast_reader.drops == 0
        await server.stop()  # flushes the fast reader, then its end of file
        got = await asyncio.wait_for(reading, 20)
    finally:
        slow.close()
        fast.close()
    ((head, sent),) = origin_app.conns
    # the fast reader's stream is a pcap file: tshark reads it from a pipe
    conv = await tshark("-r", "-", "-q", "-z", "conv,tcp", input=got)
    assert f"127.0.0.1:{int(port)}" in conv and f"127.0.0.1:{origin.port}" in conv
    _, up, down = follow_raw(await tshark("-r", "-", "-q", "-z", "follow,tcp,raw,0", input=got))
    assert up == head and down == sent
    assert await tshark("-r", "-", "-Y", "tcp.analysis.flags", *CHECKS, input=got) == ""


async def test_pcap_over_ip_without_readers_frames_nothing(tmp_path: Path) -> None:
    server = PcapServer("127.0.0.1", 0)
    await server.start()
    try:
        flow = make_flow(FlowTable(), client=("127.0.0.1", 40006), server=("127.0.0.1", 80))
        server.flow_created(flow, flow.start)
        server.flow_data(flow, UP, b"z" * 100, flow.start)
        assert server.packets == 0 and server.stats().drops == {"buffer_full": 0}
        assert server.address is not None
        reader, writer = await asyncio.open_connection(*server.address)
        header = await asyncio.wait_for(reader.readexactly(24), 5)
        assert header[:4] == bytes.fromhex("d4c3b2a1") and header[20:] == (101).to_bytes(
            4, "little"
        )
        await wait_until(lambda: len(server.readers) == 1, 3)
        server.flow_data(flow, DOWN, b"w" * 10, flow.start + 1)
        record = await asyncio.wait_for(reader.readexactly(16 + 40 + 10), 5)
        assert record.endswith(b"w" * 10)
        writer.close()
    finally:
        await server.stop()


# -- config ------------------------------------------------------------------------------------


def test_every_pcap_key_is_documented() -> None:
    here = Path(__file__).parent.parent.parent
    example = (here / "deploy" / "proxytap.example.toml").read_text()
    section = example.split("[export.pcap]", 1)[1].split("\n[", 1)[0]
    readme = (here / "README.md").read_text().split("### PCAP", 1)[1].split("\n## ", 1)[0]
    for name in PcapConfig.__dataclass_fields__:
        assert re.search(rf"^#? ?{name} =", section, re.M), name
        assert f"`{name}`" in readme, name
    assert load(here / "deploy" / "proxytap.example.toml").export.pcap == PcapConfig()
