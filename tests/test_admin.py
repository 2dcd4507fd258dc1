"""The admin API over real HTTP: probes, token, /flows and /subscribers against schemas.

Also the process as an operator runs it: ``proxytap run --admin ...`` with
``--log-format`` and ``--log-level``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.admin import AdminServer
from proxytap.app import App
from proxytap.config import (
    AdminConfig,
    Config,
    ExportConfig,
    ListenerConfig,
    LogConfig,
    TlsCheckConfig,
)
from tests.conftest import TEST_ACCESS, Origin, ProxyFactory, RunningProxy, closed_port
from tests.export.sftap_helpers import short_tmp, wait_for

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)
PROXYTAP = [sys.executable, "-m", "proxytap"]
TOKEN = "t0k3n-for-tests"


# -- a small JSON-schema-like checker -----------------------------------------------------


class MapOf:
    """A JSON object with any keys and values of one schema."""

    def __init__(self, values: Any) -> None:
        self.values = values


class ListOf:
    def __init__(self, items: Any) -> None:
        self.items = items


class Open:
    """A JSON object with at least these keys (more allowed)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields


def check(value: Any, schema: Any, path: str = "$") -> None:
    """Assert ``value`` matches ``schema``: a type, a tuple of alternatives (None for
    null), a dict (exactly these keys), ``Open``, ``MapOf``, ``ListOf`` or a literal."""
    if isinstance(schema, tuple):
        errors = []
        for alt in schema:
            try:
                check(value, alt, path)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: none of the alternatives match: {errors}")
    if schema is None:
        assert value is None, f"{path}: expected null, got {value!r}"
    elif isinstance(schema, type):
        ok = isinstance(value, schema)
        if schema in (int, float) and isinstance(value, bool):
            ok = False
        if schema is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        assert ok, f"{path}: expected {schema.__name__}, got {value!r}"
    elif isinstance(schema, dict):
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        assert set(value) == set(schema), f"{path}: keys {sorted(value)} != {sorted(schema)}"
        for key, sub in schema.items():
            check(value[key], sub, f"{path}.{key}")
    elif isinstance(schema, Open):
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        assert set(schema.fields) <= set(value), (
            f"{path}: missing {set(schema.fields) - set(value)}"
        )
        for key, sub in schema.fields.items():
            check(value[key], sub, f"{path}.{key}")
    elif isinstance(schema, MapOf):
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        for key, sub in value.items():
            check(sub, schema.values, f"{path}.{key}")
    elif isinstance(schema, ListOf):
        assert isinstance(value, list), f"{path}: expected an array, got {value!r}"
        for i, item in enumerate(value):
            check(item, schema.items, f"{path}[{i}]")
    else:
        assert value == schema, f"{path}: expected {schema!r}, got {value!r}"


ENDPOINT = {"ip": str, "port": int}
FLOW = {
    "id": int,
    "uid": str,
    "outer_uid": str,
    "listener": str,
    "tunnel": ("http-connect", "http-forward", "socks4", "socks4a", "socks5"),
    "client": ENDPOINT,
    "server": ENDPOINT,
    "requested": {"host": str, "port": int},
    "l4": "tcp",
    "l7": (str, None),
    "state": ("open", "half-closed"),
    "start": float,
    "age": float,
    "bytes_up": int,
    "bytes_down": int,
    "chunks_up": int,
    "chunks_down": int,
    "sni": (str, None),
    "alpn": (str, None),
    "ja3": (str, None),
    "ja4": (str, None),
    "http_host": (str, None),
    "user": (str, None),
    "decrypted": bool,
    "tls_version": (str, None),
    "tls_cipher": (str, None),
    "via": (str, None),  # the upstream proxy's name (chaining)
}
FLOWS = {
    "now": float,
    "total": int,
    "matched": int,
    "connections": int,
    "flows": ListOf(FLOW),
}
COUNTS = MapOf(int)
SUBSCRIBER = Open(
    {
        "name": str,
        "kind": ("sftap", "loopback7", "flowlog"),
        "connected": int,
        "buffered": int,
        "flows": int,
        "events": COUNTS,
        "bytes_sent": int,
        "drops": COUNTS,
        "dropped_bytes": COUNTS,
    }
)
READER = {
    "interface": str,
    "connected_at": float,
    "buffered": int,
    "paused": bool,
    "flows": int,
    "events_sent": int,
    "bytes_sent": int,
    "bytes_dropped": int,
    "drops": COUNTS,
    "waiting": bool,
    "sndbuf": int,
}
SOCKET_SINK = {"wait_seconds": float, "partial_sends": int, "sndbuf": int, "overload": str}
SFTAP = Open({"home": str, "readers": ListOf(READER), **SOCKET_SINK})
LOOPBACK7 = Open(
    {
        "path": str,
        "link_up": bool,
        "connects": int,
        "reconnects": int,
        "connect_failures": int,
        "last_error": (str, None),
        "format": ("text", "binary"),
        "reannounced": int,
        **SOCKET_SINK,
    }
)
FLOWLOG = Open({"path": str, "reopens": int, "rotations": int, "last_error": (str, None)})


