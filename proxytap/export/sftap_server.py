"""Serve SF-TAP flow sockets: proxytap as the abstractor its analyzers connect to.

Under ``home``, one AF_UNIX stream listener per classification rule and
balance slot: ``<home>/tcp/<name>`` and ``<home>/udp/<name>`` (spec section 3).
The hub calls ``flow_created`` / ``flow_data`` / ``flow_destroyed``
synchronously from the relay's hot path; everything here is a dict lookup, a
header format and ``transport.write`` per connected reader. Nothing awaits.

Protocol decisions:

* **Broadcast.** Every reader of a socket gets every event of the flows routed
  to it. Bytes a reader sends are read and discarded; end of file from a reader
  closes it, as in the original (a stream socket cannot tell a half-close from
  a dead peer, and a dead reader must not linger until a write fails).
* **No orphans.** A flow's events go only to the readers that received its
  CREATED, kept in the flow's own reader list: a reader connecting mid-flow
  sees nothing of that flow, and nobody ever gets DATA or DESTROYED of a flow
  whose CREATED it did not get. With no reader on the socket when the flow is
  created, the flow is not tracked at all and costs one dict miss per chunk
  (no key, no header, no encoding).
* **Never wait for a reader.** Each reader has a bounded buffer
  (``reader_buffer``, the transport's high-water mark; asyncio calls
  ``pause_writing`` past it). While paused, DATA to that reader is dropped whole
  (header and body together, so framing stays intact) and counted as
  ``buffer_full``; the original drops a chunk after a 1 s send timeout.
  CREATED and DESTROYED are still written, up to ``control_headroom`` bytes
  beyond the buffer; a reader that needs more is disconnected (``overflow``).
  With ``on_gap="cut"``, the first DATA drop instead ends that flow for that
  reader at once with ``DESTROYED reason=COMPROMISED`` (the reason the original
  uses for a reassembly overflow), so the analyzer sees a short stream rather
  than one with a hole; the default ``"skip"`` keeps the original's behaviour.
* **Chunks** are at most 65535 bytes (the binary ``len`` field). An empty
  chunk is not sent.
* **One write per reader per loop iteration.** Events are queued on the
  reader (references to the relay's bytes, never copies) and handed to its
  transport in one ``writelines`` (one ``writev``) when the event loop comes
  round again, after the I/O it was handling: a busy proxy pays one system
  call per reader per iteration, not one per event, and the reader wakes once.
  A queue reaching 256 KiB is written at once, so a burst meets the
  transport's bound (and ``pause_writing``) as before.
* ``from`` is 1 when the sender is (ip1, port1); ``match`` is ``up`` for client
  to server and ``down`` for server to client on TCP (a proxy always knows the
  client); UDP datagrams carry ``match=up`` when a regex rule matched them and
  ``none`` otherwise, as in the original. CREATED carries ``flow.start``.
* UDP has no CREATED or DESTROYED: every datagram goes to every reader of its
  socket.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

from proxytap.errors import ConfigError
from proxytap.flows.table import UP, CloseReason, Endpoint, Flow
from proxytap.proto.classify import DEFAULT, Classifier, interfaces
from proxytap.proto.sftap import (
    REASONS,
    SERVED_CHUNK,
    FlowKey,
    data_head,
    data_line,
    encode_created,
    encode_destroyed,
    flow_hash,
    flow_key,
    pack_created,
    pack_data,
    pack_destroyed,
    split_payload,
)

if TYPE_CHECKING:
    from proxytap.config import ExportConfig

log = logging.getLogger(__name__)

FORMATS = ("text", "binary")
GAP_POLICIES = ("skip", "cut")
BUFFER_FULL = "buffer_full"
OVERFLOW = "overflow"
CUT = "cut"
FLUSH_AT = 256 << 10  # queued bytes that are written at once rather than next iteration


class Interface:
    """One served socket (``tcp/http``, ``tcp/http0``, ``udp/dns``) and its readers."""

    __slots__ = ("binary", "format", "inode", "name", "path", "readers", "server")

    def __init__(self, name: str, path: Path, fmt: str) -> None:
        self.name = name
        self.path = path
        self.format = fmt
        self.binary = fmt == "binary"
        self.readers: list[Reader] = []
        self.server: asyncio.Server | None = None
        self.inode: tuple[int, int] | None = None


class Reader(asyncio.Protocol):
    """One connected analyzer; its counters are the per-reader stats.

    ``drops`` counts dropped events by reason (``buffer_full``, ``overflow``,
    ``cut``), ``bytes_dropped`` the DATA payload bytes they carried.
    """

    def __init__(self, owner: SftapServer, iface: Interface) -> None:
        self.owner = owner
        self.interface = iface.name
        self._iface = iface
        self._limit = owner.reader_buffer
        self._headroom = owner.control_headroom
        self.transport: asyncio.WriteTransport | None = None
        self.connected_at = 0.0
        self.closed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = False
        self._over = 0  # control bytes written while paused
        self._out: list[bytes | memoryview] = []  # queued until the next flush
        self._queued = 0  # bytes in _out
        self._dirty = False  # on the owner's flush list
        self.flows = 0  # flows this reader got CREATED for and not yet DESTROYED
        self.events_sent = 0
        self.bytes_sent = 0
        self.bytes_dropped = 0
        self.drops: dict[str, int] = {}
        self.dropped_bytes: dict[str, int] = {}  # payload bytes by drop reason

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.WriteTransport, transport)
        self.connected_at = time.time()
        transport.set_write_buffer_limits(high=self._limit, low=self._limit // 2)
        self._iface.readers.append(self)
        self.owner.readers_accepted += 1
        log.info("sftap: reader connected on %s", self.interface)

    def data_received(self, data: bytes) -> None:
        pass  # analyzers have nothing to say; read and discard

    def eof_received(self) -> bool:
        return False  # the reader is gone (the original closes on read() == 0 too)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._over = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out = []
        self._queued = 0
        if not self.lost.done():
            self.lost.set_result(None)
        if self in self._iface.readers:
            self._iface.readers.remove(self)
        self.owner._retire(self)
        log.info("sftap: reader left %s (%s)", self.interface, exc or "closed")

    # -- called by the server --------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes waiting in the transport for this reader."""
        t = self.transport
        return 0 if t is None or self.closed else t.get_write_buffer_size() + self._queued

    def _drop(self, reason: str, payload: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.bytes_dropped += payload
        if payload:
            self.dropped_bytes[reason] = self.dropped_bytes.get(reason, 0) + payload

    def send_data(self, head: bytes, body: bytes | memoryview) -> bool:
        """Queue one DATA event unless the reader is gone or its buffer is full.

        Header and body stay together (a drop takes both, so framing holds),
        and the body is never copied: every reader shares the relay's bytes.
        """
        if self.closed:
            return False
        n = len(body)
        if self.paused:
            self._drop(BUFFER_FULL, n)
            return False
        n += len(head)
        out = self._out
        out.append(head)
        out.append(body)
        self._queued += n
        self.events_sent += 1
        self.bytes_sent += n
        if self._queued >= FLUSH_AT:
            self.flush()  # a burst: let the transport take it (and pause us) now
        elif not self._dirty:
            self._dirty = True
            self.owner._mark(self)
        return True

    def send_control(self, msg: bytes) -> bool:
        """Queue a CREATED or DESTROYED even when the buffer is full, up to the headroom."""
        t = self.transport
        if self.closed or t is None:
            return False
        if self.paused:
            self._over += len(msg)
            if self._over > self._headroom:
                self._drop(OVERFLOW, 0)
                self.owner.readers_overflowed += 1
                log.warning("sftap: reader on %s cannot keep up; disconnecting it", self.interface)
                self.closed = True
                self._out = []
                self._queued = 0
                t.abort()
                return False
        self._out.append(msg)
        self._queued += len(msg)
        self.events_sent += 1
        self.bytes_sent += len(msg)
        if not self._dirty:
            self._dirty = True
            self.owner._mark(self)
        return True

    def flush(self) -> None:
        """Hand the queued events to the transport (one ``writev`` when the socket takes them)."""
        out = self._out
        if not out:
            return
        self._out = []
        self._queued = 0
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return
        t.writelines(out)


class _Flow:
    """What the server keeps per exported flow (computed once, at CREATED)."""

    __slots__ = ("binary", "down_from", "down_head", "key", "readers", "tcp", "up_from", "up_head")

    def __init__(
        self, key: FlowKey, client_is_1: bool, binary: bool, readers: list[Reader], tcp: bool
    ) -> None:
        self.key = key
        self.binary = binary
        self.readers = readers
        self.tcp = tcp
        self.up_from = 1 if client_is_1 else 2
        self.down_from = 2 if client_is_1 else 1
        if tcp:
            up_match, down_match = "up", "down"
        else:
            up_match = down_match = "none"
        self.up_head = data_head(key, self.up_from, up_match)
        self.down_head = data_head(key, self.down_from, down_match)


class SftapServer:
    """A hub subscriber serving ``<home>/tcp/<name>`` and ``<home>/udp/<name>``.

    ``formats`` maps ``"tcp/http"`` (or a balanced ``"tcp/http0"``) to "text"
    or "binary"; others use ``default_format``. ``reader_buffer`` bounds each
    reader's transport buffer, ``control_headroom`` the CREATED/DESTROYED bytes
    allowed beyond it. ``socket_mode`` is applied to each socket before it
    listens. Totals (``events_sent``, ``bytes_sent``, ``bytes_dropped``,
    ``drops``) include readers that have left.
    """

    name: str

    def __init__(
        self,
        home: str | os.PathLike[str],
        classifier: Classifier,
        *,
        name: str = "sftap",
        default_format: str = "text",
        formats: Mapping[str, str] | None = None,
        socket_mode: int = 0o660,
        reader_buffer: int = 4 << 20,
        control_headroom: int = 1 << 20,
        chunk: int = SERVED_CHUNK,
        on_gap: str = "skip",
        close_timeout: float = 1.0,
    ) -> None:
        if default_format not in FORMATS:
            raise ConfigError("export.format", f"must be text or binary, not {default_format!r}")
        if on_gap not in GAP_POLICIES:
            raise ConfigError("export.on_gap", f"must be skip or cut, not {on_gap!r}")
        if not 1 <= chunk <= SERVED_CHUNK:
            raise ConfigError("export.chunk", f"must be 1..{SERVED_CHUNK}")
        if reader_buffer <= 0 or control_headroom <= 0:
            raise ConfigError("export.reader_buffer", "must be > 0")
        self.name = name
        self.home = Path(home)
        self.classifier = classifier
        self.socket_mode = socket_mode
        self.reader_buffer = reader_buffer
        self.control_headroom = control_headroom
        self.chunk = chunk
        self.cut = on_gap == "cut"
        self.close_timeout = close_timeout
        formats = dict(formats or {})
        self.interfaces: dict[str, Interface] = {}
        self._routes: dict[tuple[str, str], list[Interface]] = {}
        known: set[str] = set()
        for rule in classifier.rules:
            base = f"{rule.l4}/{rule.name}"
            known.add(base)
            slots = []
            for ifname in interfaces(rule):
                full = f"{rule.l4}/{ifname}"
                known.add(full)
                fmt = formats.get(full) or formats.get(base) or default_format
                if fmt not in FORMATS:
                    raise ConfigError(f"export.formats.{full}", "must be text or binary")
                iface = Interface(full, self.home / rule.l4 / ifname, fmt)
                self.interfaces[full] = iface
                slots.append(iface)
            self._routes[(rule.l4, rule.name)] = slots
        for full in sorted(formats.keys() - known):
            raise ConfigError(f"export.formats.{full}", "no such flow socket")
        self._flows: dict[int, _Flow] = {}
        self._dirty: list[Reader] = []  # readers with queued events
        self._retired: list[Reader] = []
        self.readers_accepted = 0
        self.readers_overflowed = 0
        self.flows_exported = 0
        self.flows_unheard = 0
        # CREATED / DESTROYED events written (to all readers); DATA = events_sent - both
        self.created_sent = 0
        self.destroyed_sent = 0

    @classmethod
    def from_config(cls, exp: ExportConfig, classifier: Classifier) -> SftapServer:
        assert exp.sftap_home is not None
        return cls(
            exp.sftap_home,
            classifier,
            default_format=exp.format,
            formats=exp.formats,
            socket_mode=exp.sftap_mode,
            reader_buffer=exp.reader_buffer,
        )

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directories and listen on every socket (stale sockets are replaced)."""
        loop = asyncio.get_running_loop()
        try:
            for sub in ("tcp", "udp"):
                (self.home / sub).mkdir(mode=0o770, parents=True, exist_ok=True)
            for iface in self.interfaces.values():
                sock = self._bind(iface)
                iface.server = await loop.create_unix_server(
                    functools.partial(Reader, self, iface), sock=sock, backlog=128
                )
                log.info("sftap: serving %s (%s)", iface.path, iface.format)
        except BaseException:
            await self.stop()
            raise

    def _bind(self, iface: Interface) -> socket.socket:
        path = str(iface.path)
        if len(os.fsencode(path)) > 107:
            raise OSError(errno.ENAMETOOLONG, "AF_UNIX socket path too long", path)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise OSError(errno.EEXIST, "exists and is not a socket; not replacing it", path)
            if _alive(path):
                raise OSError(errno.EADDRINUSE, "another process is serving this socket", path)
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, self.socket_mode)  # before listen(): nobody connects meanwhile
            st = os.stat(path)
            iface.inode = (st.st_dev, st.st_ino)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop(self) -> None:
        """Stop listening, close every reader (flushing briefly), remove the sockets."""
        for iface in self.interfaces.values():
            if iface.server is not None:
                iface.server.close()
        self._flush()
        readers = [r for i in self.interfaces.values() for r in i.readers]
        for r in readers:
            if r.transport is not None:
                r.transport.close()
        pending = [r.lost for r in readers if not r.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.close_timeout)
        for r in readers:
            if not r.closed and r.transport is not None:
                r.transport.abort()
        for iface in self.interfaces.values():
            if iface.server is not None:
                await iface.server.wait_closed()
                iface.server = None
            self._unlink(iface)
        self._flows.clear()

    def _unlink(self, iface: Interface) -> None:
        if iface.inode is None:
            return
        try:
            st = os.lstat(iface.path)
            if (st.st_dev, st.st_ino) == iface.inode:
                os.unlink(iface.path)
        except FileNotFoundError:
            pass
        iface.inode = None

    # -- stats ----------------------------------------------------------------------

    def _retire(self, reader: Reader) -> None:
        self._retired.append(reader)
        if len(self._retired) > 256:  # fold old readers into one accumulator
            acc = self._retired[0]
            for r in self._retired[1:]:
                acc.events_sent += r.events_sent
                acc.bytes_sent += r.bytes_sent
                acc.bytes_dropped += r.bytes_dropped
                for k, v in r.drops.items():
                    acc.drops[k] = acc.drops.get(k, 0) + v
                for k, v in r.dropped_bytes.items():
                    acc.dropped_bytes[k] = acc.dropped_bytes.get(k, 0) + v
            self._retired = [acc]

    @property
    def readers(self) -> list[Reader]:
        """Every connected reader, all sockets."""
        return [r for i in self.interfaces.values() for r in i.readers]

    def _all(self) -> list[Reader]:
        return self._retired + self.readers

    @property
    def events_sent(self) -> int:
        return sum(r.events_sent for r in self._all())

    @property
    def bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self._all())

    @property
    def bytes_dropped(self) -> int:
        return sum(r.bytes_dropped for r in self._all())

    @property
    def drops(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._all():
            for k, v in r.drops.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def dropped_bytes(self) -> dict[str, int]:
        """DATA payload bytes dropped, by reason."""
        out: dict[str, int] = {}
        for r in self._all():
            for k, v in r.dropped_bytes.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def flows(self) -> int:
        """Flows currently exported to at least one reader."""
        return len(self._flows)

    # -- batching ---------------------------------------------------------------------

    def _mark(self, reader: Reader) -> None:
        """``reader`` has queued events: flush every such reader once, next iteration."""
        dirty = self._dirty
        if not dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        dirty.append(reader)

    def _flush(self) -> None:
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for r in dirty:
                r._dirty = False
                r.flush()

    # -- the hub's calls (hot path) ---------------------------------------------------

    def _route(self, l4: str, rule_name: str | None) -> list[Interface] | None:
        slots = self._routes.get((l4, rule_name or DEFAULT))
        if slots is None:
            slots = self._routes.get((l4, DEFAULT))
        return slots

    def flow_created(self, flow: Flow, now: float) -> None:
        slots = self._route(flow.l4, flow.l7)
        if slots is None:
            return
        if len(slots) == 1:
            iface = slots[0]
            if not iface.readers:
                self.flows_unheard += 1
                return
            key, client_is_1 = flow_key(flow.client, flow.server, flow.l4, flow.hop)
        else:
            key, client_is_1 = flow_key(flow.client, flow.server, flow.l4, flow.hop)
            iface = slots[flow_hash(key) % len(slots)]
            if not iface.readers:
                self.flows_unheard += 1
                return
        tcp = flow.l4 == "tcp"
        if tcp:
            msg = pack_created(key, flow.start) if iface.binary else encode_created(key, flow.start)
            readers = [r for r in iface.readers if r.send_control(msg)]
            if not readers:
                return
            self.created_sent += len(readers)
            for r in readers:
                r.flows += 1
        else:
            readers = iface.readers  # UDP: no CREATED; every current reader, live list
        self._flows[flow.id] = _Flow(key, client_is_1, iface.binary, readers, tcp)
        self.flows_exported += 1

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        st = self._flows.get(flow.id)
        if st is None:
            return
        n = len(data)
        if n <= self.chunk:
            if n:
                self._data(flow.id, st, direction == UP, data, now)
            return
        up = direction == UP
        for piece in split_payload(data, self.chunk):
            self._data(flow.id, st, up, piece, now)

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        st = self._flows.pop(flow.id, None)
        if st is None or not st.tcp:
            return
        text = REASONS[reason]
        msg = (
            pack_destroyed(st.key, text, now) if st.binary else encode_destroyed(st.key, text, now)
        )
        for r in st.readers:
            if r.send_control(msg):
                r.flows -= 1
                self.destroyed_sent += 1

    def datagram(
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        """Export one UDP datagram (DATA only) to every reader of its socket."""
        n = len(data)
        if not n:
            return
        rule = self.classifier.udp((src[1], dst[1]), data)
        slots = self._routes.get(("udp", rule.name))
        if not slots:
            return
        if len(slots) == 1 and not slots[0].readers:
            return
        key, src_is_1 = flow_key(src, dst, "udp", hop)
        iface = slots[flow_hash(key) % len(slots)]
        if not iface.readers:
            return
        if n > self.chunk:  # a datagram is never split: each DATA is one datagram
            for r in iface.readers:
                r._drop("oversize", n)
            return
        match = "none" if rule.up is None else "up"
        from_ = 1 if src_is_1 else 2
        if iface.binary:
            head = pack_data(key, from_, match, n, now)
        else:
            head = data_line(data_head(key, from_, match), n, now)
        for r in iface.readers:
            r.send_data(head, data)

    def _data(
        self, flow_id: int, st: _Flow, up: bool, body: bytes | memoryview, now: float
    ) -> None:
        n = len(body)
        if st.binary:
            if up:
                head = pack_data(st.key, st.up_from, "up" if st.tcp else "none", n, now)
            else:
                head = pack_data(st.key, st.down_from, "down" if st.tcp else "none", n, now)
        else:
            head = data_line(st.up_head if up else st.down_head, n, now)
        failed = False
        for r in st.readers:
            if not r.send_data(head, body):
                failed = True
        if failed and st.tcp:
            self._prune(flow_id, st, now)

    def _prune(self, flow_id: int, st: _Flow, now: float) -> None:
        """Forget readers that left; with ``on_gap="cut"``, end the flow for those that dropped."""
        keep: list[Reader] = []
        cut: list[Reader] = []
        for r in st.readers:
            if r.closed:
                continue
            if self.cut and r.paused:
                cut.append(r)
            else:
                keep.append(r)
        if cut:
            if st.binary:
                msg = pack_destroyed(st.key, "COMPROMISED", now)
            else:
                msg = encode_destroyed(st.key, "COMPROMISED", now)
            for r in cut:
                r._drop(CUT, 0)
                r.flows -= 1
                if r.send_control(msg):
                    self.destroyed_sent += 1
        st.readers = keep
        if not keep:
            del self._flows[flow_id]


def _alive(path: str) -> bool:
    """Whether something accepts connections on the UNIX socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


__all__ = ["Interface", "Reader", "SftapServer"]
