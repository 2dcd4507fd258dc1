"""Connecting through an upstream proxy (chaining): the I/O shell around ``proto.proxyclient``.

``Services.open`` comes here when an ``[[access.rules]]`` rule with ``via``
decides the request (``DestinationPolicy.route``). The result is what a
direct connect gives: a connected transport driven by the caller's protocol
and the flow's server endpoint, so tunnels, plain-HTTP forwarding (which
asks the upstream for a CONNECT tunnel to port 80 too: one way for every
client protocol and every upstream type) and TLS interception work over a
chain unchanged.

Who resolves the name, and what ip2 is:

* The client asked for an IP literal: judged by every rule and the
  default-denied ranges (``check_address``); the proxy is asked for that
  address; ip2 is that address.
* A name, ``http``, ``socks5h``, ``socks4a`` upstream: judged by the name
  rules (``check_name``; rules with ``cidrs`` cannot judge a name nobody
  resolved), sent as the name; the upstream resolves it, and proxytap never
  learns the address: ip2 is ``0.0.0.0`` (port2 the requested port), the
  name is the flow's ``requested_host`` and the SOCKS reply's BND address is
  recorded beside it (``Flow.via.bound``). BND is the upstream's own end of
  its connection to the destination (RFC 1928), not the destination, so it
  is never passed off as ip2.
* A name, ``socks5`` or ``socks4`` upstream: proxytap resolves it, judges
  every address as for a direct connect, and asks the upstream for the
  first allowed one (IPv4 for SOCKS4); ip2 is that address.

Failures (``UpstreamError``, answered like direct-connect failures) are
counted in ``Stats.connect_errors`` by ``Failure`` and in
``Stats.proxy_errors`` by (proxy, stage): ``connect`` (the upstream proxy
could not be reached), ``timeout`` (no answer within ``timeouts.connect``),
``auth`` (it refused proxytap's credentials: logged as a warning, it is a
configuration error), ``refused`` (it answered with a failure for the
destination), ``protocol`` (a malformed answer, or it closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxytap.errors import Failure, UpstreamError, classify_os_error
from proxytap.flows.table import Endpoint, Via, endpoint
from proxytap.front.upstream import SockAddr, interleave, literal_address, open_upstream
from proxytap.hostport import hostport
from proxytap.policy.acl import refusal_text
from proxytap.policy.chain import UpstreamProxy
from proxytap.proto.proxyclient import (
    PROTOCOL,
    ChainRefused,
    Established,
    ProxyClient,
)

if TYPE_CHECKING:
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front")

UNKNOWN_ADDRESS = "0.0.0.0"  # ip2 when the upstream proxy resolved the name
CONNECT = "connect"
TIMEOUT = "timeout"
# every stage a chained connect can fail in (label values exported at 0)
STAGES = (CONNECT, TIMEOUT, "auth", "refused", PROTOCOL)


class Upstreams:
    """The configured upstream proxies with their secrets (password files read now).

    Built with the rest of the policy at start-up and on reload, so an
    unreadable password file is a ``ConfigError`` naming its key then.
    """

    def __init__(self, proxies: dict[str, UpstreamProxy]) -> None:
        self.proxies = proxies
        self.secrets = {name: p.secret() for name, p in proxies.items()}

    def __getitem__(self, name: str) -> UpstreamProxy:
        return self.proxies[name]


class _Handshake[P: asyncio.BaseProtocol](asyncio.Protocol):
    """The transport's protocol while the upstream proxy is asked; then ``factory()``'s.

    On success the caller's protocol takes the transport over at once (in
    the callback that completed the reply), with the destination bytes that
    came with the reply: nothing the destination sends can be missed.
    """

    def __init__(self, client: ProxyClient, factory: Callable[[], P]) -> None:
        self.client = client
        self.factory = factory
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[tuple[P, Established]] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.client.start())

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        transport = self.transport
        assert transport is not None
        try:
            out = self.client.receive_data(data)
        except ChainRefused as exc:
            self._fail(exc)
            return
        if out:
            transport.write(out)
        established = self.client.established
        if established is None:
            return
        protocol = self.factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if established.rest:
            cast(asyncio.Protocol, protocol).data_received(established.rest)
        self.done.set_result((protocol, established))

    def eof_received(self) -> bool:
        self.data_received(b"")  # before the reply: the proxy closed on us
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            failure = classify_os_error(exc) if exc is not None else Failure.INTERNAL
            self.done.set_exception(
                ChainRefused(PROTOCOL, failure, f"the upstream proxy closed ({exc!r})")
            )

    def _fail(self, exc: ChainRefused) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


def _failed(
    services: Services,
    proxy: UpstreamProxy,
    listener: str,
    stage: str,
    failure: Failure,
    detail: str,
) -> UpstreamError:
    """Count a chained connect's failure; the error to raise (what the client is told)."""
    stats = services.stats
    stats.proxy_errors[(proxy.name, stage)] += 1
    stats.connect_errors[(listener, failure.value)] += 1
    where = f"upstream proxy {proxy.name} ({proxy.url})"
    if stage == "auth":
        log.warning("%s refused proxytap's credentials: %s", where, detail)
    if stage == CONNECT:
        message = f"the upstream proxy {proxy.name!r} could not be reached ({failure.value})"
    elif stage == TIMEOUT:
        message = f"the upstream proxy {proxy.name!r} did not answer in time"
    elif stage == "refused":
        message = f"{failure.description} (reported by the upstream proxy {proxy.name!r})"
    else:
        message = f"{failure.description} (upstream proxy {proxy.name!r})"
    return UpstreamError(failure, f"{where}: {stage}: {detail}", message)


