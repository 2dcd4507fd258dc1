"""Acceptance: headless Chromium loads an HTTPS page through proxytap, intercepted and not.

Everything is real: Debian's Chromium (the binary under ``/usr/lib/chromium``,
not the wrapper script), a proxytap process, nginx as the origin (TLS, HTTP/2
offered by ALPN), ``certutil`` making the browser's NSS trust store, the JSON
flow log and the SF-TAP flow sockets read as analyzers read them.

The browser proves the certificate chain itself: each load runs with a trust
store holding ONE anchor. The intercepted load (``localhost``, listed in
``tls.intercept``) trusts only proxytap's CA, so the page can only arrive if
proxytap terminated TLS with a leaf of its own; the passthrough load
(``127.0.0.1``, not listed) trusts only the origin's test CA, so it can only
arrive if nginx's own certificate reached the browser. nginx's access log says
who spoke TLS to it: Chromium's ClientHello carries GREASE cipher suites
(shown by nginx as ``0x?a?a``), the engine's OpenSSL never does.

Chromium facts the set-up relies on: it bypasses a proxy for loopback names
unless ``--proxy-bypass-list=<-loopback>``; at start it asks Google hosts for
accounts and component updates unless ``--gaia-url`` and
``--component-updater=url-source=`` point elsewhere (here: a local sink that
answers 404) and background networking is off; it asks Google for the time
unless the ``NetworkTimeServiceQuerying`` feature is off, and for a spelling
dictionary unless the profile's preferences turn spell checking off; as root it
needs ``--no-sandbox``; it reads its trust store from ``$HOME/.pki/nssdb``.
Every destination proxytap is asked for is checked: the origin and the sink only.
A page load may open more than one tunnel to the origin (Chromium preconnects
a spare socket, which may stay unused): the assertions hold for every tunnel,
and exactly one carries the exchanges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxytap.proto.sftap import CREATED, DATA, DESTROYED, Event
from tests.certs import Pki, make_pki
from tests.conftest import closed_port
from tests.export.sftap_helpers import TapReader, check_stream, short_tmp
from tests.intercept.interception import header, http_pairs
from tests.proxyproc import Proxytap, launch

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the real binary; /usr/bin/chromium is a script
NGINX = Path("/usr/sbin/nginx")
START_WITHIN = 30.0  # seconds for nginx or proxytap to come up (two busy cores)
BROWSER_WITHIN = 120.0  # seconds for one headless page load, start to exit
EXPORT_WITHIN = 30.0  # seconds for a finished flow to reach the flow log and the flow sockets

# the icon is inline: a /favicon.ico request would race the browser's exit after --dump-dom
PAGE = """<!doctype html>
<html><head><title>proxytap acceptance</title><link rel="icon" href="data:,">
<script src="/app.js"></script></head>
<body><p id="greeting">served by the origin</p><p id="script">script not run</p></body></html>
"""
# a second resource on the same connection: the DOM shows that it arrived and ran
SCRIPT = """document.addEventListener("DOMContentLoaded", function () {
  document.getElementById("script").textContent = "script ran: " + location.host;
});
"""
GREASE = re.compile(r"0x([0-9a-f])a\1a")  # RFC 8701 values as nginx prints unknown suites

# -- nginx, the origin ------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ text/html html; application/javascript js; }}
    log_format probe escape=json '{{"remote":"$remote_addr","remote_port":"$remote_port",'
        '"protocol":"$server_protocol","uri":"$request_uri","host":"$host",'
        '"status":"$status","sni":"$ssl_server_name","tls":"$ssl_protocol",'
        '"alpn":"$ssl_alpn_protocol","ciphers":"$ssl_ciphers","conn":"$connection"}}';
    access_log {dir}/access.log probe;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {dir}/www;
    }}
}}
"""


