"""TLS interception end to end (issue D): real curl, real origins, a real proxytap process.

Every test runs ``proxytap run`` with ``[tls] intercept = ["localhost"]`` (the
origins' test CA trusted through ``tls.upstream_ca``), drives curl (CONNECT
with ``-x``, SOCKS5 with ``--socks5-hostname``, HTTP/2 with ``--http2``) or
aiohttp (WebSocket) through it with proxytap's CA trusted, and checks what
the origin saw, what the client got, what an analyzer reads on the flow
sockets (parsed by h11, as an HTTP/1.1 analyzer parses a flow), the JSON flow
log and the metrics.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import ssl
import stat
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxytap.proto.sftap import DESTROYED
from tests.certs import Pki
from tests.conftest import run, start_origin
from tests.export.sftap_helpers import TapReader, check_stream, short_tmp
from tests.export.strict_helpers import Consumer
from tests.intercept.interception import (
    Intercepting,
    h2_origin,
    header,
    http_pairs,
    https_origin,
    start_intercepting,
)

Endpoint = tuple[str, int]
ADDONS = Path(__file__).resolve().parents[2] / "addons"


@pytest.fixture
def home() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


@pytest.fixture
async def px(home: Path, tmp_path: Path, pki: Pki) -> AsyncIterator[Intercepting]:
    p = await start_intercepting(
        home,
        tmp_path,
        pki,
        extra="""
[http]
methods = ["GET", "HEAD", "POST", "PUT", "OPTIONS", "CONNECT"]

[[http.request_rules]]
action = "remove"
name = "X-Secret"

[[http.request_rules]]
action = "add"
name = "X-Via-Proxytap"
value = "yes"
""",
    )
    yield p
    await p.stop()


@pytest.fixture
async def origin(pki: Pki) -> AsyncIterator[int]:
    async with https_origin(pki.server_context()) as port:
        yield port


async def curl(*args: str) -> tuple[int, str, str]:
    rc, out, err = await run("curl", "-sS", "--max-time", "30", *args)
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


def final_status(out: str) -> int:
    """The status of the last response head in curl's ``-i`` output (after CONNECT's 200)."""
    lines = [line for line in out.splitlines() if line.startswith("HTTP/")]
    return int(lines[-1].split()[1])


def local(w: str) -> Endpoint:
    ip, port = w.split()[-2:]
    return ip, int(port)


async def one_flow(
    tap: TapReader, within: float = 15
) -> tuple[tuple[Endpoint, Endpoint], bytes, bytes]:
    """The next whole flow on ``tap``: its two endpoints and both directions' bytes."""
    events = await tap.until(lambda ev: ev.event == DESTROYED, within)
    flows = check_stream(events)
    assert len(flows) == 1, flows.keys()
    (rec,) = flows.values()
    key = rec.created.key
    assert rec.destroyed is not None
    ends = ((key.ip1, key.port1), (key.ip2, key.port2))
    return ends, bytes(rec.up), bytes(rec.down)


# == CONNECT and SOCKS5: decrypted on tcp/http with the true endpoints ====================


