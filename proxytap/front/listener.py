"""Listening sockets: one asyncio server per configured listener."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Callable

from proxytap.config import ListenerConfig
from proxytap.front.handshake import ClientConnection
from proxytap.front.proxyheader import proxy_header_factory
from proxytap.front.services import Services


async def start_listener(services: Services, listener: ListenerConfig) -> asyncio.Server:
    """Bind and start accepting; IPv6 listeners are IPv6-only (no mapped addresses)."""
    loop = asyncio.get_running_loop()
    host, port = listener.host, listener.port
    family = socket.AF_INET6 if ":" in host else socket.AF_UNSPEC
    factory: Callable[[], asyncio.Protocol] = functools.partial(
        ClientConnection, services, listener
    )
    if listener.proxy_protocol:  # behind a load balancer: a PROXY header comes first
        factory = proxy_header_factory(services, listener)
    server = await loop.create_server(
        factory,
        host,
        port,
        family=family,
        reuse_address=True,
        backlog=4096,
    )
    for sock in server.sockets:
        if sock.family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return server


def bound_addresses(server: asyncio.Server) -> list[tuple[str, int]]:
    return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in server.sockets]