@dataclass
class Nginx:
    """nginx in the foreground with a throwaway prefix; its access log read as JSON lines."""

    dir: Path
    pki: Pki
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        www = self.dir / "www"
        www.mkdir(parents=True)
        (www / "index.html").write_text(PAGE)
        (www / "app.js").write_text(SCRIPT)
        self.port = closed_port()
        # as root the master hands requests to workers as "nobody", who cannot read pytest's
        # 0700 temporary directories: keep the workers as the user running the test
        user = "user root;" if os.geteuid() == 0 else ""
        conf = self.dir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=self.dir,
                port=self.port,
                cert=self.pki.cert_pem,
                key=self.pki.key_pem,
                user=user,
            )
        )
        argv = [str(NGINX), "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")]
        with open(self.dir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_pem))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        deadline = time.monotonic() + START_WITHIN
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited {self.proc.returncode}: {self.errors()}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    assert tls.selected_alpn_protocol() == "h2", "nginx does not offer h2"
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nginx not serving: {self.errors()}") from None
                time.sleep(0.05)

    def errors(self) -> str:
        text = ""
        for name in ("stderr", "error.log"):
            with contextlib.suppress(FileNotFoundError):
                text += (self.dir / name).read_text(errors="replace")
        return text[-3000:]

    def access(self) -> list[dict[str, str]]:
        try:
            lines = (self.dir / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown, workers included
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# -- proxytap ---------------------------------------------------------------------------------


def proxytap_config(work: Path, sftap_home: Path, upstream_ca: Path) -> Path:
    """An HTTP listener, admin, interception of ``localhost``, the flow log, flow sockets."""
    config = work / "proxytap.toml"
    config.write_text(
        "[[listeners]]\n"
        'name = "http"\nkind = "http"\naddress = "127.0.0.1:0"\n\n'
        '[admin]\naddress = "127.0.0.1:0"\n\n'
        "[access]\n"
        'allow_dest = ["127.0.0.0/8", "::1/128"]\nconnect_ports = ["1-65535"]\n\n'
        "[tls]\n"
        f'ca_dir = "{work / "ca"}"\nintercept = ["localhost"]\n'
        f'upstream_ca = "{upstream_ca}"\n\n'
        f'[log]\nflows = "{work / "flows.jsonl"}"\n\n'
        f'[export]\nsftap_home = "{sftap_home}"\n'
        # export.classify_timeout stays at its default: an intercepted flow's timer
        # starts at its first decrypted byte (Hub.rearm), not at the CONNECT
    )
    return config


# -- the browser ------------------------------------------------------------------------------


def make_home(home: Path, anchor: Path, nickname: str) -> Path:
    """A HOME whose NSS database (``~/.pki/nssdb``) trusts ``anchor`` alone, for TLS servers."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    for argv in (
        ["certutil", "-N", "--empty-password", "-d", f"sql:{db}"],
        ["certutil", "-A", "-n", nickname, "-t", "C,,", "-i", str(anchor), "-d", f"sql:{db}"],
    ):
        done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
    listed = subprocess.run(
        ["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, timeout=60, check=True
    ).stdout.decode()
    assert re.search(rf"^{nickname}\s+C,,", listed, re.M), listed
    return home


@dataclass
class Load:
    """One headless page load: exit status, the DOM, Chromium's stderr (kept for failures)."""

    returncode: int
    dom: str
    stderr: str

    def why(self) -> str:
        return f"chromium exited {self.returncode}; stderr (tail):\n{self.stderr[-4000:]}"


def chromium_argv(url: str, proxy_port: int, sink_port: int, profile: Path) -> list[str]:
    """Headless Chromium through proxytap at ``proxy_port``, printing the DOM of ``url``."""
    (profile / "Default").mkdir(parents=True)
    # spell checking on would fetch a dictionary from redirector.gvt1.com
    prefs = {"browser": {"enable_spellchecking": False}}
    (profile / "Default" / "Preferences").write_text(json.dumps(prefs))
    sink = f"http://127.0.0.1:{sink_port}"
    return [
        str(CHROMIUM),
        "--headless=new",
        "--no-sandbox",
        f"--proxy-server=http://127.0.0.1:{proxy_port}",
        "--proxy-bypass-list=<-loopback>",
        "--disable-background-networking",
        "--disable-features=NetworkTimeServiceQuerying",  # clients2.google.com/time
        f"--gaia-url={sink}",
        f"--component-updater=url-source={sink}/component-updater",
        "--disable-breakpad",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--password-store=basic",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]


async def load_page(url: str, home: Path, proxy_port: int, sink_port: int, work: Path) -> Load:
    """Chromium loads ``url`` through proxytap, with ``home`` as HOME (its NSS trust store).

    Run in its own process group, which is killed afterwards: the browser's
    helpers (zygote, renderer, GPU, crash handler) go with it. Its output is
    read to the end either way, so that a failure can show its stderr.
    """
    argv = chromium_argv(url, proxy_port, sink_port, work / "profile")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HOME"] = str(home)
    env.pop("SSLKEYLOGFILE", None)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=work,
        start_new_session=True,
    )
    out, err = bytearray(), bytearray()

    async def drain(stream: asyncio.StreamReader | None, into: bytearray) -> None:
        assert stream is not None
        while chunk := await stream.read(1 << 16):
            into += chunk

    readers = asyncio.gather(drain(proc.stdout, out), drain(proc.stderr, err), proc.wait())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(readers), BROWSER_WITHIN)
    except TimeoutError:
        timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(readers, 30)  # the group is gone: the pipes end
    stderr = err.decode(errors="replace")
    assert not timed_out, f"chromium not done within {BROWSER_WITHIN}s; stderr:\n{stderr[-4000:]}"
    assert proc.returncode is not None
    return Load(proc.returncode, out.decode(errors="replace"), stderr)


