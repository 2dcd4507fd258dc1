"""Composition root: builds the hub and sinks, starts listeners, shuts down in order.

Start: export sinks first (so the first flow already has its analyzers), then
listeners. Stop: listeners stop accepting, open tunnels drain for the grace
period, whatever is left is closed, then sinks flush and close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from proxytap.config import Config
from proxytap.export.hub import Hub
from proxytap.front.listener import bound_addresses, start_listener
from proxytap.front.services import Services
from proxytap.front.upstream import Connector, Resolver
from proxytap.proto.classify import Classifier, rules_from_config

log = logging.getLogger("proxytap")


class App:
    def __init__(
        self,
        config: Config,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
    ) -> None:
        self.config = config
        classifier = Classifier(rules_from_config(list(config.export.rules)))
        self.hub = Hub(classifier)
        self.services = Services(config=config, hub=self.hub)
        if resolver is not None:
            self.services.resolver = resolver
        if connector is not None:
            self.services.connector = connector
        self.servers: dict[str, asyncio.Server] = {}
        self.sinks: list[Any] = []
        self.stopped = asyncio.Event()

    def addresses(self, name: str) -> list[tuple[str, int]]:
        return bound_addresses(self.servers[name])

    async def start(self) -> None:
        exp = self.config.export
        if exp.sftap_home:
            from proxytap.export.sftap_server import SftapServer

            server = SftapServer.from_config(exp, self.hub.classifier)
            await server.start()
            self.hub.subscribe(server)
            self.sinks.append(server)
        if exp.loopback7:
            from proxytap.export.loopback7 import Loopback7Writer

            writer = Loopback7Writer.from_config(exp)
            await writer.start()
            self.hub.subscribe(writer)
            self.sinks.append(writer)
        try:
            for listener in self.config.listeners:
                self.servers[listener.name] = await start_listener(self.services, listener)
        except OSError:
            await self.stop(0)
            raise
        for listener in self.config.listeners:
            for host, port in self.addresses(listener.name):
                log.info("listening: %s %s on %s:%d", listener.name, listener.kind, host, port)

    async def stop(self, grace: float | None = None) -> None:
        if grace is None:
            grace = self.config.timeouts.shutdown_grace
        services = self.services
        services.draining = True
        for server in self.servers.values():
            server.close()
        for item in list(services.live):
            item.shutdown(False)
        deadline = time.monotonic() + grace
        while services.live and time.monotonic() < deadline:  # noqa: ASYNC110 - 20 Hz, only while draining
            await asyncio.sleep(0.05)
        if services.live:
            log.info("closing %d connections still open after %.1fs", len(services.live), grace)
        for item in list(services.live):
            item.shutdown(True)
        await services.tasks.cancel_all()
        for server in self.servers.values():
            await server.wait_closed()
        for sink in self.sinks:
            self.hub.unsubscribe(sink)
            await sink.stop()
        self.stopped.set()


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then drain and stop; the process exit code."""
    app = App(config)
    try:
        await app.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("proxytap ready")
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", config.timeouts.shutdown_grace)
    await app.stop()
    log.info("stopped")
    return 0
