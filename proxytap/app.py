"""Composition root: builds the hub and sinks, starts listeners, shuts down in order.

Start: export sinks first (so the first flow already has its analyzers), then
the admin server (its /readyz says 503 until the listeners are bound), then
listeners. Stop: readiness drops, listeners stop accepting, open tunnels drain
for the grace period, whatever is left is closed, then sinks flush and close,
and the admin server goes last (metrics stay scrapeable while draining).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxytap.admin import AdminServer
from proxytap.config import Config
from proxytap.errors import ConfigError
from proxytap.export.hub import Hub
from proxytap.export.sink import Sink
from proxytap.front.listener import bound_addresses, start_listener
from proxytap.front.services import Services
from proxytap.front.shedding import FdBudget, raise_open_file_limit
from proxytap.front.upstream import Connector, Resolver
from proxytap.hostport import hostport
from proxytap.proto.classify import Classifier, rules_from_config
from proxytap.reload import changed_keys, keep_restart_keys, replace

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
        self.hub = Hub(classifier, classify_timeout=config.export.classify_timeout)
        self.services = Services(config=config, hub=self.hub)
        if resolver is not None:
            self.services.resolver = resolver
        if connector is not None:
            self.services.connector = connector
        self.servers: dict[str, asyncio.Server] = {}
        # built now, started by start(): constructing an App is all the checking
        # `run` does before it binds anything, and what `check-config` does
        self.sinks: list[Sink] = build_sinks(config, classifier)
        self.admin: AdminServer | None = None
        self.started_at = time.time()
        self.ready = False  # every listener bound, not draining (/readyz)
        self.stopped = asyncio.Event()
        self.hurry = asyncio.Event()  # a second SIGTERM/SIGINT: stop draining at once
        self._reloading = asyncio.Lock()  # one config reload at a time

    def addresses(self, name: str) -> list[tuple[str, int]]:
        return bound_addresses(self.servers[name])

    async def start(self) -> None:
        for sink in self.sinks:
            try:
                await sink.start()
            except OSError:
                await self.stop(0)
                raise
            self.hub.subscribe(sink)
        try:
            await self.start_engine()
            admin = self.config.admin
            if admin.enabled:
                self.admin = AdminServer(self, admin.host, admin.port, token=admin.token)
                await self.admin.start()
            for listener in self.config.listeners:
                self.servers[listener.name] = await start_listener(self.services, listener)
        except OSError:
            await self.stop(0)
            raise
        self.ready = True
        for listener in self.config.listeners:
            for host, port in self.addresses(listener.name):
                kind = "" if listener.name == listener.kind else f" ({listener.kind})"
                behind = ""
                if listener.proxy_protocol:
                    trusted = ", ".join(listener.proxy_protocol_from)
                    behind = f", PROXY protocol from {trusted}"
                log.info(
                    "listening: %s%s on %s%s", listener.name, kind, hostport(host, port), behind
                )
        self._budget_files()

    async def start_engine(self) -> None:
        """The TLS engine, when some tunnel may be intercepted (imported only then: it is big)."""
        services = self.services
        if services.engine is not None or not services.interception.enabled:
            return
        from proxytap.intercept.engine import Engine

        engine = Engine(services)
        await engine.start()
        services.engine = engine
        tune_collector(True)
        log.info(
            "TLS interception on (CA in %s): %s",
            engine.ca_dir,
            ", ".join(self.config.tls.intercept),
        )

    def _budget_files(self) -> None:
        """Measure what the open-file limit leaves for client connections, and say it."""
        limits = self.config.limits
        fds = self.services.fds = FdBudget.measure(limits.open_files_reserve)
        bound = ""
        if fds.capacity < limits.max_connections:
            bound = f"; fewer than limits.max_connections ({limits.max_connections})"
        log.info(
            "open-file limit %d: up to ~%d client connections (2 descriptors each, "
            "%d in use now, %d kept in reserve)%s",
            fds.limit,
            fds.capacity,
            fds.base,
            fds.reserve,
            bound,
        )

    async def stop(self, grace: float | None = None) -> None:
        if grace is None:
            grace = self.config.timeouts.shutdown_grace
        services = self.services
        self.ready = False
        services.draining = True
        for server in self.servers.values():
            server.close()
        for item in list(services.live):
            item.shutdown(False)
        deadline = time.monotonic() + grace
        while services.live and time.monotonic() < deadline and not self.hurry.is_set():  # noqa: ASYNC110 - 20 Hz, only while draining
            await asyncio.sleep(0.05)
        if services.live:
            why = "asked twice to stop" if self.hurry.is_set() else f"after {grace:.1f}s"
            log.info("closing %d connections still open (%s)", len(services.live), why)
        for item in list(services.live):
            item.shutdown(True)
        await services.tasks.cancel_all()
        for server in self.servers.values():
            await server.wait_closed()
        for sink in self.sinks:
            self.hub.unsubscribe(sink)
            await sink.stop()
        if self.admin is not None:
            await self.admin.stop()
        self.stopped.set()

    def reopen_logs(self) -> None:
        """SIGHUP: sinks writing files (the JSON flow log) reopen them, for logrotate."""
        for sink in self.sinks:
            sink.reopen()
        log.info("reopening log files")

    async def reload(self, load: Callable[[], Config]) -> bool:
        """SIGHUP: read the config again (``load``) and take it over for new connections.

        Everything is built and checked before anything changes; an invalid
        config is one error line naming the key, and the running config stays.
        Keys that need a restart keep their running values (a warning names
        them); see ``proxytap.reload``. Counted in ``stats.config_reloads``.
        """
        stats = self.services.stats
        async with self._reloading:
            running = self.config
            try:
                plan = self._prepare(running, load())
            except ConfigError as exc:
                stats.config_reloads["error"] += 1
                log.error(
                    "config reload rejected, the running config stays: %s: %s",
                    exc.key,
                    exc.problem,
                )
                return False
            except Exception as exc:  # a bug, or a module failing in an unforeseen way
                stats.config_reloads["error"] += 1
                log.error("config reload failed, the running config stays: %r", exc, exc_info=exc)
                return False
            self._adopt(plan)
            stats.config_reloads["ok"] += 1
            stats.config_reloaded_at = time.time()
            changed = changed_keys(running, plan.config)
            log.info(
                "config reloaded: %s (new connections use it; open ones keep theirs)",
                "changed " + ", ".join(changed) if changed else "no change",
            )
            if plan.restart:
                log.warning(
                    "config reload: %s changed but take effect only on a restart; "
                    "the running values stay",
                    ", ".join(plan.restart),
                )
            if self.services.interception.enabled and self.services.engine is None:
                try:
                    await self.start_engine()
                except OSError as exc:
                    log.error("cannot start TLS interception after the reload: %s", exc)
            return True

    def _prepare(self, running: Config, new: Config) -> _Reload:
        """What a reload adopts, all of it built (and so checked) before anything changes.

        The policy, users, module chains and upstream proxies (a fresh
        ``Services``), the classifier: what ``App.__init__`` builds.
        ``ConfigError`` names the bad key.
        """
        from proxytap.export.sftap_server import SftapServer

        applied, restart = keep_restart_keys(running, new)
        applied = applied.validate()
        classifier = None
        if applied.export.rules != running.export.rules:
            classifier = Classifier(rules_from_config(list(applied.export.rules)))
            for sink in self.sinks:
                if not isinstance(sink, SftapServer):
                    continue
                serves = SftapServer(sink.home, classifier, formats=applied.export.formats)
                if serves.interfaces.keys() != sink.interfaces.keys():
                    restart.append("export.rules (other flow sockets)")
                    applied = replace(applied, "export.rules", running.export.rules)
                    classifier = None
                    break
        fresh = self.services.rebuilt(applied)
        return _Reload(applied, restart, fresh, classifier)

    def _adopt(self, plan: _Reload) -> None:
        """Swap in what ``_prepare`` built (nothing here raises)."""
        from proxytap.export.loopback7 import Loopback7Writer
        from proxytap.export.sftap_server import SftapServer

        applied = plan.config
        self.services.adopt(plan.services)
        self.hub.timeout = applied.export.classify_timeout
        if plan.classifier is not None:
            self.hub.classifier = plan.classifier
        for sink in self.sinks:
            if isinstance(sink, SftapServer):
                sink.retune(applied.export, plan.classifier)
            elif isinstance(sink, Loopback7Writer):
                sink.retune(applied.export)
        if applied.log.level != self.config.log.level:
            logging.getLogger().setLevel(applied.log.level.upper())
        self.config = applied


@dataclass
class _Reload:
    config: Config  # what is adopted (restart-only keys at their running values)
    restart: list[str]  # changed keys that need a restart
    services: Services  # built from ``config``, not yet in use
    classifier: Classifier | None  # new classification rules, when they changed


def build_sinks(config: Config, classifier: Classifier) -> list[Sink]:
    """The export sinks the config asks for, built (and so checked), not started."""
    exp = config.export
    sinks: list[Sink] = []
    if exp.sftap_home:
        from proxytap.export.sftap_server import SftapServer

        sinks.append(SftapServer.from_config(exp, classifier))
    if exp.loopback7:
        from proxytap.export.loopback7 import Loopback7Writer

        sinks.append(Loopback7Writer.from_config(exp))
    if config.log.flows:
        from proxytap.export.jsonlog import JsonFlowLog

        sinks.append(JsonFlowLog.from_config(config.log))
    if exp.pcap.dir:
        from proxytap.export.pcap_sink import PcapFileSink

        sinks.append(PcapFileSink.from_config(exp.pcap))
    if exp.pcap.listen:
        from proxytap.export.pcap_sink import PcapServer

        sinks.append(PcapServer.from_config(exp.pcap))
    return sinks


GEN0 = 50_000  # young-generation threshold for proxying alone (see serve)
# With the TLS engine running: mitmproxy allocates many short-lived containers per
# request, and a young collection over 50,000 of them took 70-90 ms (measured with
# gc.callbacks during bench/intercept.py's keep-alive workload), the p99 of every
# request behind it. At 3,000: pauses under 15 ms, p99 121 -> 49 ms, 381 -> 564
# req/s, 2.5 -> 1.8 ms CPU per request; the passthrough tunnel rate did not move
# (bench C, same run). The engine's own cycles are collected in full every 256
# sessions (intercept.engine.COLLECT_EVERY).
GEN0_INTERCEPTING = 3_000


def tune_collector(intercepting: bool) -> None:
    """The cyclic collector's thresholds for what this process does."""
    gc.set_threshold(GEN0_INTERCEPTING if intercepting else GEN0, 20, 20)