# -- a sink for the browser's own requests ---------------------------------------------------


@dataclass
class Sink:
    """Where Chromium's account and component-update requests go: answered 404."""

    runner: web.AppRunner
    port: int


@contextlib.asynccontextmanager
async def sink() -> AsyncIterator[Sink]:
    async def anything(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield Sink(runner, port)
    finally:
        await runner.cleanup()


# -- the analyzers ----------------------------------------------------------------------------


@dataclass
class Tapped:
    """One SF-TAP flow: its events, payload both ways."""

    created: Event
    up: bytearray = field(default_factory=bytearray)
    down: bytearray = field(default_factory=bytearray)
    destroyed: Event | None = None

    @property
    def ports(self) -> set[int]:
        return {self.created.key.port1, self.created.key.port2}


class Analyzer:
    """A reader on one flow socket, collecting in the background (as an analyzer reads)."""

    def __init__(self, reader: TapReader, name: str) -> None:
        self.reader = reader
        self.name = name
        self.events: list[tuple[Event, bytes]] = []
        self.task = asyncio.create_task(self._read())
        self.error: BaseException | None = None

    async def _read(self) -> None:
        try:
            while True:
                self.events.append(await self.reader.event())
        except (EOFError, asyncio.IncompleteReadError):
            return
        except Exception as exc:
            self.error = exc

    def flows(self) -> list[Tapped]:
        """Every flow seen so far, in CREATED order."""
        flows: dict[str, Tapped] = {}
        for ev, body in self.events:
            k = ev.key.prefix
            if ev.event == CREATED:
                flows[k] = Tapped(ev)
            elif ev.event == DATA and k in flows:
                (flows[k].up if ev.match == "up" else flows[k].down).extend(body)
            elif ev.event == DESTROYED and k in flows:
                flows[k].destroyed = ev
        return list(flows.values())

    async def finished(self, port: int) -> list[Tapped]:
        """The flows touching ``port`` once there is one and every flow seen so far is over."""
        deadline = asyncio.get_running_loop().time() + EXPORT_WITHIN
        while True:
            assert self.error is None, f"{self.name}: {self.error!r}"
            flows = self.flows()
            mine = [f for f in flows if port in f.ports]
            if mine and all(f.destroyed is not None for f in flows):
                check_stream(self.events)  # SF-TAP framing rules over everything read
                return mine
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"{self.name}: no finished flow to port {port} within {EXPORT_WITHIN}s: "
                    f"{[(f.created.key, f.destroyed) for f in flows]}"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.reader.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# -- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    work: Path
    pki: Pki
    nginx: Nginx
    proxy: Proxytap
    sink: Sink
    http_tap: Analyzer  # on tcp/http
    ssl_tap: Analyzer  # on tcp/ssl

    @property
    def proxy_port(self) -> int:
        return self.proxy.port("http")

    @property
    def proxy_ca(self) -> Path:
        return self.work / "ca" / "proxytap-ca-cert.pem"

    def log(self) -> str:
        return "".join(self.proxy.lines)

    def diagnostics(self) -> str:
        return (
            f"proxytap log:\n{self.log()[-3000:]}\nnginx:\n{self.nginx.errors()}\n"
            f"access: {self.nginx.access()}"
        )


@pytest.fixture
def origin_pki(tmp_path: Path) -> Pki:
    """The origin's test CA and certificate, once the tools are known to be there."""
    for tool in ("certutil", str(NGINX), str(CHROMIUM)):
        assert shutil.which(tool), f"{tool} missing: run tests/setup-tools.sh"
    return make_pki(tmp_path, names=("localhost",))  # SANs: localhost, 127.0.0.1, ::1


@pytest.fixture
def nginx(tmp_path: Path, origin_pki: Pki) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", origin_pki)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def stack(tmp_path: Path, origin_pki: Pki, nginx: Nginx) -> AsyncIterator[Stack]:
    with short_tmp() as short:
        sf = short / "sf"
        px = await launch(proxytap_config(tmp_path, sf, origin_pki.ca_pem))
        px.flow_log, px.home = tmp_path / "flows.jsonl", sf
        try:
            async with sink() as browser_sink:
                http = Analyzer(await TapReader.connect(sf / "tcp" / "http"), "tcp/http")
                ssl_ = Analyzer(await TapReader.connect(sf / "tcp" / "ssl"), "tcp/ssl")
                try:
                    deadline = asyncio.get_running_loop().time() + START_WITHIN
                    # both readers accepted before the browser starts
                    while await px.metric("proxytap_export_subscribers", sink="sftap") < 2:
                        assert asyncio.get_running_loop().time() < deadline, "readers not seen"
                        await asyncio.sleep(0.05)
                    yield Stack(tmp_path, origin_pki, nginx, px, browser_sink, http, ssl_)
                finally:
                    await http.close()
                    await ssl_.close()
        finally:
            await px.stop()
        assert px.proc.returncode == 0, "".join(px.lines)[-3000:]


# -- the tests --------------------------------------------------------------------------------


async def settled(stack: Stack) -> list[dict[str, Any]]:
    """Once the browser is gone: no connection or flow open, every closed flow in the log."""
    proxy = stack.proxy
    deadline = asyncio.get_running_loop().time() + EXPORT_WITHIN
    while True:
        open_ = await proxy.metric_sum("proxytap_downstream_connections_active")
        open_ += await proxy.metric_sum("proxytap_flows_active")
        closed = await proxy.metric_sum("proxytap_flows_closed_total")
        records = proxy.flows()
        if open_ == 0 and closed > 0 and len(records) == closed:
            return records
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"not settled within {EXPORT_WITHIN}s: {open_} open, {closed} closed, "
                f"{len(records)} logged\n{stack.diagnostics()}"
            )
        await asyncio.sleep(0.05)