def test_checker_rejects_what_it_should() -> None:
    check({"a": 1, "b": None}, {"a": int, "b": (str, None)})
    for bad, schema in [
        ({"a": True}, {"a": int}),
        ({"a": 1, "x": 2}, {"a": int}),
        ({"a": "1"}, {"a": int}),
        ([1, "2"], ListOf(int)),
        ({"k": 1.5}, MapOf(int)),
        ("socks6", ("socks4", "socks5")),
        ({}, Open({"a": int})),
    ]:
        with pytest.raises(AssertionError):
            check(bad, schema)


# -- helpers -----------------------------------------------------------------------------


def admin_url(proxy: RunningProxy | App) -> str:
    app: App = getattr(proxy, "app", proxy)  # conftest's classes load twice: no isinstance
    assert app.admin is not None
    host, port = app.admin.addresses()[0]
    return f"http://{host}:{port}"


async def get(
    url: str, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=hdrs) as resp:
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return resp.status, body, resp.headers


@pytest.fixture
def home() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


# -- probes -----------------------------------------------------------------------------


async def test_readyz_follows_the_listeners(origin: Origin) -> None:
    app = App(Config(listeners=LISTENERS, access=TEST_ACCESS).validate())
    admin = AdminServer(app, "127.0.0.1", 0)
    await admin.start()
    url = "http://{}:{}".format(*admin.addresses()[0])
    writer = None
    try:
        status, body, _ = await get(f"{url}/readyz")
        assert (status, body["status"]) == (503, "starting")
        status, body, _ = await get(f"{url}/healthz")
        assert (status, body["status"]) == (200, "alive")
        await app.start()
        status, body, _ = await get(f"{url}/readyz")
        assert (status, body["status"]) == (200, "ready")
        assert set(body["listeners"]) == {"http", "socks"}
        # an open tunnel keeps the proxy draining: not ready, still alive
        reader, writer = await asyncio.open_connection(*app.addresses("http")[0])
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        stopping = asyncio.create_task(app.stop(5.0))
        await wait_for(lambda: app.services.draining)
        status, body, _ = await get(f"{url}/readyz")
        assert (status, body["status"]) == (503, "draining")
        assert (await get(f"{url}/healthz"))[0] == 200
        writer.close()
        await asyncio.wait_for(stopping, 5)
        assert (await get(f"{url}/readyz"))[0] == 503
    finally:
        if writer is not None:
            writer.close()
        await app.stop(0)
        await admin.stop()


async def test_admin_server_stops_with_the_app(start_proxy: ProxyFactory) -> None:
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, admin=AdminConfig("127.0.0.1:0"))
    proxy: RunningProxy = await start_proxy(cfg)
    url = admin_url(proxy)
    assert (await get(f"{url}/readyz"))[0] == 200
    await proxy.app.stop(0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"{url}/healthz")


async def test_admin_address_in_use_stops_start_up(start_proxy: ProxyFactory) -> None:
    first: RunningProxy = await start_proxy(
        Config(listeners=LISTENERS, access=TEST_ACCESS, admin=AdminConfig("127.0.0.1:0"))
    )
    assert first.app.admin is not None
    taken = "{}:{}".format(*first.app.admin.addresses()[0])
    app = App(Config(listeners=LISTENERS, access=TEST_ACCESS, admin=AdminConfig(taken)))
    with pytest.raises(OSError):
        await app.start()
    assert not app.servers and app.stopped.is_set()