@pytest.mark.parametrize("via", ["connect", "socks5"])
async def test_intercepted_exchange_is_exported_decrypted(
    px: Intercepting, origin: int, via: str
) -> None:
    tap = await px.tap("tcp/http")
    ssl_tap = await px.tap("tcp/ssl")
    try:
        proxy = ["-x", px.http] if via == "connect" else ["--socks5-hostname", px.socks]
        rc, out, err = await curl(
            *proxy,
            "--cacert",
            str(px.ca_cert),
            "--http1.1",
            "-H",
            "X-Secret: s3cret",
            "-H",
            "X-Kept: 1",
            "-w",
            "\n%{local_ip} %{local_port}",
            f"https://localhost:{origin}/echo?q=1",
        )
        assert rc == 0, err
        body, _, w = out.rpartition("\n")
        seen = json.loads(body)
        client = local(w)
        # the origin saw the request after the header rules of issue C, inside TLS
        names = {k.lower(): v for k, v in seen["headers"]}
        assert "x-secret" not in names
        assert names["x-via-proxytap"] == "yes"
        assert names["x-kept"] == "1"
        assert names["via"] == "1.1 proxytap"
        ends, up, down = await one_flow(tap)
        assert set(ends) == {client, ("127.0.0.1", origin)}
        ((req, resp),) = http_pairs(up, down)
        assert req.head.method == b"GET" and req.head.target == b"/echo?q=1"  # type: ignore[union-attr]
        assert header(req, "x-secret") is None and header(req, "x-via-proxytap") == "yes"
        assert header(req, "host") == f"localhost:{origin}"
        assert resp.head.status_code == 200
        assert json.loads(resp.body) == seen  # the response as the origin sent it
        assert await ssl_tap.nothing_within(0.3)  # no ciphertext export by default
    finally:
        tap.close()
        ssl_tap.close()
    await _flow_logged(px, client, decrypted=True)
    (record,) = [f for f in px.flows() if f["id.orig_p"] == client[1]]
    assert record["service"] == "http"
    assert record["tunnel"] == ("http-connect" if via == "connect" else "socks5")
    assert record["sni"] == "localhost"
    assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert record["tls_cipher"]
    assert record["ja3"] and record["ja4"]
    assert await px.metric("proxytap_intercept_decisions_total", outcome="intercepted") >= 1


async def _flow_logged(px: Intercepting, client: Endpoint, decrypted: bool) -> None:
    record = await px.flow_of(client)
    assert record["decrypted"] is decrypted, record


# == passthrough: the ciphertext on tcp/ssl, unchanged =====================================


async def test_passthrough_host_is_exported_as_ciphertext(
    px: Intercepting, origin: int, pki: Pki
) -> None:
    tap = await px.tap("tcp/ssl")
    try:
        rc, out, err = await curl(
            "-x",
            px.http,
            "--cacert",
            str(pki.ca_pem),  # the origin's own certificate: nothing in between
            "-w",
            "\n%{local_ip} %{local_port}",
            f"https://127.0.0.1:{origin}/hello",
        )
        assert rc == 0, err
        body, _, w = out.rpartition("\n")
        assert body == "hello GET /hello"
        client = local(w)
        ends, up, down = await one_flow(tap)
        assert set(ends) == {client, ("127.0.0.1", origin)}
        assert up[:1] == b"\x16" and down[:1] == b"\x16"  # TLS records both ways
        assert b"GET /hello" not in up
    finally:
        tap.close()
    await _flow_logged(px, client, decrypted=False)
    assert (
        await px.metric(
            "proxytap_intercept_decisions_total", outcome="passthrough", reason="not-listed"
        )
        >= 1
    )


async def test_plain_bytes_inside_connect_never_reach_the_engine(px: Intercepting) -> None:
    """A CONNECT to an intercepted name whose client speaks plain HTTP: relayed as is."""
    origin = await start_origin()
    try:
        rc, out, err = await curl(
            "-p",
            "-x",
            px.http,
            "-w",
            "\n%{local_ip} %{local_port}",
            f"http://localhost:{origin.port}/hello",
        )
        assert rc == 0, err
        body, _, w = out.rpartition("\n")
        assert body == "hello GET /hello"
        await _flow_logged(px, local(w), decrypted=False)
    finally:
        await origin.runner.cleanup()


# == C's rules inside TLS =================================================================


async def test_request_refused_in_plain_http_is_refused_inside_tls(
    px: Intercepting, origin: int
) -> None:
    """TRACE is not in http.methods: 501 with Proxy-Status, in plain HTTP and inside TLS."""
    rc, plain, err = await curl("-x", px.http, "-X", "DELETE", "-i", "http://127.0.0.1:9/x")
    assert rc == 0, err
    rc, tls, err = await curl(
        "-x",
        px.http,
        "--cacert",
        str(px.ca_cert),
        "-X",
        "DELETE",
        "-i",
        f"https://localhost:{origin}/echo",
    )
    assert rc == 0, err
    for answer in (plain, tls):
        assert final_status(answer) == 501, answer
        assert "proxy-status: proxytap; error=http_request_denied" in answer.lower()
        assert "method DELETE is not allowed" in answer
    assert await px.metric("proxytap_intercept_refusals_total", what="request") == 1


