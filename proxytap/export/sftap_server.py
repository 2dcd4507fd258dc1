"""Serve SF-TAP flow sockets: proxytap as the abstractor its analyzers connect to.

Under ``home``, one AF_UNIX stream listener per classification rule and
balance slot: ``<home>/tcp/<name>`` and ``<home>/udp/<name>`` (spec section 3).
The hub calls ``flow_created`` / ``flow_data`` / ``flow_destroyed``
synchronously from the relay's hot path; everything here is a dict lookup, a
header format and one ``sendmsg`` (or a queue append) per connected reader.
Nothing awaits.

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
* **Whole messages** (spec section 3, "message integrity"): every event
  goes to each reader in one ``sendmsg`` of its own, only when the reader's
  socket has room for all of it, through a ``Channel``
  (``proxytap.export.channel``): a bounded queue of whole messages per
  reader on a raw socket, never an asyncio transport (which coalesces and
  splits). Each reader socket gets ``sndbuf`` bytes of kernel send buffer
  (SO_SNDBUF; the Linux default of 208 KiB loses most of a fast flow even to
  a fast reader).
* **Overload** per the ``overload`` policy: ``drop`` (default) never slows the
  proxied traffic: DATA a reader has no room for is dropped whole (header and
  body, so framing stays intact) and counted as ``buffer_full``; the original
  drops a chunk after a 1 s send timeout. ``wait`` is lossless: the flow's
  relay stops reading both sides while a reader is behind on it, for at most
  ``max_wait`` seconds per stall (then ``max_wait`` drops, counted, until the
  reader catches up). CREATED and DESTROYED are still queued, up to
  ``control_headroom`` bytes beyond the buffer; a reader that needs more is
  disconnected (``overflow``). With ``on_gap="cut"``, the first DATA drop
  instead ends that flow for that reader at once with ``DESTROYED
  reason=COMPROMISED`` (the reason the original uses for a reassembly
  overflow), so the analyzer sees a short stream rather than one with a
  hole; the default ``"skip"`` keeps the original's behaviour.
* **Chunks** are at most 32 KiB by default (``chunk``; 65535 at most, the
  binary ``len`` field): a message of header and body then fits one kernel
  socket buffer, which a reader's ``read(len)`` gets whole (see
  ``SERVED_CHUNK_DEFAULT``). An empty chunk is not sent.
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
import logging
import os
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from proxytap.errors import ConfigError
from proxytap.export.channel import (
    MIN_SNDBUF,
    OVERFLOW,
    OVERLOAD_POLICIES,
    Channel,
    Totals,
    size_sndbuf,
)
from proxytap.export.sink import Sink, SinkStats, event_counts, known
from proxytap.flows.table import UP, CloseReason, Endpoint, Flow
from proxytap.proto.classify import DEFAULT, Classifier, interfaces
from proxytap.proto.sftap import (
    REASONS,
    SERVED_CHUNK,
    SERVED_CHUNK_DEFAULT,
    FlowHeaders,
    data_head,
    data_line,
    flow_hash,
    flow_key,
    pack_data,
    split_payload,
)

if TYPE_CHECKING:
    from proxytap.config import ExportConfig

log = logging.getLogger(__name__)

FORMATS = ("text", "binary")
GAP_POLICIES = ("skip", "cut")
CUT = "cut"
DROP_REASONS = ("buffer_full", "max_wait", "overflow", "cut", "oversize")


class Interface:
    """One served socket (``tcp/http``, ``tcp/http0``, ``udp/dns``) and its readers."""

    __slots__ = ("binary", "format", "inode", "name", "path", "readers", "server")

    def __init__(self, name: str, path: Path, fmt: str) -> None:
        self.name = name
        self.path = path
        self.format = fmt
        self.binary = fmt == "binary"
        self.readers: list[Reader] = []
        self.server: socket.socket | None = None  # the listening socket
        self.inode: tuple[int, int] | None = None


class Reader:
    """One connected analyzer: its ``Channel`` and what it was sent; its counters are the stats.

    ``drops`` counts dropped events by reason (``buffer_full``, ``max_wait``,
    ``overflow``, ``cut``), ``bytes_dropped`` the DATA payload bytes they carried.
    """

    def __init__(self, owner: SftapServer, iface: Interface, sock: socket.socket) -> None:
        self.owner = owner
        self.interface = iface.name
        self._iface = iface
        self.connected_at = time.time()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.flows = 0  # flows this reader got CREATED for and not yet DESTROYED
        self.channel = Channel(
            sock,
            name=f"sftap {iface.name}",
            limit=owner.reader_buffer,
            headroom=owner.control_headroom,
            overload=owner.overload,
            max_wait=owner.max_wait,
            sndbuf=owner.sndbuf,
            on_closed=self._closed,
        )

    def _closed(self, channel: Channel, why: str | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self in self._iface.readers:
            self._iface.readers.remove(self)
        if why == OVERFLOW:
            self.owner.readers_overflowed += 1
        self.owner._retire(self)
        log.info("sftap: reader left %s (%s)", self.interface, why or "closed")

    @property
    def closed(self) -> bool:
        return self.channel.closed

    @property
    def paused(self) -> bool:
        """Behind: messages wait in proxytap for room in the reader's socket."""
        return self.channel.queued > 0

    @property
    def buffered(self) -> int:
        """Bytes waiting in proxytap for this reader (the kernel buffer not counted)."""
        return 0 if self.channel.closed else self.channel.queued

    @property
    def unread(self) -> int:
        """Bytes in the reader's kernel socket buffer, sent but not yet read (with overhead)."""
        return self.channel.in_kernel()

    @property
    def events_sent(self) -> int:
        return self.channel.events_sent

    @property
    def bytes_sent(self) -> int:
        return self.channel.bytes_sent

    @property
    def drops(self) -> dict[str, int]:
        return self.channel.drops

    @property
    def dropped_bytes(self) -> dict[str, int]:
        return self.channel.dropped_bytes

    @property
    def bytes_dropped(self) -> int:
        return sum(self.channel.dropped_bytes.values())

    def close(self) -> None:
        self.channel.close()


