"""Scale-out as operators run it: HAProxy (TCP mode, send-proxy-v2, round robin) in front of
two proxytap instances, with curl and python-socks as the clients.

The HAProxy config is ``deploy/haproxy/haproxy.cfg`` itself, with its addresses
and ports replaced by loopback ones. Three loopback addresses keep the parties
apart: the clients connect from 127.0.0.2, HAProxy connects to the instances
from 127.0.0.1, the origin listens on 127.0.0.4. Each instance trusts PROXY
headers from 127.0.0.1 only and allows only 127.0.0.2 as a client, so a
request judged by HAProxy's address would be refused; and every export is
checked for the clients' own (address, port) pairs, which only the PROXY
header can have told the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.proto.proxyproto import v2_header
from tests.conftest import Origin, curl, start_origin
from tests.export.sftap_helpers import TapReader
from tests.front.behind import Endpoint, Proxytap, flows_ended, key_endpoints, running

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
CLIENT = "127.0.0.2"  # where the clients connect from
BALANCER = "127.0.0.1"  # where HAProxy's connections to the instances come from
ORIGIN = "127.0.0.4"

INSTANCE = f"""
[[listeners]]
name = "http"
kind = "http"
address = "127.0.0.1:0"
proxy_protocol = true
proxy_protocol_from = ["{BALANCER}/32"]

[[listeners]]
name = "socks"
kind = "socks"
address = "127.0.0.1:0"
proxy_protocol = true
proxy_protocol_from = ["{BALANCER}/32"]