# == HTTP/2 ===============================================================================


async def test_http2_concurrent_streams_pair_for_an_http1_analyzer(
    px: Intercepting, pki: Pki, tmp_path: Path
) -> None:
    async with h2_origin(pki) as port:
        tap = await px.tap("tcp/http")
        try:
            args = ["-x", px.http, "--cacert", str(px.ca_cert), "--http2", "--parallel"]
            args += ["-w", "%{http_version} %{local_port}\n"]
            for i in range(8):
                args += ["-o", str(tmp_path / f"s{i}"), f"https://localhost:{port}/s{i}"]
            rc, out, err = await curl(*args)
            assert rc == 0, err
            # curl multiplexed every stream over one connection, HTTP/2 on both legs
            stats = {tuple(line.split()) for line in out.splitlines()}
            assert len(stats) == 1 and next(iter(stats))[0] == "2", out
            for i in range(8):
                assert (tmp_path / f"s{i}").read_text() == f"2 /s{i}"
            _, up, down = await one_flow(tap)
        finally:
            tap.close()
    pairs = http_pairs(up, down)
    assert len(pairs) == 8
    for req, resp in pairs:
        path = req.head.target.decode()  # type: ignore[union-attr]
        assert resp.body.decode() == f"2 {path}"  # each response follows its own request
        assert header(req, "host") == f"localhost:{port}"
    assert sorted(r.head.target for r, _ in pairs) == sorted(  # type: ignore[union-attr]
        f"/s{i}".encode() for i in range(8)
    )
    assert await px.metric("proxytap_intercept_requests_total", protocol="http2") == 8


# == WebSocket ============================================================================


async def test_websocket_echo_through_interception(px: Intercepting, origin: int) -> None:
    """The handshake and the messages' payloads land on tcp/websocket (the abstractor's rule)."""
    tap = await px.tap("tcp/websocket")
    ctx = ssl.create_default_context(cafile=str(px.ca_cert))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"wss://localhost:{origin}/ws", proxy=px.http, ssl=ctx) as ws,
        ):
            for i in range(3):
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"echo m{i}"
            await ws.send_bytes(b"\x00bin")
            assert (await ws.receive_bytes()) == b"echo \x00bin"
        _, up, down = await one_flow(tap)
    finally:
        tap.close()
    up_head = up[: up.index(b"\r\n\r\n") + 4]
    down_head = down[: down.index(b"\r\n\r\n") + 4]
    ((req, resp),) = http_pairs(up_head, down_head)
    assert header(req, "upgrade") == "websocket"
    assert resp.head.status_code == 101
    # then the messages' payloads, in order, each direction
    assert up.endswith(b"m0m1m2\x00bin")
    assert down.endswith(b"echo m0echo m1echo m2echo \x00bin")


# == origin certificates ==================================================================