class _Flow:
    """What the server keeps per exported flow (computed once, at CREATED)."""

    __slots__ = ("headers", "readers", "tcp")

    def __init__(self, headers: FlowHeaders, readers: list[Reader], tcp: bool) -> None:
        self.headers = headers
        self.readers = readers
        self.tcp = tcp


class SftapServer(Sink):
    """A hub subscriber serving ``<home>/tcp/<name>`` and ``<home>/udp/<name>``.

    ``formats`` maps ``"tcp/http"`` (or a balanced ``"tcp/http0"``) to "text"
    or "binary"; others use ``default_format``. ``reader_buffer`` bounds the
    messages queued in proxytap per reader, ``control_headroom`` the
    CREATED/DESTROYED bytes allowed beyond it, ``sndbuf`` each reader socket's
    kernel send buffer. ``overload`` is ``drop`` or ``wait`` (``max_wait``
    seconds at most per stall). ``socket_mode`` is applied to each socket
    before it listens. Totals (``events_sent``, ``bytes_sent``,
    ``bytes_dropped``, ``drops``) include readers that have left.
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
        sndbuf: int = 4 << 20,
        overload: str = "drop",
        max_wait: float = 2.0,
        chunk: int = SERVED_CHUNK_DEFAULT,
        on_gap: str = "skip",
        close_timeout: float = 1.0,
    ) -> None:
        if default_format not in FORMATS:
            raise ConfigError("export.format", f"must be text or binary, not {default_format!r}")
        if on_gap not in GAP_POLICIES:
            raise ConfigError("export.on_gap", f"must be skip or cut, not {on_gap!r}")
        if overload not in OVERLOAD_POLICIES:
            raise ConfigError("export.overload", f"must be drop or wait, not {overload!r}")
        if not 1 <= chunk <= SERVED_CHUNK:
            raise ConfigError("export.chunk", f"must be 1..{SERVED_CHUNK}")
        if reader_buffer <= 0 or control_headroom <= 0:
            raise ConfigError("export.reader_buffer", "must be > 0")
        if sndbuf < MIN_SNDBUF:
            raise ConfigError("export.reader_sndbuf", f"must be >= {MIN_SNDBUF}")
        if max_wait <= 0:
            raise ConfigError("export.max_wait", "must be > 0")
        self.name = name
        self.home = Path(home)
        self.classifier = classifier
        self.socket_mode = socket_mode
        self.reader_buffer = reader_buffer
        self.control_headroom = control_headroom
        self.sndbuf = sndbuf
        self.overload = overload
        self.max_wait = max_wait
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
        self._retired = Totals()
        self.effective_sndbuf = 0  # what the kernel gave the last reader socket
        self.readers_accepted = 0
        self.readers_overflowed = 0
        self.flows_exported = 0
        self.flows_unheard = 0
        # CREATED / DESTROYED events written (to all readers); DATA = events_sent - both
        self.created_sent = 0
        self.destroyed_sent = 0

    def retune(self, exp: ExportConfig, classifier: Classifier | None) -> None:
        """Config reload: overload policy for readers that connect from now on; ``classifier``
        (when the rules changed) must serve the same sockets (``interfaces`` names)."""
        self.overload = exp.overload
        self.max_wait = exp.max_wait
        self.cut = exp.on_gap == "cut"
        if classifier is not None:
            self.classifier = classifier

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
            sndbuf=exp.reader_sndbuf,
            overload=exp.overload,
            max_wait=exp.max_wait,
            on_gap=exp.on_gap,
            chunk=exp.chunk,
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
                iface.server = sock
                sock.listen(128)
                loop.add_reader(sock.fileno(), self._accept, iface)
                log.info("sftap: serving %s (%s)", iface.path, iface.format)
        except BaseException:
            await self.stop()
            raise
        self._probe_sndbuf()

    def _probe_sndbuf(self) -> None:
        """Say once what send buffer readers get; warn when the kernel caps it."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            got = size_sndbuf(a, self.sndbuf)
        self.effective_sndbuf = got
        if got < self.sndbuf:
            log.warning(
                "sftap: reader sockets get a %d-byte send buffer, not the %d configured "
                "(export.reader_sndbuf): net.core.wmem_max caps it; raise that sysctl "
                "or give proxytap CAP_NET_ADMIN, or fast flows lose export data",
                got,
                self.sndbuf,
            )
        else:
            log.info("sftap: reader sockets get a %d-byte kernel send buffer", got)

    def _accept(self, iface: Interface) -> None:
        lsock = iface.server
        if lsock is None:
            return
        for _ in range(64):  # bounded: other listeners and the relay get their turn
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the reader waits in the backlog
                log.warning("sftap: cannot accept a reader on %s: %s", iface.name, exc)
                return
            reader = Reader(self, iface, sock)
            self.effective_sndbuf = reader.channel.sndbuf
            iface.readers.append(reader)
            self.readers_accepted += 1
            log.info("sftap: reader connected on %s", iface.name)

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
        """Stop listening, close every reader (sending what is queued, briefly), remove sockets."""
        loop = asyncio.get_running_loop()
        for iface in self.interfaces.values():
            if iface.server is not None:
                loop.remove_reader(iface.server.fileno())
                iface.server.close()
                iface.server = None
            self._unlink(iface)
        readers = self.readers
        if readers:
            await asyncio.wait(
                [asyncio.ensure_future(r.channel.drain(self.close_timeout)) for r in readers]
            )
        for r in readers:
            r.close()
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
        self._retired.add(reader.channel)

    @property
    def readers(self) -> list[Reader]:
        """Every connected reader, all sockets."""
        return [r for i in self.interfaces.values() for r in i.readers]

    @property
    def events_sent(self) -> int:
        return self._retired.events_sent + sum(r.events_sent for r in self.readers)

    @property
    def bytes_sent(self) -> int:
        return self._retired.bytes_sent + sum(r.bytes_sent for r in self.readers)

    @property
    def bytes_dropped(self) -> int:
        return sum(self.dropped_bytes.values())

    @property
    def partial_sends(self) -> int:
        return self._retired.partial_sends + sum(r.channel.partial_sends for r in self.readers)

    @property
    def wait_seconds(self) -> float:
        """Time readers held flows (summed over readers), including a wait in progress."""
        return self._retired.waited + sum(r.channel.waited() for r in self.readers)

    @property
    def drops(self) -> dict[str, int]:
        out = dict(self._retired.drops)
        for r in self.readers:
            for k, v in r.drops.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def dropped_bytes(self) -> dict[str, int]:
        """DATA payload bytes dropped, by reason."""
        out = dict(self._retired.dropped_bytes)
        for r in self.readers:
            for k, v in r.dropped_bytes.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def flows(self) -> int:
        """Flows currently exported to at least one reader."""
        return len(self._flows)

    def stats(self) -> SinkStats:
        readers = self.readers
        created, destroyed = self.created_sent, self.destroyed_sent
        return SinkStats(
            name=self.name,
            kind="sftap",
            connected=len(readers),
            buffered=sum(r.buffered for r in readers),
            flows=self.flows,
            events=event_counts(self.events_sent, created, destroyed),
            bytes_sent=self.bytes_sent,
            drops=known(DROP_REASONS, self.drops),
            dropped_bytes=known(DROP_REASONS, self.dropped_bytes),
            wait_seconds=self.wait_seconds,
            partial_sends=self.partial_sends,
            sndbuf=self.effective_sndbuf,
            detail={
                "home": str(self.home),
                "overload": self.overload,
                "readers": [
                    {
                        "interface": r.interface,
                        "connected_at": r.connected_at,
                        "buffered": r.buffered,
                        "paused": r.paused,
                        "waiting": r.channel.waiting,
                        "flows": r.flows,
                        "events_sent": r.events_sent,
                        "bytes_sent": r.bytes_sent,
                        "bytes_dropped": r.bytes_dropped,
                        "drops": dict(r.drops),
                        "sndbuf": r.channel.sndbuf,
                    }
                    for r in readers
                ],
            },
        )

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
        headers = FlowHeaders(key, client_is_1, binary=iface.binary, tcp=tcp)
        if tcp:
            msg = headers.created(flow.start)
            readers = [r for r in iface.readers if r.channel.control(msg)]
            if not readers:
                return
            self.created_sent += len(readers)
            for r in readers:
                r.flows += 1
        else:
            readers = iface.readers  # UDP: no CREATED; every current reader, live list
        self._flows[flow.id] = _Flow(headers, readers, tcp)
        self.flows_exported += 1

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        st = self._flows.get(flow.id)
        if st is None:
            return
        n = len(data)
        if n <= self.chunk:
            if n:
                self._data(flow, st, direction == UP, data, now)
            return
        up = direction == UP
        for piece in split_payload(data, self.chunk):
            if not self._data(flow, st, up, piece, now):
                return

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        st = self._flows.pop(flow.id, None)
        if st is None:
            return
        for r in st.readers:
            r.channel.forget(flow)
        if not st.tcp:
            return
        msg = st.headers.destroyed(REASONS[reason], now)
        for r in st.readers:
            if r.channel.control(msg):
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
                r.channel.drop("oversize", n)
            return
        match = "none" if rule.up is None else "up"
        from_ = 1 if src_is_1 else 2
        if iface.binary:
            head = pack_data(key, from_, match, n, now)
        else:
            head = data_line(data_head(key, from_, match), n, now)
        msg = (head, data)
        total = len(head) + n
        for r in iface.readers:
            r.channel.data_nowait(msg, total)

    def _data(self, flow: Flow, st: _Flow, up: bool, body: bytes | memoryview, now: float) -> bool:
        """One DATA event to the flow's readers; False when no reader is left for it."""
        n = len(body)
        head = st.headers.data(up, n, now)
        msg = (head, body)
        total = len(head) + n
        failed = False
        for r in st.readers:
            if not r.channel.data(flow, msg, total):
                failed = True
        if failed and st.tcp:
            return self._prune(flow, st, now)
        return True

    def _prune(self, flow: Flow, st: _Flow, now: float) -> bool:
        """Forget readers that left; with ``on_gap="cut"``, end the flow for those that dropped.

        False when the flow has no reader left.
        """
        keep: list[Reader] = []
        cut: list[Reader] = []
        for r in st.readers:
            if r.closed:
                continue
            if self.cut and r.channel.dropped_last:
                cut.append(r)
            else:
                keep.append(r)
        if cut:
            msg = st.headers.destroyed("COMPROMISED", now)
            for r in cut:
                r.channel.drop(CUT, 0)
                r.channel.forget(flow)
                r.flows -= 1
                if r.channel.control(msg):
                    self.destroyed_sent += 1
        st.readers = keep
        if not keep:
            del self._flows[flow.id]
            return False
        return True


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
