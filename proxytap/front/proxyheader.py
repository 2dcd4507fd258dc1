"""A ``proxy_protocol`` listener's connection until its PROXY header is read.

Behind a TCP load balancer (HAProxy ``send-proxy-v2``, AWS NLB, ...) the
socket's peer is the balancer; the client is named by the PROXY protocol
header the balancer sends first (``proxytap.proto.proxyproto`` reads it). This
shell sits in front of ``ClientConnection`` on such a listener:

1. The open-file budget is checked as on every listener.
2. The socket's peer must be in the listener's ``proxy_protocol_from``. The
   header is believed only from there: anyone else could claim any client
   address (and walk past ``access.clients``), so another peer is closed
   before a byte of it is read.
3. The header must arrive whole within ``timeouts.handshake``. A malformed
   header, none in time, or a connection that ends before it is whole:
   closed unanswered (the balancer has told its client the connection is
   up; there is no protocol to answer in yet).
4. The connection is handed to ``ClientConnection.accepted`` with the
   carried client (the socket's peer for v2 LOCAL, v1 UNKNOWN and the
   families the specification falls back on) and the client's bytes that
   followed the header. From there on the client ACL, the connection caps,
   authentication throttling, flows, SF-TAP exports, the JSON flow log,
   access lines and metrics see only that address (``Connection.client``),
   never the balancer's.

Every outcome is counted in ``proxytap_downstream_proxy_headers_total`` by
listener and result (``RESULTS``); refusals are logged with their reason
(accepted headers at DEBUG: a balancer's connections come by the thousand).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from proxytap.config import ListenerConfig
from proxytap.flows.table import Endpoint, endpoint
from proxytap.front.handshake import ClientConnection
from proxytap.front.services import Services
from proxytap.hostport import hostport
from proxytap.policy.acl import ClientAcl
from proxytap.proto.proxyproto import (
    NEED_DATA,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
)

log = logging.getLogger("proxytap.front")

ACCEPTED = "accepted"  # the client is the address the header carried
LOCAL = "local"  # a valid header that names no client: the socket's peer is the client
UNTRUSTED = "untrusted"  # the peer is not in proxy_protocol_from: closed unread
MALFORMED = "malformed"
TIMEOUT = "timeout"  # no whole header within timeouts.handshake
CLOSED = "closed"  # the connection ended before the header was whole
RESULTS = (ACCEPTED, LOCAL, UNTRUSTED, MALFORMED, TIMEOUT, CLOSED)


def proxy_header_factory(
    services: Services, listener: ListenerConfig
) -> Callable[[], ProxyHeaderConnection]:
    """The protocol factory of a ``proxy_protocol`` listener (its trusted peers built once)."""
    trusted = ClientAcl(
        listener.proxy_protocol_from, key=f"listeners.{listener.name}.proxy_protocol_from"
    )
    return lambda: ProxyHeaderConnection(services, listener, trusted)


class ProxyHeaderConnection(asyncio.Protocol):
    """One accepted connection of a ``proxy_protocol`` listener, before its header is read."""

    def __init__(self, services: Services, listener: ListenerConfig, trusted: ClientAcl) -> None:
        self.services = services
        self.listener = listener
        self.trusted = trusted
        self.reader = ProxyHeaderReader()
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint = ("", 0)  # the balancer
        self.local: Endpoint = ("", 0)
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # handed over, or closed

    # -- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        services = self.services
        if services.out_of_files():
            # refused as on every listener: closed at once, counted, logged once a window
            self.done = True
            ClientConnection(services, self.listener).connection_made(transport)
            return
        try:
            self.peer = endpoint(transport.get_extra_info("peername"))
            self.local = endpoint(transport.get_extra_info("sockname"))
        except (TypeError, ValueError, OSError):
            transport.abort()
            self.done = True
            return
        if not self.trusted.allowed(self.peer[0]):
            self._refuse(
                UNTRUSTED,
                f"not in listeners.{self.listener.name}.proxy_protocol_from; closed unread",
            )
            return
        services.live.add(self)
        timeout = services.config.timeouts.handshake
        self.timer = asyncio.get_running_loop().call_later(timeout, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.reader.receive_data(data)
        self._step()

    def eof_received(self) -> bool:
        if not self.done:
            self.reader.receive_data(b"")
            self._step()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._refuse(CLOSED, "connection lost before the PROXY header was whole")

    def shutdown(self, force: bool) -> None:
        """Still waiting for its header on shutdown: closed at once."""
        if not self.done:
            self._end()
            assert self.transport is not None
            self.transport.close()

    # -- the header -----------------------------------------------------------------

    def _step(self) -> None:
        try:
            event = self.reader.next_event()
        except ProxyHeaderError as exc:
            self._refuse(CLOSED if exc.closed else MALFORMED, exc.reason)
            return
        if event is NEED_DATA:
            return
        assert isinstance(event, ProxyHeader)
        self._hand_over(event)

    def _hand_over(self, header: ProxyHeader) -> None:
        transport = self.transport
        assert transport is not None
        self._end()
        if header.source is None:
            client, result = self.peer, LOCAL
        else:
            client, result = endpoint(header.source), ACCEPTED  # IPv4-mapped -> IPv4
        self.services.stats.proxy_headers[(self.listener.name, result)] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "PROXY v%d %s %s from %s: client %s",
                header.version,
                header.command,
                header.family,
                hostport(*self.peer),
                hostport(*client),
            )
        conn = ClientConnection(self.services, self.listener)
        transport.set_protocol(conn)
        conn.accepted(transport, client, self.local)
        rest = self.reader.trailing_data()
        if rest:
            conn.data_received(rest)

    # -- endings --------------------------------------------------------------------

    def _timeout(self) -> None:
        self.timer = None
        if not self.done:
            self._refuse(TIMEOUT, "no whole PROXY header within timeouts.handshake")

    def _refuse(self, result: str, reason: str) -> None:
        """Closed unanswered, counted by ``result``, logged with ``reason``."""
        self._end()
        self.services.stats.proxy_headers[(self.listener.name, result)] += 1
        log.info(
            "connection from %s on PROXY-protocol listener %s refused (%s): %s",
            hostport(*self.peer),
            self.listener.name,
            result,
            reason,
        )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _end(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.services.live.discard(self)


__all__ = ["RESULTS", "ProxyHeaderConnection", "proxy_header_factory"]