def _leaf(pki: Pki, directory: Path, kind: str) -> ssl.SSLContext:
    """A server context whose certificate is expired, names another host, or is self-signed."""
    raw = pki.ca_pem.read_bytes()
    ca_cert = x509.load_pem_x509_certificate(raw)
    ca_key_path = pki.ca_pem.with_name("ca-key.pem")
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = "elsewhere.test" if kind == "wrong_name" else "localhost"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if kind == "self_signed" or not ca_key_path.exists():
        issuer, signer = subject, key
    else:
        signer = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)  # type: ignore[assignment]
        issuer = ca_cert.subject
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=1)
    if kind == "expired":
        start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=2)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path = directory / f"{kind}.pem"
    key_path = directory / f"{kind}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("expired", "expired"), ("wrong_name", "wrong_name"), ("self_signed", "untrusted")],
)
async def test_bad_origin_certificate_is_refused_and_counted(
    px: Intercepting, pki: Pki, tmp_path: Path, kind: str, reason: str
) -> None:
    if kind != "self_signed":
        assert pki.ca_pem.with_name("ca-key.pem").exists(), "tests/certs.py keeps the CA key"
    async with https_origin(_leaf(pki, tmp_path, kind)) as port:
        rc, out, err = await curl(
            "-x", px.http, "--cacert", str(px.ca_cert), "-i", f"https://localhost:{port}/hello"
        )
    assert rc == 0, err
    assert final_status(out) == 502, out
    assert "proxy-status: proxytap; error=tls_certificate_error" in out.lower()
    assert "hello" not in out.split("\r\n\r\n", 1)[1][:5]
    assert await px.metric("proxytap_intercept_upstream_tls_errors_total", reason=reason) == 1
    assert any("failed TLS verification" in line for line in px.lines)


# == pinning fail-open ====================================================================


async def test_client_that_rejects_the_leaf_gets_the_host_passed_through(
    px: Intercepting, origin: int, pki: Pki
) -> None:
    url = f"https://localhost:{origin}/hello"
    # a client that trusts only the origin's CA rejects proxytap's leaf (unknown CA)
    rc, _, err = await curl("-x", px.http, "--cacert", str(pki.ca_pem), url)
    assert rc != 0 and "certificate" in err.lower(), err
    assert await px.metric("proxytap_intercept_client_tls_failures_total", reason="rejected") == 1
    assert await px.metric("proxytap_intercept_pinned_pairs") == 1
    # the same client again: passed through untouched, so the origin's own certificate works
    rc, out, err = await curl(
        "-x", px.http, "--cacert", str(pki.ca_pem), "-w", "\n%{local_ip} %{local_port}", url
    )
    assert rc == 0, err
    body, _, w = out.rpartition("\n")
    assert body == "hello GET /hello"
    await _flow_logged(px, local(w), decrypted=False)
    assert (
        await px.metric(
            "proxytap_intercept_decisions_total", outcome="passthrough", reason="pinned"
        )
        == 1
    )
    assert any("rejected proxytap's certificate" in line for line in px.lines)


# == key log, reserved name, ciphertext export ============================================


