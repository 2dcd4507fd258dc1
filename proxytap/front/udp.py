"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): one association's relay, policy and tap.

The handshake (``ClientConnection``) reads the request on the control
connection (authentication, the client ACL and the listener's limits apply
there exactly as for CONNECT), calls ``Association.open`` to bind the relay,
answers with the relay's address as BND.ADDR/BND.PORT, then hands the control
connection over with ``start``. From then on this module owns it all:

* **The relay socket** is bound on the address the client reached the
  listener at (the control connection's local address, same family), port 0.
  It takes datagrams from the client's address only (``conn.client``: the
  true client, also behind the PROXY protocol): when the request named the
  client's own address and a port, from that port only; otherwise the first
  well-formed datagram's source port pins the client for the association's
  life. A request naming another address (a client behind NAT names its
  private one) does not widen this: the relay never serves a third party.
  Anything else is dropped, counted (``foreign_source``) and logged at DEBUG
  at most once per ``LOG_WINDOW`` seconds.
* **Datagrams** (``proxytap.proto.socks.parse_udp_datagram``): a header that
  does not parse is dropped (``malformed``), a fragment (FRAG != 0) too
  (``fragment``; proxytap does not reassemble, as RFC 1928 allows).
* **Destination policy** per datagram, as for every connect
  (``DestinationPolicy``): a name is judged before any lookup, then every
  resolved address until one is allowed; an IP literal in full. A denial
  drops the datagram (``denied``) and is counted as the listener's policy
  denial by its rule. Names are resolved without blocking (the same resolver
  as upstream connects, within ``timeouts.connect``) and kept ``NAME_TTL``
  seconds per association (failures ``FAILED_TTL``), so a burst of queries to
  one name costs one lookup; at most ``MAX_WAITING`` datagrams wait for
  lookups (``backlog`` past it).
* **Upstream** is one socket per association, IPv6 with IPv4-mapped
  addresses for IPv4 destinations (IPv4 only where the host has no IPv6).
  Only sources the client has sent to may answer (``unsolicited`` otherwise,
  the filtering of a port-restricted NAT): the relay is not a way in for
  anyone else. Answers are sent back with the SOCKS UDP header naming their
  source.
* **Inner flows**: one ``Flow`` per (client UDP address, destination) pair,
  ``l4="udp"``, in the flow table (``/flows``, the JSON flow log when it
  ends) and classified by SF-TAP's UDP rules (``Hub.udp_opened``: DNS ports
  land on ``udp/dns``). Every datagram goes to the hub as one DATA event
  (``Hub.datagram``; SF-TAP has no CREATED or DESTROYED for UDP) and to
  PCAP as one UDP packet, with the true endpoints: the client's UDP address
  and the destination's. At most ``limits.max_udp_destinations`` pairs at
  once (``destination_limit`` past it); a pair idle for
  ``timeouts.udp_idle`` ends (``TIMEOUT``) and frees its place.
* **The end**: the control connection closing (``NORMAL``, or ``RESET``),
  the client sending anything on it after its request (``ERROR``: RFC 1928
  gives it nothing to say there), no datagram relayed either way for
  ``timeouts.udp_idle`` (``TIMEOUT``; the control connection is closed) or
  the proxy's shutdown (``SHUTDOWN``, once the drain grace is over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from proxytap.errors import ProtocolError
from proxytap.flows.table import CloseReason, Connection, Endpoint, Flow, endpoint
from proxytap.front.services import Services
from proxytap.front.shedding import LogWindow
from proxytap.front.tunnel import flow_ended
from proxytap.front.upstream import interleave, literal_address
from proxytap.hostport import hostport
from proxytap.proto.socks import UdpAssociateRequest, UdpDatagram, parse_udp_datagram, udp_header

log = logging.getLogger("proxytap.front")

# why a datagram was dropped (the ``reason`` label of proxytap_udp_dropped_datagrams_total)
FOREIGN = "foreign_source"  # not from the client's address (or its pinned port)
FRAGMENT = "fragment"  # FRAG != 0
MALFORMED = "malformed"  # a SOCKS UDP header that does not parse
DENIED = "denied"  # destination policy
DNS_ERROR = "dns_error"  # the destination name did not resolve in time
BACKLOG = "backlog"  # too many datagrams waiting for name lookups
DESTINATION_LIMIT = "destination_limit"  # limits.max_udp_destinations
UNSOLICITED = "unsolicited"  # from a source the client never sent to
BUFFER_FULL = "buffer_full"  # a socket's send buffer is full
SEND_ERROR = "send_error"  # the kernel refused to send
DROP_REASONS = (
    FOREIGN,
    FRAGMENT,
    MALFORMED,
    DENIED,
    DNS_ERROR,
    BACKLOG,
    DESTINATION_LIMIT,
    UNSOLICITED,
    BUFFER_FULL,
    SEND_ERROR,
)

