"""What every connection shares: config, flow table, hub, upstream connect, tasks."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxytap.config import Config
from proxytap.errors import Failure
from proxytap.export.hub import Hub
from proxytap.flows.table import FlowTable
from proxytap.front.upstream import (
    AddrInfo,
    Connector,
    Resolver,
    SocketConnector,
    SystemResolver,
    open_upstream,
)

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

    def check_destination(self, addr: AddrInfo) -> Failure | None:
        """Policy on the resolved address about to be connected (issue C fills this)."""
        return None

    async def connect(self, host: str, port: int) -> socket.socket:
        cfg = self.config
        return await open_upstream(
            host,
            port,
            resolver=self.resolver,
            connector=self.connector,
            timeout=cfg.timeouts.connect,
            delay=cfg.upstream.happy_eyeballs_delay,
            prefer=cfg.upstream.prefer,
            check=self.check_destination,
        )
