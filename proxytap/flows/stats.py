"""Counters the proxy keeps as plain numbers; ``proxytap.metrics`` exports them.

The hot path only does ``+=`` on ints and dicts here (no locks, no label
lookups); the Prometheus collector reads everything at scrape time, together
with what the flow table, the hub and the sinks already count.
"""

from __future__ import annotations

import bisect
from collections import Counter

# seconds; connects on a LAN take < 1 ms, across the internet 10-300 ms
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# seconds; flows live from milliseconds (an API call) to hours (a websocket)
FLOW_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# seconds; a plain-HTTP exchange (head read to response end) or a tunnel's set-up
# (request read to reply sent): a cached LAN answer takes ~1 ms, a slow origin seconds
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Buckets:
    """A cumulative-on-export histogram: per-bucket counts, sum, count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def observe(table: dict[tuple[str, str], Buckets], key: tuple[str, str], value: float) -> None:
    """Observe ``value`` in the histogram of ``key`` (made on first use)."""
    buckets = table.get(key)
    if buckets is None:
        buckets = table[key] = Buckets(LATENCY_BUCKETS)
    buckets.observe(value)


class Stats:
    """Everything counted outside the flow table, hub and sinks."""

    def __init__(self) -> None:
        # (listener, protocol) -> client connections accepted (downstream)
        self.downstream: Counter[tuple[str, str]] = Counter()
        # upstream connects
        self.connect_seconds = Buckets(CONNECT_BUCKETS)
        # (listener, Proxy-Status error type) -> failed connects (policy denials excluded)
        self.connect_errors: Counter[tuple[str, str]] = Counter()
        # chaining ([[upstream.proxies]]): upstream proxy name -> tunnels it opened, and
        # (proxy, stage) -> failures (front/chain.py STAGES: connect, timeout, auth, ...)
        self.proxy_connects: Counter[str] = Counter()
        self.proxy_errors: Counter[tuple[str, str]] = Counter()
        # SIGHUP config reloads: "ok" / "error" -> count; Unix time of the last good one
        self.config_reloads: Counter[str] = Counter()
        self.config_reloaded_at = 0.0
        # bytes of finished flows (live flows are added at scrape time)
        self.bytes_up = 0
        self.bytes_down = 0
        # ... and by (listener, direction): "upstream" client to destination
        self.relayed: Counter[tuple[str, str]] = Counter()
        # finished inner flows: (l7 class, close reason) -> count
        self.flows_closed: Counter[tuple[str, str]] = Counter()
        self.flow_seconds = Buckets(FLOW_BUCKETS)
        # plain-HTTP responses by status class ("2xx") and by who answered
        # (listener, class, "origin"|"proxy")
        self.http_responses: Counter[tuple[str, str, str]] = Counter()
        # (listener, "http"|"socks") -> requests that broke their protocol
        self.protocol_errors: Counter[tuple[str, str]] = Counter()
        # (rule, reason) -> refused requests (policy, limits, auth)
        self.refusals: Counter[tuple[str, str]] = Counter()
        # (listener, rule) -> requests refused by access policy alone (client ACL,
        # CONNECT ports, destination rules and default-denied ranges): not connect errors
        self.denied: Counter[tuple[str, str]] = Counter()
        # (listener, protocol, result) -> CONNECT and SOCKS requests answered; result is
        # the HTTP status ("403") or the SOCKS reply code's name ("not_allowed")
        self.tunnel_results: Counter[tuple[str, str, str]] = Counter()
        # (listener, protocol) -> request read to success reply sent, for tunnels set up
        self.tunnel_setup: dict[tuple[str, str], Buckets] = {}
        # (listener, method class) -> request head read to response end (plain HTTP)
        self.http_seconds: dict[tuple[str, str], Buckets] = {}
        self.auth_failures: Counter[str] = Counter()  # listener -> failed authentications
        # listener -> attempts refused unchecked (too many failures from the address)
        self.auth_throttled: Counter[str] = Counter()
        self.sni_mismatches = 0
        # TLS interception: (outcome, reason) -> tunnels decided (intercepted / passthrough),
        # and ("intercepted", "tls") client handshakes done, ("refused", "request"|"response")
        self.intercept: Counter[tuple[str, str]] = Counter()
        self.intercept_requests: Counter[str] = Counter()  # http1 / http2 -> exchanges done
        self.intercept_upstream_errors: Counter[str] = Counter()  # origin TLS failures by reason
        self.intercept_client_failures: Counter[str] = Counter()  # rejected / other
        # module name -> hook calls that raised (or broke a head) and failed closed
        self.module_errors: Counter[str] = Counter()
        # (listener, stage) -> client connections closed by a handshake deadline;
        # stage "first_byte": sent nothing at all, "handshake": an unfinished request
        self.handshake_timeouts: Counter[tuple[str, str]] = Counter()
        # (listener, result) -> PROXY protocol headers (front/proxyheader.py RESULTS):
        # accepted, local (the socket's peer is the client), or why the connection was refused
        self.proxy_headers: Counter[tuple[str, str]] = Counter()
        # listener -> silent connections closed to make room for a request of the
        # same client over its connection cap
        self.silent_evictions: Counter[str] = Counter()
        # listener -> client connections accepted and closed at once near the
        # open-file limit
        self.fd_refusals: Counter[str] = Counter()
        # SOCKS5 UDP ASSOCIATE (front/udp.py): listener -> associations opened, open now
        self.udp_associations: Counter[str] = Counter()
        self.udp_associations_open: Counter[str] = Counter()
        # (listener, "upstream"|"downstream") -> datagrams relayed
        self.udp_datagrams: Counter[tuple[str, str]] = Counter()
        # (listener, reason) -> datagrams dropped (front/udp.py DROP_REASONS)
        self.udp_dropped: Counter[tuple[str, str]] = Counter()
