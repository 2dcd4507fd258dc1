"""What every connection shares: config, flow table, hub, upstream connect, tasks."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxytap.config import Config
from proxytap.errors import Failure, UpstreamError
from proxytap.export.hub import Hub
from proxytap.flows.table import FlowTable
from proxytap.front.authn import Authenticator
from proxytap.front.upstream import (
    AddrInfo,
    Connector,
    Resolver,
    SocketConnector,
    SystemResolver,
    open_upstream,
)
from proxytap.policy.acl import ClientAcl, DestinationPolicy, build_policy

log = logging.getLogger("proxytap")


class Closable(Protocol):
    def shutdown(self, force: bool) -> None:
        """Stop; ``force`` closes at once, else only idle parts close."""


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
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, reason) -> count

    def __post_init__(self) -> None:
        self.clients, self.destinations = build_policy(self.config.access)
        self.auth = Authenticator.from_config(self.config.auth)

    def refused(self, rule: str, reason: str) -> None:
        key = (rule, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def admit(self, client_ip: str) -> tuple[str, str] | None:
        """(rule, reason) when a client connection just opened must be refused."""
        limits = self.config.limits
        count = self.table.per_client.get(client_ip, 0)
        if not self.clients.allowed(client_ip):
            return ("client-acl", "client address not allowed")
        if limits.max_connections and len(self.table.connections) > limits.max_connections:
            return ("max-connections", "connection limit reached")
        if limits.max_connections_per_client and count > limits.max_connections_per_client:
            return ("max-connections-per-client", "too many connections from this client")
        return None

    async def connect(self, host: str, port: int, user: str | None = None) -> socket.socket:
        """Policy, then resolve and connect; ``UpstreamError`` names the failure.

        The name is judged before any lookup, every resolved address right
        before it would be contacted (a denied address is never sent a packet).
        """
        decision = self.destinations.check_name(host, port, user)
        if decision is not None and not decision.allowed:
            raise UpstreamError(decision.failure or Failure.DENIED, f"rule {decision.rule}")
        policy = self.destinations

        def check(addr: AddrInfo) -> tuple[Failure, str] | None:
            verdict = policy.check_address(addr[1][0], port, host, user)
            if verdict.allowed:
                return None
            return verdict.failure or Failure.PROHIBITED, f"rule {verdict.rule} ({addr[1][0]})"

        cfg = self.config
        return await open_upstream(
            host,
            port,
            resolver=self.resolver,
            connector=self.connector,
            timeout=cfg.timeouts.connect,
            delay=cfg.upstream.happy_eyeballs_delay,
            prefer=cfg.upstream.prefer,
            check=check,
        )
