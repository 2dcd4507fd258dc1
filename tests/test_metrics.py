"""Metrics end to end: a scripted session through the real proxy, /metrics read over HTTP.

The oracle for every value is outside the code under test: what a recording
origin received and sent, what the clients did (how many connections, which
were refused), what an SF-TAP reader and a loopback7 stand-in actually
received, and what landed in the flow log file. The exposition is parsed with
``prometheus_client.parser``; each checked family is compared whole (every
label set, zeros included). Also here: ``promtool`` on deploy/ and the
Grafana dashboard's metric names against a real scrape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import (
    AdminConfig,
    Config,
    ExportConfig,
    ListenerConfig,
    LogConfig,
    UpstreamConfig,
)
from proxytap.errors import Failure
from proxytap.export.jsonlog import JsonFlowLog
from proxytap.export.loopback7 import Loopback7Writer
from proxytap.export.sftap_server import SftapServer
from proxytap.metrics import METRICS
from proxytap.policy.auth import AuthConfig
from tests.conftest import (
    TEST_ACCESS,
    ProxyFactory,
    RunningProxy,
    closed_port,
    exchange,
    pattern,
    run,
)
from tests.export.sftap_helpers import TapReader, check_stream, short_tmp, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)
BIG = 4 << 20  # through a flow socket whose reader does not read: drops guaranteed
RULES = (
    {"name": "no-blocked", "action": "deny", "domains": ["blocked.test"]},
    {"name": "rest", "action": "allow"},
)

Labels = tuple[tuple[str, str], ...]


# -- helpers --------------------------------------------------------------------------


async def scrape(proxy: RunningProxy, token: str | None = None) -> dict[str, Any]:
    """GET /metrics from the admin server over HTTP; families by name."""
    assert proxy.app.admin is not None
    host, port = proxy.app.admin.addresses()[0]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/metrics", headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str, suffix: str = "") -> dict[Labels, float]:
    """Every sample ``name + suffix`` of family ``name``, keyed by its sorted labels."""
    out: dict[Labels, float] = {}
    for s in families[name].samples:
        if s.name == name + suffix:
            out[tuple(sorted(s.labels.items()))] = s.value
    return out


def lab(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def value(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    return samples(families, name, suffix)[lab(**labels)]


def check_histogram(families: dict[str, Any], name: str, count: int) -> list[float]:
    """Buckets cumulative and ending at ``count``; ``_count`` == ``count``; the bucket values."""
    buckets = sorted(
        (float(s.labels["le"]), s.value)
        for s in families[name].samples
        if s.name.endswith("_bucket")
    )
    values = [v for _, v in buckets]
    assert values == sorted(values), buckets
    assert buckets[-1] == (float("inf"), count)
    assert value(families, name, "_count") == count
    total = value(families, name, "_sum")
    assert (total > 0) if count else (total == 0)
    return values


def zeros(keys: Iterator[Labels] | list[Labels]) -> dict[Labels, float]:
    return dict.fromkeys(keys, 0.0)


@pytest.fixture
def home() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    subprocess.run(["htpasswd", "-bcB", str(path), "alice", "s3cret"], check=True)
    return path


@dataclasses.dataclass
class RecordingOrigin:
    """A raw HTTP origin recording (request bytes, response bytes) per connection."""

    server: asyncio.Server
    records: list[tuple[int, int]]

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def recording_origin() -> AsyncIterator[RecordingOrigin]:
    records: list[tuple[int, int]] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            body = pattern(BIG) if head.startswith(b"GET /big ") else b"hello"
            resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            w.write(resp)
            await w.drain()
            records.append((len(head), len(resp)))
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield RecordingOrigin(server, records)
    server.close()


@dataclasses.dataclass
class Standin:
    """A loopback7 stand-in: accepts the writer and counts every byte it gets."""

    server: asyncio.Server
    received: list[int]


@pytest.fixture
async def standin(home: Path) -> AsyncIterator[Standin]:
    received = [0]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            received[0] += len(data)
        w.close()

    server = await asyncio.start_unix_server(handle, str(home / "loopback7"))
    yield Standin(server, received)
    server.close()


def connect_req(target: str, credentials: str | None) -> bytes:
    import base64

    auth = ""
    if credentials is not None:
        auth = f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode()


async def socks_get(proxy: RunningProxy, port: int, path: str) -> bytes:
    p = Proxy(ProxyType.SOCKS5, *proxy.socks, username="alice", password="s3cret")
    sock = await p.connect("127.0.0.1", port, timeout=5)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: origin\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


# == the scripted session ================================================================


async def test_scripted_session_exact_counters(
    start_proxy: ProxyFactory,
    home: Path,
    tmp_path: Path,
    htpasswd: Path,
    recording_origin: RecordingOrigin,
    standin: Standin,
) -> None:
    flowlog_path = tmp_path / "flows.json"
    cfg = Config(
        listeners=LISTENERS,
        access=dataclasses.replace(TEST_ACCESS, rules=RULES),
        auth=AuthConfig(htpasswd=str(htpasswd)),
        export=ExportConfig(
            sftap_home=str(home),
            reader_buffer=64 << 10,
            reader_sndbuf=128 << 10,  # small, so the sleeping reader below loses DATA
            loopback7=str(home / "loopback7"),
        ),
        log=LogConfig(flows=str(flowlog_path)),
        admin=AdminConfig(address="127.0.0.1:0"),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    app = proxy.app
    sftap = next(s for s in app.sinks if isinstance(s, SftapServer))
    l7 = next(s for s in app.sinks if isinstance(s, Loopback7Writer))
    flowlog = next(s for s in app.sinks if isinstance(s, JsonFlowLog))
    await wait_for(lambda: l7.link_up)

    # nothing yet: every known label set is there, at 0
    before = await scrape(proxy)
    assert samples(before, "proxytap_downstream_connections", "_total") == zeros(
        [lab(listener="http", protocol=p) for p in ("http-connect", "http-forward")]
        + [lab(listener="socks", protocol=p) for p in ("socks4", "socks4a", "socks5")]
    )
    assert value(before, "proxytap_ready") == 1

    # the slow reader: connected to tcp/http before any traffic, never reads until the end
    import socket

    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(str(sftap.interfaces["tcp/http"].path))
    await wait_for(lambda: len(sftap.readers) == 1)

    origin = f"127.0.0.1:{recording_origin.port}"
    # 1. curl through a CONNECT tunnel
    rc, body, err = await run(
        "curl",
        "-sS",
        "-p",
        "-x",
        "http://alice:s3cret@{}:{}".format(*proxy.http),
        f"http://{origin}/hello",
    )
    assert rc == 0 and body == b"hello", err
    # 2. SOCKS5 (python-socks, user name and password)
    assert (await socks_get(proxy, recording_origin.port, "/hello")).endswith(b"\r\n\r\nhello")
    # 3. a destination a rule denies: refused without a connect attempt
    got = await exchange(
        proxy.http, connect_req(f"blocked.test:{recording_origin.port}", "alice:s3cret")
    )
    assert got.startswith(b"HTTP/1.1 403 ") and b"error=destination_ip_prohibited" in got
    # 4. a destination that refuses the connection
    got = await exchange(proxy.http, connect_req(f"127.0.0.1:{closed_port()}", "alice:s3cret"))
    assert got.startswith(b"HTTP/1.1 502 ") and b"error=connection_refused" in got
    # 5. a wrong password
    got = await exchange(proxy.http, connect_req(origin, "alice:wrong"))
    assert got.startswith(b"HTTP/1.1 407 ")
    # 6. 4 MiB through SOCKS5 while the flow-socket reader sleeps
    big = await socks_get(proxy, recording_origin.port, "/big")
    assert big.endswith(pattern(BIG))
    await proxy.recorder.wait_destroyed(3)
    await wait_for(lambda: not app.services.table.connections and not app.services.live)
    assert len(recording_origin.records) == 3

    # the slow reader wakes up and reads everything it was sent
    sr, sw = await asyncio.open_unix_connection(sock=stalled, limit=1 << 22)
    tap = TapReader(sr, sw)
    destroyed = 0
    events: list[Any] = []
    while destroyed < 3:
        ev, payload = await asyncio.wait_for(tap.event(), 10)
        events.append((ev, payload))
        destroyed += ev.event == "DESTROYED"
    check_stream(events)
    kinds = [ev.event for ev, _ in events]
    got_payload = sum(len(p) for _, p in events)
    await wait_for(lambda: standin.received[0] == l7.bytes_sent)
    await flowlog.flush()

    m = await scrape(proxy)
    up = sum(r[0] for r in recording_origin.records)
    down = sum(r[1] for r in recording_origin.records)

    # -- downstream -----------------------------------------------------------------
    expected = zeros(
        [lab(listener="http", protocol=p) for p in ("http-connect", "http-forward")]
        + [lab(listener="socks", protocol=p) for p in ("socks4", "socks4a", "socks5")]
    )
    active = dict(expected)
    expected[lab(listener="http", protocol="http-connect")] = 4  # 1, 3, 4, 5
    expected[lab(listener="socks", protocol="socks5")] = 2  # 2, 6
    assert samples(m, "proxytap_downstream_connections", "_total") == expected
    assert samples(m, "proxytap_downstream_connections_active") == active
    assert samples(m, "proxytap_downstream_rejections", "_total") == {
        lab(rule="auth", reason="bad credentials"): 1,
        lab(rule="no-blocked", reason="destination denied"): 1,
    }
    denied = samples(m, "proxytap_policy_denied", "_total")
    assert {k: v for k, v in denied.items() if v} == {lab(listener="http", rule="no-blocked"): 1}
    assert samples(m, "proxytap_downstream_auth_failures", "_total") == {
        lab(listener="http"): 1,
        lab(listener="socks"): 0,
    }
    assert samples(m, "proxytap_downstream_protocol_errors", "_total") == zeros(
        [lab(listener="http", protocol="http"), lab(listener="socks", protocol="socks")]
    )
    assert value(m, "proxytap_downstream_connections_limit") == 10000
    # no plain HTTP in this session: every status class at 0
    assert set(samples(m, "proxytap_downstream_http_requests", "_total").values()) == {0}

    # -- upstream -------------------------------------------------------------------
    check_histogram(m, "proxytap_upstream_connect_duration_seconds", 3)  # 1, 2, 6
    errors = samples(m, "proxytap_upstream_connect_errors", "_total")
    # the policy denial (3) is a denial, not a connect error: no connect was tried
    assert {k: v for k, v in errors.items() if v} == {
        lab(listener="http", reason="connection_refused"): 1
    }
    assert len(errors) == 2 * len(Failure)  # every Proxy-Status error type, per listener
    assert samples(m, "proxytap_upstream_connections_active") == {}

    # -- bytes and flows --------------------------------------------------------------
    # 1 through the http listener, 2 and 6 through socks
    up_http, down_http = recording_origin.records[0]
    assert samples(m, "proxytap_relayed_bytes", "_total") == {
        lab(listener="http", direction="upstream"): up_http,
        lab(listener="http", direction="downstream"): down_http,
        lab(listener="socks", direction="upstream"): up - up_http,
        lab(listener="socks", direction="downstream"): down - down_http,
    }
    classes = [r.name for r in app.hub.classifier.rules if r.l4 == "tcp"]
    assert "http" in classes and len(classes) > 2
    assert samples(m, "proxytap_flows", "_total") == {
        **zeros([lab(l7=c) for c in classes]),
        lab(l7="http"): 3,
    }
    # idle: no flow open, every class there at 0
    assert samples(m, "proxytap_flows_active") == zeros(
        [lab(l7=c) for c in [*classes, "unclassified"]]
    )
    assert samples(m, "proxytap_flows_closed", "_total") == {lab(l7="http", reason="normal"): 3}
    check_histogram(m, "proxytap_flow_duration_seconds", 3)

    # -- export -----------------------------------------------------------------------
    assert samples(m, "proxytap_export_events", "_total") == {
        lab(sink="sftap", type="created"): kinds.count("CREATED"),
        lab(sink="sftap", type="data"): kinds.count("DATA"),
        lab(sink="sftap", type="destroyed"): kinds.count("DESTROYED"),
        lab(sink="loopback7", type="created"): 3,
        lab(sink="loopback7", type="data"): l7.events_sent - 6,
        lab(sink="loopback7", type="destroyed"): 3,
        lab(sink="flowlog", type="flow"): 3,
    }
    assert kinds.count("CREATED") == 3
    dropped = samples(m, "proxytap_export_dropped_events", "_total")
    dropped_bytes = samples(m, "proxytap_export_dropped_bytes", "_total")
    assert dropped[lab(sink="sftap", reason="buffer_full")] > 0
    assert {k: v for k, v in dropped.items() if v} == {
        lab(sink="sftap", reason="buffer_full"): sftap.drops["buffer_full"]
    }
    assert len(dropped) == 5 + 6 + 2  # sftap, loopback7, flowlog reasons
    # every payload byte of every flow either reached the slow reader or was counted dropped
    assert {k: v for k, v in dropped_bytes.items() if v} == {
        lab(sink="sftap", reason="buffer_full"): up + down - got_payload
    }
    assert samples(m, "proxytap_export_sent_bytes", "_total") == {
        lab(sink="sftap"): sftap.bytes_sent,
        lab(sink="loopback7"): standin.received[0],
        lab(sink="flowlog"): flowlog_path.stat().st_size,
    }
    assert samples(m, "proxytap_export_subscribers") == {
        lab(sink="sftap"): 1,
        lab(sink="loopback7"): 1,
        lab(sink="flowlog"): 1,
    }
    assert samples(m, "proxytap_export_buffered_bytes") == {
        lab(sink="sftap"): 0,
        lab(sink="loopback7"): 0,
        lab(sink="flowlog"): 0,
    }
    assert value(m, "proxytap_export_subscriber_errors", "_total") == 0
    assert samples(m, "proxytap_loopback7_link_up") == {lab(sink="loopback7"): 1}
    assert samples(m, "proxytap_loopback7_reconnects", "_total") == {lab(sink="loopback7"): 0}
    assert samples(m, "proxytap_loopback7_connect_failures", "_total") == {lab(sink="loopback7"): 0}
    lines = flowlog_path.read_text().splitlines()
    assert sorted((r["orig_bytes"], r["resp_bytes"]) for r in map(json.loads, lines)) == sorted(
        recording_origin.records
    )
    tap.close()


async def test_live_tunnels_are_active_gauges(
    start_proxy: ProxyFactory, recording_origin: RecordingOrigin
) -> None:
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, admin=AdminConfig("127.0.0.1:0"))
    proxy: RunningProxy = await start_proxy(cfg)
    r1, w1 = await asyncio.open_connection(*proxy.http)
    w1.write(connect_req(f"127.0.0.1:{recording_origin.port}", None))
    assert (await r1.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    w1.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")  # classified at once
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", recording_origin.port)
    _, w2 = await asyncio.open_connection(sock=sock)  # open, nothing sent: not classified yet
    _, w3 = await asyncio.open_connection(*proxy.socks)  # still in its handshake
    await wait_for(lambda: proxy.app.hub.classified.get("http") == 1)
    await wait_for(lambda: len(proxy.app.services.table.connections) == 3)
    m = await scrape(proxy)
    active = samples(m, "proxytap_downstream_connections_active")
    assert {k: v for k, v in active.items() if v} == {
        lab(listener="http", protocol="http-connect"): 1,
        lab(listener="socks", protocol="socks5"): 1,
        lab(listener="socks", protocol="handshake"): 1,
    }
    assert samples(m, "proxytap_upstream_connections_active") == {
        lab(protocol="http-connect"): 1,
        lab(protocol="socks5"): 1,
    }
    flows_active = samples(m, "proxytap_flows_active")
    assert {k: v for k, v in flows_active.items() if v} == {
        lab(l7="http"): 1,
        lab(l7="unclassified"): 1,
    }
    assert len(flows_active) > 2  # the other classes, at 0
    # live flows' bytes count before they end, under their listener
    up = len(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert value(m, "proxytap_relayed_bytes", "_total", listener="http", direction="upstream") == up
    assert value(m, "proxytap_relayed_bytes", "_total", listener="socks", direction="upstream") == 0
    for w in (w1, w2, w3):
        w.close()


# == plain HTTP: needs two lines in proxytap/front/http_forward.py ==========================


async def test_plain_http_counters_exact(
    start_proxy: ProxyFactory, recording_origin: RecordingOrigin
) -> None:
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, admin=AdminConfig("127.0.0.1:0"))
    proxy: RunningProxy = await start_proxy(cfg)
    # one keep-alive client connection: two requests to the origin, one to a closed port
    urls = [
        f"http://127.0.0.1:{recording_origin.port}/hello",
        f"http://localhost:{recording_origin.port}/hello",
        f"http://127.0.0.1:{closed_port()}/hello",
    ]
    outputs = [arg for _ in urls for arg in ("-o", "/dev/null")]
    rc, out, err = await run(
        "curl", "-sS", "-x", proxy.http_url, "-w", "%{http_code}\n", *outputs, *urls
    )
    assert rc == 0, err
    assert out.split() == [b"200", b"200", b"502"], err
    await wait_for(lambda: not proxy.app.services.table.connections)
    m = await scrape(proxy)
    assert value(m, "proxytap_downstream_connections", "_total", listener="http",
                 protocol="http-forward") == 1  # fmt: skip
    responses = samples(m, "proxytap_downstream_http_requests", "_total")
    assert {k: v for k, v in responses.items() if v} == {
        lab(listener="http", code_class="2xx", source="origin"): 2,
        lab(listener="http", code_class="5xx", source="proxy"): 1,
    }
    assert len(responses) == 5 * 2  # the http listener's classes; none for socks
    check_histogram(m, "proxytap_upstream_connect_duration_seconds", 2)
    assert samples(m, "proxytap_flows_closed", "_total") == {lab(l7="http", reason="normal"): 2}
    check_histogram(m, "proxytap_flow_duration_seconds", 2)
    down = sum(r[1] for r in recording_origin.records)
    assert (
        value(m, "proxytap_relayed_bytes", "_total", listener="http", direction="downstream")
        == down
    )


# == deploy/: promtool and the dashboard ===================================================


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run tests/setup-tools.sh (Debian package prometheus)")
    return path


async def test_promtool_checks_rules_and_config() -> None:
    promtool = _promtool()
    rc, out, err = await run(promtool, "check", "rules", str(DEPLOY / "alerts.yml"))
    assert rc == 0, (out + err).decode()
    rc, out, err = await run(promtool, "check", "config", str(DEPLOY / "prometheus.yml"))
    assert rc == 0, (out + err).decode()
    rc, out, err = await run(promtool, "test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert rc == 0, (out + err).decode()


_PROMQL_NAME = re.compile(r"\b((?:proxytap|process)_[a-z0-9_]+)")


def exposed_names(families: dict[str, Any]) -> set[str]:
    """Every series name a family of this type can expose."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }
    names = set()
    for name, fam in families.items():
        names.add(name)
        names.update(name + s for s in suffixes.get(fam.type, ()))
        names.update(s.name for s in fam.samples)
    return names