NAME_TTL = 30.0  # seconds a resolved name is reused within one association
FAILED_TTL = 5.0  # ... a name that did not resolve
MAX_NAMES = 64  # names kept per association (the oldest goes first)
MAX_WAITING = 64  # datagrams of one association waiting for a name lookup
SEND_BUFFER_LIMIT = 1 << 20  # bytes queued in a datagram transport before drops
LOG_WINDOW = 10.0  # seconds between log lines about one kind of drop, per association
RESOLVE_PORT = 0  # lookups are by name alone; the port comes from each datagram

Addresses = list[tuple[int, str]]  # (family, IP text), in the order to try


class _Pair:
    """One destination of the association: its inner flow, last use, reply header."""

    __slots__ = ("flow", "header", "last", "sockaddr")

    def __init__(self, flow: Flow, sockaddr: tuple[Any, ...], last: float) -> None:
        self.flow = flow
        self.sockaddr = sockaddr  # how the upstream socket addresses it
        self.header = udp_header(*flow.server)  # before every answer to the client
        self.last = last


class _Name:
    """A name's lookup within one association (shared by the datagrams that wait on it)."""

    __slots__ = ("expires", "task")

    def __init__(self, task: asyncio.Task[Addresses]) -> None:
        self.task = task
        self.expires = float("inf")  # set when the lookup ends