# -- token ---------------------------------------------------------------------------------


async def test_bearer_token(start_proxy: ProxyFactory) -> None:
    cfg = Config(
        listeners=LISTENERS, access=TEST_ACCESS, admin=AdminConfig("127.0.0.1:0", token=TOKEN)
    )
    proxy: RunningProxy = await start_proxy(cfg)
    url = admin_url(proxy)
    for path in ("/healthz", "/readyz"):
        assert (await get(url + path))[0] == 200, path
    for path, ok in (
        ("/metrics", 200),
        ("/flows", 200),
        ("/subscribers", 200),
        ("/stats", 200),
    ):
        for token, headers in (
            (None, None),
            ("wrong", None),
            (TOKEN + "x", None),
            (None, {"Authorization": f"Basic {TOKEN}"}),
            (None, {"Authorization": TOKEN}),
        ):
            status, body, hdrs = await get(url + path, token, headers)
            assert status == 401, (path, token, headers)
            assert body == {"error": "a bearer token is required"}
            assert hdrs["WWW-Authenticate"] == 'Bearer realm="proxytap"'
        assert (await get(url + path, TOKEN))[0] == ok, path


async def test_ca_endpoints_without_a_ca(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        admin=AdminConfig("127.0.0.1:0", token=TOKEN),
        tls=TlsCheckConfig(ca_dir=str(tmp_path / "no-ca")),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    for path in ("/ca", "/ca.pem", "/ca.der", "/ca.p12"):  # open, like the probes: no token
        status, body, hdrs = await get(admin_url(proxy) + path)
        assert status == 404, path
        assert hdrs["Content-Type"].startswith("application/json")
        assert "proxytap ca init" in body["error"]
    status, body, _ = await get(admin_url(proxy) + "/nothing-here", TOKEN)
    assert status == 404 and "error" in body


# -- /flows and /subscribers during live tunnels -------------------------------------------


async def test_flows_and_subscribers_match_their_schemas(
    start_proxy: ProxyFactory, origin: Origin, home: Path, tmp_path: Path
) -> None:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        export=ExportConfig(sftap_home=str(home), loopback7=str(home / "nowhere")),
        log=LogConfig(flows=str(tmp_path / "flows.json")),
        admin=AdminConfig("127.0.0.1:0"),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    url = admin_url(proxy)
    # an analyzer on tcp/http
    ar, aw = await asyncio.open_unix_connection(str(home / "tcp" / "http"))
    # a CONNECT tunnel with one request in flight (classified http) ...
    r1, w1 = await asyncio.open_connection(*proxy.http)
    w1.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert (await r1.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    client1 = w1.get_extra_info("sockname")[:2]
    w1.write(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await r1.readuntil(b"hello GET /hello")).startswith(b"HTTP/1.1 200")
    # ... and a SOCKS5 tunnel to a name, idle (not classified yet)
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("localhost", origin.port)
    _, w2 = await asyncio.open_connection(sock=sock)
    client2 = sock.getsockname()[:2]
    await wait_for(lambda: len(proxy.app.services.table.flows) == 2)

    status, doc, _ = await get(f"{url}/flows")
    assert status == 200
    check(doc, FLOWS)
    assert (doc["total"], doc["matched"], doc["connections"]) == (2, 2, 2)
    f1, f2 = doc["flows"]
    assert f1["id"] < f2["id"]
    assert (f1["tunnel"], f1["l7"], f1["listener"]) == ("http-connect", "http", "http")
    assert (f1["client"]["ip"], f1["client"]["port"]) == tuple(client1)
    assert f1["server"] == {"ip": "127.0.0.1", "port": origin.port}
    assert f1["bytes_up"] == len(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert f1["bytes_down"] > 0 and f1["chunks_up"] == 1
    assert (f2["tunnel"], f2["l7"], f2["bytes_up"]) == ("socks5", None, 0)
    assert f2["requested"] == {"host": "localhost", "port": origin.port}
    assert (f2["client"]["ip"], f2["client"]["port"]) == tuple(client2)
    assert f1["outer_uid"] != f2["outer_uid"] and f1["uid"] != f2["uid"]

    async def ids(query: str) -> list[int]:
        status, doc, _ = await get(f"{url}/flows?{query}")
        assert status == 200, doc
        check(doc, FLOWS)
        return [f["id"] for f in doc["flows"]]

    assert await ids(f"client={client1[0]}:{client1[1]}") == [f1["id"]]
    assert await ids(f"client={client1[0]}") == [f1["id"], f2["id"]]
    assert await ids(f"destination=localhost:{origin.port}") == [f2["id"]]
    assert await ids(f"destination=127.0.0.1:{origin.port}") == [f1["id"], f2["id"]]
    assert await ids("destination=example.org") == []
    assert await ids("class=http") == [f1["id"]]
    assert await ids("class=unclassified") == [f2["id"]]
    assert await ids("state=open") == [f1["id"], f2["id"]]
    assert await ids("state=half-closed") == []
    assert await ids("limit=1") == [f1["id"]]
    status, doc, _ = await get(f"{url}/flows?limit=1")
    assert (doc["matched"], len(doc["flows"])) == (2, 1)
    for bad in ("limit=x", "limit=-1", "limit=100001"):
        status, doc, _ = await get(f"{url}/flows?{bad}")
        assert status == 400 and "limit" in doc["error"]

    status, doc, _ = await get(f"{url}/subscribers")
    assert status == 200
    check(doc, {"subscribers": ListOf(SUBSCRIBER)})
    subs = {s["name"]: s for s in doc["subscribers"]}
    # the app's export sinks; the test's own hub subscriber (recorder) is no sink
    assert set(subs) == {"sftap", "loopback7", "flowlog"}
    check(subs["sftap"], SFTAP)
    check(subs["loopback7"], LOOPBACK7)
    check(subs["flowlog"], FLOWLOG)
    sftap = subs["sftap"]
    assert sftap["connected"] == 1 and len(sftap["readers"]) == 1
    assert sftap["readers"][0]["interface"] == "tcp/http"
    assert sftap["readers"][0]["flows"] == 1  # the CONNECT tunnel, classified http
    assert sftap["events"]["created"] == 1 and sftap["events"]["data"] == 2
    assert sftap["drops"] == dict.fromkeys(
        ("buffer_full", "max_wait", "overflow", "cut", "oversize"), 0
    )
    assert sftap["partial_sends"] == 0 and sftap["wait_seconds"] == 0
    assert sftap["sndbuf"] >= 4 << 20  # export.reader_sndbuf (the kernel doubles it)
    l7 = subs["loopback7"]
    assert (l7["link_up"], l7["connected"], l7["connects"]) == (False, 0, 0)
    assert l7["connect_failures"] >= 1 and l7["last_error"]
    assert l7["drops"]["not_connected"] >= 1  # the CONNECT tunnel's CREATED and DATA
    assert subs["flowlog"]["connected"] == 1 and subs["flowlog"]["events"] == {"flow": 0}

    status, doc, _ = await get(f"{url}/stats")
    assert status == 200
    check(
        doc,
        {
            "now": float,
            "uptime": float,
            "bytes_up": int,
            "bytes_down": int,
            "flows_active": int,
            "flows_total": int,
            "connections_active": int,
            "connections_total": int,
            "export_dropped_events": int,
            "export_dropped_bytes": int,
        },
    )
    assert (doc["flows_active"], doc["flows_total"], doc["connections_active"]) == (2, 2, 2)
    assert doc["bytes_up"] == f1["bytes_up"]
    for w in (w1, w2, aw):
        w.close()
    del ar


# -- the process: --admin, --log-format, --log-level ------------------------------------------


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        *PROXYTAP,
        "run",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return proc, []


async def _stop(proc: asyncio.subprocess.Process) -> tuple[int, list[str]]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    rest = await asyncio.wait_for(proc.stderr.read(), 15)
    rc = await asyncio.wait_for(proc.wait(), 15)
    return rc, rest.decode().splitlines()


async def test_run_with_admin_and_json_logs(origin: Origin) -> None:
    proc, lines = await _start(
        "--http",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--allow-dest",
        "127.0.0.0/8",
        "--connect-ports",
        "1-65535",
    )
    try:
        assert proc.stderr is not None
        admin = http = None
        while admin is None or http is None or not any("proxytap ready" in x for x in lines):
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)
            msg = json.loads(line)["msg"]
            if m := re.search(r"admin: serving (http://\S+)/metrics", msg):
                admin = m.group(1)
            if m := re.search(r"listening: http on (\S+)", msg):
                http = m.group(1)
        status, body, _ = await get(f"{admin}/readyz")
        assert (status, body["status"]) == (200, "ready")
        # one tunnel: a debug "open" line and an INFO line when it ends, both JSON
        reader, writer = await asyncio.open_connection(*http.rsplit(":", 1))
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        status, body, _ = await get(f"{admin}/metrics")
        assert status == 200 and "proxytap_downstream_connections_total" in body
    finally:
        rc, rest = await _stop(proc)
    assert rc == 0
    records = [json.loads(x) for x in lines + rest]
    for rec in records:
        assert set(rec) >= {"ts", "level", "logger", "msg"}
    levels = {r["level"] for r in records}
    assert {"debug", "info"} <= levels
    tunnel = [r for r in records if r["msg"].startswith("tunnel http-connect")]
    assert [r["level"] for r in tunnel] == ["debug", "info"], tunnel
    assert any(r["msg"] == "stopped" for r in records)


async def test_run_log_level_warning_is_quiet_and_text(origin: Origin) -> None:
    http_port, admin_port = closed_port(), closed_port()
    proc, _ = await _start(
        "--http",
        f"127.0.0.1:{http_port}",
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--log-level",
        "warning",
        "--log-format",
        "text",
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    if (await get(f"http://127.0.0.1:{admin_port}/readyz"))[0] == 200:
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        # refused by the default policy (loopback): logged at INFO, so not shown
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.read()).startswith(b"HTTP/1.1 403")
        writer.close()
    finally:
        rc, rest = await _stop(proc)
    assert rc == 0
    assert rest == [], rest  # nothing at INFO or DEBUG, nothing went wrong


async def test_run_admin_off(origin: Origin) -> None:
    proc, lines = await _start("--http", "127.0.0.1:0", "--admin", "off")
    try:
        assert proc.stderr is not None
        while not any("proxytap ready" in x for x in lines):
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)
    finally:
        rc, _ = await _stop(proc)
    assert rc == 0
    assert not any("admin:" in x for x in lines)


# -- configuration ---------------------------------------------------------------------------


def test_admin_and_flow_log_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxytap.cli import build_parser, config_from_args
    from proxytap.config import from_dict
    from proxytap.errors import ConfigError

    def cfg(*argv: str) -> Config:
        return config_from_args(build_parser().parse_args(["run", *argv]))

    monkeypatch.delenv("PROXYTAP_ADMIN_TOKEN", raising=False)
    assert cfg().admin == AdminConfig("127.0.0.1:9090")  # the command line's default
    assert Config().admin.enabled is False  # an embedded App runs none unless asked
    assert cfg("--admin", "off").admin.enabled is False
    got = cfg("--admin", "[::1]:0", "--admin-token", "abc", "--log-flows", "/tmp/f.json")
    assert (got.admin.host, got.admin.port, got.admin.token) == ("::1", 0, "abc")
    assert got.log.flows == "/tmp/f.json"
    monkeypatch.setenv("PROXYTAP_ADMIN_TOKEN", "from-env")
    assert cfg().admin.token == "from-env"
    assert cfg("--admin-token", "flag").admin.token == "flag"
    toml = tmp_path / "c.toml"
    toml.write_text('[admin]\naddress = "127.0.0.1:9187"\ntoken = "file"\n')
    assert cfg("--config", str(toml)).admin == AdminConfig("127.0.0.1:9187", "file")
    with pytest.raises(SystemExit):
        cfg("--admin", "nowhere")
    for data, key in (
        ({"admin": {"address": "nope"}}, "admin.address"),
        ({"admin": {"token": "has space"}}, "admin.token"),
        ({"admin": {"bogus": 1}}, "admin.bogus"),
        ({"log": {"flows": ""}}, "log.flows"),
        ({"log": {"flows_backups": 0}}, "log.flows_backups"),
        ({"log": {"flows_max_bytes": -1}}, "log.flows_max_bytes"),
    ):
        with pytest.raises(ConfigError) as info:
            from_dict(data)
        assert info.value.key == key, data