[access]
clients = ["{CLIENT}/32"]
allow_dest = ["{ORIGIN}/32"]
connect_ports = ["1-65535"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def haproxy_config(instances: list[Proxytap], http: int, socks: int, monitor: int) -> str:
    """deploy/haproxy/haproxy.cfg with loopback addresses, and a monitor URI to wait on."""
    text = DEPLOY.read_text()
    text = text.replace("maxconn 20000", "maxconn 1000")  # within a test's open-file limit
    text = text.replace("bind :3128", f"bind 127.0.0.1:{http}")
    text = text.replace("bind :1080", f"bind 127.0.0.1:{socks}")
    lines = []
    for line in text.splitlines():
        for i, inst in enumerate(instances, 1):
            if re.match(rf"\s+server proxytap{i} ", line):
                admin_port = inst.admin.rsplit(":", 1)[1]
                line = line.replace(f"10.0.0.1{i}:8080", f"127.0.0.1:{inst.ports['http']}")
                line = line.replace(f"10.0.0.1{i}:1080", f"127.0.0.1:{inst.ports['socks']}")
                line = line.replace("port 9090", f"port {admin_port}")
        lines.append(line)
    text = "\n".join(lines)
    assert "10.0.0." not in text.partition("\nglobal")[2], "an address was left unreplaced"
    # all listeners are bound before any answers: once /up answers, the frontends are up
    return (
        text
        + f"\n\nfrontend monitor\n    mode http\n    bind 127.0.0.1:{monitor}\n"
        + ("    monitor-uri /up\n")
    )


def logged(path: Path) -> str:
    return path.read_text(errors="replace")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    assert found, "haproxy is not installed: run tests/setup-tools.sh"
    return found


@contextlib.asynccontextmanager
async def haproxy(config: Path, log: Path, monitor: int) -> AsyncIterator[None]:
    """HAProxy in the foreground (-db) on ``config``; stopped on exit."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            haproxy_binary(), "-f", str(config), "-db", stdout=out, stderr=out
        )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):  # at most ~10 s
                assert proc.returncode is None, logged(log)
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{monitor}/up") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"haproxy did not start: {logged(log)}")
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def curl_via(http: int, origin: Origin, *tunnel: str) -> Endpoint:
    """curl from 127.0.0.2 through the balancer's HTTP port; the client's own endpoint."""
    rc, out, err = await curl(
        "--fail", "--interface", CLIENT, "-x", f"http://127.0.0.1:{http}", *tunnel,
        "-w", "\n%{local_ip} %{local_port}", f"{origin.url}/hello",
    )  # fmt: skip
    assert rc == 0, err
    body, _, local = out.decode().rpartition("\n")
    assert body == "hello GET /hello"
    ip, port = local.split()
    return ip, int(port)


async def socks_open(
    socks: int, origin: Origin
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Endpoint]:
    """python-socks from 127.0.0.2 through the balancer's SOCKS port; the client's endpoint."""
    proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", socks, rdns=False)
    sock = await proxy.connect(ORIGIN, origin.port, timeout=10, local_addr=(CLIENT, 0))
    host, port = sock.getsockname()[:2]
    reader, writer = await asyncio.open_connection(sock=sock)
    return reader, writer, (host, port)


async def socks_finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"GET /hello HTTP/1.1\r\nHost: {ORIGIN}\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello GET /hello"), answer


async def test_haproxy_round_robin_over_two_instances_keeps_the_real_client(
    tmp_path: Path,
) -> None:
    http, socks, monitor = free_port(), free_port(), free_port()
    origin = await start_origin(ORIGIN)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(origin.runner.cleanup)
        one, two = await asyncio.gather(
            stack.enter_async_context(running(tmp_path / "one", INSTANCE)),
            stack.enter_async_context(running(tmp_path / "two", INSTANCE)),
        )
        instances = [one, two]
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(instances, http, socks, monitor))
        await stack.enter_async_context(haproxy(config, tmp_path / "haproxy.log", monitor))
        taps = [await TapReader.connect(p.home / "tcp" / "http") for p in instances]
        for tap in taps:
            stack.callback(tap.close)

        # python-socks: two tunnels held open, one on each instance (round robin)
        held = [await socks_open(socks, origin) for _ in range(2)]
        socks_clients = {client for _, _, client in held}
        live = [await p.live_flows() for p in instances]
        seen = [{(f["client"]["ip"], f["client"]["port"]) for f in rows} for rows in live]
        assert sorted(len(s) for s in seen) == [1, 1], live
        assert seen[0] | seen[1] == socks_clients  # /flows: the real client, each instance
        for reader, writer, _ in held:
            await socks_finish(reader, writer)
        # curl: plain HTTP twice, CONNECT (-p) twice
        curl_clients = {await curl_via(http, origin) for _ in range(2)}
        curl_clients |= {await curl_via(http, origin, "-p") for _ in range(2)}
        assert {ip for ip, _ in curl_clients | socks_clients} == {CLIENT}
        assert len(curl_clients) == 4

        # each instance's flow socket: its 3 flows (round robin), keyed by the real clients
        created = [await asyncio.wait_for(flows_ended(tap, 3), 15) for tap in taps]
        exported: list[set[Endpoint]] = []
        for events in created:
            ends = set()
            for ev in events:
                (client,) = key_endpoints(ev) - {(ORIGIN, origin.port)}
                ends.add(client)
            exported.append(ends)
        assert exported[0] | exported[1] == curl_clients | socks_clients
        assert not exported[0] & exported[1]

        # the balancer cannot use an instance directly: its peer must be the balancer
        r, w = await asyncio.open_connection("127.0.0.1", one.ports["http"], local_addr=(CLIENT, 0))
        w.write(v2_header((CLIENT, 1), ("127.0.0.1", http)) + b"CONNECT x:1 HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()

        for p in instances:
            for listener, n in (("http", 2), ("socks", 1)):
                got = await p.metric(
                    "proxytap_downstream_proxy_headers_total", listener=listener, result="accepted"
                )
                assert got == n, (listener, got)
            assert (
                await p.metric(
                    "proxytap_downstream_proxy_headers_total", listener="socks", result="local"
                )
                == 0
            )  # health checks go to /readyz and carry no header
        assert (
            await one.metric(
                "proxytap_downstream_proxy_headers_total", listener="http", result="untrusted"
            )
            == 1
        )
        logs = [await p.stop() for p in instances]

    for p, clients, log in zip(instances, exported, logs, strict=True):
        # the JSON flow log: the same real clients, never the balancer
        records = p.flows()
        assert {(r["id.orig_h"], r["id.orig_p"]) for r in records} == clients
        assert sorted(r["listener"] for r in records) == ["http", "http", "socks"]
        # access lines: one per flow, each naming its real client
        access = [ln for ln in log.splitlines() if f"{ORIGIN}:{origin.port}" in ln]
        assert len(access) == 3, log
        named = {ep for ep in clients if any(f"{ep[0]}:{ep[1]} " in ln for ln in access)}
        assert named == clients, access
        assert not any(f" {BALANCER}:" in ln for ln in access), access