def dashboard_exprs(doc: Any) -> list[str]:
    """Every PromQL ``expr`` in a Grafana dashboard (panels, rows, templating)."""
    out: list[str] = []
    if isinstance(doc, dict):
        for key, val in doc.items():
            if key in ("expr", "query", "definition") and isinstance(val, str):
                out.append(val)
            else:
                out.extend(dashboard_exprs(val))
    elif isinstance(doc, list):
        for item in doc:
            out.extend(dashboard_exprs(item))
    return out


async def test_dashboard_uses_only_exposed_metrics(
    start_proxy: ProxyFactory, home: Path, tmp_path: Path, recording_origin: RecordingOrigin
) -> None:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        export=ExportConfig(sftap_home=str(home), loopback7=str(home / "nowhere")),
        log=LogConfig(flows=str(tmp_path / "flows.json")),
        admin=AdminConfig(address="127.0.0.1:0"),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    assert (await socks_get_anonymous(proxy, recording_origin.port)).endswith(b"hello")
    families = await scrape(proxy)
    names = exposed_names(families)
    doc = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = dashboard_exprs(doc)
    assert len(exprs) >= 15
    used = {n for e in exprs for n in _PROMQL_NAME.findall(e)}
    assert used, exprs
    assert used <= names, sorted(used - names)
    # the alert rules too; and METRICS (the module's list) is exactly what is exposed
    rules = (DEPLOY / "alerts.yml").read_text()
    assert set(_PROMQL_NAME.findall(rules)) <= names
    assert set(METRICS) <= names
    assert {n.removesuffix("_total") for n in METRICS} == {
        f for f in families if f.startswith("proxytap_")
    }
    # prometheus.yml targets the default admin address
    assert "127.0.0.1:9090" in (DEPLOY / "prometheus.yml").read_text()