DESTINATION = re.compile(r"-> (\S+):\d+ |proxytap\.access: \S+ [A-Z]+ (\S+):\d+/")


def destinations(log: str) -> set[str]:
    """The hosts proxytap was asked to reach, from its access and failure lines."""
    return {a or b for a, b in DESTINATION.findall(log)}


def assert_page(load: Load, host: str) -> None:
    assert load.returncode == 0, load.why()
    assert "<title>proxytap acceptance</title>" in load.dom, (load.dom, load.why())
    assert '<p id="greeting">served by the origin</p>' in load.dom, load.dom
    assert f'<p id="script">script ran: {host}</p>' in load.dom, (load.dom, load.why())


def assert_only_origin_and_sink(stack: Stack, records: list[dict[str, Any]], host: str) -> None:
    """The browser asked for nothing but the origin and the local sink (no Google hosts)."""
    asked = destinations(stack.log())
    assert asked <= {"127.0.0.1", host} and host in asked, (asked, stack.log()[-3000:])
    ports = {(r["id.resp_h"], r["id.resp_p"]) for r in records}
    assert ports <= {("127.0.0.1", stack.nginx.port), ("127.0.0.1", stack.sink.port)}, records


async def test_chromium_page_intercepted_over_http2(stack: Stack) -> None:
    """``localhost`` is intercepted: Chromium trusts only proxytap's CA and speaks h2 to it."""
    origin = f"localhost:{stack.nginx.port}"
    home = make_home(stack.work / "home-intercept", stack.proxy_ca, "proxytap")
    load = await load_page(
        f"https://{origin}/", home, stack.proxy_port, stack.sink.port, stack.work / "chromium"
    )
    assert_page(load, origin)

    # the flow log: decrypted tunnels (h2 offered by the client); one carries the exchanges
    records = await settled(stack)
    assert_only_origin_and_sink(stack, records, "localhost")
    tunnels = [r for r in records if r["id.resp_p"] == stack.nginx.port]
    for r in tunnels:
        assert r["decrypted"] is True, r
        assert r["sni"] == r["requested_host"] == "localhost", r
        assert "h2" in (r["alpn"] or "").split(","), r
        assert r["id.resp_h"] == r["id.orig_h"] == "127.0.0.1", r
        assert r["id.orig_p"] not in (stack.proxy_port, stack.nginx.port), r
        assert r["tunnel"] == "http-connect", r
        # a browser that exits may abort a socket (unread TLS tickets on a spare one): reset
        assert r["close_reason"] in ("normal", "reset"), r
    busy = [r for r in tunnels if r["orig_bytes"] or r["resp_bytes"]]
    assert len(busy) == 1, tunnels
    rec = busy[0]
    assert rec["service"] == "http", rec
    assert rec["tls_version"] == "TLSv1.3", rec
    assert rec["tls_cipher"], rec

    # what the browser spoke to proxytap: HTTP/2, both exchanges (the page, its script)
    h2 = await stack.proxy.metric("proxytap_intercept_requests_total", protocol="http2")
    h1 = await stack.proxy.metric("proxytap_intercept_requests_total", protocol="http1")
    assert (h2, h1) == (2, 0), stack.nginx.access()

    # what proxytap spoke to nginx: TLS with SNI localhost, HTTP/2, from OpenSSL (no GREASE)
    access = stack.nginx.access()
    assert sorted(a["uri"] for a in access) == ["/", "/app.js"], access
    for a in access:
        assert a["protocol"] == "HTTP/2.0" and a["alpn"] == "h2", a
        assert a["sni"] == a["host"] == "localhost", a
        assert a["tls"] == "TLSv1.3" and a["status"] == "200", a
        assert not GREASE.search(a["ciphers"]), a  # not Chromium's own ClientHello

    # the analyzer on tcp/http: the true client and origin, the exchanges rendered as HTTP/1.1
    flows = await stack.http_tap.finished(stack.nginx.port)
    assert len(flows) == 1, [f.created.key for f in flows]
    f = flows[0]
    key = f.created.key
    assert (key.ip1, key.ip2, key.l3, key.l4) == ("127.0.0.1", "127.0.0.1", "ipv4", "tcp"), key
    assert f.ports == {rec["id.orig_p"], stack.nginx.port}, (key, rec)  # never the proxy's
    up, down = bytes(f.up), bytes(f.down)
    assert up.startswith(b"GET / HTTP/1.1\r\n"), up[:300]
    assert down.startswith(b"HTTP/1.1 200 "), down[:300]
    assert (len(up), len(down)) == (rec["orig_bytes"], rec["resp_bytes"]), rec
    # read as an HTTP/1.1 analyzer reads it (strictly): two exchanges, whole, in order
    pairs = http_pairs(up, down)
    assert [(q.head.method, q.head.target) for q, _ in pairs] == [  # type: ignore[union-attr]
        (b"GET", b"/"),
        (b"GET", b"/app.js"),
    ], pairs
    for (req, resp), body in zip(pairs, (PAGE, SCRIPT), strict=True):
        assert header(req, "host") == origin, req
        assert resp.head.status_code == 200 and resp.body == body.encode(), resp
    assert f.destroyed is not None and f.destroyed.reason == rec["close_reason"].upper(), rec
    # nothing of it on tcp/ssl: it was decrypted (ciphertext export is off)
    assert not [t.created.key for t in stack.ssl_tap.flows() if stack.nginx.port in t.ports]


