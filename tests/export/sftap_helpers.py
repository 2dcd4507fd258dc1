"""Helpers shared by the SF-TAP export tests: flows, a flow-socket reader, a stream checker."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from proxytap.flows.table import Flow, FlowTable
from proxytap.proto.sftap import (
    CREATED,
    DATA,
    DESTROYED,
    HEADER_SIZE,
    Event,
    decode_binary,
    decode_text,
)


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A directory short enough for AF_UNIX paths (108 bytes)."""
    d = tempfile.mkdtemp(dir="/tmp", prefix="sft")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_flow(
    table: FlowTable,
    client: tuple[str, int] = ("10.0.0.1", 40000),
    server: tuple[str, int] = ("93.184.216.34", 80),
    start: float = 1795300775.5,
) -> Flow:
    conn = table.open_connection(client, ("127.0.0.1", 3128), "mixed", start)
    return table.open_flow(conn, server, "example.com", server[1], start)


async def wait_for(cond: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``cond`` until true (server-side bookkeeping lags a client's connect)."""
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class TapReader:
    """An analyzer: reads events from a flow socket as the real ones do."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, binary: bool = False
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.binary = binary

    @classmethod
    async def connect(cls, path: Path | str, binary: bool = False) -> TapReader:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer, binary)

    async def event(self) -> tuple[Event, bytes]:
        if self.binary:
            ev = decode_binary(await self.reader.readexactly(HEADER_SIZE))
        else:
            line = await self.reader.readline()
            if not line:
                raise EOFError
            ev = decode_text(line)
        body = await self.reader.readexactly(ev.length) if ev.event == DATA else b""
        return ev, body

    async def until(
        self, stop: Callable[[Event], bool], within: float = 5.0
    ) -> list[tuple[Event, bytes]]:
        """Events up to and including the first for which ``stop`` is true."""
        out: list[tuple[Event, bytes]] = []

        async def run() -> None:
            while True:
                ev, body = await self.event()
                out.append((ev, body))
                if stop(ev):
                    return

        await asyncio.wait_for(run(), within)
        return out

    async def nothing_within(self, seconds: float = 0.1) -> bool:
        try:
            await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.writer.transport.abort()


@dataclass
class FlowRecord:
    created: Event
    up: bytearray = field(default_factory=bytearray)
    down: bytearray = field(default_factory=bytearray)
    chunks: list[bytes] = field(default_factory=list)
    destroyed: Event | None = None


def check_stream(events: list[tuple[Event, bytes]]) -> dict[str, FlowRecord]:
    """Validate SF-TAP framing rules over a reader's events; return flows by key prefix.

    CREATED before anything else of a flow, no DATA or DESTROYED of a flow the
    reader was not told about, one DESTROYED, DATA lengths match bodies,
    ``match`` is up/down, and key bytes never change within a flow.
    """
    live: dict[str, FlowRecord] = {}
    done: dict[str, FlowRecord] = {}
    for ev, body in events:
        k = ev.key.prefix
        if ev.event == CREATED:
            assert k not in live, f"second CREATED for {k}"
            live[k] = FlowRecord(ev)
        elif ev.event == DATA:
            if ev.key.l4 == "udp":
                continue
            assert k in live, f"orphan DATA for {k}"
            assert len(body) == ev.length
            assert 1 <= ev.length <= 65535
            rec = live[k]
            assert ev.match in ("up", "down")
            (rec.up if ev.match == "up" else rec.down).extend(body)
            rec.chunks.append(body)
        else:
            assert ev.event == DESTROYED
            assert k in live, f"orphan DESTROYED for {k}"
            rec = live.pop(k)
            rec.destroyed = ev
            assert k not in done, f"flow {k} seen twice"
            done[k] = rec
    assert not live, f"flows without DESTROYED: {list(live)}"
    return done
