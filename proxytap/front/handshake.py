"""The client's connection from accept until its tunnel or forwarder takes over.

The listener kind and the first byte pick the protocol: 0x04 / 0x05 SOCKS,
anything else HTTP (``mixed``); ``socks`` and ``http`` listeners accept only
their own. The pure parsers in ``proxytap.proto`` do the protocol; this shell
moves bytes, enforces the handshake deadline, connects upstream and answers:
a SOCKS reply code or an HTTP status with ``Proxy-Status`` for every failure,
the success reply only once the upstream connection is up. Bytes the client
sent after its request are handed to the relay, never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from proxytap.config import ListenerConfig
from proxytap.errors import Failure, ProtocolError, UpstreamError, classify_os_error
from proxytap.flows.stats import observe
from proxytap.flows.table import CloseReason, Connection, Endpoint, endpoint
from proxytap.front.answers import AUTH_FAILED, Answering, socks_result
from proxytap.front.authn import auth_failed, auth_throttled, check_proxy_authorization
from proxytap.front.relay import Early, PendingUpstream, Relay
from proxytap.front.services import SOCKS4_USERID, Services
from proxytap.front.tunnel import finished, relay_tunnel
from proxytap.front.udp import Association
from proxytap.modules.api import Context
from proxytap.policy.acl import refusal_text
from proxytap.policy.auth import socks4_userid_ok
from proxytap.policy.message import RequestHead
from proxytap.proto import httpconnect
from proxytap.proto.socks import (
    NEED_DATA,
    NO_AUTH,
    USERPASS,
    AuthRequest,
    ConnectRequest,
    SocksServer,
    UdpAssociateRequest,
)

log = logging.getLogger("proxytap.front")

SOCKS_VERSIONS = (0x04, 0x05)


class ClientConnection(Answering):
    """Accepted client connection during its handshake."""

    def __init__(self, services: Services, listener: ListenerConfig) -> None:
        self.services = services
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.buf = bytearray()
        self.socks: SocksServer | None = None
        self.http = False
        self.http_version = "HTTP/1.1"
        self.done = False  # handed over, or closed
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.refusal: tuple[str, str] | None = None  # (rule, reason) decided at accept
        self.first_byte = -1
        self.chain = services.chains[listener.name]
        self.ctx: Context | None = None  # the tunnel's module context (modules only)
        # while connecting: what the client sends before its reply, kept for the relay
        self.early: Early | None = None
        self.connect = False  # an HTTP CONNECT request (not plain HTTP): its answer is counted
        # when the tunnel's request was read (set-up latency; monotonic: the loop's
        # clock may count whole milliseconds only)
        self.asked_at = 0.0
        self.socks_version = 5  # of the SOCKS request, once read
        self.auth_rejected = False  # SOCKS5: the sub-negotiation failed (``01 01`` sent)
        self.counted = False  # the connection was counted already (CONNECT after requests)

    @classmethod
    def after_requests(
        cls,
        services: Services,
        conn: Connection,
        transport: asyncio.Transport,
        data: bytes,
        eof: bool,
    ) -> ClientConnection:
        """A CONNECT after plain-HTTP requests (the forwarder's call): handled as a first one.

        ``data`` is its head and what followed; ``eof``: the client half-closed
        already. The connection was admitted and counted when it was accepted.
        """
        listener = next(lst for lst in services.config.listeners if lst.name == conn.listener)
        self = cls(services, listener)
        self.transport = transport
        self.conn = conn
        self.http = True
        self.first_byte = data[0]
        self.counted = True
        services.live.add(self)
        transport.set_protocol(self)
        self.data_received(data)
        if eof:
            self.eof_received()
        return self

    # -- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        services = self.services
        if services.out_of_files():
            self._no_files()
            return
        try:
            peer = endpoint(transport.get_extra_info("peername"))
            local = endpoint(transport.get_extra_info("sockname"))
        except (TypeError, ValueError, OSError):
            transport.abort()
            self.done = True
            return
        self.accepted(transport, peer, local)

    def accepted(self, transport: asyncio.Transport, client: Endpoint, local: Endpoint) -> None:
        """The connection is open and its client known: from here on it is ``conn.client``.

        ``client`` is the socket's peer, or on a ``proxy_protocol`` listener the
        address the load balancer's PROXY header carried (``front.proxyheader``
        calls this once the header is read). The client ACL, the connection
        caps, authentication throttling, flows, exports, logs and metrics all
        take the client from ``conn.client`` alone, never from the socket.
        """
        self.transport = transport
        services = self.services
        self.conn = services.table.open_connection(client, local, self.listener.name, time.time())
        # answered once the protocol is known (a precise SOCKS code or HTTP status)
        self.refusal = services.admit(client[0])
        services.live.add(self)
        services.went_silent(client[0], self)
        loop = asyncio.get_running_loop()
        timeouts = services.config.timeouts
        if timeouts.first_byte < timeouts.handshake:
            self.timer = loop.call_later(timeouts.first_byte, self._first_byte_due)
        else:
            self.timer = loop.call_later(timeouts.handshake, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.early is not None:
            self.early.add(data, self.transport)
            return
        if self.socks is None and not self.http:
            kind = self.listener.kind
            self.first_byte = data[0]
            self._spoke()
            is_socks = data[0] in SOCKS_VERSIONS
            if kind == "socks" or (kind == "mixed" and is_socks):
                auth = self.services.auth is not None
                methods = (USERPASS,) if auth else (NO_AUTH,)
                self.socks = SocksServer(methods=methods, udp_associate=True)
            else:
                self.http = True
        try:
            if self.socks is not None:
                self.socks.receive_data(data)
                self._socks_step()
            else:
                self.buf += data
                self._http_step()
        except ProtocolError as exc:
            self._refuse(exc)

    def eof_received(self) -> bool:
        if self.done:
            return False
        if self.early is not None:  # a half-close after the request: the relay passes it on
            self.early.eof = True
            return True
        if self.socks is not None:
            try:
                self.socks.receive_data(b"")
                self._socks_step()
            except ProtocolError as exc:
                self._refuse(exc)
        elif self.first_byte < 0:
            # asked nothing (a port check, a load balancer's health check): not logged
            self._close("client closed without sending anything", quiet=True)
        else:
            self._close("client closed during handshake")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._close("client went away during handshake")
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- protocols ------------------------------------------------------------------

    def _socks_step(self) -> None:
        socks = self.socks
        assert socks is not None and self.transport is not None
        while not self.done:
            event = socks.next_event()
            out = socks.data_to_send()
            if out:
                self.transport.write(out)
            if event is NEED_DATA:
                return
            if isinstance(event, AuthRequest):
                if self.refusal is not None:
                    # refused before the request: no reply code can be sent yet, the
                    # sub-negotiation fails; still counted by its rule
                    self._count_refusal(*self.refusal)
                if self.refusal is not None or self.services.auth is None:
                    self.auth_rejected = True
                    socks.auth_result(False)
                    continue
                assert self.conn is not None
                if auth_throttled(self.services, self.conn) is not None:
                    # 01 01 with no password checked; logged once a window, not here
                    socks.auth_result(False)
                    self.transport.write(socks.data_to_send())
                    self._answered(AUTH_FAILED)
                    self._close("too many failed authentications", linger=True, quiet=True)
                    return
                self._socks_auth(event)
                return
            if isinstance(event, UdpAssociateRequest):  # front/udp.py
                assert self.conn is not None
                self.conn.protocol = event.protocol
                if self.refusal is not None:
                    self._deny(*self.refusal)
                    return
                self.early = Early()  # any byte from now on ends the association
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                self.asked_at = time.monotonic()
                self.task = self.services.tasks.spawn(self._associate(event, socks.trailing_data()))
                return
            if isinstance(event, ConnectRequest):
                assert self.conn is not None
                self.conn.protocol = event.protocol  # socks4a is known from here on
                self.socks_version = event.version
                if self.refusal is not None:
                    self._deny(*self.refusal)
                    return
                allowed = self.services.config.auth.socks4_userids
                if event.version == 4 and not socks4_userid_ok(event.user_id, allowed):
                    self._deny(SOCKS4_USERID, "SOCKS4 user id not accepted")
                    return
                self._begin(event.host, event.port, event.protocol, socks.trailing_data())
                return

    def _socks_auth(self, request: AuthRequest) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        self.task = self.services.tasks.spawn(self._socks_auth_task(request))

    async def _socks_auth_task(self, request: AuthRequest) -> None:
        auth = self.services.auth
        assert auth is not None and self.socks is not None and self.transport is not None
        ok = await auth.check(request.username, request.password)
        if self.done:
            return
        self.socks.auth_result(ok)
        self.auth_rejected = not ok
        assert self.conn is not None
        if ok:
            self.conn.user = request.username
        else:
            auth_failed(self.services, self.conn, request.username)
        self.transport.resume_reading()
        try:
            self._socks_step()
        except ProtocolError as exc:
            self._refuse(exc)

    def _http_step(self) -> None:
        limits = self.services.config.limits
        end = httpconnect.head_end(self.buf, limits.max_head, limits.max_request_line)
        if end is None:
            return
        line = httpconnect.request_line(self.buf)
        if not line.startswith(b"CONNECT "):
            # Plain HTTP: the forwarder parses every head of the connection, this one
            # included (one parser, one set of rules for all of them).
            self.http_version = "HTTP/1.0" if line.endswith(b" HTTP/1.0") else "HTTP/1.1"
            if self.refusal is not None:
                self._deny(*self.refusal)
                return
            self._forward()
            return
        self.connect = True
        head = httpconnect.parse_head(bytes(self.buf[:end]))
        self.http_version = head.version
        if self.refusal is not None:
            self._deny(*self.refusal)
            return
        request = RequestHead(head.method, head.target, head.version, head.headers)
        try:
            self.services.rules.validate_request(request)  # the same rules as forwarded heads
        except ProtocolError:
            raise
        except Exception as exc:  # a bug in a rule: fail closed (500), logged and counted
            raise self.chain.failed(self.chain.names[0][0], "request", exc) from exc
        credentials = head.values("proxy-authorization")
        self._begin(request.host, request.port, "http-connect", bytes(self.buf[end:]), credentials)

    def _forward(self) -> None:
        from proxytap.front.http_forward import HttpForwarder

        assert self.transport is not None and self.conn is not None
        self.conn.protocol = "http-forward"
        self._handed_over()
        forwarder = HttpForwarder(self.services, self.conn, self.transport)
        self.transport.set_protocol(forwarder)
        forwarder.start(bytes(self.buf))

    # -- connecting -----------------------------------------------------------------

    def _begin(
        self,
        host: str,
        port: int,
        protocol: str,
        early: bytes,
        credentials: tuple[str, ...] | None = None,
    ) -> None:
        assert self.transport is not None and self.conn is not None
        self.early = Early()  # reading goes on: bytes are kept, not parsed (no poller update)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conn.protocol = protocol
        self.asked_at = time.monotonic()
        self.task = self.services.tasks.spawn(self._open_tunnel(host, port, early, credentials))

    async def _http_user(self, credentials: tuple[str, ...]) -> str | None:
        """The authenticated user of a CONNECT, or None after answering 400/407."""
        auth = self.services.auth
        assert auth is not None and self.conn is not None
        if not credentials:
            self._deny("auth", "proxy authentication required", status=407)
            return None
        throttled = auth_throttled(self.services, self.conn)
        if throttled is not None:
            # logged once a window (auth_throttled), not per attempt
            self._http_error(429, throttled.reason, throttled.proxy_status, throttled.retry_after)
            self._close("too many failed authentications", linger=True, quiet=True)
            return None
        user, err = await check_proxy_authorization(auth, credentials[0])
        if err is None:
            return user
        auth_failed(self.services, self.conn, user)
        if err.status == 407:
            self._deny("auth", err.reason, status=407, count=False)
        else:
            self._refuse(err)
        return None

    async def _admit(
        self, host: str, port: int, credentials: tuple[str, ...] | None
    ) -> tuple[bool, Context | None]:
        """Authentication, the CONNECT port policy, the modules' ``on_connect``.

        ``(False, None)`` when the tunnel was refused (and answered); else its
        module context (None without modules).
        """
        services = self.services
        conn = self.conn
        assert conn is not None
        if credentials is not None:  # HTTP CONNECT
            if services.auth is not None:
                user = await self._http_user(credentials)
                if user is None or self.done:
                    return False, None
                conn.user = user
            verdict = services.destinations.check_connect_port(port)
            if not verdict.allowed:
                services.denied(self.listener.name, verdict.rule, "connect port denied")
                text = refusal_text(verdict.rule, port)
                self._connect_failed(host, port, Failure.DENIED, f"rule {verdict.rule}", text)
                return False, None
        chain = self.chain
        if not chain.active:
            return True, None
        ctx = Context(
            listener=self.listener.name,
            protocol=self._protocol_name(),
            client=conn.client,
            host=host,
            port=port,
            user=conn.user,
        )
        try:
            chain.on_connect(ctx)
        except ProtocolError as exc:
            chain.on_close(ctx)
            self._module_refused(exc)
            return False, None
        return True, ctx

    async def _open_tunnel(
        self, host: str, port: int, early: bytes, credentials: tuple[str, ...] | None
    ) -> None:
        services = self.services
        client = self.transport
        conn = self.conn
        assert client is not None and conn is not None
        admitted, self.ctx = await self._admit(host, port, credentials)
        if not admitted:
            return
        try:
            server, pending, peer = await services.open(
                host, port, conn.user, PendingUpstream, listener=self.listener.name
            )
        except UpstreamError as exc:
            self._close_ctx()
            self._connect_failed(host, port, exc.failure, exc.detail, exc.message)
            return
        reply = self._success_reply(server, host, port)
        if reply is None:
            return
        if self.done or client.is_closing():
            server.close()
            self._close_ctx()
            self._close("client went away while connecting")
            return
        flow = services.open_flow(conn, peer, host, port, upstream=server)
        client.write(reply)
        self._answered("200" if self.socks is None else socks_result(self.socks_version, 0))
        key = (self.listener.name, self._protocol_name())
        observe(services.stats.tunnel_setup, key, time.monotonic() - self.asked_at)
        self._handed_over()
        held = self.early
        assert held is not None
        if held.chunks:
            early += b"".join(held.chunks)
            held.chunks = []
        relay_tunnel(
            services,
            flow,
            client,
            server,
            pending,
            early,
            held.eof,
            self.chain,
            self.ctx,
            self._relay_done,
        )

    async def _associate(self, request: UdpAssociateRequest, early: bytes) -> None:
        """SOCKS5 UDP ASSOCIATE: bind the relay, answer with its address, hand over."""
        client = self.transport
        assert client is not None and self.conn is not None and self.socks is not None
        assoc = Association(self.services, self.conn, request)
        try:
            local = endpoint(client.get_extra_info("sockname"))  # where the client reached us
            bound = await assoc.open(local)
        except (OSError, TypeError, ValueError) as exc:
            self._connect_failed(request.host, request.port, classify_os_error(exc), repr(exc))
            return
        if self.done or client.is_closing():
            assoc.close()
            self._close("client went away while the UDP relay was bound")
            return
        client.write(self.socks.reply(0x00, bound))
        self._answered(socks_result(5, 0x00))
        key = (self.listener.name, self._protocol_name())
        observe(self.services.stats.tunnel_setup, key, time.monotonic() - self.asked_at)
        self._handed_over()
        held = self.early
        assert held is not None
        assoc.start(client, early + b"".join(held.chunks), held.eof)

    def _relay_done(self, relay: Relay, reason: CloseReason) -> None:
        self._close_ctx()
        finished(self.services, relay, reason)

    def _success_reply(self, server: asyncio.Transport, host: str, port: int) -> bytes | None:
        """The reply once connected (SOCKS: BND.ADDR is the upstream socket's address).

        None when that address cannot be had: answered as a connect failure.
        """
        if self.socks is None:
            return httpconnect.connect_established(self.http_version)
        try:
            local = endpoint(server.get_extra_info("sockname"))
        except (OSError, TypeError, ValueError) as exc:
            server.close()
            self._close_ctx()
            self._connect_failed(host, port, classify_os_error(exc), repr(exc))
            return None
        return self.socks.reply(0x00, local)

    def _close_ctx(self) -> None:
        if self.ctx is not None:
            self.chain.on_close(self.ctx)

    # -- endings --------------------------------------------------------------------

    def shutdown(self, force: bool) -> None:
        """A connection still in its handshake is closed at once on shutdown."""
        self._close("proxy shutting down")