async def test_keylog_ciphertext_export_and_reserved_name(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    keylog = tmp_path / "keys" / "tls-keys.log"
    px = await start_intercepting(
        home,
        tmp_path,
        pki,
        tls=f'intercept = ["localhost"]\nkeylog_file = "{keylog}"\nexport_ciphertext = true',
    )
    try:
        assert stat.S_IMODE(os.stat(px.ca_dir / "proxytap-ca.pem").st_mode) == 0o600
        ssl_tap = await px.tap("tcp/ssl")
        try:
            rc, out, err = await curl(
                "-x", px.http, "--cacert", str(px.ca_cert), f"https://localhost:{origin}/hello"
            )
            assert rc == 0, err
            assert out == "hello GET /hello"
            ends, up, down = await one_flow(ssl_tap)
            assert up[:1] == b"\x16" and down[:1] == b"\x16"
            assert ("127.0.0.1", origin) in ends
        finally:
            ssl_tap.close()
        assert stat.S_IMODE(os.stat(keylog).st_mode) == 0o600
        labels = {line.split()[0] for line in keylog.read_text().splitlines() if line}
        assert "CLIENT_TRAFFIC_SECRET_0" in labels or "CLIENT_RANDOM" in labels
        rc, page, err = await curl("-x", px.http, "http://proxytap.ca/")
        assert rc == 0, err
        assert "proxytap" in page and "SHA-256" in page
        rc, pem, err = await curl("-x", px.http, "http://proxytap.ca/ca.pem")
        assert pem == px.ca_cert.read_text()
    finally:
        await px.stop()


# == memory: a long download through interception is streamed ===============================


@pytest.mark.slow
async def test_500_mib_download_keeps_rss_bounded(px: Intercepting, origin: int) -> None:
    size = 500 << 20
    assert px.proc.pid is not None
    status = Path(f"/proc/{px.proc.pid}/status")

    def rss() -> int:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    peak = rss()
    task = asyncio.ensure_future(
        run(
            "curl",
            "-sS",
            "--max-time",
            "300",
            "-x",
            px.http,
            "--cacert",
            str(px.ca_cert),
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            f"https://localhost:{origin}/bytes/{size}",
            timeout=320,
        )
    )
    while not task.done():
        peak = max(peak, rss())
        await asyncio.sleep(0.05)
    rc, out, err = task.result()
    assert rc == 0, err
    assert int(out) == size
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB"


# == PCAP (issue F): the decrypted flow as plaintext HTTP between the true endpoints ========


async def test_intercepted_flow_in_pcap_dissects_as_http(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    pcap_dir = tmp_path / "pcap"
    px = await start_intercepting(
        home, tmp_path, pki, extra=f'\n[export.pcap]\ndir = "{pcap_dir}"\n'
    )
    try:
        rc, out, err = await curl(
            "-x",
            px.http,
            "--cacert",
            str(px.ca_cert),
            "-w",
            "\n%{local_ip} %{local_port}",
            f"https://localhost:{origin}/hello?pcap",
        )
        assert rc == 0, err
        body, _, w = out.rpartition("\n")
        assert body == "hello GET /hello?pcap"
        client = local(w)
        await _flow_logged(px, client, decrypted=True)
    finally:
        await px.stop()  # the file is complete once proxytap stopped
    (path,) = sorted(pcap_dir.glob("*.pcap"))
    # the origin's port is not 80: tell tshark it is HTTP (with 443: -d tcp.port==443,http)
    rc, fields, err = await run(
        "tshark",
        "-r",
        str(path),
        "-d",
        f"tcp.port=={origin},http",
        "-Y",
        "http",
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "ip.src",
        "-e",
        "tcp.srcport",
        "-e",
        "ip.dst",
        "-e",
        "tcp.dstport",
        "-e",
        "http.host",
        "-e",
        "http.request.uri",
        "-e",
        "http.response.code",
    )
    assert rc == 0, err
    rows = [line.split("|") for line in fields.decode().splitlines()]
    assert rows == [
        [
            client[0],
            str(client[1]),
            "127.0.0.1",
            str(origin),
            f"localhost:{origin}",
            "/hello?pcap",
            "",
        ],
        ["127.0.0.1", str(origin), client[0], str(client[1]), "", "", "200"],
    ], rows


# == endings: abrupt clients and origins leave nothing behind ================================


async def test_abrupt_endings_leave_no_session_behind(px: Intercepting, origin: int) -> None:
    """Clients that reset mid-handshake, mid-request and mid-download; all accounted for."""
    ctx = ssl.create_default_context(cafile=str(px.ca_cert))
    host, port = "127.0.0.1", px.ports["http"]
    connect = f"CONNECT localhost:{origin} HTTP/1.1\r\nHost: localhost:{origin}\r\n\r\n".encode()

    async def tunnel() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection(host, port)
        w.write(connect)
        assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        return r, w

    def reset(w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    # 1. half a ClientHello, then a reset
    r, w = await tunnel()
    w.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    await asyncio.sleep(0.1)
    reset(w)
    # 2. a whole handshake, half a request, then a reset
    r, w = await tunnel()
    await w.start_tls(ctx, server_hostname="localhost")
    w.write(b"GET /hello HTTP/1.1\r\nHost: local")
    await asyncio.sleep(0.1)
    w.transport.abort()
    # 3. a download abandoned in the middle
    r, w = await tunnel()
    await w.start_tls(ctx, server_hostname="localhost")
    w.write(f"GET /bytes/{50 << 20} HTTP/1.1\r\nHost: localhost:{origin}\r\n\r\n".encode())
    await r.readexactly(1 << 20)
    w.transport.abort()
    # and the proxy still serves
    rc, out, err = await curl(
        "-x", px.http, "--cacert", str(px.ca_cert), f"https://localhost:{origin}/hello"
    )
    assert rc == 0 and out == "hello GET /hello", err
    for _ in range(200):
        if await px.metric("proxytap_intercept_sessions_active") == 0:
            break
        await asyncio.sleep(0.05)
    assert await px.metric("proxytap_intercept_sessions_active") == 0
    assert (
        await px.metric(
            "proxytap_downstream_connections_active", listener="http", protocol="http-connect"
        )
        == 0
    )
    records = px.flows()
    assert len(records) == 4, records  # every tunnel's flow ended and was logged
    assert not any("Traceback" in line for line in px.lines), "".join(px.lines)


# == long-running: intercepted sessions give their memory back ===========================


@pytest.mark.slow
async def test_rounds_of_intercepted_sessions_do_not_grow(px: Intercepting, origin: int) -> None:
    """Rounds of 300 intercepted sessions (a GET each); RSS levels off after the first."""
    ctx = ssl.create_default_context(cafile=str(px.ca_cert))
    connect = f"CONNECT localhost:{origin} HTTP/1.1\r\nHost: localhost:{origin}\r\n\r\n".encode()
    request = f"GET /bytes/20000 HTTP/1.1\r\nHost: localhost:{origin}\r\nConnection: close\r\n\r\n"
    gate = asyncio.Semaphore(30)

    async def session() -> None:
        async with gate:
            r, w = await asyncio.open_connection("127.0.0.1", px.ports["http"])
            w.write(connect)
            await r.readuntil(b"\r\n\r\n")
            await w.start_tls(ctx, server_hostname="localhost")
            w.write(request.encode())
            data = await asyncio.wait_for(r.read(), 30)
            assert data.startswith(b"HTTP/1.1 200") and len(data) > 20000
            w.close()

    assert px.proc.pid is not None
    status = Path(f"/proc/{px.proc.pid}/status")

    def rss() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) << 10

    sizes = []
    for _ in range(5):
        await asyncio.gather(*(session() for _ in range(300)))
        for _ in range(400):
            if await px.metric("proxytap_intercept_sessions_active") == 0:
                break
            await asyncio.sleep(0.05)
        sizes.append(rss())
    grown = sizes[-1] - sizes[1]
    assert grown < 16 << 20, [s >> 20 for s in sizes]


async def test_connection_close_inside_tls_ends_the_connection(
    px: Intercepting, origin: int
) -> None:
    """Hop-by-hop fields are the rules' to strip, but Connection: close still ends the leg."""
    ctx = ssl.create_default_context(cafile=str(px.ca_cert))
    r, w = await asyncio.open_connection("127.0.0.1", px.ports["http"])
    w.write(f"CONNECT localhost:{origin} HTTP/1.1\r\nHost: localhost:{origin}\r\n\r\n".encode())
    await r.readuntil(b"\r\n\r\n")
    await w.start_tls(ctx, server_hostname="localhost")
    w.write(
        f"GET /hello HTTP/1.1\r\nHost: localhost:{origin}\r\nConnection: close\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(r.read(), 10)  # to the end: the proxy closes after it
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello GET /hello"
    assert b"connection: close" in head.lower()
    w.close()


async def test_response_refused_by_the_rules_inside_tls_is_a_502(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    """A response with more header fields than limits.max_headers: 502, as in plain HTTP."""
    px = await start_intercepting(home, tmp_path, pki, extra="\n[limits]\nmax_headers = 30\n")
    try:
        rc, out, err = await curl(
            "-x", px.http, "--cacert", str(px.ca_cert), "-i", f"https://localhost:{origin}/many"
        )
        assert rc == 0, err
        assert final_status(out) == 502, out
        assert "proxy-status: proxytap; error=" in out.lower()
        assert "x-h39" not in out.lower()
        # a response within the limit passes
        rc, out, err = await curl(
            "-x", px.http, "--cacert", str(px.ca_cert), f"https://localhost:{origin}/many?n=5"
        )
        assert rc == 0 and out == "many", err
        assert await px.metric("proxytap_intercept_refusals_total", what="response") == 1
    finally:
        await px.stop()


async def test_listener_modules_run_inside_tls(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    """addons/strip_tracking on the listener: the origin never sees utm_* inside TLS either."""
    addons = ADDONS
    px = await start_intercepting(
        home,
        tmp_path,
        pki,
        listener='client_to_server = ["validate", "rewrite", "strip_tracking"]',
        extra=f'\n[modules]\npath = ["{addons}"]\n',
    )
    try:
        rc, out, err = await curl(
            "-x",
            px.http,
            "--cacert",
            str(px.ca_cert),
            "-H",
            "Cookie: _ga=GA1.2.3; session=abc",
            f"https://localhost:{origin}/echo?utm_source=mail&q=1&gclid=x",
        )
        assert rc == 0, err
        seen = json.loads(out)
        assert seen["path"] == "/echo?q=1"
        cookies = [v for k, v in seen["headers"] if k.lower() == "cookie"]
        assert cookies == ["session=abc"]
    finally:
        await px.stop()


# == reload: interception lists change on SIGHUP, pins survive ==============================


async def test_sighup_turns_interception_on_and_keeps_the_pins(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    px = await start_intercepting(home, tmp_path, pki, tls='intercept = ["other.test"]')
    cfg = tmp_path / "proxytap.toml"
    url = f"https://localhost:{origin}/hello"
    try:

        async def get(cacert: Path) -> tuple[int, Endpoint | None, str]:
            rc, out, err = await curl(
                "-x", px.http, "--cacert", str(cacert), "-w", "\n%{local_ip} %{local_port}", url
            )
            body, _, w = out.rpartition("\n")
            return rc, local(w) if rc == 0 else None, body or err

        async def reload(lines: int) -> None:
            assert px.proc.pid is not None
            os.kill(px.proc.pid, signal.SIGHUP)
            for _ in range(200):
                if sum("config reloaded" in line for line in px.lines) >= lines:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("".join(px.lines[-20:]))

        rc, client, body = await get(pki.ca_pem)  # localhost is not listed: passed through
        assert rc == 0 and client is not None, body
        await _flow_logged(px, client, decrypted=False)
        cfg.write_text(
            cfg.read_text().replace('intercept = ["other.test"]', 'intercept = ["localhost"]')
        )
        await reload(1)
        rc, client, body = await get(px.ca_cert)  # now intercepted
        assert rc == 0 and client is not None and body == "hello GET /hello", body
        await _flow_logged(px, client, decrypted=True)
        rc, _, _ = await get(pki.ca_pem)  # a client that rejects the leaf: pinned
        assert rc != 0
        assert await px.metric("proxytap_intercept_pinned_pairs") == 1
        await reload(2)  # no change: the pin stays
        assert await px.metric("proxytap_intercept_pinned_pairs") == 1
        rc, client, body = await get(pki.ca_pem)
        assert rc == 0 and client is not None, body
        await _flow_logged(px, client, decrypted=False)
    finally:
        await px.stop()


async def test_refused_request_bodies_are_read_only_when_small(
    px: Intercepting, origin: int, tmp_path: Path
) -> None:
    """PATCH is not allowed: a small body is read and the client gets the 501 (exported
    whole); a large one is not read: its connection is closed."""
    tap = await px.tap("tcp/http")
    try:
        rc, out, err = await curl(
            "-x", px.http, "--cacert", str(px.ca_cert), "-i", "-X", "PATCH",
            "--data-binary", "hello", f"https://localhost:{origin}/echo",
        )  # fmt: skip
        assert rc == 0, err
        assert final_status(out) == 501, out
        _, up, down = await one_flow(tap)
    finally:
        tap.close()
    ((req, resp),) = http_pairs(up, down)
    assert req.head.method == b"PATCH" and req.body == b"hello"  # type: ignore[union-attr]
    assert resp.head.status_code == 501
    big = tmp_path / "big"
    big.write_bytes(b"x" * (4 << 20))
    rc, out, err = await curl(
        "-x", px.http, "--cacert", str(px.ca_cert), "-X", "PATCH",
        "--data-binary", f"@{big}", f"https://localhost:{origin}/echo",
    )  # fmt: skip
    assert rc != 0, out  # closed unanswered: the 4 MiB were never read to refuse them
    assert await px.metric("proxytap_intercept_refusals_total", what="request") == 2


# == export overload "wait": the decrypted flow waits for a slow analyzer, loses nothing ====


async def test_wait_policy_holds_an_intercepted_download_for_a_throttled_reader(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    size, mbps, buffers = 24 << 20, 20.0, 1 << 20
    px = await start_intercepting(
        home,
        tmp_path,
        pki,
        export=f'overload = "wait"\nmax_wait = 5.0\nreader_sndbuf = {buffers}\n'
        f"reader_buffer = {buffers}\n",
    )
    reader = Consumer("reader", home / "tcp" / "http", tmp_path, "throttled", throttle=mbps)
    try:
        await asyncio.to_thread(reader.start)
        rc, out, err = await curl(
            "-x", px.http, "--cacert", str(px.ca_cert), "-o", "/dev/null",
            "-w", "%{size_download} %{time_total} %{local_ip} %{local_port}",
            f"https://localhost:{origin}/bytes/{size}",
        )  # fmt: skip
        assert rc == 0, err
        got, seconds, _, port = out.split()
        assert int(got) == size
        final = await asyncio.to_thread(
            reader.wait, lambda s: any(f["destroyed"] for f in s["flows"].values()), 120, "end"
        )
        dropped = await px.metric_sum("proxytap_export_dropped_bytes_total", sink="sftap")
        waited = await px.metric_sum("proxytap_export_wait_seconds_total", sink="sftap")
    finally:
        await asyncio.to_thread(reader.kill)
        await px.stop()
    assert dropped == 0 and waited > 0
    (flow,) = [f for f in final["flows"].values() if int(port) in (f["port1"], f["port2"])]
    assert final["short_reads"] == 0 and final["parse_errors"] == 0
    body = sum(s["bytes"] for s in flow["streams"].values())
    assert body > size  # every byte of the response (and its head, and the request)
    # ahead of the reader by at most its socket buffers, proxytap's queue and some slack
    floor = (size - 2 * buffers - 2 * buffers - (1 << 20)) / (mbps * 1e6)
    assert float(seconds) >= floor - 0.05, (seconds, floor)


# == shutdown: an open intercepted connection drains, then is closed ======================


async def test_sigterm_closes_an_open_intercepted_connection_after_the_grace(
    home: Path, tmp_path: Path, pki: Pki, origin: int
) -> None:
    px = await start_intercepting(home, tmp_path, pki, extra="\n[timeouts]\nshutdown_grace = 1.0\n")
    ctx = ssl.create_default_context(cafile=str(px.ca_cert))
    r, w = await asyncio.open_connection("127.0.0.1", px.ports["http"])
    w.write(f"CONNECT localhost:{origin} HTTP/1.1\r\nHost: localhost:{origin}\r\n\r\n".encode())
    await r.readuntil(b"\r\n\r\n")
    await w.start_tls(ctx, server_hostname="localhost")
    client = w.get_extra_info("sockname")[:2]
    w.write(f"GET /hello HTTP/1.1\r\nHost: localhost:{origin}\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert await px.metric("proxytap_intercept_sessions_active") == 1
    assert px.proc.pid is not None
    os.kill(px.proc.pid, signal.SIGTERM)
    rest = await asyncio.wait_for(r.read(), 15)  # the keep-alive connection is closed
    assert b"hello GET /hello" in rest
    assert await asyncio.wait_for(px.proc.wait(), 15) == 0
    w.close()
    (record,) = [f for f in px.flows() if (f["id.orig_h"], f["id.orig_p"]) == tuple(client)]
    assert record["decrypted"] is True and record["close_reason"] == "shutdown"
    await px.stop()
