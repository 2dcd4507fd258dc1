"""Prometheus metrics: one collector that reads the proxy's own counters at scrape time.

The hot path only increments plain ints and dicts (``Stats``, the flow
table's per-flow counters, each sink's stats); ``ProxytapCollector.collect``
turns them into metric families when Prometheus scrapes, so relaying pays
nothing for metrics. Register it on an injected ``CollectorRegistry``
(``register``); the admin server serves that registry at ``/metrics``.

Names follow Prometheus conventions (``proxytap_`` prefix, ``_total`` for
counters, ``_bytes`` / ``_seconds`` units) and split as Envoy and HAProxy do:
``downstream`` is client to proxy, ``upstream`` is proxy to destination.
``METRICS`` lists every family with its type and help text; label sets that
are known up front (listener x protocol, error reasons, status classes, sink
event types and drop reasons) are exported at 0 so rates and alerts work
from the first scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from proxytap import __version__
from proxytap.errors import Failure
from proxytap.flows.stats import LATENCY_BUCKETS, Buckets
from proxytap.front.chain import STAGES as CHAIN_STAGES
from proxytap.front.proxyheader import RESULTS as PROXY_HEADER_RESULTS
from proxytap.front.services import CLIENT_ACL
from proxytap.front.udp import DROP_REASONS as UDP_DROP_REASONS
from proxytap.policy.acl import CONNECT_PORTS

if TYPE_CHECKING:
    from proxytap.app import App
    from proxytap.front.services import Services

# Client protocols a listener kind can speak (label values of ``protocol``).
PROTOCOLS = {
    "http": ("http-connect", "http-forward"),
    "socks": ("socks4", "socks4a", "socks5"),
    "mixed": ("http-connect", "http-forward", "socks4", "socks4a", "socks5"),
}
# the ``protocol`` label of protocol errors: the families a listener kind speaks
FAMILIES = {"http": ("http",), "socks": ("socks",), "mixed": ("http", "socks")}
HANDSHAKE = "handshake"  # an open client connection whose protocol is not known yet
# handshake deadlines: "first_byte" (nothing sent), "handshake" (request unfinished)
HANDSHAKE_STAGES = ("first_byte", "handshake")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
METHOD_CLASSES = ("GET", "POST", "other")  # the ``method`` label of plain-HTTP latencies
# results of CONNECT and SOCKS requests exported at 0: success and the usual refusals
KNOWN_RESULTS = {
    "http-connect": ("200", "400", "403", "407", "502", "503", "504"),
    "socks4": ("granted", "rejected"),
    "socks4a": ("granted", "rejected"),
    "socks5": (
        "succeeded",
        "general_failure",
        "not_allowed",
        "host_unreachable",
        "connection_refused",
        "ttl_expired",
        "auth_failed",
    ),
}
RESPONDERS = ("origin", "proxy")
EVENT_TYPES = ("created", "data", "destroyed")
UNCLASSIFIED = "unclassified"

# name -> (type, help); the one list of what /metrics exposes (besides process_*)
METRICS: dict[str, tuple[str, str]] = {
    "proxytap_info": ("info", "proxytap version"),
    "proxytap_start_time_seconds": ("gauge", "Unix time the proxy started"),
    "proxytap_ready": ("gauge", "1 while every listener is bound and not draining"),
    "proxytap_downstream_connections_total": (
        "counter",
        "Client connections accepted, by listener and client protocol",
    ),
    "proxytap_downstream_connections_active": (
        "gauge",
        "Client connections open now, by listener and client protocol (handshake: not known yet)",
    ),
    "proxytap_downstream_connections_limit": (
        "gauge",
        "limits.max_connections (0: no limit)",
    ),
    "proxytap_downstream_connections_open_file_capacity": (
        "gauge",
        "Client connections the open-file limit allows: two descriptors each, "
        "after those in use at start and limits.open_files_reserve",
    ),
    "proxytap_downstream_open_file_refusals_total": (
        "counter",
        "Client connections accepted and closed at once because the open-file limit was near",
    ),
    "proxytap_downstream_handshake_timeouts_total": (
        "counter",
        "Client connections closed by a handshake deadline, by listener and stage "
        "(first_byte: sent nothing within timeouts.first_byte; handshake: request "
        "unfinished within timeouts.handshake)",
    ),
    "proxytap_downstream_proxy_headers_total": (
        "counter",
        "Connections of proxy_protocol listeners by what became of their PROXY header "
        "(accepted: the carried client is used; local: valid, the socket's peer is the "
        "client; untrusted: peer not in proxy_protocol_from, closed unread; malformed; "
        "timeout; closed: the connection ended before the header)",
    ),
    "proxytap_downstream_silent_evictions_total": (
        "counter",
        "Connections that had sent nothing, closed to make room for a request of the "
        "same client over its connection limit",
    ),
    "proxytap_downstream_rejections_total": (
        "counter",
        "Client requests refused by policy, limits or authentication, by rule and reason",
    ),
    "proxytap_policy_denied_total": (
        "counter",
        "Requests refused by access policy alone, by listener and rule (client-acl, "
        "connect-ports, socks4-userid, an [[access.rules]] name, default-deny:<range>); "
        "never counted as upstream connect errors",
    ),
    "proxytap_downstream_tunnel_results_total": (
        "counter",
        "CONNECT and SOCKS requests answered, by listener, client protocol and result "
        "(CONNECT: the HTTP status; SOCKS: the reply code's name, auth_failed, protocol_error)",
    ),
    "proxytap_downstream_tunnel_setup_duration_seconds": (
        "histogram",
        "Tunnels set up: CONNECT or SOCKS request read to success reply sent "
        "(authentication, policy, resolution and connect), by listener and client protocol",
    ),
    "proxytap_downstream_http_request_duration_seconds": (
        "histogram",
        "Plain-HTTP requests: request head read to response end (the origin's, or the "
        "proxy's answer after a failed connect or timeout), by listener and method "
        "(GET, POST, other)",
    ),
    "proxytap_downstream_auth_failures_total": (
        "counter",
        "Failed proxy authentications (wrong user name or password)",
    ),
    "proxytap_downstream_auth_throttled_total": (
        "counter",
        "Proxy authentication attempts refused unchecked: the client address had "
        "auth.max_failures failures within auth.failure_window",
    ),
    "proxytap_downstream_protocol_errors_total": (
        "counter",
        "Handshakes that broke their protocol, by protocol family",
    ),
    "proxytap_intercept_decisions_total": (
        "counter",
        "TLS tunnels of clients that may be intercepted, by outcome (intercepted, "
        "passthrough) and reason (intercept, not-listed, passthrough-host, pinned, ...)",
    ),
    "proxytap_intercept_sessions_active": ("gauge", "Intercepted tunnels open now"),
    "proxytap_intercept_requests_total": (
        "counter",
        "HTTP exchanges completed inside intercepted tunnels, by protocol (http1, http2)",
    ),
    "proxytap_intercept_refusals_total": (
        "counter",
        "Intercepted requests or responses refused by the header rules or a module (the "
        "client got the error status with Proxy-Status), by what (request, response)",
    ),
    "proxytap_intercept_upstream_tls_errors_total": (
        "counter",
        "Origins whose TLS failed under interception (the client got 502), by reason "
        "(expired, wrong_name, untrusted, invalid, handshake)",
    ),
    "proxytap_intercept_client_tls_failures_total": (
        "counter",
        "Client TLS handshakes with proxytap's certificate that failed, by reason "
        "(rejected: the client refused the certificate, pinning fail-open applies; other)",
    ),
    "proxytap_intercept_pinned_pairs": (
        "gauge",
        "(client, host) pairs passed through now because the client rejected proxytap's "
        "certificate (tls.pinning_fail_open)",
    ),
    "proxytap_downstream_sni_mismatches_total": (
        "counter",
        "Tunnels whose TLS ClientHello named another host than the request",
    ),
    "proxytap_module_errors_total": (
        "counter",
        "Module hook calls that raised or broke a head and failed closed, by module",
    ),
    "proxytap_downstream_http_requests_total": (
        "counter",
        "Plain-HTTP requests answered, by status class and by who answered (origin or proxy)",
    ),
    "proxytap_udp_associations_total": (
        "counter",
        "SOCKS5 UDP associations set up (relay bound and answered), by listener",
    ),
    "proxytap_udp_associations_active": ("gauge", "SOCKS5 UDP associations open now"),
    "proxytap_udp_datagrams_total": (
        "counter",
        "Datagrams relayed by SOCKS5 UDP associations; direction=upstream: client to "
        "destination, downstream: destination to client",
    ),
    "proxytap_udp_dropped_datagrams_total": (
        "counter",
        "Datagrams SOCKS5 UDP associations dropped, by listener and reason (foreign_source, "
        "fragment, malformed, denied, dns_error, backlog, destination_limit, unsolicited, "
        "buffer_full, send_error)",
    ),
    "proxytap_upstream_connect_duration_seconds": (
        "histogram",
        "Time to resolve and connect to a destination (successful connects)",
    ),
    "proxytap_upstream_connect_errors_total": (
        "counter",
        "Failed or refused upstream connects, by Proxy-Status error type",
    ),
    "proxytap_upstream_proxy_connections_total": (
        "counter",
        "Connections opened through an upstream proxy (chaining: an [[access.rules]] rule "
        "with via), by [[upstream.proxies]] name",
    ),
    "proxytap_upstream_proxy_errors_total": (
        "counter",
        "Failed connects through an upstream proxy, by proxy and reason (connect: not "
        "reachable; timeout; auth: it refused proxytap's credentials; refused: it reported "
        "a failure for the destination; protocol: a malformed answer or it closed)",
    ),
    "proxytap_upstream_connections_active": (
        "gauge",
        "Upstream connections open now (one per inner flow), by client protocol",
    ),
    "proxytap_config_reloads_total": (
        "counter",
        "Config reloads on SIGHUP, by result (ok: in force for new connections; error: "
        "rejected, the previous config stays)",
    ),
    "proxytap_config_last_reload_success_timestamp_seconds": (
        "gauge",
        "Unix time of the last config reload that took effect (0: none since start)",
    ),
    "proxytap_relayed_bytes_total": (
        "counter",
        "Payload bytes relayed; direction=upstream: client to destination, "
        "downstream: destination to client",
    ),
    "proxytap_flows_total": ("counter", "Inner flows classified, by L7 class"),
    "proxytap_flows_active": ("gauge", "Inner flows open now, by L7 class"),
    "proxytap_flows_closed_total": ("counter", "Inner flows ended, by L7 class and close reason"),
    "proxytap_flow_duration_seconds": ("histogram", "Lifetime of ended inner flows"),
    "proxytap_export_events_total": (
        "counter",
        "Events written to export consumers, by sink and event type",
    ),
    "proxytap_export_sent_bytes_total": ("counter", "Bytes written to export consumers, by sink"),
    "proxytap_export_dropped_events_total": (
        "counter",
        "Export events dropped (never proxied data), by sink and reason",
    ),
    "proxytap_export_dropped_bytes_total": (
        "counter",
        "Payload bytes of dropped export events, by sink and reason",
    ),
    "proxytap_export_wait_seconds_total": (
        "counter",
        "Seconds flows were paused for export consumers that were behind (overload wait)",
    ),
    "proxytap_export_partial_sends_total": (
        "counter",
        "Export messages the kernel took only part of (kept framed; expected to stay 0)",
    ),
    "proxytap_export_socket_buffer_bytes": (
        "gauge",
        "Kernel send buffer (SO_SNDBUF as the kernel reports it) of export consumer sockets",
    ),
    "proxytap_export_classify_timeouts_total": (
        "counter",
        "Flows classified when export.classify_timeout passed rather than on their bytes",
    ),
    "proxytap_loopback7_reannounced_flows_total": (
        "counter",
        "Live flows announced again (CREATED) on a new loopback7 connection",
    ),
    "proxytap_export_subscribers": (
        "gauge",
        "Export consumers connected now (flow-socket readers, loopback7 link, open flow log)",
    ),
    "proxytap_export_buffered_bytes": ("gauge", "Bytes waiting in export buffers, by sink"),
    "proxytap_export_flows_active": ("gauge", "Flows currently exported, by sink"),
    "proxytap_export_subscriber_errors_total": (
        "counter",
        "Exceptions raised by export subscribers (contained by the hub)",
    ),
    "proxytap_loopback7_link_up": ("gauge", "1 while connected to the abstractor's loopback7"),
    "proxytap_loopback7_reconnects_total": (
        "counter",
        "Connections to loopback7 after the first",
    ),
    "proxytap_loopback7_connect_failures_total": (
        "counter",
        "Failed attempts to connect to loopback7",
    ),
}


def status_class(status: int) -> str:
    """``"2xx"`` for 200..299 (the label value of ``code_class``)."""
    return f"{status // 100}xx"


def _histogram(name: str, buckets: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name,
        METRICS[name][1],
        buckets=[(le, float(n)) for le, n in buckets.cumulative()],
        sum_value=buckets.sum,
    )


def _histograms(
    name: str,
    labels: tuple[str, ...],
    observed: Mapping[tuple[str, str], Buckets],
    known: Iterable[tuple[str, str]],
) -> HistogramMetricFamily:
    """A labelled histogram: the ``known`` label sets empty, the ``observed`` ones filled."""
    family = HistogramMetricFamily(name, METRICS[name][1], labels=list(labels))
    empty = Buckets(LATENCY_BUCKETS)
    for key in sorted({*known, *observed}):
        buckets = observed.get(key, empty)
        cumulative = [(le, float(n)) for le, n in buckets.cumulative()]
        family.add_metric(list(key), cumulative, buckets.sum)
    return family


def _counter(name: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, METRICS[name][1], labels=list(labels))


def _gauge(name: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name][1], labels=list(labels))


def _fill(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[Any, float]) -> None:
    for key, value in sorted(values.items()):
        labels = list(key) if isinstance(key, tuple) else [key]
        family.add_metric(labels, float(value))


# TLS interception decisions exported at 0 (proxytap.policy.intercept.Verdict reasons)
INTERCEPT_DECISIONS = (
    ("intercepted", "intercept"),
    ("passthrough", "not-listed"),
    ("passthrough", "passthrough-host"),
    ("passthrough", "passthrough-client"),
    ("passthrough", "pinned"),
)


def _intercept_families(services: Services) -> Iterator[Metric]:
    """TLS interception: decisions, sessions, exchanges, refusals, TLS failures, pins."""
    stats = services.stats
    decisions = _counter("proxytap_intercept_decisions_total", ("outcome", "reason"))
    refusals = _counter("proxytap_intercept_refusals_total", ("what",))
    decided = dict.fromkeys(INTERCEPT_DECISIONS, 0)
    refused = {"request": 0, "response": 0}
    for (outcome, reason), n in stats.intercept.items():
        if outcome == "refused":
            refused[reason] = n
        elif reason != "tls":
            decided[(outcome, reason)] = n
    _fill(decisions, decided)
    _fill(refusals, refused)
    engine = services.engine
    active = _gauge("proxytap_intercept_sessions_active")
    active.add_metric([], float(engine.active if engine is not None else 0))
    requests = _counter("proxytap_intercept_requests_total", ("protocol",))
    _fill(requests, {"http1": 0, "http2": 0, **stats.intercept_requests})
    upstream = _counter("proxytap_intercept_upstream_tls_errors_total", ("reason",))
    reasons = ("expired", "wrong_name", "untrusted", "invalid", "handshake")
    _fill(upstream, {**dict.fromkeys(reasons, 0), **stats.intercept_upstream_errors})
    client = _counter("proxytap_intercept_client_tls_failures_total", ("reason",))
    _fill(client, {"rejected": 0, "other": 0, **stats.intercept_client_failures})
    pinned = _gauge("proxytap_intercept_pinned_pairs")
    pinned.add_metric([], float(len(services.pins)))
    yield from (decisions, active, requests, refusals, upstream, client, pinned)


class ProxytapCollector(Collector):
    """Reads ``Stats``, the flow table, the hub and the sinks of ``app`` when scraped."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        services = app.services
        stats = services.stats
        table = services.table
        cfg = app.config

        info = InfoMetricFamily("proxytap", METRICS["proxytap_info"][1])
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily(
            "proxytap_start_time_seconds",
            METRICS["proxytap_start_time_seconds"][1],
            value=app.started_at,
        )
        yield GaugeMetricFamily(
            "proxytap_ready", METRICS["proxytap_ready"][1], value=float(app.ready)
        )

        # -- downstream ---------------------------------------------------------------
        known: Counter[tuple[str, str]] = Counter()
        for lst in cfg.listeners:
            for proto in PROTOCOLS.get(lst.kind, ()):
                known[(lst.name, proto)] = 0
        totals = known.copy()
        totals.update(stats.downstream)
        family = _counter("proxytap_downstream_connections_total", ("listener", "protocol"))
        _fill(family, totals)
        yield family
        active = known.copy()
        for conn in list(table.connections.values()):
            active[(conn.listener, conn.protocol or HANDSHAKE)] += 1
        gauge = _gauge("proxytap_downstream_connections_active", ("listener", "protocol"))
        _fill(gauge, active)
        yield gauge
        yield GaugeMetricFamily(
            "proxytap_downstream_connections_limit",
            METRICS["proxytap_downstream_connections_limit"][1],
            value=cfg.limits.max_connections,
        )
        yield from self._shedding()
        family = _counter("proxytap_downstream_rejections_total", ("rule", "reason"))
        _fill(family, stats.refusals)
        yield family
        family = _counter("proxytap_policy_denied_total", ("listener", "rule"))
        _fill(family, {**self._known_denials(), **stats.denied})
        yield family
        names = [lst.name for lst in cfg.listeners]
        family = _counter("proxytap_downstream_auth_failures_total", ("listener",))
        _fill(family, {**dict.fromkeys(names, 0), **stats.auth_failures})
        yield family
        family = _counter("proxytap_downstream_auth_throttled_total", ("listener",))
        _fill(family, {**dict.fromkeys(names, 0), **stats.auth_throttled})
        yield family
        family = _counter("proxytap_downstream_protocol_errors_total", ("listener", "protocol"))
        known_errors = {
            (lst.name, FAMILIES[lst.kind][i]): 0 for lst in cfg.listeners for i in (0, -1)
        }
        _fill(family, {**known_errors, **stats.protocol_errors})
        yield family
        yield CounterMetricFamily(
            "proxytap_downstream_sni_mismatches_total",
            METRICS["proxytap_downstream_sni_mismatches_total"][1],
            value=stats.sni_mismatches,
        )
        yield from _intercept_families(services)
        family = _counter("proxytap_module_errors_total", ("module",))
        modules = {m.name: 0 for chain in services.chains.values() for m in chain.modules}
        _fill(family, {**modules, **stats.module_errors})
        yield family
        responses: Counter[tuple[str, str, str]] = Counter(
            {
                (lst.name, c, r): 0
                for lst in cfg.listeners
                if lst.kind != "socks"
                for c in STATUS_CLASSES
                for r in RESPONDERS
            }
        )
        responses.update(stats.http_responses)
        family = _counter(
            "proxytap_downstream_http_requests_total", ("listener", "code_class", "source")
        )
        _fill(family, responses)
        yield family
        yield from self._tunnels()
        yield from self._udp()

        # -- upstream -----------------------------------------------------------------
        yield _histogram("proxytap_upstream_connect_duration_seconds", stats.connect_seconds)
        errors: Counter[tuple[str, str]] = Counter(
            {(name, f.value): 0 for name in names for f in Failure}
        )
        errors.update(stats.connect_errors)
        family = _counter("proxytap_upstream_connect_errors_total", ("listener", "reason"))
        _fill(family, errors)
        yield family
        yield from self._chaining()
        yield from self._reloads()

        # -- flows and bytes ----------------------------------------------------------
        flows = list(table.flows.values())
        relayed: Counter[tuple[str, str]] = Counter(
            {(name, d): 0 for name in names for d in ("upstream", "downstream")}
        )
        relayed.update(stats.relayed)
        by_tunnel: Counter[str] = Counter()
        # every L7 class a flow can have, at 0 while idle
        classes = [r.name for r in app.hub.classifier.rules if r.l4 == "tcp"] + [UNCLASSIFIED]
        by_class: Counter[str] = Counter(dict.fromkeys(classes, 0))
        for flow in flows:
            listener = flow.outer.listener
            relayed[(listener, "upstream")] += flow.bytes_up
            relayed[(listener, "downstream")] += flow.bytes_down
            by_tunnel[flow.outer.protocol] += 1
            by_class[flow.l7 or UNCLASSIFIED] += 1
        gauge = _gauge("proxytap_upstream_connections_active", ("protocol",))
        _fill(gauge, by_tunnel)
        yield gauge
        family = _counter("proxytap_relayed_bytes_total", ("listener", "direction"))
        _fill(family, relayed)
        yield family
        hub = app.hub
        family = _counter("proxytap_flows_total", ("l7",))
        _fill(family, {**dict.fromkeys(classes[:-1], 0), **hub.classified})
        yield family
        gauge = _gauge("proxytap_flows_active", ("l7",))
        _fill(gauge, by_class)
        yield gauge
        family = _counter("proxytap_flows_closed_total", ("l7", "reason"))
        _fill(family, stats.flows_closed)
        yield family
        yield _histogram("proxytap_flow_duration_seconds", stats.flow_seconds)

        # -- export -------------------------------------------------------------------
        yield from self._export(hub.subscriber_errors)

    def _tunnels(self) -> Iterator[Metric]:
        """CONNECT and SOCKS replies by result; set-up and plain-HTTP latencies."""
        stats = self.app.services.stats
        tunnels: list[tuple[str, str]] = []
        results: Counter[tuple[str, str, str]] = Counter()
        forwarding: list[tuple[str, str]] = []
        for lst in self.app.config.listeners:
            for proto in PROTOCOLS.get(lst.kind, ()):
                if proto == "http-forward":
                    forwarding += [(lst.name, m) for m in METHOD_CLASSES]
                    continue
                tunnels.append((lst.name, proto))
                for result in KNOWN_RESULTS[proto]:
                    results[(lst.name, proto, result)] = 0
        results.update(stats.tunnel_results)
        family = _counter(
            "proxytap_downstream_tunnel_results_total", ("listener", "protocol", "result")
        )
        _fill(family, results)
        yield family
        yield _histograms(
            "proxytap_downstream_tunnel_setup_duration_seconds",
            ("listener", "protocol"),
            stats.tunnel_setup,
            tunnels,
        )
        yield _histograms(
            "proxytap_downstream_http_request_duration_seconds",
            ("listener", "method"),
            stats.http_seconds,
            forwarding,
        )

    def _udp(self) -> Iterator[Metric]:
        """SOCKS5 UDP ASSOCIATE: associations, datagrams relayed and dropped (front/udp.py)."""
        stats = self.app.services.stats
        names = [lst.name for lst in self.app.config.listeners if lst.kind != "http"]
        family = _counter("proxytap_udp_associations_total", ("listener",))
        _fill(family, {**dict.fromkeys(names, 0), **stats.udp_associations})
        yield family
        gauge = _gauge("proxytap_udp_associations_active", ("listener",))
        _fill(gauge, {**dict.fromkeys(names, 0), **stats.udp_associations_open})
        yield gauge
        family = _counter("proxytap_udp_datagrams_total", ("listener", "direction"))
        known = {(n, d): 0 for n in names for d in ("upstream", "downstream")}
        _fill(family, {**known, **stats.udp_datagrams})
        yield family
        family = _counter("proxytap_udp_dropped_datagrams_total", ("listener", "reason"))
        _fill(family, {**{(n, r): 0 for n in names for r in UDP_DROP_REASONS}, **stats.udp_dropped})
        yield family

    def _chaining(self) -> Iterator[Metric]:
        """Upstream proxies (chaining)."""
        stats = self.app.services.stats
        proxies = list(self.app.services.upstreams.proxies)
        family = _counter("proxytap_upstream_proxy_connections_total", ("proxy",))
        _fill(family, {**dict.fromkeys(proxies, 0), **stats.proxy_connects})
        yield family
        family = _counter("proxytap_upstream_proxy_errors_total", ("proxy", "reason"))
        known = {(p, stage): 0 for p in proxies for stage in CHAIN_STAGES}
        _fill(family, {**known, **stats.proxy_errors})
        yield family

    def _reloads(self) -> Iterator[Metric]:
        """Config reloads (SIGHUP)."""
        stats = self.app.services.stats
        family = _counter("proxytap_config_reloads_total", ("result",))
        _fill(family, {"ok": 0, "error": 0, **stats.config_reloads})
        yield family
        yield GaugeMetricFamily(
            "proxytap_config_last_reload_success_timestamp_seconds",
            METRICS["proxytap_config_last_reload_success_timestamp_seconds"][1],
            value=stats.config_reloaded_at,
        )

    def _known_denials(self) -> dict[tuple[str, str], int]:
        """Every (listener, rule) a denial can be counted under that is known up front."""
        policy = self.app.services.destinations
        rules = [CLIENT_ACL]
        rules += [r.name for r in policy.rules if r.action == "deny"]
        rules += sorted({f"default-deny:{r.label}" for r in policy.default_deny_ranges})
        known: dict[tuple[str, str], int] = {}
        for lst in self.app.config.listeners:
            names = rules if lst.kind == "socks" else [*rules, CONNECT_PORTS]
            known.update({(lst.name, rule): 0 for rule in names})
        return known

    def _shedding(self) -> Iterator[Metric]:
        """Connections closed or refused to keep the proxy up (silent ones, descriptors)."""
        services = self.app.services
        stats = services.stats
        names = [lst.name for lst in self.app.config.listeners]
        if services.fds is not None:
            yield GaugeMetricFamily(
                "proxytap_downstream_connections_open_file_capacity",
                METRICS["proxytap_downstream_connections_open_file_capacity"][1],
                value=services.fds.capacity,
            )
        family = _counter("proxytap_downstream_open_file_refusals_total", ("listener",))
        _fill(family, {**dict.fromkeys(names, 0), **stats.fd_refusals})
        yield family
        family = _counter("proxytap_downstream_handshake_timeouts_total", ("listener", "stage"))
        known = {(name, stage): 0 for name in names for stage in HANDSHAKE_STAGES}
        _fill(family, {**known, **stats.handshake_timeouts})
        yield family
        family = _counter("proxytap_downstream_proxy_headers_total", ("listener", "result"))
        behind = [lst.name for lst in self.app.config.listeners if lst.proxy_protocol]
        known = {(name, result): 0 for name in behind for result in PROXY_HEADER_RESULTS}
        _fill(family, {**known, **stats.proxy_headers})
        yield family
        family = _counter("proxytap_downstream_silent_evictions_total", ("listener",))
        _fill(family, {**dict.fromkeys(names, 0), **stats.silent_evictions})
        yield family

    def _export(self, subscriber_errors: int) -> Iterator[Metric]:
        sinks = [s.stats() for s in self.app.sinks]
        events = _counter("proxytap_export_events_total", ("sink", "type"))
        sent = _counter("proxytap_export_sent_bytes_total", ("sink",))
        dropped = _counter("proxytap_export_dropped_events_total", ("sink", "reason"))
        dropped_bytes = _counter("proxytap_export_dropped_bytes_total", ("sink", "reason"))
        subscribers = _gauge("proxytap_export_subscribers", ("sink",))
        buffered = _gauge("proxytap_export_buffered_bytes", ("sink",))
        flows = _gauge("proxytap_export_flows_active", ("sink",))
        waited = _counter("proxytap_export_wait_seconds_total", ("sink",))
        partial = _counter("proxytap_export_partial_sends_total", ("sink",))
        sndbuf = _gauge("proxytap_export_socket_buffer_bytes", ("sink",))
        for s in sinks:
            _fill(events, {(s.name, t): n for t, n in s.events.items()})
            sent.add_metric([s.name], s.bytes_sent)
            _fill(dropped, {(s.name, r): n for r, n in s.drops.items()})
            _fill(dropped_bytes, {(s.name, r): n for r, n in s.dropped_bytes.items()})
            subscribers.add_metric([s.name], s.connected)
            buffered.add_metric([s.name], s.buffered)
            flows.add_metric([s.name], s.flows)
            if s.kind != "flowlog":
                waited.add_metric([s.name], s.wait_seconds)
                partial.add_metric([s.name], s.partial_sends)
                sndbuf.add_metric([s.name], s.sndbuf)
        yield from (events, sent, dropped, dropped_bytes, subscribers, buffered, flows)
        yield from (waited, partial, sndbuf)
        yield CounterMetricFamily(
            "proxytap_export_subscriber_errors_total",
            METRICS["proxytap_export_subscriber_errors_total"][1],
            value=subscriber_errors,
        )
        yield CounterMetricFamily(
            "proxytap_export_classify_timeouts_total",
            METRICS["proxytap_export_classify_timeouts_total"][1],
            value=self.app.hub.timed_out,
        )
        link = _gauge("proxytap_loopback7_link_up", ("sink",))
        reconnects = _counter("proxytap_loopback7_reconnects_total", ("sink",))
        failures = _counter("proxytap_loopback7_connect_failures_total", ("sink",))
        again = _counter("proxytap_loopback7_reannounced_flows_total", ("sink",))
        for s in sinks:
            if s.link is not None:
                link.add_metric([s.name], float(s.link["link_up"]))
                reconnects.add_metric([s.name], s.link["reconnects"])
                failures.add_metric([s.name], s.link["connect_failures"])
                again.add_metric([s.name], s.link["reannounced"])
        yield from (link, reconnects, failures, again)


def register(app: App, registry: CollectorRegistry, *, process: bool = True) -> CollectorRegistry:
    """Register proxytap's collector (and the process collector) on ``registry``."""
    registry.register(ProxytapCollector(app))
    if process:
        ProcessCollector(registry=registry)
    return registry


__all__ = ["METRICS", "ProxytapCollector", "register", "status_class"]
