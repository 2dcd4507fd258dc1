"""A connected transport handed to the TLS engine, as the asyncio streams it reads.

The engine (mitmproxy's proxy core) works on ``StreamReader`` /
``StreamWriter`` pairs; proxytap hands it transports that its own protocols
drove until then (the client's, after the CONNECT or SOCKS reply and the
ClientHello; the upstream one proxytap opened). ``streams`` swaps the
protocol, feeds what was already read, and puts a ``Leg`` between the
streams and the transport: reading paused for the reader's buffer and for an
export consumer's hold (``overload = "wait"``) stay two separate wants, and
writes can be reported (ciphertext export).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Tap = Callable[[bytes], None]


class _Tap(asyncio.StreamReaderProtocol):
    """A stream protocol that also reports what it reads (ciphertext export)."""

    def __init__(self, reader: asyncio.StreamReader, on_data: Tap | None) -> None:
        super().__init__(reader)
        self._on_data = on_data

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
        super().data_received(data)


class Leg:
    """A transport as the engine's streams see it.

    Reading is paused for two reasons that must not undo each other: the
    stream reader's buffer is full (the reader pauses and resumes it), or an
    export consumer under ``overload = "wait"`` holds the flow (``hold``).
    The transport reads only when neither applies. Writes are reported to
    ``on_write`` when given (ciphertext export). Everything else is the
    transport's.
    """

    def __init__(self, transport: asyncio.Transport, on_write: Tap | None = None) -> None:
        self._t = transport
        self._on_write = on_write
        self._full = False
        self._held = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._on_write is not None:
            self._on_write(bytes(data))
        self._t.write(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def pause_reading(self) -> None:
        self._full = True
        self._apply()

    def resume_reading(self) -> None:
        self._full = False
        self._apply()

    def hold(self, held: bool) -> None:
        self._held = held
        self._apply()

    def _apply(self) -> None:
        if self._t.is_closing():
            return
        if self._full or self._held:
            self._t.pause_reading()
        else:
            self._t.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def streams(
    transport: asyncio.Transport,
    early: bytes,
    eof: bool,
    on_read: Tap | None = None,
    on_write: Tap | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connected transport as a reader and writer (protocol swapped, early bytes fed).

    Both see the transport through a ``Leg`` (``writer.transport``).
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16, loop=loop)
    proto = _Tap(reader, on_read)
    leg: Any = Leg(transport, on_write)
    transport.set_protocol(proto)
    proto.connection_made(leg)
    if early:
        reader.feed_data(early)
    if eof:
        reader.feed_eof()
    leg.resume_reading()
    if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
        proto.pause_writing()
    writer = asyncio.StreamWriter(leg, proto, reader, loop)
    return reader, writer