async def _target(
    services: Services, proxy: UpstreamProxy, host: str, port: int, user: str | None, listener: str
) -> str:
    """What the upstream proxy is asked for: the name, or an address proxytap judged."""
    policy = services.destinations
    literal = literal_address(host.strip("[]"), port)
    if literal is not None:
        return literal[0][1][0]  # judged in full by DestinationPolicy.route
    decision = policy.check_name(host, port, user)
    if decision is not None and not decision.allowed:
        services.denied(listener, decision.rule, "destination denied")
        raise UpstreamError(
            decision.failure or Failure.DENIED,
            f"rule {decision.rule}",
            refusal_text(decision.rule, port),
        )
    if proxy.remote_dns:
        return host
    cfg = services.config
    try:
        async with asyncio.timeout(cfg.timeouts.connect):
            addrs = await services.resolver.resolve(host, port)
    except TimeoutError:
        raise UpstreamError(Failure.DNS_TIMEOUT, f"dns for {host}:{port}") from None
    except (OSError, UnicodeError) as exc:
        failure = classify_os_error(exc) if isinstance(exc, OSError) else Failure.DNS_ERROR
        raise UpstreamError(failure, repr(exc)) from None
    denied: str | None = None
    for _family, sockaddr in interleave(addrs, cfg.upstream.prefer):
        ip = sockaddr[0]
        if proxy.ipv4_only and ":" in ip:
            continue
        verdict = policy.check_address(ip, port, host, user)
        if verdict.allowed:
            return ip
        denied = denied or verdict.rule
    if denied is not None:
        services.denied(listener, denied, "destination denied")
        raise UpstreamError(Failure.PROHIBITED, f"rule {denied}", refusal_text(denied, port))
    raise UpstreamError(Failure.DNS_ERROR, f"{host!r} has no address the upstream can use")


async def open_chained[P: asyncio.BaseProtocol](
    services: Services,
    name: str,
    host: str,
    port: int,
    user: str | None,
    factory: Callable[[], P],
    listener: str,
) -> tuple[asyncio.Transport, P, Endpoint, Via]:
    """Connect to ``host``:``port`` through the upstream proxy ``name``.

    Returns the transport (driven by ``factory()``'s protocol), the flow's
    server endpoint (see the module docstring) and the ``Via`` record.
    Raises ``UpstreamError`` (counted).
    """
    upstreams = services.upstreams
    proxy = upstreams[name]
    secret = upstreams.secrets[name]
    target = await _target(services, proxy, host, port, user, listener)
    try:  # what the handshake cannot carry fails here, before anything is sent
        ProxyClient(proxy.kind, target, port, username=proxy.username, password=secret)
    except ValueError as exc:
        services.stats.connect_errors[(listener, Failure.NET_UNREACHABLE.value)] += 1
        raise UpstreamError(
            Failure.NET_UNREACHABLE,
            f"upstream proxy {name} ({proxy.url}): {exc}",
            f"the upstream proxy {name!r} cannot reach this address ({proxy.scheme})",
        ) from None
    cfg = services.config
    timeout = cfg.timeouts.connect
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    started = time.monotonic()

    def handshake() -> _Handshake[P]:
        client = ProxyClient(proxy.kind, target, port, username=proxy.username, password=secret)
        return _Handshake(client, factory)

    async def attempt(family: int, sockaddr: SockAddr) -> tuple[asyncio.Transport, _Handshake[P]]:
        return await services.connector.open(family, sockaddr, handshake)

    def discard(made: tuple[asyncio.Transport, _Handshake[P]]) -> None:
        made[0].close()

    try:
        transport, pending = await open_upstream(
            proxy.host,
            proxy.port,
            resolver=services.resolver,
            attempt=attempt,
            discard=discard,
            timeout=timeout,
            delay=cfg.upstream.happy_eyeballs_delay,
            prefer=cfg.upstream.prefer,
        )
    except UpstreamError as exc:
        stage = TIMEOUT if exc.failure is Failure.TIMEOUT else CONNECT
        raise _failed(services, proxy, listener, stage, exc.failure, exc.detail) from None
    try:
        async with asyncio.timeout_at(deadline):
            protocol, established = await pending.done
    except TimeoutError:
        transport.abort()
        raise _failed(
            services, proxy, listener, TIMEOUT, Failure.TIMEOUT, f"no answer within {timeout}s"
        ) from None
    except ChainRefused as exc:
        transport.abort()
        raise _failed(services, proxy, listener, exc.stage, exc.failure, exc.detail) from None
    except BaseException:
        transport.abort()
        raise
    services.stats.connect_seconds.observe(time.monotonic() - started)
    services.stats.proxy_connects[name] += 1
    try:
        address = endpoint(transport.get_extra_info("peername"))
    except (TypeError, ValueError, OSError):
        address = (proxy.host, proxy.port)
    by_name = target == host and literal_address(host.strip("[]"), port) is None
    peer: Endpoint = (UNKNOWN_ADDRESS if by_name else target, port)
    via = Via(name, address, established.bound, by_name)
    log.debug(
        "via %s (%s): %s asked as %s, bound %s",
        name,
        hostport(*address),
        hostport(host, port),
        hostport(target, port),
        hostport(*established.bound) if established.bound else "-",
    )
    return transport, protocol, peer, via