async def test_chromium_page_passed_through(stack: Stack) -> None:
    """``127.0.0.1`` is not listed: the browser's own TLS reaches nginx, and only its CA works."""
    origin = f"127.0.0.1:{stack.nginx.port}"
    home = make_home(stack.work / "home-passthrough", stack.pki.ca_pem, "origin-test-ca")
    load = await load_page(
        f"https://{origin}/", home, stack.proxy_port, stack.sink.port, stack.work / "chromium"
    )
    assert_page(load, origin)

    records = await settled(stack)
    assert_only_origin_and_sink(stack, records, "127.0.0.1")
    tunnels = [r for r in records if r["id.resp_p"] == stack.nginx.port]
    for r in tunnels:
        assert r["decrypted"] is False and r["tls_version"] is None, r  # ciphertext only
        assert r["requested_host"] == "127.0.0.1" and r["sni"] is None, r  # no SNI for an IP
        assert r["id.resp_h"] == r["id.orig_h"] == "127.0.0.1", r
        assert r["id.orig_p"] not in (stack.proxy_port, stack.nginx.port), r
        assert r["tunnel"] == "http-connect" and r["close_reason"] in ("normal", "reset"), r
    busy = [r for r in tunnels if r["orig_bytes"]]
    assert busy, tunnels
    for r in busy:
        assert r["service"] == "ssl", r
        assert "h2" in (r["alpn"] or "").split(","), r
    for protocol in ("http1", "http2"):
        assert await stack.proxy.metric("proxytap_intercept_requests_total", protocol=protocol) == 0

    # nginx talked TLS and HTTP/2 with Chromium itself: GREASE in the offered suites, no SNI
    access = stack.nginx.access()
    assert sorted(a["uri"] for a in access) == ["/", "/app.js"], access
    for a in access:
        assert a["protocol"] == "HTTP/2.0" and a["alpn"] == "h2", a
        assert a["sni"] == "" and a["host"] == "127.0.0.1" and a["status"] == "200", a
        assert GREASE.search(a["ciphers"]), a

    # the analyzer on tcp/ssl: the true client and origin, every ciphertext byte both ways
    flows = await stack.ssl_tap.finished(stack.nginx.port)
    assert sorted(tuple(sorted(f.ports)) for f in flows) == sorted(
        tuple(sorted((r["id.orig_p"], stack.nginx.port))) for r in busy
    ), ([f.created.key for f in flows], busy)
    for f in flows:
        (r,) = [r for r in busy if r["id.orig_p"] in f.ports]
        assert (len(f.up), len(f.down)) == (r["orig_bytes"], r["resp_bytes"]), r
        assert f.destroyed is not None and f.destroyed.reason == r["close_reason"].upper(), r
        assert f.up[:1] == b"\x16" and f.down[:1] == b"\x16", (f.up[:8], f.down[:8])
        assert PAGE.encode() not in f.down
    assert not [t.created.key for t in stack.http_tap.flows() if stack.nginx.port in t.ports]
