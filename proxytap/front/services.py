"""What every connection shares: config, flow table, hub, upstream connect, tasks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from proxytap.config import Config
from proxytap.errors import Failure, UpstreamError
from proxytap.export.hub import Hub
from proxytap.flows.stats import Stats
from proxytap.flows.table import (
    CloseReason,
    Connection,
    Endpoint,
    Flow,
    FlowTable,
    Via,
    endpoint,
)
from proxytap.front.authn import Authenticator
from proxytap.front.chain import Upstreams, open_chained
from proxytap.front.shedding import FdBudget, LogWindow
from proxytap.front.upstream import (
    AddrInfo,
    Connector,
    Resolver,
    SockAddr,
    SocketConnector,
    SystemResolver,
    open_upstream,
)
from proxytap.modules.chain import Chain
from proxytap.modules.loader import build_chains, header_rules
from proxytap.policy.acl import ClientAcl, DestinationPolicy, build_policy, refusal_text
from proxytap.policy.chain import build_proxies
from proxytap.policy.headers import HeaderRules
from proxytap.policy.intercept import InterceptPolicy, PinMemory

if TYPE_CHECKING:
    from proxytap.intercept.engine import Engine

log = logging.getLogger("proxytap")


class Closable(Protocol):
    def shutdown(self, force: bool) -> None:
        """Stop; ``force`` closes at once, else only idle parts close."""


class Silent(Protocol):
    """A client connection that has not sent a byte yet."""

    def evict(self) -> None:
        """Close it (counted): a connection of the same client needs its place."""


PER_CLIENT = "max-connections-per-client"
GLOBAL = "max-connections"
CLIENT_ACL = "client-acl"
SOCKS4_USERID = "socks4-userid"
# what a client refused at the handshake by these rules is told: the setting to change
HANDSHAKE_TEXT = {
    CLIENT_ACL: "the client address is not allowed by rule client-acl; allow it in access.clients",
    SOCKS4_USERID: "the SOCKS4 user id is not accepted by rule socks4-userid; "
    "allow it in auth.socks4_userids",
}


class TaskSet:
    """Keeps a reference to every background task (no fire-and-forget) and logs failures."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in a connection task", exc_info=task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Services:
    config: Config
    hub: Hub | None = None
    table: FlowTable = field(default_factory=FlowTable)
    resolver: Resolver = field(default_factory=SystemResolver)
    connector: Connector = field(default_factory=SocketConnector)
    tasks: TaskSet = field(default_factory=TaskSet)
    live: set[Closable] = field(default_factory=set)
    draining: bool = False
    clients: ClientAcl = field(init=False)
    destinations: DestinationPolicy = field(init=False)
    auth: Authenticator | None = field(init=False)
    stats: Stats = field(default_factory=Stats)
    rules: HeaderRules = field(init=False)
    chains: dict[str, Chain] = field(init=False)  # listener name -> its modules
    # the open-file budget (App.start measures it once the listeners are bound); None: unchecked
    fds: FdBudget | None = None
    lingering: int = 0  # closed client connections still draining after a final answer
    fd_log: LogWindow = field(default_factory=LogWindow)
    # client address -> its connections that have sent nothing yet, oldest first
    silent: dict[str, dict[Silent, None]] = field(default_factory=dict)
    upstreams: Upstreams = field(init=False)  # [[upstream.proxies]], for via rules
    # upstream transports connected through an upstream proxy -> how (for open_flow)
    vias: weakref.WeakKeyDictionary[asyncio.BaseTransport, Via] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    interception: InterceptPolicy = field(init=False)  # tls.intercept / tls.passthrough
    pins: PinMemory = field(init=False)  # clients that rejected proxytap's certificate
    engine: Engine | None = None  # the TLS engine (App.start), when interception is on

    def __post_init__(self) -> None:
        cfg = self.config
        self.clients, self.destinations = build_policy(cfg.access)
        self.auth = Authenticator.from_config(cfg.auth)
        self.rules = header_rules(cfg)
        self.upstreams = Upstreams(build_proxies(cfg.upstream.proxies, "upstream.proxies"))
        self.interception = InterceptPolicy.from_config(cfg.tls)
        self.pins = PinMemory(cfg.tls.pinning_fail_open)
        # loads user modules: a ConfigError here stops start-up
        self.chains = build_chains(cfg, self.rules, self.stats.module_errors)

    @property
    def refusals(self) -> dict[tuple[str, str], int]:
        """(rule, reason) -> requests refused by policy, limits or authentication."""
        return self.stats.refusals

    def refused(self, rule: str, reason: str) -> None:
        self.stats.refusals[(rule, reason)] += 1

    def denied(self, listener: str, rule: str, reason: str) -> None:
        """An access-policy refusal: a rejection, and counted per listener and rule."""
        self.stats.refusals[(rule, reason)] += 1
        self.stats.denied[(listener, rule)] += 1

    def rebuilt(self, config: Config) -> Services:
        """Reload, step one: everything ``__post_init__`` derives, built from ``config``.

        The fields not passed in (policy, users, header rules, module chains,
        upstream proxies, ...) of a fresh instance that shares ``stats``;
        a ``ConfigError`` here leaves the running set untouched.
        """
        return Services(config=config, stats=self.stats)

    def adopt(self, fresh: Services) -> None:
        """Reload, step two: what new connections use comes from ``fresh`` from now on.

        All of it is swapped in one step (nothing can run in between).
        Connections already open keep what they took (their module chain, the
        decisions made for them); the counters go on.
        """
        old_auth = self.auth
        old_pins = self.pins
        for f in dataclasses.fields(self):
            if not f.init:
                setattr(self, f.name, getattr(fresh, f.name))
        self.config = fresh.config
        new_auth = self.auth
        if (
            old_auth is not None
            and new_auth is not None
            and (old_auth.throttle.limit, old_auth.throttle.window)
            == (new_auth.throttle.limit, new_auth.throttle.window)
        ):
            new_auth.throttle = old_auth.throttle  # failed attempts still count
        # clients that rejected proxytap's certificate stay passed through (new duration)
        old_pins.ttl = self.pins.ttl
        self.pins = old_pins

    def open_flow(
        self,
        conn: Connection,
        peer: Endpoint,
        host: str,
        port: int,
        *,
        upstream: asyncio.BaseTransport | None = None,
    ) -> Flow:
        """The tap step, for tunnels and forwarded HTTP alike: an inner flow begins.

        ``peer`` is the address actually connected to (from ``open``): the
        flow's true destination. ``upstream``: the transport ``open`` gave,
        so a flow through an upstream proxy records it (``Flow.via``). The
        flow is in the table and announced to the hub (CREATED) before a byte
        of it is relayed.
        """
        flow = self.table.open_flow(conn, peer, host, port, time.time())
        if upstream is not None and self.vias:
            flow.via = self.vias.pop(upstream, None)
        if self.hub is not None:
            self.hub.opened(flow)
        return flow

    def flow_closed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        """The one place an inner flow ends: hub, flow table, counters."""
        if self.hub is not None:
            self.hub.closed(flow, reason, now)
        self.table.close_flow(flow, reason, now)
        stats = self.stats
        stats.bytes_up += flow.bytes_up
        stats.bytes_down += flow.bytes_down
        listener = flow.outer.listener
        stats.relayed[(listener, "upstream")] += flow.bytes_up
        stats.relayed[(listener, "downstream")] += flow.bytes_down
        stats.flows_closed[(flow.l7 or "unclassified", reason.value)] += 1
        stats.flow_seconds.observe(now - flow.start)

    def admit(self, client_ip: str) -> tuple[str, str] | None:
        """(rule, reason) when a client connection just opened must be refused."""
        limits = self.config.limits
        count = self.table.per_client.get(client_ip, 0)
        if not self.clients.allowed(client_ip):
            return (CLIENT_ACL, "client address not allowed")
        if limits.max_connections and len(self.table.connections) > limits.max_connections:
            return (GLOBAL, "connection limit reached")
        if limits.max_connections_per_client and count > limits.max_connections_per_client:
            return (PER_CLIENT, "too many connections from this client")
        return None

    def readmit(self, client_ip: str) -> tuple[str, str] | None:
        """A connection refused at open by a connection limit has sent its first bytes.

        Judged again (connections may have closed since), and if still over a
        limit, the client's oldest silent connection gives up its place: a
        client that sends requests is served before its connections that send
        nothing. Only the client's own connections are given up, never another's.
        """
        refusal = self.admit(client_ip)
        if refusal is None or refusal[0] not in (PER_CLIENT, GLOBAL):
            return refusal
        waiting = self.silent.get(client_ip)
        if not waiting:
            return refusal
        next(iter(waiting)).evict()
        return None

    def went_silent(self, client_ip: str, conn: Silent) -> None:
        waiting = self.silent.get(client_ip)
        if waiting is None:
            self.silent[client_ip] = {conn: None}
        else:
            waiting[conn] = None

    def spoke(self, client_ip: str, conn: Silent) -> None:
        """``conn`` sent its first bytes, or closed: no longer silent."""
        waiting = self.silent.get(client_ip)
        if waiting is not None:
            waiting.pop(conn, None)
            if not waiting:
                del self.silent[client_ip]

    def out_of_files(self) -> bool:
        """One more client connection would leave fewer than the reserve of descriptors."""
        fds = self.fds
        if fds is None:
            return False
        table = self.table
        upstreams = len(table.flows) - table.udp_flows  # a UDP association's flows share a socket
        return fds.full(len(table.connections) + 1, upstreams, self.lingering)

    async def open[P: asyncio.BaseProtocol](
        self,
        host: str,
        port: int,
        user: str | None,
        factory: Callable[[], P],
        *,
        listener: str,
    ) -> tuple[asyncio.Transport, P, Endpoint]:
        """Policy, then resolve and connect: a transport driven by ``factory()``.

        The one upstream-connect API, for tunnels and forwarded HTTP alike.
        ``factory`` is called once per attempt (Happy Eyeballs may race
        several): callers pass a small holding protocol (``PendingUpstream``)
        and hand the winner's transport to their own with ``set_protocol``.

        The name is judged before any lookup, every resolved address right
        before it would be contacted (a denied address is never sent a
        packet). Also returns the address connected to, so callers need not ask
        the transport for it.
        A rule with ``via`` (``DestinationPolicy.route``) sends the connection
        through that upstream proxy instead (``front/chain.py``): the same
        result, the peer then being what the proxy was asked for (or
        ``0.0.0.0`` when it resolved the name); pass the transport to
        ``open_flow`` so the flow records the proxy.
        ``UpstreamError`` names the failure. A policy denial is counted as a
        denial of ``listener`` (``stats.denied``), not as a connect error: no
        connect was tried, and alerting on connect errors should not page for it.
        """
        route = self.destinations.route(host, port, user) if self.destinations.chaining else None
        if route is not None and route.via is not None:
            transport, protocol, peer, via = await open_chained(
                self, route.via, host, port, user, factory, listener
            )
            self.vias[transport] = via
            return transport, protocol, peer
        connector = self.connector

        async def attempt(family: int, sockaddr: SockAddr) -> tuple[asyncio.Transport, P, Endpoint]:
            transport, protocol = await connector.open(family, sockaddr, factory)
            return transport, protocol, endpoint(sockaddr)

        def discard(made: tuple[asyncio.Transport, P, Endpoint]) -> None:
            made[0].close()

        return await self._upstream(host, port, user, listener, attempt, discard)

    async def _upstream[T](
        self,
        host: str,
        port: int,
        user: str | None,
        listener: str,
        attempt: Callable[[int, SockAddr], Awaitable[T]],
        discard: Callable[[T], None],
    ) -> T:
        decision = self.destinations.check_name(host, port, user)
        if decision is not None and not decision.allowed:
            failure = decision.failure or Failure.DENIED
            self.denied(listener, decision.rule, "destination denied")
            text = refusal_text(decision.rule, port)
            raise UpstreamError(failure, f"rule {decision.rule}", text)
        policy = self.destinations
        denied_by: list[str] = []

        def check(addr: AddrInfo) -> tuple[Failure, str] | None:
            verdict = policy.check_address(addr[1][0], port, host, user)
            if verdict.allowed:
                return None
            denied_by.append(verdict.rule)
            return verdict.failure or Failure.PROHIBITED, f"rule {verdict.rule} ({addr[1][0]})"

        cfg = self.config
        started = time.monotonic()
        try:
            made = await open_upstream(
                host,
                port,
                resolver=self.resolver,
                attempt=attempt,
                discard=discard,
                timeout=cfg.timeouts.connect,
                delay=cfg.upstream.happy_eyeballs_delay,
                prefer=cfg.upstream.prefer,
                check=check,
            )
        except UpstreamError as exc:
            if exc.failure is Failure.PROHIBITED and denied_by:
                self.denied(listener, denied_by[0], "destination denied")
                exc.message = refusal_text(denied_by[0], port)
            else:
                self.stats.connect_errors[(listener, exc.failure.value)] += 1
            raise
        self.stats.connect_seconds.observe(time.monotonic() - started)
        return made
