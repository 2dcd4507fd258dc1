"""What the interception tests share: a real proxytap process, HTTPS origins, export readers.

* ``Intercepting``: ``proxytap run`` as a subprocess (``tests.proxyproc``)
  with a TOML config written here (listeners, ``[tls]`` interception of
  ``localhost``, the test CA trusted for origins, SF-TAP flow sockets, the
  JSON flow log, the admin server).
* Origins: an aiohttp HTTPS origin with an echo of the request head, a
  WebSocket echo and a byte source; a hypercorn origin that speaks HTTP/2.
* ``http_pairs``: the decrypted export parsed the way an HTTP/1.1 analyzer
  parses a flow, with h11 (strict): the requests of the client-to-server
  bytes, then the responses of the other direction, paired in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
from aiohttp import WSMsgType, web

from tests.certs import Pki
from tests.conftest import origin_app, start_origin
from tests.export.sftap_helpers import TapReader
from tests.proxyproc import Proxytap, launch


@dataclass
class Intercepting(Proxytap):
    """A proxytap process with interception configured, and where its CA is."""

    ca_dir: Path = Path()

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "proxytap-ca-cert.pem"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def socks(self) -> str:
        return f"127.0.0.1:{self.ports['socks']}"

    async def tap(self, name: str) -> TapReader:
        assert self.home is not None
        return await TapReader.connect(self.home / name)


def config_text(
    home: Path,
    ca_dir: Path,
    flow_log: Path,
    pki: Pki,
    extra: str = "",
    listener: str = "",
    export: str = "",
) -> str:
    return f"""
[[listeners]]
kind = "http"
address = "127.0.0.1:0"
name = "http"
{listener}

[[listeners]]
kind = "socks"
address = "127.0.0.1:0"
name = "socks"

[access]
allow_dest = ["127.0.0.0/8", "::1/128"]
connect_ports = ["1-65535"]

[tls]
ca_dir = "{ca_dir}"
upstream_ca = "{pki.ca_pem}"
{extra}

[export]
sftap_home = "{home}"
{export}

[log]
flows = "{flow_log}"

[admin]
address = "127.0.0.1:0"
"""


async def start_intercepting(
    home: Path,
    work: Path,
    pki: Pki,
    tls: str = 'intercept = ["localhost"]',
    extra: str = "",
    listener: str = "",
    export: str = "",
) -> Intercepting:
    """proxytap with ``[tls]`` lines ``tls``, more TOML in ``extra``, ``listener``
    lines in the HTTP listener's table and ``export`` lines in ``[export]``."""
    ca_dir = work / "ca"
    flow_log = work / "flows.jsonl"
    cfg = work / "proxytap.toml"
    cfg.write_text(config_text(home, ca_dir, flow_log, pki, tls, listener, export) + extra)
    px = await launch(cfg)
    base = {f.name: getattr(px, f.name) for f in dataclasses.fields(px)}
    return Intercepting(**{**base, "flow_log": flow_log, "home": home}, ca_dir=ca_dir)


# -- origins ------------------------------------------------------------------------------


def echo_app() -> web.Application:
    """The tests' origin (``/hello``, ``/bytes/N``, ``/upload``) with ``/echo`` (the
    request head as JSON), ``/many`` (N header fields) and ``/ws`` (a WebSocket echo)."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": len(body),
            }
        )

    async def many(request: web.Request) -> web.Response:
        n = int(request.query.get("n", "40"))
        return web.Response(text="many", headers={f"X-H{i}": str(i) for i in range(n)})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo " + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(b"echo " + msg.data)
        return sock

    app = origin_app()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/many", many)
    app.router.add_get("/ws", ws)
    return app


@contextlib.asynccontextmanager
async def https_origin(ctx: ssl.SSLContext, host: str = "127.0.0.1") -> AsyncIterator[int]:
    origin = await start_origin(host, ctx, echo_app())
    try:
        yield origin.port
    finally:
        await origin.runner.cleanup()


@contextlib.asynccontextmanager
async def h2_origin(pki: Pki) -> AsyncIterator[int]:
    """hypercorn over TLS offering h2 (ALPN) and http/1.1; answers ``PROTO PATH``."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HConfig

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = f"{scope['http_version']} {scope['path']}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    cfg = HConfig()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.certfile = str(pki.cert_pem)
    cfg.keyfile = str(pki.key_pem)
    cfg.alpn_protocols = ["h2", "http/1.1"]
    cfg.accesslog = None
    cfg.errorlog = None
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        serve(app, cfg, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    )
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


# -- the export as an HTTP/1.1 analyzer reads it ------------------------------------------


@dataclass
class Message:
    head: h11.Request | h11.Response | h11.InformationalResponse
    body: bytes


def _events(conn: h11.Connection) -> list[Any]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            return out
        out.append(ev)


def http_pairs(up: bytes, down: bytes) -> list[tuple[Message, Message]]:
    """Every request of ``up`` with its response in ``down``, parsed strictly (h11)."""
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    server.receive_data(up)
    server.receive_data(b"")
    requests: list[Message] = []
    while True:
        ev = server.next_event()
        if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
            break
        assert isinstance(ev, h11.Request), ev
        body = b""
        while True:
            nxt = server.next_event()
            if isinstance(nxt, h11.Data):
                body += nxt.data
            elif isinstance(nxt, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"request {ev.target!r} cut: {nxt}")
        requests.append(Message(ev, body))
        server.send(h11.Response(status_code=204, headers=[]))
        server.send(h11.EndOfMessage())
        server.start_next_cycle()
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    client.receive_data(down)
    pairs = []
    for req in requests:
        head = req.head
        assert isinstance(head, h11.Request)
        client.send(h11.Request(method=head.method, target=head.target, headers=head.headers))
        if req.body:
            client.send(h11.Data(data=req.body))
        client.send(h11.EndOfMessage())
        resp: h11.Response | None = None
        body = b""
        while True:
            ev = client.next_event()
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:  # a protocol switch: the HTTP part ends here
                    pairs.append((req, Message(ev, b"")))
                    return pairs
                continue
            if isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"response to {head.target!r} cut: {ev}")
        assert resp is not None
        pairs.append((req, Message(resp, body)))
        if resp.status_code == 101:
            break
        client.start_next_cycle()
    return pairs


def header(msg: Message, name: str) -> str | None:
    for k, v in msg.head.headers:
        if k.decode().lower() == name.lower():
            return v.decode("latin-1")
    return None
