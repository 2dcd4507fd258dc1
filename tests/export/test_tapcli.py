"""``proxytap tap``: reads a served flow socket and prints what analyzers would get."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxytap.export import tapcli
from proxytap.export.hub import Hub
from proxytap.export.sftap_server import SftapServer
from proxytap.export.tapcli import hexdump
from proxytap.flows.table import DOWN, UP, CloseReason, FlowTable
from proxytap.proto.classify import Classifier
from proxytap.proto.sftap import decode_text
from tests.export.sftap_helpers import make_flow, short_tmp, wait_for

REQ = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESP = b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.fixture
async def home() -> AsyncIterator[Path]:
    with short_tmp() as d:
        yield d


async def run_tap(
    server: SftapServer, iface: str, *args: str
) -> tuple[asyncio.Task[int], io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    path = str(server.interfaces[iface].path)
    task = asyncio.create_task(asyncio.to_thread(tapcli.main, [path, *args], out=out, err=err))
    await wait_for(lambda: len(server.interfaces[iface].readers) == 1)
    return task, out, err


def one_flow(hub: Hub) -> None:
    flow = make_flow(FlowTable())
    hub.opened(flow)
    hub.data(flow, UP, REQ, flow.start + 0.5)
    hub.data(flow, DOWN, RESP, flow.start + 0.75)
    hub.closed(flow, CloseReason.NORMAL, flow.start + 1)


@pytest.mark.parametrize("fmt", ["text", "binary"])
async def test_prints_headers_and_hexdump(home: Path, fmt: str) -> None:
    hub = Hub(Classifier())
    server = SftapServer(home, hub.classifier, default_format=fmt)
    await server.start()
    hub.subscribe(server)
    try:
        extra = ["--binary"] if fmt == "binary" else []
        task, out, err = await run_tap(server, "tcp/http", "--hexdump", "--count", "4", *extra)
        one_flow(hub)
        assert await asyncio.wait_for(task, 5) == 0, err.getvalue()
    finally:
        await server.stop()
    lines = out.getvalue().splitlines()
    headers = [line for line in lines if line.startswith("ip1=")]
    events = [decode_text(h.encode() + b"\n") for h in headers]
    assert [e.event for e in events] == ["CREATED", "DATA", "DATA", "DESTROYED"]
    assert [e.length for e in events if e.event == "DATA"] == [len(REQ), len(RESP)]
    assert "00000000  47 45 54 20 2f 20 48 54  54 50 2f 31 2e 31 0d 0a  |GET / HTTP/1.1..|" in lines
    assert any(line.endswith("|HTTP/1.1 204 No |") for line in lines)


async def test_end_of_stream_exits_zero(home: Path) -> None:
    hub = Hub(Classifier())
    server = SftapServer(home, hub.classifier)
    await server.start()
    hub.subscribe(server)
    task, out, _ = await run_tap(server, "tcp/http")
    one_flow(hub)
    await wait_for(lambda: out.getvalue().count("\n") == 4)
    await server.stop()
    assert await asyncio.wait_for(task, 5) == 0
    assert len(out.getvalue().splitlines()) == 4  # headers only without --hexdump


async def test_malformed_stream_exits_two(home: Path) -> None:
    path = home / "junk"

    async def garbage(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"this is not an sf-tap header\n")
        await w.drain()
        w.close()

    server = await asyncio.start_unix_server(garbage, str(path))
    err = io.StringIO()
    try:
        rc = await asyncio.to_thread(tapcli.main, [str(path)], out=io.StringIO(), err=err)
    finally:
        server.close()
    assert rc == 2
    assert "malformed" in err.getvalue()


def test_missing_socket_and_bad_usage(tmp_path: Path) -> None:
    err = io.StringIO()
    assert tapcli.main([str(tmp_path / "nope")], err=err) == 1
    assert "cannot connect" in err.getvalue()
    assert tapcli.main(["--count"], err=io.StringIO()) == 2


def test_hexdump_format() -> None:
    assert hexdump(b"") == ""
    assert hexdump(b"AB\x00") == "00000000  41 42 00" + " " * 15 + "  " + " " * 23 + "  |AB.|\n"
    dump = hexdump(bytes(range(20)))
    assert dump.splitlines()[1].startswith("00000010  10 11 12 13")
    assert len(dump.splitlines()[0]) == len("00000000  ") + 23 + 2 + 23 + 2 + 18


def test_cli_entry_point(tmp_path: Path) -> None:
    from proxytap import cli

    assert cli.main(["tap", str(tmp_path / "nope")]) == 1
