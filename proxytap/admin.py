"""The admin HTTP server (aiohttp): metrics, health, the live flow table, export subscribers.

Endpoints (all ``GET``; JSON unless said otherwise):

``/healthz``
    200 while the process serves requests at all (liveness). Always open.
``/readyz``
    200 once every listener is bound, 503 before that and from the moment
    shutdown starts (readiness: take the proxy out of a load balancer while it
    drains). Always open.
``/metrics``
    Prometheus text exposition (OpenMetrics when asked for) of the registry.
``/flows``
    The live flow table; query parameters ``client`` (IP or IP:port),
    ``destination`` (requested name, resolved IP, either with ``:port``),
    ``class`` (L7 class, ``unclassified`` for not yet classified), ``state``
    (open, half-closed), ``limit`` (default 1000, at most 100000).
``/subscribers``
    Every export subscriber of the hub with its buffer, counters and drops;
    SF-TAP flow-socket servers list each connected reader.
``/stats``
    Totals for ``proxytap flows --stats``: bytes, flows, connections, drops.
``/ca``, ``/ca.pem``, ``/ca.der``, ``/ca.p12``
    The interception CA (``tls.ca_dir``): an HTML page with install steps for
    Firefox, Chromium, macOS, Windows, Debian/Ubuntu, Android and iOS and the
    certificate's SHA-256 fingerprint, and the certificate itself (never the
    key); 404 with a JSON error while there is no CA.

Authentication: with a token configured, every endpoint except ``/healthz``,
``/readyz`` and the CA's needs ``Authorization: Bearer <token>`` (401
otherwise, with ``WWW-Authenticate: Bearer``). The probes stay open because
orchestrators' probes usually cannot carry secrets and they reveal nothing but
up/ready; the CA certificate is public by nature, and devices being set up
fetch it. The
server binds to loopback unless configured otherwise; a non-loopback address
without a token is logged as a warning at start.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from proxytap import __version__
from proxytap.errors import ConfigError
from proxytap.export.sink import Sink
from proxytap.flows.table import Flow
from proxytap.hostport import hostport
from proxytap.intercept import ca as ca_lib
from proxytap.intercept import onboarding
from proxytap.intercept.ca import CA
from proxytap.metrics import UNCLASSIFIED, register

if TYPE_CHECKING:
    from proxytap.app import App

log = logging.getLogger("proxytap.admin")

# the probes, and the CA certificate and its install page (public by nature: devices
# being set up fetch them, and they carry no secret)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/ca", "/ca.pem", "/ca.der", "/ca.p12"})
CA_TYPES = {
    "pem": "application/x-pem-file",
    "der": "application/x-x509-ca-cert",
    "p12": "application/x-pkcs12",
}
NO_CA = "there is no CA in tls.ca_dir yet: 'proxytap ca init' creates one"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def flow_json(flow: Flow, now: float) -> dict[str, Any]:
    """One row of ``/flows``."""
    outer = flow.outer
    return {
        "id": flow.id,
        "uid": flow.uid,
        "outer_uid": outer.uid,
        "listener": outer.listener,
        "tunnel": outer.protocol,
        "client": {"ip": flow.client[0], "port": flow.client[1]},
        "server": {"ip": flow.server[0], "port": flow.server[1]},
        "requested": {"host": flow.requested_host, "port": flow.requested_port},
        "via": flow.via.proxy if flow.via is not None else None,  # upstream proxy (chaining)
        "l4": flow.l4,
        "l7": flow.l7,
        "state": flow.state.value,
        "start": flow.start,
        "age": round(max(0.0, now - flow.start), 3),
        "bytes_up": flow.bytes_up,
        "bytes_down": flow.bytes_down,
        "chunks_up": flow.chunks_up,
        "chunks_down": flow.chunks_down,
        "sni": flow.sni,
        "alpn": flow.alpn,
        "ja3": flow.ja3,
        "ja4": flow.ja4,
        "http_host": flow.http_host,
        "user": outer.user,
        "decrypted": flow.decrypted,
        "tls_version": flow.tls_version,
        "tls_cipher": flow.tls_cipher,
    }


def _endpoint_match(query: str, host: str, port: int) -> bool:
    return query in (host, f"{host}:{port}", f"[{host}]:{port}")


def subscriber_json(sink: Sink) -> dict[str, Any]:
    """One entry of ``/subscribers``: the common counters plus what the kind adds."""
    s = sink.stats()
    out: dict[str, Any] = {
        "name": s.name,
        "kind": s.kind,
        "connected": s.connected,
        "buffered": s.buffered,
        "flows": s.flows,
        "events": s.events,
        "bytes_sent": s.bytes_sent,
        "drops": s.drops,
        "dropped_bytes": s.dropped_bytes,
    }
    if s.kind != "flowlog":
        out.update(wait_seconds=s.wait_seconds, partial_sends=s.partial_sends, sndbuf=s.sndbuf)
    out.update(s.detail)
    return out


class AdminServer:
    """Serves the admin API for ``app`` on ``host:port``; ``registry`` is injectable."""

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        *,
        token: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.token = token
        if registry is None:
            registry = register(app, CollectorRegistry())
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def web_app(self) -> web.Application:
        """The aiohttp application (routes and the token check)."""
        webapp = web.Application(middlewares=[self._auth])
        webapp.router.add_get("/healthz", self.healthz)
        webapp.router.add_get("/readyz", self.readyz)
        webapp.router.add_get("/metrics", self.metrics)
        webapp.router.add_get("/flows", self.flows)
        webapp.router.add_get("/subscribers", self.subscribers)
        webapp.router.add_get("/stats", self.stats)
        webapp.router.add_get("/ca", self.ca_page)
        for fmt in CA_TYPES:
            webapp.router.add_get(f"/ca.{fmt}", self.ca_file)
        return webapp

    async def start(self) -> None:
        """Bind and serve; an address in use raises ``OSError``."""
        runner = web.AppRunner(self.web_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        for host, port in self.addresses():
            log.info("admin: serving http://%s/metrics", hostport(host, port))
        if self.token is None and not _is_loopback(self.host):
            log.warning("admin: %s is not a loopback address and no token is set", self.host)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs (the real port when configured with port 0)."""
        runner = self._runner
        if runner is None:
            return []
        return [(str(addr[0]), int(addr[1])) for addr in runner.addresses]

    # -- middleware ----------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            scheme, _, credentials = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.strip().encode(), self.token.encode()
            ):
                challenge = {"WWW-Authenticate": 'Bearer realm="proxytap"'}
                return _error(401, "a bearer token is required", **challenge)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason)
            raise

    # -- endpoints -----------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "version": __version__})

    async def readyz(self, request: web.Request) -> web.Response:
        app = self.app
        listeners = {name: [f"{h}:{p}" for h, p in app.addresses(name)] for name in app.servers}
        if app.ready:
            return web.json_response({"status": "ready", "listeners": listeners})
        status = "draining" if app.services.draining else "starting"
        return web.json_response({"status": status, "listeners": listeners}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def flows(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("limit", DEFAULT_LIMIT))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 0 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be 0..{MAX_LIMIT}")
        client = q.get("client")
        dest = q.get("destination")
        l7 = q.get("class")
        state = q.get("state")
        now = time.time()
        table = self.app.services.table
        matched = []
        for flow in sorted(table.flows.values(), key=lambda f: f.id):
            if client is not None and not _endpoint_match(client, *flow.client):
                continue
            if dest is not None and not (
                _endpoint_match(dest, *flow.server)
                or _endpoint_match(dest, flow.requested_host, flow.requested_port)
            ):
                continue
            if l7 is not None and (flow.l7 or UNCLASSIFIED) != l7:
                continue
            if state is not None and flow.state.value != state:
                continue
            matched.append(flow)
        rows = [flow_json(f, now) for f in matched[:limit]]
        return web.json_response(
            {
                "now": now,
                "total": len(table.flows),
                "matched": len(matched),
                "connections": len(table.connections),
                "flows": rows,
            }
        )

    async def subscribers(self, request: web.Request) -> web.Response:
        subs = [subscriber_json(s) for s in self.app.sinks]
        return web.json_response({"subscribers": subs})

    async def stats(self, request: web.Request) -> web.Response:
        app = self.app
        st = app.services.stats
        table = app.services.table
        live = list(table.flows.values())
        sinks = [s.stats() for s in app.sinks]
        return web.json_response(
            {
                "now": time.time(),
                "uptime": time.time() - app.started_at,
                "bytes_up": st.bytes_up + sum(f.bytes_up for f in live),
                "bytes_down": st.bytes_down + sum(f.bytes_down for f in live),
                "flows_active": len(live),
                "flows_total": sum(app.hub.classified.values())
                + sum(1 for f in live if f.l7 is None),
                "connections_active": len(table.connections),
                "connections_total": sum(st.downstream.values()),
                "export_dropped_events": sum(sum(s.drops.values()) for s in sinks),
                "export_dropped_bytes": sum(sum(s.dropped_bytes.values()) for s in sinks),
            }
        )

    def _ca(self) -> CA | web.Response:
        """The CA in tls.ca_dir, or the error answer when there is none (or it is broken)."""
        try:
            ca = ca_lib.load(Path(self.app.config.tls.ca_dir))
        except ConfigError as exc:
            log.warning("admin: the CA cannot be served: %s", exc)
            return _error(500, "the CA in tls.ca_dir cannot be read; see the proxy's log")
        return _error(404, NO_CA) if ca is None else ca

    async def ca_file(self, request: web.Request) -> web.Response:
        """``/ca.pem``, ``/ca.der``, ``/ca.p12``: the CA certificate (never its key)."""
        ca = self._ca()
        if isinstance(ca, web.Response):
            return ca
        fmt = request.path.rpartition(".")[2]
        return web.Response(
            body=ca.export(fmt),
            content_type=CA_TYPES[fmt],
            headers={"Content-Disposition": f"attachment; filename=proxytap-ca.{fmt}"},
        )

    async def ca_page(self, request: web.Request) -> web.Response:
        """``/ca``: how to install the CA on each kind of client, with its fingerprint."""
        ca = self._ca()
        if isinstance(ca, web.Response):
            return ca
        return web.Response(text=onboarding.page(ca, "/"), content_type="text/html")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["AdminServer", "flow_json", "subscriber_json"]
