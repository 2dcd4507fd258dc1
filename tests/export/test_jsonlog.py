"""The JSON flow log: record fields, buffering, rotation, reopening, and real sessions.

End to end, the oracle for "which outer connection carried this flow" is the
client itself: the local port of its socket (python-socks) or curl's
``%{local_port}`` and ``%{num_connects}`` for a keep-alive connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import Config, ListenerConfig, LogConfig
from proxytap.export.jsonlog import JsonFlowLog, flow_record
from proxytap.flows.table import CloseReason, FlowTable, Via
from tests.conftest import TEST_ACCESS, Origin, ProxyFactory, RunningProxy, run, start_origin
from tests.export.sftap_helpers import make_flow, wait_for

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)

ZEEK = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "duration")
ALL_FIELDS = {
    *ZEEK,
    "proto",
    "service",
    "orig_bytes",
    "resp_bytes",
    "orig_chunks",
    "resp_chunks",
    "tunnel_parents",
    "outer_uid",
    "tunnel",
    "listener",
    "proxy_h",
    "proxy_p",
    "requested_host",
    "requested_port",
    "sni",
    "alpn",
    "ja3",
    "ja4",
    "http_host",
    "user",
    "close_reason",
    "decrypted",
    "tls_version",
    "tls_cipher",
    "upstream_proxy",
    "upstream_proxy_h",
    "upstream_proxy_p",
    "upstream_bound_h",
    "upstream_bound_p",
    "upstream_resolved",
}


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sample_flow(table: FlowTable, start: float = 1795300775.5) -> Any:
    flow = make_flow(table, start=start)
    flow.outer.protocol = "socks5"
    flow.outer.user = "alice"
    flow.bytes_up, flow.bytes_down = 120, 4567
    flow.chunks_up, flow.chunks_down = 1, 3
    flow.l7, flow.sni, flow.alpn = "ssl", "example.com", "h2"
    return flow


# -- the record -----------------------------------------------------------------------------


def test_record_fields() -> None:
    table = FlowTable()
    flow = sample_flow(table)
    rec = flow_record(flow, CloseReason.RESET, flow.start + 2.25)
    assert set(rec) == ALL_FIELDS
    assert rec["ts"] == 1795300775.5 and rec["duration"] == 2.25
    assert rec["uid"] == flow.uid and rec["uid"].startswith("F")
    assert (rec["id.orig_h"], rec["id.orig_p"]) == ("10.0.0.1", 40000)
    assert (rec["id.resp_h"], rec["id.resp_p"]) == ("93.184.216.34", 80)
    assert (rec["proxy_h"], rec["proxy_p"], rec["listener"]) == ("127.0.0.1", 3128, "mixed")
    assert rec["tunnel_parents"] == [flow.outer.uid] and rec["outer_uid"] == flow.outer.uid
    assert rec["outer_uid"].startswith("C")
    assert (rec["orig_bytes"], rec["resp_bytes"]) == (120, 4567)
    assert (rec["service"], rec["sni"], rec["alpn"]) == ("ssl", "example.com", "h2")
    assert (rec["tunnel"], rec["user"], rec["close_reason"]) == ("socks5", "alice", "reset")
    assert (rec["requested_host"], rec["requested_port"]) == ("example.com", 80)
    assert rec["decrypted"] is False and rec["http_host"] is None
    chained = {k: v for k, v in rec.items() if k.startswith("upstream_")}
    assert len(chained) == 6 and set(chained.values()) == {None}  # a direct flow
    json.dumps(rec)  # JSON-ready as it is


def test_record_of_a_flow_through_an_upstream_proxy() -> None:
    """Chaining: the proxy, its address and the BND it reported, beside the true endpoints."""
    table = FlowTable()
    flow = sample_flow(table)
    flow.server = ("0.0.0.0", 443)  # the upstream resolved the name (README "Chaining")
    flow.via = Via("corp", ("192.0.2.8", 1080), ("198.51.100.4", 50123), True)
    rec = flow_record(flow, CloseReason.NORMAL, flow.start + 1)
    assert (rec["id.resp_h"], rec["id.resp_p"]) == ("0.0.0.0", 443)
    assert rec["requested_host"] == "example.com"
    assert (rec["upstream_proxy"], rec["upstream_proxy_h"], rec["upstream_proxy_p"]) == (
        "corp",
        "192.0.2.8",
        1080,
    )
    assert (rec["upstream_bound_h"], rec["upstream_bound_p"]) == ("198.51.100.4", 50123)
    assert rec["upstream_resolved"] is True
    flow.via = Via("corp", ("192.0.2.8", 3128), None, False)  # HTTP CONNECT: no BND
    rec = flow_record(flow, CloseReason.NORMAL, flow.start + 1)
    assert (rec["upstream_bound_h"], rec["upstream_bound_p"], rec["upstream_resolved"]) == (
        None,
        None,
        False,
    )


# -- the sink -------------------------------------------------------------------------------


async def test_writes_one_line_per_flow_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    sink = JsonFlowLog(path)
    await sink.start()
    table = FlowTable()
    flows = [sample_flow(table, start=1795300775.5 + i) for i in range(3)]
    for f in flows:
        sink.flow_created(f, f.start)
        sink.flow_data(f, 1, b"x", f.start)
        sink.flow_destroyed(f, CloseReason.NORMAL, f.start + 1)
    await sink.flush()
    recs = read_log(path)
    assert [r["uid"] for r in recs] == [f.uid for f in flows]
    assert sink.records == 3 and sink.bytes_written == path.stat().st_size
    assert sink.buffered == 0 and sink.drops == {}
    await sink.stop()
    assert not sink.is_open


async def test_never_blocks_and_drops_when_the_buffer_is_full(tmp_path: Path) -> None:
    sink = JsonFlowLog(tmp_path / "flows.json", buffer_limit=1000)
    await sink.start()
    table = FlowTable()
    for _ in range(5):  # synchronously, as the hub calls it: the writer has not run yet
        sink.flow_destroyed(sample_flow(table), CloseReason.NORMAL, 1795300776.0)
    one = len(json.dumps(flow_record(sample_flow(table), CloseReason.NORMAL, 1795300776.0)))
    kept = 1000 // (one + 1)
    assert sink.drops == {"buffer_full": 5 - kept}
    assert sink.dropped_bytes["buffer_full"] > 0
    await sink.flush()
    assert len(read_log(tmp_path / "flows.json")) == kept == sink.records
    await sink.stop()


async def test_created_0640_whatever_the_umask_existing_files_keep_their_mode(
    tmp_path: Path,
) -> None:
    path = tmp_path / "flows.json"
    old = os.umask(0)
    try:
        sink = JsonFlowLog(path)
        await sink.start()
        await sink.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o600)  # an operator's choice is kept
    sink = JsonFlowLog(path)
    await sink.start()
    await sink.stop()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_size_rotation_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    table = FlowTable()
    line = len(json.dumps(flow_record(sample_flow(table), CloseReason.NORMAL, 1.0))) + 1
    sink = JsonFlowLog(path, max_bytes=2 * line + 10, backups=2)
    await sink.start()
    uids = []
    for _ in range(7):
        f = sample_flow(table)
        uids.append(f.uid)
        sink.flow_destroyed(f, CloseReason.NORMAL, f.start + 1)
        await sink.flush()  # one record per write: rotation is checked before each
    await sink.stop()
    assert sorted(os.listdir(tmp_path)) == ["flows.json", "flows.json.1", "flows.json.2"]
    assert [r["uid"] for r in read_log(path)] == uids[6:]
    assert [r["uid"] for r in read_log(tmp_path / "flows.json.1")] == uids[4:6]
    assert [r["uid"] for r in read_log(tmp_path / "flows.json.2")] == uids[2:4]
    assert sink.rotations == 3
    for name in os.listdir(tmp_path):
        assert (tmp_path / name).stat().st_size <= 2 * line + 10


async def test_reopen_after_logrotate_moved_the_file(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    sink = JsonFlowLog(path)
    await sink.start()
    table = FlowTable()
    first, second = sample_flow(table), sample_flow(table)
    sink.flow_destroyed(first, CloseReason.NORMAL, 1795300776.0)
    await sink.flush()
    os.rename(path, tmp_path / "flows.json.1")
    sink.reopen()
    sink.flow_destroyed(second, CloseReason.NORMAL, 1795300776.0)
    await sink.flush()
    assert [r["uid"] for r in read_log(tmp_path / "flows.json.1")] == [first.uid]
    assert [r["uid"] for r in read_log(path)] == [second.uid]
    assert sink.reopens == 1
    await sink.stop()


async def test_write_errors_are_counted_never_raised(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    path = d / "flows.json"
    sink = JsonFlowLog(path)
    await sink.start()
    table = FlowTable()
    os.rename(path, tmp_path / "moved.json")
    d.rmdir()  # logrotate gone wrong: the directory is gone, reopening fails
    sink.reopen()
    sink.flow_destroyed(sample_flow(table), CloseReason.NORMAL, 1795300776.0)  # no exception
    await sink.flush()
    assert sink.drops == {"write_error": 1} and sink.records == 0
    assert sink.last_error and not sink.is_open
    d.mkdir()  # fixed: the next write opens the file again
    flow = sample_flow(table)
    sink.flow_destroyed(flow, CloseReason.NORMAL, 1795300776.0)
    await sink.flush()
    assert [r["uid"] for r in read_log(path)] == [flow.uid]
    assert sink.records == 1 and sink.drops == {"write_error": 1}
    await sink.stop()


async def test_unwritable_path_stops_start_up(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        log=LogConfig(flows=str(tmp_path / "missing" / "flows.json")),
    )
    with pytest.raises(OSError):
        await start_proxy(cfg)


# -- end to end: outer and inner uids --------------------------------------------------------


def sink_of(proxy: RunningProxy) -> JsonFlowLog:
    return next(s for s in proxy.app.sinks if isinstance(s, JsonFlowLog))


async def test_socks5_sessions_link_outer_and_inner(
    start_proxy: ProxyFactory, origin: Origin, tmp_path: Path
) -> None:
    path = tmp_path / "flows.json"
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, log=LogConfig(flows=str(path)))
    proxy: RunningProxy = await start_proxy(cfg)
    clients = []
    for _ in range(2):
        sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("localhost", origin.port)
        clients.append(sock.getsockname()[:2])
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).endswith(b"hello GET /hello")
        writer.close()
    await proxy.recorder.wait_destroyed(2)
    await sink_of(proxy).flush()
    recs = read_log(path)
    assert len(recs) == 2
    by_port = {r["id.orig_p"]: r for r in recs}
    assert set(by_port) == {port for _, port in clients}
    flows = {f.client[1]: f for f in proxy.recorder.flows()}
    for ip, port in clients:
        rec = by_port[port]
        flow = flows[port]
        assert set(rec) == ALL_FIELDS
        assert rec["id.orig_h"] == ip
        assert (rec["id.resp_h"], rec["id.resp_p"]) == ("127.0.0.1", origin.port)
        assert (rec["requested_host"], rec["requested_port"]) == ("localhost", origin.port)
        assert (rec["tunnel"], rec["listener"], rec["service"]) == ("socks5", "socks", "http")
        assert (rec["proxy_h"], rec["proxy_p"]) == proxy.socks
        assert rec["uid"] == flow.uid and rec["outer_uid"] == flow.outer.uid
        assert rec["tunnel_parents"] == [rec["outer_uid"]]
        assert rec["close_reason"] == "normal" and rec["decrypted"] is False
        assert rec["orig_bytes"] == flow.bytes_up > 0 and rec["resp_bytes"] == flow.bytes_down
    a, b = recs
    assert a["uid"] != b["uid"] and a["outer_uid"] != b["outer_uid"]


async def test_plain_http_keepalive_two_hosts_share_one_outer_uid(
    start_proxy: ProxyFactory, origin: Origin, tmp_path: Path
) -> None:
    other = await start_origin()
    try:
        path = tmp_path / "flows.json"
        cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, log=LogConfig(flows=str(path)))
        proxy: RunningProxy = await start_proxy(cfg)
        urls = [f"http://127.0.0.1:{origin.port}/hello", f"http://localhost:{other.port}/hello"]
        rc, out, err = await run(
            "curl",
            "-sS",
            "-x",
            proxy.http_url,
            "-w",
            " %{local_port} %{num_connects}\n",
            *urls,
        )
        assert rc == 0, err
        lines = out.decode().splitlines()
        assert len(lines) == 2 and all(x.startswith("hello GET /hello ") for x in lines)
        ports = {int(x.split()[-2]) for x in lines}
        connects = sum(int(x.split()[-1]) for x in lines)
        assert len(ports) == 1 and connects == 1  # one keep-alive connection to the proxy
        (client_port,) = ports
        await proxy.recorder.wait_destroyed(2)
        await sink_of(proxy).flush()
        recs = sorted(read_log(path), key=lambda r: r["id.resp_p"] != origin.port)
        assert len(recs) == 2
        first, second = recs
        assert first["outer_uid"] == second["outer_uid"]
        assert first["tunnel_parents"] == second["tunnel_parents"] == [first["outer_uid"]]
        assert first["uid"] != second["uid"]
        assert first["id.orig_p"] == second["id.orig_p"] == client_port
        assert first["tunnel"] == second["tunnel"] == "http-forward"
        assert (first["requested_host"], first["id.resp_p"]) == ("127.0.0.1", origin.port)
        assert (second["requested_host"], second["id.resp_p"]) == ("localhost", other.port)
        assert first["http_host"] == f"127.0.0.1:{origin.port}"
        assert second["http_host"] == f"localhost:{other.port}"
        assert first["service"] == second["service"] == "http"
        outer = {f.outer.uid for f in proxy.recorder.flows()}
        assert outer == {first["outer_uid"]}
    finally:
        await other.runner.cleanup()


# -- SIGHUP in the real process ----------------------------------------------------------------


async def test_sighup_reopens_the_flow_log(origin: Origin, tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxytap",
        "run",
        "--socks",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--allow-dest",
        "127.0.0.0/8",
        "--log-flows",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []

    async def until(pattern: str) -> re.Match[str]:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()  # type: ignore[union-attr]
            assert line, f"proxytap exited early: {lines}"
            lines.append(line)
            if m := re.search(pattern, line):
                return m

    async def one_request() -> None:
        rc, body, err = await run(
            "curl", "-sS", "--socks5-hostname", socks, f"http://localhost:{origin.port}/hello"
        )
        assert rc == 0 and body == b"hello GET /hello", err

    try:
        socks = (await until(r"listening: socks on (\S+)")).group(1)
        await until("proxytap ready")
        await one_request()
        await wait_for(lambda: path.exists() and path.stat().st_size > 0, 5)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # it names users and clients
        os.rename(path, tmp_path / "flows.json.1")
        proc.send_signal(signal.SIGHUP)
        await until("reopening log files")
        await one_request()
        await wait_for(lambda: path.exists() and path.stat().st_size > 0, 5)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the reopened file too
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 15)
    assert rc == 0
    old, new = read_log(tmp_path / "flows.json.1"), read_log(path)
    assert len(old) == len(new) == 1
    assert old[0]["uid"] != new[0]["uid"] and new[0]["tunnel"] == "socks5"