class _Side(asyncio.DatagramProtocol):
    """The relay socket (``client=True``) or the upstream socket: calls into the association."""

    def __init__(self, assoc: Association, client: bool) -> None:
        self.assoc = assoc
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.client:
            self.assoc.from_client(data, addr)
        else:
            self.assoc.from_destination(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.assoc.drop(SEND_ERROR, repr(exc))


class _Control(asyncio.Protocol):
    """The TCP control connection once the association is up: any byte or close ends it."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def data_received(self, data: bytes) -> None:
        self.assoc.end(CloseReason.ERROR, "the client sent data on the control connection")

    def eof_received(self) -> bool:
        self.assoc.end(CloseReason.NORMAL, "control connection closed by the client")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.assoc.end(CloseReason.NORMAL, "control connection closed")
        else:
            self.assoc.end(CloseReason.RESET, f"control connection lost: {exc!r}")


class Association:
    """One SOCKS5 UDP association: the relay socket, the upstream socket, the pairs."""

    def __init__(self, services: Services, conn: Connection, request: UdpAssociateRequest) -> None:
        self.services = services
        self.conn = conn
        self.listener = conn.listener
        self.client_ip = conn.client[0]
        self.client_port = 0  # pinned: by the request, or by the first datagram
        named = not request.unspecified and endpoint((request.host, 0))[0] == self.client_ip
        if named and request.port:  # the client's own address and port: only from there
            self.client_port = request.port
        self.client: Endpoint | None = None  # (ip, port) once pinned
        self.client_addr: tuple[Any, ...] | None = None  # the relay's sendto address
        if self.client_port:
            self.client = (self.client_ip, self.client_port)
        self.relay: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None
        self.dual = False  # the upstream socket is IPv6 and reaches IPv4 as ::ffff:a.b.c.d
        self.bound: Endpoint = ("0.0.0.0", 0)
        self.control: asyncio.Transport | None = None
        self.pairs: dict[Endpoint, _Pair] = {}
        self.names: dict[str, _Name] = {}
        self.waiting = 0  # datagrams waiting for a name lookup
        self.tasks: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0  # loop time of the last relayed datagram
        self.up = 0  # datagrams relayed, client to destinations
        self.down = 0
        self.drops: dict[str, int] = {}
        self.logs: dict[str, LogWindow] = {}
        self.started = time.time()
        self.closed = False
        config = services.config
        self.idle = config.timeouts.udp_idle
        self.max_pairs = config.limits.max_udp_destinations

    # -- set-up (the handshake's calls) ---------------------------------------------------

    async def open(self, local: Endpoint) -> Endpoint:
        """Bind the relay on ``local``'s address (port 0) and the upstream socket.

        Returns the relay's address (the reply's BND.ADDR/BND.PORT). Raises
        ``OSError`` when a socket cannot be made; nothing is left open then.
        """
        loop = asyncio.get_running_loop()
        try:
            relay, _ = await loop.create_datagram_endpoint(
                lambda: _Side(self, True), local_addr=(local[0], 0)
            )
            self.relay = relay
            self.bound = endpoint(relay.get_extra_info("sockname"))
            sock = _upstream_socket()
            self.dual = sock.family == socket.AF_INET6
            upstream, _ = await loop.create_datagram_endpoint(lambda: _Side(self, False), sock=sock)
            self.upstream = upstream
        except BaseException:
            self._close_sockets()
            raise
        return self.bound

    def start(self, control: asyncio.Transport, early: bytes, eof: bool) -> None:
        """The reply was sent: the association takes the control connection over.

        ``early``: bytes the client sent after its request (ends the
        association at once, as would any later byte); ``eof``: it closed.
        """
        services = self.services
        self.control = control
        services.live.add(self)
        services.stats.udp_associations[self.listener] += 1
        services.stats.udp_associations_open[self.listener] += 1
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        control.set_protocol(_Control(self))
        log.debug(
            "udp association %s %s: relay %s",
            self.conn.uid,
            hostport(*self.conn.client),
            hostport(*self.bound),
        )
        if early:
            self.end(CloseReason.ERROR, "the client sent data on the control connection")
        elif eof:
            self.end(CloseReason.NORMAL, "control connection closed by the client")
        else:
            self.timer = loop.call_later(self.idle, self._tick)

    def close(self) -> None:
        """Opened but never started (the client left while the relay was bound)."""
        self.closed = True
        self._close_sockets()

    # -- client to destinations -----------------------------------------------------------

    def from_client(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.closed:
            return
        try:
            src = endpoint(addr)
        except ValueError:
            self.drop(FOREIGN, repr(addr))
            return
        if src[0] != self.client_ip or (self.client_port and src[1] != self.client_port):
            self.drop(FOREIGN, hostport(*src))
            return
        try:
            dg = parse_udp_datagram(data)
        except ProtocolError as exc:
            self.drop(MALFORMED, exc.reason)
            return
        if dg.frag:
            self.drop(FRAGMENT, f"FRAG {dg.frag}")
            return
        if self.client_addr is None:
            self.client_port = src[1]
            self.client = src
            self.client_addr = addr
        if dg.atyp != "domain":
            self._to_address(dg, dg.host, literal_address(dg.host, dg.port) or [])
            return
        user = self.conn.user
        verdict = self.services.destinations.check_name(dg.host, dg.port, user)
        if verdict is not None and not verdict.allowed:
            self._denied(dg, verdict.rule)
            return
        name = self.names.get(dg.host)
        if name is not None and name.task.done():
            if name.expires > asyncio.get_running_loop().time():
                self._to_name(dg, name.task.result())
                return
            del self.names[dg.host]
            name = None
        if self.waiting >= MAX_WAITING:
            self.drop(BACKLOG, dg.host)
            return
        if name is None:
            name = self._lookup(dg.host, dg.port)
        self.waiting += 1
        self._spawn(self._after_lookup(dg, name))

    def _to_name(self, dg: UdpDatagram, addrs: Addresses) -> None:
        if not addrs:
            self.drop(DNS_ERROR, dg.host)
            return
        self._to_address(
            dg, dg.host, [(family, _sockaddr(family, ip, dg.port)) for family, ip in addrs]
        )

    def _to_address(self, dg: UdpDatagram, host: str, addrs: list[Any]) -> None:
        """Send to the first of ``addrs`` the policy allows (``host``: the name asked for)."""
        policy = self.services.destinations
        user = self.conn.user
        denied_by = ""
        for _family, sockaddr in addrs:
            dst = endpoint(sockaddr)
            # judged for every datagram (the policy caches its answers): the same
            # address may be asked for under another name, and rules may be reloaded
            verdict = policy.check_address(dst[0], dst[1], host, user)
            if not verdict.allowed:
                denied_by = denied_by or verdict.rule
                continue
            pair = self.pairs.get(dst)
            if pair is None:
                pair = self._pair(dst, dg, host)
                if pair is None:
                    return
            self._send_up(pair, dg.data)
            return
        if denied_by:
            self._denied(dg, denied_by)
        else:
            self.drop(DNS_ERROR, dg.host)

    def _pair(self, dst: Endpoint, dg: UdpDatagram, host: str) -> _Pair | None:
        """A new destination: its inner flow (None past ``max_udp_destinations``)."""
        if len(self.pairs) >= self.max_pairs:
            self.drop(DESTINATION_LIMIT, hostport(*dst))
            return None
        assert self.client is not None and self.upstream is not None
        services = self.services
        flow = services.table.open_flow(self.conn, dst, host, dg.port, time.time(), l4="udp")
        flow.client = self.client
        if services.hub is not None:
            services.hub.udp_opened(flow, dg.data)
        ip = dst[0]
        if self.dual and ":" not in ip:
            ip = "::ffff:" + ip
        sockaddr: tuple[Any, ...] = (ip, dst[1], 0, 0) if ":" in ip else (ip, dst[1])
        pair = self.pairs[dst] = _Pair(flow, sockaddr, asyncio.get_running_loop().time())
        log.debug(
            "udp %s %s -> %s (%s) open",
            flow.tunnel,
            hostport(*flow.client),
            hostport(host, dg.port),
            hostport(*dst),
        )
        return pair

    def _send_up(self, pair: _Pair, payload: bytes) -> None:
        upstream = self.upstream
        assert upstream is not None
        if _queued(upstream) > SEND_BUFFER_LIMIT:
            self.drop(BUFFER_FULL, "upstream")
            return
        upstream.sendto(payload, pair.sockaddr)
        flow = pair.flow
        flow.bytes_up += len(payload)
        flow.chunks_up += 1
        self.up += 1
        self.services.stats.udp_datagrams[(self.listener, "upstream")] += 1
        pair.last = self.last = asyncio.get_running_loop().time()
        hub = self.services.hub
        if hub is not None and payload:
            hub.datagram(flow.client, flow.server, payload, time.time(), hop=flow.hop)

    def _denied(self, dg: UdpDatagram, rule: str) -> None:
        self.services.denied(self.listener, rule, "destination denied")
        self.drop(DENIED, f"{hostport(dg.host, dg.port)} by rule {rule}")

    # -- name lookups ----------------------------------------------------------------------

    def _lookup(self, host: str, port: int) -> _Name:
        if len(self.names) >= MAX_NAMES:
            for key, old in list(self.names.items()):
                if old.task.done():
                    del self.names[key]
                    break
        task: asyncio.Task[Addresses] = asyncio.get_running_loop().create_task(
            self._resolve(host, port)
        )
        name = self.names[host] = _Name(task)
        self.tasks.add(task)
        task.add_done_callback(self._looked_up)
        task.add_done_callback(lambda t: self._expire(name, t))
        return name

    def _looked_up(self, task: asyncio.Task[Addresses]) -> None:
        self.tasks.discard(task)

    def _expire(self, name: _Name, task: asyncio.Task[Addresses]) -> None:
        if task.cancelled():
            return
        ttl = NAME_TTL if task.exception() is None and task.result() else FAILED_TTL
        name.expires = asyncio.get_running_loop().time() + ttl

    async def _resolve(self, host: str, port: int) -> Addresses:
        """The name's addresses in the order to try (``upstream.prefer``); [] when it fails."""
        services = self.services
        try:
            async with asyncio.timeout(services.config.timeouts.connect):
                infos = await services.resolver.resolve(host, port)
        except (OSError, UnicodeError, TimeoutError) as exc:
            log.debug("udp association %s: %s did not resolve: %r", self.conn.uid, host, exc)
            return []
        ordered = interleave(infos, services.config.upstream.prefer)
        return [(family, str(sockaddr[0])) for family, sockaddr in ordered]

    async def _after_lookup(self, dg: UdpDatagram, name: _Name) -> None:
        try:
            addrs = await asyncio.shield(name.task)
        finally:
            self.waiting -= 1
        if not self.closed:
            self._to_name(dg, addrs)

    def _spawn(self, coro: Any) -> None:
        task = self.services.tasks.spawn(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- destinations to the client --------------------------------------------------------

    def from_destination(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.closed:
            return
        try:
            src = endpoint(addr)
        except ValueError:
            self.drop(UNSOLICITED, repr(addr))
            return
        pair = self.pairs.get(src)
        if pair is None:
            self.drop(UNSOLICITED, hostport(*src))
            return
        relay = self.relay
        assert relay is not None and self.client_addr is not None
        if _queued(relay) > SEND_BUFFER_LIMIT:
            self.drop(BUFFER_FULL, "relay")
            return
        relay.sendto(pair.header + data, self.client_addr)
        flow = pair.flow
        flow.bytes_down += len(data)
        flow.chunks_down += 1
        self.down += 1
        self.services.stats.udp_datagrams[(self.listener, "downstream")] += 1
        pair.last = self.last = asyncio.get_running_loop().time()
        hub = self.services.hub
        if hub is not None and data:
            hub.datagram(flow.server, flow.client, data, time.time(), hop=flow.hop)

    # -- drops, idle, the end --------------------------------------------------------------

    def drop(self, reason: str, detail: str) -> None:
        """A datagram dropped: counted, and logged at most once per window and reason."""
        self.services.stats.udp_dropped[(self.listener, reason)] += 1
        self.drops[reason] = self.drops.get(reason, 0) + 1
        window = self.logs.get(reason)
        if window is None:
            window = self.logs[reason] = LogWindow(LOG_WINDOW)
        n = window.hit()
        if n:
            log.log(
                logging.INFO if reason == DENIED else logging.DEBUG,
                "udp association %s %s: %d datagram(s) dropped (%s), last: %s",
                self.conn.uid,
                hostport(*self.conn.client),
                n,
                reason,
                detail,
            )

    def _tick(self) -> None:
        """The idle timer: forget idle destinations; end the association when all is idle."""
        self.timer = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for dst, pair in list(self.pairs.items()):
            if now - pair.last >= self.idle:
                del self.pairs[dst]
                self._flow_ended(pair.flow, CloseReason.TIMEOUT)
        if now - self.last >= self.idle:
            self.end(CloseReason.TIMEOUT, f"no datagram for {self.idle:g}s")
            return
        due = min([self.last, *(p.last for p in self.pairs.values())]) + self.idle
        self.timer = loop.call_later(max(due - now, 0.01), self._tick)

    def shutdown(self, force: bool) -> None:
        """Proxy shutdown: the association goes on while draining, ends when ``force``."""
        if force:
            self.end(CloseReason.SHUTDOWN, "proxy shutting down")

    def end(self, reason: CloseReason, why: str) -> None:
        """End once: sockets, every pair's flow, the control connection, the books."""
        if self.closed:
            return
        self.closed = True
        services = self.services
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for task in list(self.tasks):
            task.cancel()
        self._close_sockets()
        pairs, self.pairs = self.pairs, {}
        for pair in pairs.values():
            self._flow_ended(pair.flow, reason)
        control = self.control
        if control is not None and not control.is_closing():
            if reason in (CloseReason.RESET, CloseReason.SHUTDOWN):
                control.abort()
            else:
                control.close()
        services.table.close_connection(self.conn)
        services.stats.udp_associations_open[self.listener] -= 1
        services.live.discard(self)
        log.info(
            "udp association %s %s (relay %s) ended: %s; datagrams up=%d down=%d dropped=%d %.3fs",
            self.conn.uid,
            hostport(*self.conn.client),
            hostport(*self.bound),
            why,
            self.up,
            self.down,
            sum(self.drops.values()),
            time.time() - self.started,
        )

    def _flow_ended(self, flow: Flow, reason: CloseReason) -> None:
        flow_ended(self.services, flow, reason, "udp")

    def _close_sockets(self) -> None:
        for transport in (self.relay, self.upstream):
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()


def _queued(transport: asyncio.DatagramTransport) -> int:
    """Bytes the transport holds for a socket that would block (asyncio's and uvloop's have
    ``get_write_buffer_size``; the stubs of ``DatagramTransport`` do not)."""
    size = getattr(transport, "get_write_buffer_size", None)
    return int(size()) if size is not None else 0


def _sockaddr(family: int, ip: str, port: int) -> tuple[Any, ...]:
    return (ip, port, 0, 0) if family == socket.AF_INET6 else (ip, port)


def _upstream_socket() -> socket.socket:
    """An unconnected UDP socket on every address: IPv6 reaching IPv4 too, else IPv4."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
        except OSError:
            sock.close()
            sock = None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", 0))
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


__all__ = ["DROP_REASONS", "Association"]
