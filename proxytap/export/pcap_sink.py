"""PCAP export: every inner flow as a synthesized TCP/IP conversation, to files and readers.

Two sinks share the framing (``proxytap.proto.pcap``: a handshake at the flow's
start, MSS-sized segments with the peer's ACKs as the proxy saw the data, a
FIN/ACK exchange or a RST at the end, between the TRUE client and the TRUE
destination; classic pcap, LINKTYPE_RAW):

* ``PcapFileSink`` (``[export.pcap] dir``): files
  ``proxytap-YYYYmmdd-HHMMSS-NNNN.pcap`` (UTC, a counter) created 0640, a new
  one before a write would take the current one past ``rotate_bytes`` and
  after ``rotate_seconds``, and on SIGHUP (``reopen``). The hub's calls frame
  the packets into an in-memory buffer (bounded: ``buffer`` bytes; past it,
  DATA is dropped whole and counted, ``buffer_full``); a task hands what has
  accumulated to a worker thread that ``os.write``\\ s it, so the event loop
  never waits for the disk. A failed open or write (a full disk, a
  directory that is not writable) loses its batch (``write_error``), is
  logged once per failure streak, never reaches the proxied traffic, and
  closes the file: after a back-off (1 s, doubling to 30 s) the next batch
  opens a new file.
* ``PcapServer`` (``[export.pcap] listen``): PCAP-over-IP. Every TCP client
  that connects gets the pcap file header, then the live packets, as a
  stream ``tshark -r -``, Arkime or NetworkMiner read. Each reader has an
  asyncio transport; a packet batch goes to a reader whole or not at all (a
  reader whose transport already holds ``buffer`` bytes loses it,
  ``buffer_full``), so a slow reader never blocks the proxy or the other
  readers, and its stream stays well framed. Bytes a reader sends are
  discarded. A reader that connects mid-flow sees that flow from its next
  packet on (no handshake); with no reader, DATA is not framed at all.

The channel of the SF-TAP sinks (``export.channel``) is not used for the
server: it exists to keep message boundaries on AF_UNIX sockets, which a
pcap stream does not need (a reader parses records from the byte stream),
and a transport with a whole-batch check gives the same drop policy.

Lost packets (a full buffer, a failed write) still move the conversation's
sequence numbers on, so an analyzer sees the loss as "previous segment not
captured" rather than silently spliced streams. Records are written in the
order the hub delivers events; a flow's first DATA (buffered by the hub until
it is classified) carries the time the proxy saw it, so packets of different
flows may be slightly out of time order in a file (every reader copes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxytap.config import parse_hostport
from proxytap.export.sink import Sink, SinkStats, known
from proxytap.export.writer import WriterTask
from proxytap.flows.table import CloseReason, Endpoint, Flow
from proxytap.hostport import hostport
from proxytap.proto.pcap import (
    DEFAULT_MSS,
    DEFAULT_SNAPLEN,
    Packet,
    TcpConversation,
    global_header,
    records,
    udp_packet,
)

if TYPE_CHECKING:
    from proxytap.config import PcapConfig

log = logging.getLogger(__name__)

FILE_MODE = 0o640
DIR_MODE = 0o750
WRITE_ERROR = "write_error"
BUFFER_FULL = "buffer_full"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# the ends a RST stands for: an abort, the proxy's own error, the shutdown grace running out
RESET_REASONS = frozenset({CloseReason.RESET, CloseReason.ERROR, CloseReason.SHUTDOWN})


class _PcapFraming(Sink):
    """The hub's calls turned into pcap records; subclasses say where they go."""

    kind = "pcap"

    def __init__(self, name: str, *, snaplen: int, mss: int) -> None:
        self.name = name
        self.snaplen = snaplen
        self.mss = mss
        self._convs: dict[Flow, TcpConversation] = {}
        self.packets = 0  # packets handed on (written, or sent to at least one reader)
        self.drops: dict[str, int] = {}
        self.dropped_bytes: dict[str, int] = {}

    # -- what a subclass provides ----------------------------------------------------

    def _room(self, size: int) -> bool:
        """Whether about ``size`` more bytes may be framed now (else the DATA is lost)."""
        return True

    def _emit(self, blob: bytes, packets: int, payload: int) -> None:
        raise NotImplementedError

    # -- the hub's calls ---------------------------------------------------------------

    def _conv(self, flow: Flow) -> TcpConversation:
        conv = self._convs.get(flow)
        if conv is None:
            conv = TcpConversation(flow.client, flow.server, flow.uid, self.mss)
            self._convs[flow] = conv
        return conv

    def _send(self, packets: list[Packet], payload: int = 0) -> None:
        if packets:
            self._emit(records(packets, self.snaplen), len(packets), payload)

    def flow_created(self, flow: Flow, now: float) -> None:
        if flow.l4 != "tcp":
            return
        # the handshake is stamped with the flow's start, not the (later) classification
        self._send(self._conv(flow).open(flow.start))

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        if flow.l4 != "tcp":
            return
        conv = self._conv(flow)
        if not self._room(len(data)):
            conv.skip(direction, len(data))  # a reader sees the gap
            self._drop(BUFFER_FULL, 1, len(data))
            return
        self._send(conv.data(direction, data, now), len(data))

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        conv = self._convs.pop(flow, None)
        if conv is not None:
            self._send(conv.close(reason in RESET_REASONS, now))

    def datagram(
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        if not self._room(len(data)):
            self._drop(BUFFER_FULL, 1, len(data))
            return
        self._send([udp_packet(src, dst, data, now)], len(data))

    def _drop(self, reason: str, events: int, size: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + events
        self.dropped_bytes[reason] = self.dropped_bytes.get(reason, 0) + size


class PcapFileSink(WriterTask, _PcapFraming):
    """Rotating pcap files in ``directory``, written from a worker thread.

    Stats: ``packets`` and ``bytes_written`` (what reached a file),
    ``drops`` / ``dropped_bytes`` by reason (``buffer_full``,
    ``write_error``), ``files`` (opened), ``rotations``, ``last_error``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        name: str = "pcap",
        rotate_bytes: int = 100 << 20,
        rotate_seconds: float = 3600.0,
        snaplen: int = DEFAULT_SNAPLEN,
        mss: int = DEFAULT_MSS,
        buffer_limit: int = 8 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name, snaplen=snaplen, mss=mss)
        self.directory = os.fspath(directory)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.buffer_limit = buffer_limit
        self.clock = clock
        # the worker thread's write call: ``os.write`` (a seam: tests put a full disk here)
        self.os_write: Callable[[int, memoryview], int] = os.write
        # (records, packets, payload bytes) per hub event, waiting for the writer
        self._pending: list[tuple[bytes, int, int]] = []
        self._pending_bytes = 0
        self._init_writer()
        # the open file: only the writer (its thread, or the task between thread calls)
        self._fd: int | None = None
        self._size = 0
        self._opened_at = 0.0
        self._seq = 0
        self.path: str | None = None  # the file being written
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST
        self._failing = False
        self.bytes_written = 0
        self.files = 0
        self.rotations = 0
        self.last_error: str | None = None

    @classmethod
    def from_config(cls, cfg: PcapConfig) -> PcapFileSink:
        assert cfg.dir is not None
        return cls(
            cfg.dir,
            rotate_bytes=cfg.rotate_bytes,
            rotate_seconds=cfg.rotate_seconds,
            snaplen=cfg.snaplen,
            mss=cfg.mss,
            buffer_limit=cfg.buffer,
        )

    # -- stats ---------------------------------------------------------------------

    def stats(self) -> SinkStats:
        reasons = (BUFFER_FULL, WRITE_ERROR)
        return SinkStats(
            name=self.name,
            kind=self.kind,
            connected=int(self._fd is not None),
            buffered=self._pending_bytes,
            flows=len(self._convs),
            events={"packet": self.packets},
            bytes_sent=self.bytes_written,
            drops=known(reasons, self.drops),
            dropped_bytes=known(reasons, self.dropped_bytes),
            detail={
                "dir": self.directory,
                "file": self.path,
                "files": self.files,
                "rotations": self.rotations,
                "last_error": self.last_error,
            },
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory if it is missing; files open on the first packets.

        A directory that cannot be created or written does not stop start-up
        (the proxy is what matters): writes fail, are counted and retried.
        """
        try:
            os.makedirs(self.directory, mode=DIR_MODE, exist_ok=True)
        except OSError as exc:
            self._failed(f"cannot create {self.directory}: {exc.strerror}")
        self._start_writer()

    # -- framing side --------------------------------------------------------------------

    def _room(self, size: int) -> bool:
        return self._pending_bytes + size <= self.buffer_limit

    def _emit(self, blob: bytes, packets: int, payload: int) -> None:
        if self._pending_bytes + len(blob) > self.buffer_limit:
            self._drop(BUFFER_FULL, 1, payload)
            return
        self._pending.append((blob, packets, payload))
        self._pending_bytes += len(blob)
        self._wake.set()

    # -- the writer ------------------------------------------------------------------

    def _due(self, now: float) -> float | None:
        """Seconds until the open file is due for time rotation (None: nothing due)."""
        if self._fd is None or not self.rotate_seconds:
            return None
        return self._opened_at + self.rotate_seconds - now

    async def _run(self) -> None:
        while True:
            due = self._due(self.clock())
            if due is None or due > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), due)
            self._wake.clear()
            due = self._due(self.clock())
            if self._reopen or (due is not None and due <= 0):
                self._reopen = False
                if self._fd is not None:
                    self.rotations += 1
                self._close()  # the next packets open a new file
            batch = self._pending
            if not batch:
                if self._stopping:
                    return
                continue
            self._pending = []
            self._pending_bytes = 0
            if self.clock() < self._retry_at:  # backing off after a failure: no disk access
                self._lost(batch)
                continue
            self._idle.clear()
            try:
                done, error = await asyncio.to_thread(self._write, batch)
            except Exception as exc:  # never let the writer die: count and go on
                done, error = 0, repr(exc)
            finally:
                self._idle.set()
            for _blob, packets, _payload in batch[:done]:
                self.packets += packets
            if error is None:
                if self._failing:
                    log.info("pcap %s: writing again", self.directory)
                self._failing = False
                self._backoff = BACKOFF_FIRST
            else:
                self._lost(batch[done:])
                self._failed(error)
                self._retry_at = self.clock() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            if self._stopping and not self._pending:
                return

    def _lost(self, batch: list[tuple[bytes, int, int]]) -> None:
        if batch:
            self._drop(WRITE_ERROR, len(batch), sum(p for _, _, p in batch))

    def _failed(self, error: str) -> None:
        self.last_error = error
        if not self._failing:
            log.error("pcap %s: %s; packets are lost until it works", self.directory, error)
        self._failing = True

    def _write(self, batch: list[tuple[bytes, int, int]]) -> tuple[int, str | None]:
        """In the worker thread: write ``batch`` entry by entry, rotating by size between
        entries; (entries written, error)."""
        done = 0
        try:
            for blob, _packets, _payload in batch:
                if (
                    self._fd is not None
                    and self.rotate_bytes
                    and self._size > len(global_header())
                    and self._size + len(blob) > self.rotate_bytes
                ):
                    self._close()
                    self.rotations += 1
                if self._fd is None:
                    self._open()
                self._write_all(blob)
                done += 1
        except OSError as exc:
            self._close()  # a half-written record ends this file; the next opens a new one
            return done, f"{exc.strerror or exc}"
        return done, None

    def _write_all(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        while view:  # bounded: every round writes at least one byte or raises
            n = self.os_write(fd, view)
            if n <= 0:
                raise OSError(f"short write to {self.path}")
            view = view[n:]
            self._size += n
            self.bytes_written += n

    def _open(self) -> None:
        now = self.clock()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        for _ in range(10000):  # a name no earlier run used: bounded
            self._seq += 1
            path = os.path.join(self.directory, f"proxytap-{stamp}-{self._seq:04d}.pcap")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(f"no free file name in {self.directory}")
        # packets carry client addresses and payloads: owner and group only, whatever the umask
        os.fchmod(fd, FILE_MODE)
        self._fd = fd
        self.path = path
        self._size = 0
        self._opened_at = now
        self.files += 1
        self._write_all(global_header(self.snaplen))

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Reader(asyncio.Protocol):
    """One PCAP-over-IP consumer."""

    def __init__(self, server: PcapServer) -> None:
        self.server = server
        self.transport: asyncio.WriteTransport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.sent = 0
        self.drops = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.WriteTransport, but are one
        self.transport = cast(asyncio.WriteTransport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        header = global_header(self.server.snaplen)
        self.transport.write(header)
        self.sent += len(header)
        self.server.readers.add(self)
        log.info("pcap-over-ip: reader %s connected", hostport(*self.peer))

    def data_received(self, data: bytes) -> None:
        pass  # a reader has nothing to say

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.readers.discard(self)
        if not self.server.readers:
            self.server._empty.set()
        self.server.sent_by_gone += self.sent
        self.transport = None
        log.info("pcap-over-ip: reader %s gone", hostport(*self.peer))

    @property
    def buffered(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def send(self, blob: bytes, limit: int) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() + len(blob) > limit:
            self.drops += 1
            return False
        t.write(blob)  # whole records, or nothing: the stream stays framed
        self.sent += len(blob)
        return True


class PcapServer(_PcapFraming):
    """PCAP-over-IP: a TCP server streaming the pcap header and the live packets.

    Stats: ``connected`` readers, ``buffered`` (bytes in their transports),
    ``bytes_sent``, ``drops`` (``buffer_full``: one per reader and batch it
    missed), per-reader detail.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 57012,
        *,
        name: str = "pcap-over-ip",
        snaplen: int = DEFAULT_SNAPLEN,
        mss: int = DEFAULT_MSS,
        buffer_limit: int = 8 << 20,
    ) -> None:
        super().__init__(name, snaplen=snaplen, mss=mss)
        self.host = host
        self.port = port
        self.buffer_limit = buffer_limit
        self.readers: set[_Reader] = set()
        self.sent_by_gone = 0
        self._empty = asyncio.Event()  # set when the last reader has gone
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    @classmethod
    def from_config(cls, cfg: PcapConfig) -> PcapServer:
        assert cfg.listen is not None
        host, port = parse_hostport(cfg.listen, "export.pcap.listen")
        return cls(host, port, snaplen=cfg.snaplen, mss=cfg.mss, buffer_limit=cfg.buffer)

    def stats(self) -> SinkStats:
        readers = list(self.readers)
        return SinkStats(
            name=self.name,
            kind=self.kind,
            connected=len(readers),
            buffered=sum(r.buffered for r in readers),
            flows=len(self._convs),
            events={"packet": self.packets},
            bytes_sent=self.sent_by_gone + sum(r.sent for r in readers),
            drops=known((BUFFER_FULL,), self.drops),
            dropped_bytes=known((BUFFER_FULL,), self.dropped_bytes),
            detail={
                "listen": f"{self.address[0]}:{self.address[1]}" if self.address else None,
                "readers": [
                    {
                        "peer": f"{r.peer[0]}:{r.peer[1]}",
                        "buffered": r.buffered,
                        "sent": r.sent,
                        "drops": r.drops,
                    }
                    for r in readers
                ],
            },
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Reader(self), self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        log.info("pcap-over-ip on %s", hostport(*self.address))

    async def stop(self) -> None:
        """Stop accepting; give readers up to a second to take what is queued, then cut."""
        if self._server is not None:
            self._server.close()
            self._server = None
        readers = list(self.readers)
        for r in readers:
            if r.transport is not None:
                r.transport.close()
        if self.readers:
            self._empty.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), 1.0)
        for r in list(self.readers):
            if r.transport is not None:
                r.transport.abort()

    def datagram(
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        if self.readers:
            super().datagram(src, dst, data, now, hop=hop)

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        if flow.l4 != "tcp":
            return
        if not self.readers:
            self._conv(flow).skip(direction, len(data))  # nobody to lose it: no drop
            return
        super().flow_data(flow, direction, data, now)

    def _emit(self, blob: bytes, packets: int, payload: int) -> None:
        sent = False
        for r in list(self.readers):
            if r.send(blob, self.buffer_limit):
                sent = True
            else:
                self._drop(BUFFER_FULL, 1, payload)
        if sent:
            self.packets += packets


__all__ = ["PcapFileSink", "PcapServer"]