async def socks_get_anonymous(proxy: RunningProxy, port: int) -> bytes:
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", port, timeout=5)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: origin\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def readme_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """README's metrics table: name -> (type, label names), each name once."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Metrics\n", 1)[1].split("\n### ", 1)[0]
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in section.splitlines():
        if not line.startswith("| `proxytap_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        labels = tuple(re.findall(r"`(\w+)`", cells[2]))
        for name in re.findall(r"`(proxytap_\w+)`", cells[0]):
            assert name not in table, f"{name} twice in README's metrics table"
            table[name] = (cells[1], labels)
    return table


async def test_readme_metrics_table_is_what_is_exposed(
    start_proxy: ProxyFactory, home: Path, tmp_path: Path, recording_origin: RecordingOrigin
) -> None:
    """Every family of METRICS in README's table, with its type and its label names."""
    table = readme_metrics()
    assert {n: t for n, (t, _) in table.items()} == {n: t for n, (t, _) in METRICS.items()}
    # a PROXY-protocol listener: its header results are exported at 0
    behind = ListenerConfig(
        kind="http",
        address="127.0.0.1:0",
        name="behind",
        proxy_protocol=True,
        proxy_protocol_from=("10.0.0.0/8",),
    )
    cfg = Config(  # every sink kind: the export families have samples to read labels from
        listeners=(*LISTENERS, behind),
        access=TEST_ACCESS,
        export=ExportConfig(sftap_home=str(home), loopback7=str(home / "nowhere")),
        log=LogConfig(flows=str(tmp_path / "flows.json")),
        admin=AdminConfig(address="127.0.0.1:0"),
        # an upstream proxy (chaining): its families are exported at 0 per proxy
        upstream=UpstreamConfig(proxies=({"name": "up", "url": "socks5h://127.0.0.1:9"},)),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    assert (await socks_get_anonymous(proxy, recording_origin.port)).endswith(b"hello")
    families = await scrape(proxy)
    checked = 0
    for name, (_, labels) in table.items():
        family = families[name.removesuffix("_total")]
        exposed = {tuple(sorted(k for k in s.labels if k != "le")) for s in family.samples}
        if exposed:  # families without samples here (no modules: module errors) have none
            assert exposed == {tuple(sorted(labels))}, name
            checked += 1
    assert checked >= len(table) - 2, checked
