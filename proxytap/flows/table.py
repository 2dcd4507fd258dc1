"""The flow table: outer connections, the inner flows they carry, their counters.

An *outer connection* is what the client opened to proxytap (client -> proxy).
An *inner flow* is the decapsulated conversation the proxy relays for it
(true client -> true destination): one per CONNECT or SOCKS tunnel, one per
(client connection, upstream connection) pair for plain HTTP. Both have Zeek
style uids so logs can link them.

The relay updates the counters in place; objects use ``__slots__`` because
one exists per live connection.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

Endpoint = tuple[str, int]

UP = 1  # client -> server
DOWN = 2  # server -> client


class CloseReason(enum.Enum):
    NORMAL = "normal"  # both sides closed
    RESET = "reset"  # a side aborted
    TIMEOUT = "timeout"  # idle timeout
    ERROR = "error"  # proxy-side error (bad protocol, policy)
    SHUTDOWN = "shutdown"  # still open when the proxy's shutdown grace ran out: reset


class State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    HALF_CLOSED = "half-closed"
    CLOSED = "closed"


_uids = random.Random(secrets.randbits(128))


def new_uid(prefix: str) -> str:
    """A Zeek-style uid: ``prefix`` and 16 hex digits.

    Uids link log records, they guard nothing: a generator seeded once from
    the OS is enough, and it spares a ``getrandom`` system call per connection.
    """
    return f"{prefix}{_uids.getrandbits(64):016x}"


def endpoint(sockaddr: tuple[object, ...]) -> Endpoint:
    """Normalize a socket address (2- or 4-tuple) to (inet_ntop text, port).

    IPv4-mapped IPv6 addresses (from a dual-stack listener) become IPv4.
    """
    return (_address_text(str(sockaddr[0])), int(sockaddr[1]))  # type: ignore[call-overload]


@functools.lru_cache(maxsize=8192)
def _address_text(host: str) -> str:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


@dataclass(frozen=True, slots=True)
class Via:
    """The upstream proxy an inner flow went through (chaining, ``[[upstream.proxies]]``).

    ``by_name``: the proxy was asked for the destination by name and resolved
    it itself, so proxytap never learns the destination's address: the flow's
    ``server`` (ip2) is then ``0.0.0.0`` and the requested port. ``bound`` is
    what a SOCKS proxy reported as BND.ADDR/BND.PORT (its own end of its
    connection to the destination; ``None`` over HTTP CONNECT, which reports
    nothing).
    """

    proxy: str  # the [[upstream.proxies]] name
    address: Endpoint  # the upstream proxy's address proxytap connected to
    bound: Endpoint | None
    by_name: bool


class Valve(Protocol):
    """What relays a flow: export sinks ask it to stop and restart reading both sides."""

    def export_hold(self, held: bool) -> None: ...


class Connection:
    """The outer connection: client -> proxy."""

    __slots__ = ("client", "flows", "id", "listener", "local", "protocol", "start", "uid", "user")

    def __init__(
        self, id: int, client: Endpoint, local: Endpoint, listener: str, start: float
    ) -> None:
        self.id = id
        self.uid = new_uid("C")
        self.client = client
        self.local = local
        self.listener = listener
        self.protocol = ""  # http-connect, http-forward, socks4, socks4a, socks5
        self.start = start
        self.user: str | None = None
        self.flows = 0


class Flow:
    """One inner flow: true client -> true destination."""

    __slots__ = (
        "alpn",
        "bytes_down",
        "bytes_up",
        "chunks_down",
        "chunks_up",
        "client",
        "decrypted",
        "end",
        "holders",
        "hop",
        "http_host",
        "id",
        "ja3",
        "ja4",
        "l4",
        "l7",
        "outer",
        "reason",
        "requested_host",
        "requested_port",
        "server",
        "sni",
        "start",
        "state",
        "tap",
        "tls_cipher",
        "tls_version",
        "uid",
        "valve",
        "via",
    )

    def __init__(
        self,
        id: int,
        outer: Connection,
        server: Endpoint,
        requested_host: str,
        requested_port: int,
        start: float,
        l4: str = "tcp",
    ) -> None:
        self.id = id
        self.uid = new_uid("F")
        self.outer = outer
        self.client = outer.client
        self.server = server  # the address actually connected to (peername)
        self.requested_host = requested_host
        self.requested_port = requested_port
        self.start = start
        self.end: float | None = None
        self.l4 = l4
        self.hop = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.chunks_up = 0
        self.chunks_down = 0
        self.state = State.OPEN
        self.reason: CloseReason | None = None
        self.l7: str | None = None
        self.sni: str | None = None
        self.alpn: str | None = None
        # the client's TLS fingerprints (proxytap.proto.fingerprint), from its ClientHello
        self.ja3: str | None = None  # MD5 hex of the JA3 string
        self.ja4: str | None = None
        self.http_host: str | None = None
        self.decrypted = False  # intercepted: the bytes exported are the decrypted ones
        self.tls_version: str | None = None  # of the client leg, when intercepted
        self.tls_cipher: str | None = None
        self.tap: object | None = None  # per-flow state owned by the export hub
        # Lossless export (overload "wait"): the sinks that are behind on this flow
        # hold it; while any does, its ``valve`` (the relay) reads neither side.
        self.valve: Valve | None = None
        self.holders: set[object] | None = None
        self.via: Via | None = None  # the upstream proxy it went through (chaining)

    def hold(self, by: object) -> None:
        """``by`` (an export consumer) is behind: stop reading this flow until it releases."""
        holders = self.holders
        if holders is None:
            self.holders = {by}
            if self.valve is not None:
                self.valve.export_hold(True)
        else:
            holders.add(by)

    def release(self, by: object) -> None:
        holders = self.holders
        if holders is None or by not in holders:
            return
        holders.discard(by)
        if not holders:
            self.holders = None
            if self.valve is not None:
                self.valve.export_hold(False)

    @property
    def tunnel(self) -> str:
        return self.outer.protocol

    @property
    def user(self) -> str | None:
        return self.outer.user


class FlowTable:
    """Live connections and flows, by id; hands out ids."""

    def __init__(self) -> None:
        self._next_id = 1
        self.connections: dict[int, Connection] = {}
        self.flows: dict[int, Flow] = {}
        self.per_client: dict[str, int] = {}  # open connections by client address
        # open flows with l4 "udp" (SOCKS5 UDP ASSOCIATE): they hold no socket of their own
        self.udp_flows = 0

    def _id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def open_connection(
        self, client: Endpoint, local: Endpoint, listener: str, now: float
    ) -> Connection:
        conn = Connection(self._id(), client, local, listener, now)
        self.connections[conn.id] = conn
        self.per_client[client[0]] = self.per_client.get(client[0], 0) + 1
        return conn

    def close_connection(self, conn: Connection) -> None:
        """Idempotent: the first call removes the connection and its count."""
        if self.connections.pop(conn.id, None) is None:
            return
        ip = conn.client[0]
        left = self.per_client.get(ip, 0) - 1
        if left > 0:
            self.per_client[ip] = left
        else:
            self.per_client.pop(ip, None)

    def open_flow(
        self,
        outer: Connection,
        server: Endpoint,
        requested_host: str,
        requested_port: int,
        now: float,
        l4: str = "tcp",
    ) -> Flow:
        flow = Flow(self._id(), outer, server, requested_host, requested_port, now, l4)
        outer.flows += 1
        self.flows[flow.id] = flow
        if l4 == "udp":
            self.udp_flows += 1
        return flow

    def close_flow(self, flow: Flow, reason: CloseReason, now: float) -> None:
        flow.state = State.CLOSED
        flow.reason = reason
        flow.end = now
        if self.flows.pop(flow.id, None) is not None and flow.l4 == "udp":
            self.udp_flows -= 1

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self.flows.values()))

    def __len__(self) -> int:
        return len(self.flows)
