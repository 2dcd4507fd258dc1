"""``proxytap flows``: formatting, and the real command against a live proxy's admin API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from typing import Any

from proxytap.config import AdminConfig, Config, ExportConfig, ListenerConfig
from proxytap.flowscli import age, human, render_table, stats_line
from tests.conftest import TEST_ACCESS, Origin, ProxyFactory, RunningProxy, closed_port, run
from tests.export.sftap_helpers import wait_for

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)
FLOWS = [sys.executable, "-m", "proxytap", "flows"]
TOKEN = "flows-cli-token"


# -- formatting ------------------------------------------------------------------------------


def test_human_and_age() -> None:
    assert [human(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 40)] == [
        "0B",
        "1023B",
        "1.0KiB",
        "1.5KiB",
        "5.0MiB",
        "3.0TiB",
    ]
    assert [age(s) for s in (0.04, 59.9, 61, 3599, 7325)] == [
        "0.0s",
        "59.9s",
        "1m01s",
        "59m59s",
        "2h02m",
    ]


def _row(**kw: Any) -> dict[str, Any]:
    row = {
        "id": 7,
        "client": {"ip": "10.0.0.1", "port": 40000},
        "server": {"ip": "2001:db8::1", "port": 443},
        "requested": {"host": "example.org", "port": 443},
        "chunks_up": 3,
        "chunks_down": 12,
        "bytes_up": 517,
        "bytes_down": 48213,
        "l7": "ssl",
        "state": "open",
        "age": 4.25,
    }
    row.update(kw)
    return row


def test_render_table() -> None:
    doc = {
        "total": 3,
        "connections": 2,
        "flows": [_row(), _row(id=12, l7=None, state="half-closed", age=75.0, bytes_down=0)],
    }
    assert render_table(doc).splitlines() == [
        "3 flows, 2 client connections, 2 shown",
        "ID  CHUNKS  BYTES UP  BYTES DOWN  CLIENT -> DESTINATION (REQUESTED)"
        "                      L7   STATE        AGE",
        " 7    3/12       517       48213  10.0.0.1:40000 -> [2001:db8::1]:443 (example.org:443)"
        "  ssl  open         4.2s",
        "12    3/12       517           0  10.0.0.1:40000 -> [2001:db8::1]:443 (example.org:443)"
        "  -    half-closed  1m15s",
    ]


def test_stats_line_rates() -> None:
    first = {
        "now": 1000.0,
        "uptime": 10.0,
        "bytes_up": 10240,
        "bytes_down": 20480,
        "flows_active": 1,
        "flows_total": 5,
        "connections_active": 1,
        "export_dropped_events": 0,
        "export_dropped_bytes": 0,
    }
    text, numbers = stats_line(first, None)  # averages since start
    assert numbers["up_bps"] == 1024 and numbers["new_flows_per_s"] == 0.5
    second = {**first, "now": 1002.0, "bytes_down": 20480 + 4096, "flows_total": 9}
    text, numbers = stats_line(second, first)
    assert numbers["up_bps"] == 0 and numbers["down_bps"] == 2048
    assert numbers["new_flows_per_s"] == 2
    assert text.endswith(
        "bytes up 10.0KiB down 24.0KiB | 0B/s up 2.0KiB/s down"
        " | flows 1 active 9 total 2.0 new/s | conns 1 | drops 0 events 0B"
    )


# -- the command against a live proxy ------------------------------------------------------------


async def live_proxy(start_proxy: ProxyFactory, origin: Origin, token: str | None = None) -> Any:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        admin=AdminConfig("127.0.0.1:0", token=token),
        # the second tunnel stays quiet and must still show as unclassified ("-") when
        # the table is read: no classification by time during the test
        export=ExportConfig(classify_timeout=3600.0),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    r1, w1 = await asyncio.open_connection(*proxy.http)
    w1.write(f"CONNECT localhost:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert (await r1.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    w1.write(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await r1.readuntil(b"hello GET /hello")
    r2, w2 = await asyncio.open_connection(*proxy.http)
    w2.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert (await r2.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await wait_for(lambda: proxy.app.hub.classified.get("http") == 1)
    assert proxy.app.admin is not None
    url = "http://{}:{}".format(*proxy.app.admin.addresses()[0])
    return proxy, url, (w1, w2)


async def test_flows_once_table_and_json(start_proxy: ProxyFactory, origin: Origin) -> None:
    _, url, writers = await live_proxy(start_proxy, origin)
    rc, out, err = await run(*FLOWS, "--admin", url, "--once")
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == "2 flows, 2 client connections"
    assert lines[1].split()[:2] == ["ID", "CHUNKS"]
    assert len(lines) == 4
    client1 = "{}:{}".format(*writers[0].get_extra_info("sockname")[:2])
    pattern = (
        rf"^\s*\d+\s+1/\d+\s+40\s+\d+\s+{re.escape(client1)} -> 127\.0\.0\.1:{origin.port}"
        rf" \(localhost:{origin.port}\)\s+http\s+open\s+\d+\.\ds$"
    )
    assert re.match(pattern, lines[2]), lines[2]
    assert re.search(rf"\(127\.0\.0\.1:{origin.port}\)\s+-\s+open\s", lines[3]), lines[3]
    # filters go to the admin API; --json prints its document
    rc, out, err = await run(*FLOWS, "--admin", url.removeprefix("http://"), "--once", "--json",
                             "--class", "http")  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["total"], doc["matched"]) == (2, 1)
    assert doc["flows"][0]["requested"] == {"host": "localhost", "port": origin.port}
    # --count: that many tables, then exit
    rc, out, err = await run(*FLOWS, "--admin", url, "--count", "2", "--interval", "0.1")
    assert rc == 0, err
    assert out.decode().count("2 flows, 2 client connections") == 2
    for w in writers:
        w.close()


async def test_flows_stats_count(start_proxy: ProxyFactory, origin: Origin) -> None:
    _, url, writers = await live_proxy(start_proxy, origin)
    rc, out, err = await run(*FLOWS, "--admin", url, "--stats", "--count", "2", "--interval", "0.2")
    assert rc == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 2
    line = (
        r"^\d\d:\d\d:\d\d bytes up \d+B down \d+(\.\d)?K?i?B \| \S+/s up \S+/s down"
        r" \| flows 2 active 2 total \d+\.\d new/s \| conns 2 \| drops 0 events 0B$"
    )
    for text in lines:
        assert re.match(line, text), text
    assert "| 0B/s up 0B/s down | flows 2 active 2 total 0.0 new/s" in lines[1]
    rc, out, err = await run(
        *FLOWS, "--admin", url, "--stats", "--json", "--count", "2", "--interval", "0.2"
    )
    assert rc == 0, err
    first, second = (json.loads(x) for x in out.decode().splitlines())
    assert first["flows_total"] == second["flows_total"] == 2
    assert second["bytes_up"] == len(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert second["up_bps"] == 0 and second["new_flows_per_s"] == 0
    for w in writers:
        w.close()


async def test_flows_token_and_errors(start_proxy: ProxyFactory, origin: Origin) -> None:
    _, url, writers = await live_proxy(start_proxy, origin, token=TOKEN)
    rc, out, err = await run(*FLOWS, "--admin", url, "--once")
    assert rc == 1 and out == b""
    assert b"HTTP 401 a bearer token is required (--token or $PROXYTAP_ADMIN_TOKEN)" in err
    rc, out, err = await run(*FLOWS, "--admin", url, "--once", "--token", TOKEN)
    assert rc == 0 and out.startswith(b"2 flows"), err
    proc = await asyncio.create_subprocess_exec(
        *FLOWS,
        "--admin",
        url,
        "--once",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PROXYTAP_ADMIN_TOKEN": TOKEN},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and out.startswith(b"2 flows"), err
    rc, out, err = await run(*FLOWS, "--admin", f"127.0.0.1:{closed_port()}", "--once")
    assert rc == 1 and b"cannot reach the admin API" in err
    rc, _, err = await run(*FLOWS, "--count", "0")
    assert rc == 2 and b"--count must be >= 1" in err
    rc, out, _ = await run(sys.executable, "-m", "proxytap", "--help")
    assert rc == 0 and b"flows" in out
    for w in writers:
        w.close()
