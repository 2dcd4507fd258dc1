"""The TLS engine: mitmproxy's proxy core, embedded, for the tunnels proxytap intercepts.

proxytap answers CONNECT and SOCKS itself, checks policy, connects upstream
and reads the client's ClientHello (``proxytap.front.inspect``). Only when
``proxytap.policy.intercept`` says so is the tunnel handed here, with the
bytes already read and the upstream connection already open: mitmproxy's
``TransparentProxy`` layer takes both (no second policy check, no second DNS
lookup, no second connect), terminates TLS on each leg with a leaf signed by
proxytap's CA, and runs HTTP/1.1, HTTP/2, WebSocket or raw TCP inside.
``proxytap.intercept.addon`` then applies the header rules and modules and
exports the decrypted inner flow.

What is borrowed from mitmproxy, and pinned (``mitmproxy==12.2.*``; the smoke
tests in ``tests/intercept`` break first on an upgrade):

* ``ProxyConnectionHandler`` with the destination preset, as mitmproxy's
  transparent listeners do, but with no listener;
* ``open_connection`` overridden for the first server connection, so the
  engine uses proxytap's upstream transport (this mirrors mitmproxy's own
  method; it is what makes interception work over a chained upstream too).
  A later connection to the same destination (an origin that closed a
  keep-alive connection) is opened through proxytap's upstream path again,
  with its policy; a connection anywhere else is refused;
* a ``Master`` with four addons (``Proxyserver`` for the options the layers
  read, ``NextLayer``, ``TlsConfig`` reading proxytap's CA, and ours), not
  ``DumpMaster``: nothing stores flows, nothing listens, no event-loop hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmproxy import certs, options
from mitmproxy.addons import next_layer, proxyserver, tlsconfig
from mitmproxy.connection import ConnectionState
from mitmproxy.master import Master
from mitmproxy.net import tls as net_tls
from mitmproxy.proxy import commands, events, server_hooks
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.proxy.server import ConnectionIO

from proxytap.errors import UpstreamError
from proxytap.flows.table import CloseReason
from proxytap.front.relay import PendingUpstream, Relay
from proxytap.hostport import hostport
from proxytap.intercept import ca as ca_files
from proxytap.intercept.addon import ProxytapAddon, Session
from proxytap.intercept.leg import streams
from proxytap.proto.tlshello import ClientHello

if TYPE_CHECKING:
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.intercept")

_STORE_KEYS = frozenset(("certs", "confdir", "key_size", "cert_passphrase"))
_MODE = ProxyMode.parse("transparent")
STOP_WAIT = 2.0  # seconds a stopped session's streams may take to close
# The engine's finished connections are reference cycles, and proxytap runs the full
# collection rarely (app.py: gen0 50,000, so about every 20 million allocations): a
# collection after this many intercepted sessions gives their memory back in time
# (tests/intercept: rounds of sessions level off instead of growing ~25 KiB each).
COLLECT_EVERY = 256


class _TlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TLS configuration, with proxytap's CA file instead of ``mitmproxy-ca.pem``."""

    def __init__(self, ca_dir: Path) -> None:
        super().__init__()
        self.ca_dir = ca_dir

    def configure(self, updated: Any) -> None:
        keys = {updated} if isinstance(updated, str) else set(updated)
        super().configure(keys - _STORE_KEYS)  # type: ignore[no-untyped-call]
        if keys & _STORE_KEYS:
            self.certstore = certs.CertStore.from_files(
                self.ca_dir / ca_files.KEY_FILE, self.ca_dir / f"{ca_files.BASENAME}-dhparam.pem"
            )


def _keylog(path: str | None) -> None:
    """Key log of intercepted sessions (both legs), or none: never from the environment."""
    logger: net_tls.MasterSecretLogger | None = None
    if path:
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        os.chmod(p, 0o600)
        logger = net_tls.MasterSecretLogger(p)
    net_tls.log_master_secret = logger
    net_tls.create_proxy_server_context.cache_clear()
    net_tls.create_client_proxy_context.cache_clear()


