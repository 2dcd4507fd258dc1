"""A CONNECT or SOCKS tunnel once its destination is connected: relay, inspection, end.

The handshake (``ClientConnection``) authenticates, applies the port policy
and the modules' ``on_connect``, connects (``Services.open``), opens the flow
(``Services.open_flow``, the tap step every inner flow takes) and answers the
client. From there this module takes over: the relay (with module sides when
a module of the listener filters bytes), the TLS ClientHello inspection (SNI
against the name asked for), and the accounting at the end of the tunnel
(``finished``: the flow's close, the client connection's, the access line).
The handshake stays the tunnel's owner: the relay's ``done`` is its call, so
it runs the modules' ``on_close`` and then ``finished``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from proxytap.flows.table import CloseReason, Flow
from proxytap.front.inspect import HelloInspector
from proxytap.front.modchain import filtering_sides
from proxytap.front.relay import PendingUpstream, Relay
from proxytap.front.services import Services
from proxytap.hostport import hostport
from proxytap.logstream import access
from proxytap.modules.api import Context
from proxytap.modules.chain import Chain
from proxytap.proto.tlshello import ClientHello

log = logging.getLogger("proxytap.front")


def relay_tunnel(
    services: Services,
    flow: Flow,
    client: asyncio.Transport,
    server: asyncio.Transport,
    pending: PendingUpstream,
    early: bytes,
    client_eof: bool,
    chain: Chain,
    ctx: Context | None,
    done: Callable[[Relay, CloseReason], None],
) -> Relay:
    """Start relaying the tunnel of ``flow``; ``early``: client bytes sent before the reply."""
    relay = Relay(flow, services.hub, services.config.timeouts.idle, done)
    relay.ctx = ctx
    services.live.add(relay)
    sides = None
    if ctx is not None:
        ctx.server = flow.server
        ctx.flow = flow
        if chain.filters:
            sides = filtering_sides(chain, ctx)
    log.debug(
        "tunnel %s %s -> %s (%s) open",
        flow.tunnel,
        hostport(*flow.client),
        hostport(flow.requested_host, flow.requested_port),
        hostport(*flow.server),
    )
    relay.start(
        client,
        server,
        pending,
        early,
        services.config.limits.write_buffer_high,
        client_eof=client_eof,
        inspect=functools.partial(_inspector, services),
        sides=sides,
    )
    return relay


def _inspector(services: Services, relay: Relay) -> HelloInspector:
    tls = services.config.tls

    def mismatch(hello: ClientHello) -> None:
        flow = relay.flow
        services.refused("sni-mismatch", tls.sni_mismatch)
        services.stats.sni_mismatches += 1
        if tls.sni_mismatch != "allow":
            log.warning(
                "sni mismatch (%s): %s %s asked for %s, its ClientHello names %s",
                tls.sni_mismatch,
                flow.tunnel,
                hostport(*flow.client),
                hostport(flow.requested_host, flow.requested_port),
                hello.sni,
            )

    intercept = None
    engine = services.engine
    if engine is not None and services.interception.may_intercept(relay.flow.client[0]):

        def intercept(hello: ClientHello, held: bytes) -> bool:
            flow = relay.flow
            host = hello.sni or flow.requested_host
            verdict = services.interception.decide(
                flow.client[0], host, services.pins, time.monotonic()
            )
            outcome = "intercepted" if verdict.intercept else "passthrough"
            services.stats.intercept[(outcome, verdict.reason)] += 1
            if not verdict.intercept:
                return False
            engine.take(relay, hello, held)
            return True

    return HelloInspector(relay, tls.sni_mismatch, tls.inspect_timeout, mismatch, intercept)


def finished(services: Services, relay: Relay, reason: CloseReason) -> None:
    """The relay ended: the flow, the client connection, the access line."""
    flow = relay.flow
    services.table.close_connection(flow.outer)
    services.live.discard(relay)
    flow_ended(services, flow, reason, "tunnel")


def flow_ended(services: Services, flow: Flow, reason: CloseReason, kind: str) -> None:
    """An inner flow ends: its record closes, and its access line (``kind``: tunnel, udp)."""
    now = time.time()
    services.flow_closed(flow, reason, now)
    access(
        "%s %s %s -> %s (%s) %s up=%d down=%d %.3fs",
        kind,
        flow.tunnel,
        hostport(*flow.client),
        hostport(flow.requested_host, flow.requested_port),
        hostport(*flow.server),
        reason.value,
        flow.bytes_up,
        flow.bytes_down,
        now - flow.start,
    )