async def serve(app: App, load: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain and stop; the process exit code.

    A second SIGTERM or SIGINT while draining stops at once (what is still
    open is reset, as after the grace). SIGHUP reopens the log files and,
    given ``load`` (the config as ``run`` built it: file and flags), reloads
    the config (``App.reload``).
    """
    before, after = raise_open_file_limit()
    if after != before:
        log.info("open-file limit raised from %d to %d (the hard limit)", before, after)
    try:
        await app.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            app.hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        app.reopen_logs()
        if load is not None and not stop.is_set():
            task = loop.create_task(app.reload(load))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Collector policy. A closed tunnel or forwarder connection is freed by
    # reference counting: it breaks its own reference cycles as it ends
    # (Relay.finish, HttpForwarder._teardown, UpstreamConnection._unhook; checked with
    # the collector off by tests/front/test_release.py). So the cyclic collector
    # has nothing per connection to free and is tuned for throughput alone:
    # what start-up built lives for the whole run and is frozen out of it (once,
    # here; freezing only hides objects from the collector, reference counting
    # still frees them), and the young generation grows to 50,000 objects (with
    # the default 700, opening 8,000 tunnels at once cost 10-15% more proxy CPU:
    # a young collection every few dozen tunnels, and full ones over all open). The
    # catch: a cycle left by a closed connection waits for a rare full
    # collection, about 3 KiB per tunnel (15 MiB per 5,000 before the cycles
    # were broken; tests/test_memory.py watches RSS over rounds of tunnels).
    # With TLS interception on, the young generation is kept small: see tune_collector.
    gc.freeze()
    tune_collector(app.services.engine is not None)
    log.info("proxytap ready")
    await stop.wait()
    for task in reloads:
        task.cancel()
    log.info("shutting down: draining for up to %.1fs", app.config.timeouts.shutdown_grace)
    await app.stop()
    log.info("stopped")
    return 0