class _Handler(ProxyConnectionHandler):
    """One intercepted client connection, with its first server connection already open."""

    def __init__(self, engine: Engine, session: Session, client: tuple[Any, Any]) -> None:
        master = engine.master
        super().__init__(master, client[0], client[1], master.options, _MODE)  # type: ignore[no-untyped-call]
        self.engine = engine
        self.session = session
        self.first: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def open_connection(self, command: commands.OpenConnection) -> None:
        conn = command.connection
        target = self.layer.context.server.address
        if conn.address != target:
            refusal = "proxytap: an intercepted connection goes to its vetted destination only"
            conn.error = refusal
            await self.server_event(events.OpenConnectionCompleted(command, refusal))
            return
        streams_ = self.first
        self.first = None
        hook_data = server_hooks.ServerConnectionHookData(client=self.client, server=conn)
        await self.handle_hook(server_hooks.ServerConnectHook(hook_data))
        if err := conn.error:
            if streams_ is not None:
                streams_[1].close()
            await self.handle_hook(server_hooks.ServerConnectErrorHook(hook_data))
            await self.server_event(events.OpenConnectionCompleted(command, f"killed: {err}"))
            return
        if streams_ is None:
            try:
                streams_ = await self.engine.reconnect(self.session)
            except UpstreamError as exc:
                conn.error = exc.message or exc.detail or "cannot connect"
                await self.handle_hook(server_hooks.ServerConnectErrorHook(hook_data))
                await self.server_event(events.OpenConnectionCompleted(command, conn.error))
                return
        reader, writer = streams_
        conn.timestamp_start = conn.timestamp_tcp_setup = time.time()
        conn.state = ConnectionState.OPEN
        conn.peername = writer.get_extra_info("peername")
        conn.sockname = writer.get_extra_info("sockname")
        self.transports[conn] = ConnectionIO(
            handler=asyncio.current_task(), reader=reader, writer=writer
        )
        await self.handle_hook(server_hooks.ServerConnectedHook(hook_data))
        await self.server_event(events.OpenConnectionCompleted(command, None))
        try:
            await self.handle_connection(conn)
        finally:
            conn.timestamp_end = time.time()
            await self.handle_hook(server_hooks.ServerDisconnectedHook(hook_data))

    def stop(self) -> None:
        """End the connection now (what mitmproxy's idle timeout does)."""
        io = self.transports.get(self.client)
        if io is not None and io.handler is not None:
            io.handler.cancel("proxytap stops the session")


class Engine:
    """The embedded mitmproxy: one per process (mitmproxy's context is process-global)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        tls = services.config.tls
        self.ca_dir = Path(tls.ca_dir)
        self.addon = ProxytapAddon(services)
        self.master: Master
        self.ended = 0  # sessions ended since the last collection

    async def start(self) -> None:
        tls = self.services.config.tls
        ca_files.ensure(self.ca_dir)
        _keylog(tls.keylog_file)
        opts = options.Options()
        self.master = Master(opts, event_loop=asyncio.get_running_loop())
        # Master hooks the root logger (every record would become a mitmproxy event)
        self.master._legacy_log_events.uninstall()
        addons = (
            proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]
            next_layer.NextLayer(),
            _TlsConfig(self.ca_dir),
            self.addon,
        )
        self.master.addons.add(*addons)  # type: ignore[no-untyped-call]
        opts.update(  # type: ignore[no-untyped-call]
            server=False,
            connection_strategy="eager",
            tcp_timeout=int(self.services.config.timeouts.idle),
            ssl_insecure=not tls.verify_upstream,
            ssl_verify_upstream_trusted_ca=tls.upstream_ca,
            http2=tls.http2,
            websocket=True,
            rawtcp=True,
            store_streamed_bodies=False,
            confdir=str(self.ca_dir),
        )
        await self.master.running()
        for name in ("mitmproxy", "mitmproxy.proxy.server"):
            logging.getLogger(name).setLevel(logging.WARNING)

    @property
    def active(self) -> int:
        """Intercepted connections open now."""
        return len(self.addon.sessions)

    def take(self, relay: Relay, hello: ClientHello, held: bytes) -> None:
        """Intercept the tunnel of ``relay``: its client sent ``held`` (the ClientHello)."""
        services = self.services
        flow = relay.flow
        client, server = relay.up.rx, relay.down.rx
        relay.detach()
        services.live.discard(relay)
        session = Session(services, relay, flow, hello)
        flow.decrypted = True
        services.live.add(session)
        services.tasks.spawn(self._run(session, client, server, held))

    async def _run(
        self, session: Session, client: asyncio.Transport, server: asyncio.Transport, held: bytes
    ) -> None:
        flow = session.flow
        reason = CloseReason.NORMAL
        tap_read = tap_write = None
        if session.cipher is not None:
            tap_read, tap_write = session.cipher_up, session.cipher_down
            session.cipher_up(held)  # the ClientHello, read before the engine took over
        c = streams(client, held, False, tap_read, tap_write)
        s = streams(server, b"", False)
        handler = _Handler(self, session, c)
        handler.first = s
        session.handler = handler
        context = handler.layer.context
        context.server.address = flow.server
        context.server.sni = session.server_name
        handler.layer = modes.TransparentProxy(context)
        self.addon.sessions[context.client.id] = session
        try:
            await handler.handle_client()
        except asyncio.CancelledError:
            reason = CloseReason.SHUTDOWN
            raise
        except Exception as exc:  # the engine failed on this connection: close it, go on
            reason = CloseReason.ERROR
            log.error(
                "intercepted tunnel %s -> %s failed: %r",
                hostport(*flow.client),
                hostport(flow.requested_host, flow.requested_port),
                exc,
            )
        finally:
            self.addon.sessions.pop(context.client.id, None)
            for _, writer in (c, s):
                writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_WAIT):
                    await c[1].wait_closed()
            self.services.live.discard(session)
            session.finish(reason if session.reason is None else session.reason)
            self.ended += 1
            if self.ended >= COLLECT_EVERY:
                self.ended = 0
                gc.collect()

    async def reconnect(
        self, session: Session
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Another connection to the session's destination, through proxytap's upstream path."""
        flow = session.flow
        transport, pending, _ = await self.services.open(
            flow.requested_host,
            flow.requested_port,
            flow.outer.user,
            PendingUpstream,
            listener=flow.outer.listener,
        )
        return streams(transport, b"".join(pending.early.chunks), pending.early.eof)
