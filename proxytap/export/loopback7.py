"""Feed a running SF-TAP abstractor: write every inner flow into its ``loopback7`` socket.

proxytap connects as a client to ``<home>/loopback7`` of an existing flow
abstractor and writes each flow in the text (default) or binary format; the
abstractor classifies it and hands it to its own analyzers. The abstractor's
reader is fragile, so this writer follows spec section 4 to the letter:

1. The key is normalized here (smaller endpoint is ``ip1``/``port1``).
2. ``hop`` is the flow's own (0 for a flow the proxy saw first-hand; the
   abstractor adds 1). In text, ``vlan=-1`` follows ``port2`` unless
   ``vlan=False``.
3. CREATED first, then DATA (``from=1|2``), then exactly one DESTROYED.
4. DATA has ``1 <= len <= 16384`` (larger chunks are split, empty ones are not
   sent: a zero-length DATA wedges the abstractor's reader).
5. **One message, one send** (4.5): the abstractor reads the header, then the
   body with one ``read()``, and on a short read closes the connection and
   ends every flow on it. Each message goes out in one ``sendmsg`` of its own,
   whole, when the socket has room for all of it: ``proxytap.export.channel``
   (a bounded queue of whole messages on a raw socket; no asyncio transport,
   which would merge and split them).
6. UDP is DATA only, one event per datagram, never CREATED or DESTROYED (which
   would crash the abstractor). A datagram over 16384 bytes is dropped rather
   than split (a split would read as two datagrams) and counted ``oversize``.
7. When the socket is absent or the abstractor goes away, proxying goes on:
   events are counted as dropped and the writer reconnects with backoff
   (0.1 s doubling to 5 s; reset once a connection has lasted ``backoff_max``).
8. **Reconnects re-announce live flows.** Closing the connection made the
   abstractor destroy every flow created on it. On a new connection, every
   flow still live (and every flow that started while there was none) gets
   its CREATED again, with its original start time, and then its later DATA
   and its DESTROYED, so the abstractor sees it end. What was sent while
   there was no connection is lost (counted ``not_connected``).

Overload: ``overload="drop"`` (default) drops whole DATA events the
abstractor has no room for (``buffer_full``); ``"wait"`` pauses the flow's
relay while the abstractor is behind, at most ``max_wait`` per stall (then
``max_wait`` drops). CREATED/DESTROYED still go out up to ``control_headroom``
bytes beyond the queue; past that the connection is dropped (``overflow``),
which makes the abstractor destroy its flows, and the writer reconnects. With
``on_gap="cut"`` a flow that lost DATA is ended at once with DESTROYED
``COMPROMISED`` instead of continuing with a hole.

Drop reasons (``drops`` counts events, ``dropped_bytes`` their payload
bytes): ``not_connected``, ``buffer_full``, ``max_wait``, ``overflow``,
``oversize``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from proxytap.errors import ConfigError
from proxytap.export.channel import MIN_SNDBUF, OVERLOAD_POLICIES, Channel, Totals
from proxytap.export.sink import Sink, SinkStats, event_counts, known
from proxytap.flows.table import UP, CloseReason, Endpoint, Flow
from proxytap.proto.sftap import (
    LOOPBACK7_CHUNK,
    LOOPBACK7_REASONS,
    NO_VLAN,
    FlowHeaders,
    flow_key,
    split_payload,
)

if TYPE_CHECKING:
    from proxytap.config import ExportConfig

log = logging.getLogger(__name__)

NOT_CONNECTED = "not_connected"
OVERSIZE = "oversize"
CUT = "cut"
DROP_REASONS = ("not_connected", "buffer_full", "max_wait", "overflow", "oversize", "cut")


class _Live:
    """A live TCP flow: its headers, its start, and the connection its CREATED went out on."""

    __slots__ = ("cut", "flow", "gen", "headers")

    def __init__(self, flow: Flow, headers: FlowHeaders) -> None:
        self.flow = flow
        self.headers = headers
        self.gen = 0  # connection number its CREATED went out on; 0: none yet
        self.cut = False  # ended for the abstractor after lost DATA (on_gap="cut")


class Loopback7Writer(Sink):
    """A hub subscriber writing every flow into an abstractor's loopback7 socket.

    Stats: ``link_up``, ``connects``, ``reconnects`` (connections after the
    first), ``connect_failures``, ``last_error``, ``events_sent``,
    ``bytes_sent``, ``drops`` and ``dropped_bytes`` by reason, ``buffered``,
    ``flows`` (flows live on the current connection), ``reannounced``,
    ``wait_seconds``, ``partial_sends``, ``sndbuf`` (the kernel's send buffer).
    """

    name: str

    def __init__(
        self,
        path: str,
        *,
        name: str = "loopback7",
        format: str = "text",
        vlan: bool = True,
        buffer_limit: int = 8 << 20,
        control_headroom: int = 1 << 20,
        sndbuf: int = 4 << 20,
        overload: str = "drop",
        max_wait: float = 2.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        chunk: int = LOOPBACK7_CHUNK,
        on_gap: str = "skip",
        close_timeout: float = 1.0,
    ) -> None:
        if format not in ("text", "binary"):
            raise ConfigError("export.loopback7_format", f"must be text or binary, not {format!r}")
        if not 1 <= chunk <= LOOPBACK7_CHUNK:
            raise ConfigError("export.loopback7_chunk", f"must be 1..{LOOPBACK7_CHUNK}")
        if buffer_limit <= 0 or control_headroom <= 0:
            raise ConfigError("export.loopback7_buffer", "must be > 0")
        if sndbuf < MIN_SNDBUF:
            raise ConfigError("export.loopback7_sndbuf", f"must be >= {MIN_SNDBUF}")
        if overload not in OVERLOAD_POLICIES:
            raise ConfigError(
                "export.loopback7_overload", f"must be drop or wait, not {overload!r}"
            )
        if on_gap not in ("skip", "cut"):
            raise ConfigError("export.loopback7_on_gap", f"must be skip or cut, not {on_gap!r}")
        if not 0 < backoff_initial <= backoff_max:
            raise ConfigError("export.loopback7_backoff", "need 0 < initial <= max")
        self.name = name
        self.path = path
        self.binary = format == "binary"
        self.vlan: int | None = NO_VLAN if vlan and not self.binary else None
        self.buffer_limit = buffer_limit
        self.control_headroom = control_headroom
        self.sndbuf = sndbuf
        self.overload = overload
        self.max_wait = max_wait
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.chunk = chunk
        self.cut = on_gap == "cut"
        self.close_timeout = close_timeout
        self._channel: Channel | None = None
        self._lost: asyncio.Future[None] | None = None
        self._gen = 0  # connection number; 0 = never connected
        self._flows: dict[int, _Live] = {}  # live TCP flows
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._done = Totals()  # counters of connections that have closed
        self.connects = 0
        self.connect_failures = 0
        self.last_error: str | None = None
        self.reannounced = 0  # CREATED sent again for live flows after a reconnect
        self.effective_sndbuf = 0
        # CREATED / DESTROYED events written; DATA = events_sent - both
        self.created_sent = 0
        self.destroyed_sent = 0
        self._drops: dict[str, int] = {}
        self._dropped_bytes: dict[str, int] = {}

    @classmethod
    def from_config(cls, exp: ExportConfig) -> Loopback7Writer:
        assert exp.loopback7 is not None
        return cls(
            exp.loopback7,
            format=exp.loopback7_format,
            vlan=exp.loopback7_vlan,
            buffer_limit=exp.loopback7_buffer,
            sndbuf=exp.loopback7_sndbuf,
            overload=exp.loopback7_overload,
            max_wait=exp.loopback7_max_wait,
            on_gap=exp.loopback7_on_gap,
        )

    def retune(self, exp: ExportConfig) -> None:
        """Config reload: the overload policy for the next link (validated by the config)."""
        self.overload = exp.loopback7_overload
        self.max_wait = exp.loopback7_max_wait
        self.cut = exp.loopback7_on_gap == "cut"

    # -- stats ---------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return self._channel is not None

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    @property
    def buffered(self) -> int:
        ch = self._channel
        return 0 if ch is None else ch.queued

    @property
    def flows(self) -> int:
        gen = self._gen
        return sum(1 for f in self._flows.values() if f.gen == gen and not f.cut)

    def _totals(self) -> Totals:
        t = self._done.copy()
        if self._channel is not None:
            t.add(self._channel)
        return t

    @property
    def events_sent(self) -> int:
        return self._totals().events_sent

    @property
    def bytes_sent(self) -> int:
        return self._totals().bytes_sent

    @property
    def partial_sends(self) -> int:
        return self._totals().partial_sends

    @property
    def wait_seconds(self) -> float:
        ch = self._channel
        return self._done.waited + (ch.waited() if ch is not None else 0.0)

    @property
    def drops(self) -> dict[str, int]:
        return _merged(self._drops, self._totals().drops)

    @property
    def dropped_bytes(self) -> dict[str, int]:
        return _merged(self._dropped_bytes, self._totals().dropped_bytes)

    def stats(self) -> SinkStats:
        created, destroyed = self.created_sent, self.destroyed_sent
        totals = self._totals()
        return SinkStats(
            name=self.name,
            kind="loopback7",
            connected=int(self.link_up),
            buffered=self.buffered,
            flows=self.flows,
            events=event_counts(totals.events_sent, created, destroyed),
            bytes_sent=totals.bytes_sent,
            drops=known(DROP_REASONS, _merged(self._drops, totals.drops)),
            dropped_bytes=known(DROP_REASONS, _merged(self._dropped_bytes, totals.dropped_bytes)),
            wait_seconds=self.wait_seconds,
            partial_sends=totals.partial_sends,
            sndbuf=self.effective_sndbuf,
            link={
                "link_up": self.link_up,
                "reconnects": self.reconnects,
                "connect_failures": self.connect_failures,
                "reannounced": self.reannounced,
            },
            detail={
                "path": self.path,
                "format": "binary" if self.binary else "text",
                "overload": self.overload,
                "link_up": self.link_up,
                "connects": self.connects,
                "reconnects": self.reconnects,
                "connect_failures": self.connect_failures,
                "reannounced": self.reannounced,
                "last_error": self.last_error,
            },
        )

    def _drop(self, reason: str, payload: int) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + 1
        if payload:
            self._dropped_bytes[reason] = self._dropped_bytes.get(reason, 0) + payload

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once (the abstractor may be down)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-connect")

    async def stop(self) -> None:
        """Stop reconnecting and close the connection (sending what is queued, briefly)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        ch = self._channel
        if ch is not None:
            await ch.drain(self.close_timeout)
            ch.close()
        self._flows.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial
        while not self._stopping:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError as exc:
                sock.close()
                self.connect_failures += 1
                if self.last_error != str(exc):
                    log.warning("loopback7: cannot connect to %s: %s", self.path, exc)
                self.last_error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            except BaseException:
                sock.close()
                raise
            lost = self._link_up(sock)
            started = loop.time()
            await asyncio.shield(lost)  # stop() closes the channel itself after cancelling us
            if loop.time() - started >= self.backoff_max:
                delay = self.backoff_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _link_up(self, sock: socket.socket) -> asyncio.Future[None]:
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost = lost
        ch = Channel(
            sock,
            name="loopback7",
            limit=self.buffer_limit,
            headroom=self.control_headroom,
            overload=self.overload,
            max_wait=self.max_wait,
            sndbuf=self.sndbuf,
            on_closed=self._link_down,
        )
        self._channel = ch
        self._gen += 1
        self.connects += 1
        self.last_error = None
        if ch.sndbuf != self.effective_sndbuf:
            self.effective_sndbuf = ch.sndbuf
            capped = " (capped by net.core.wmem_max)" if ch.sndbuf < self.sndbuf else ""
            log.info("loopback7: kernel send buffer %d bytes%s", ch.sndbuf, capped)
        log.info("loopback7: connected to %s (connection %d)", self.path, self.connects)
        self._reannounce(ch)
        return lost

    def _reannounce(self, ch: Channel) -> None:
        """The new connection knows no flow: announce every live one again (item 8)."""
        again = 0
        for live in self._flows.values():
            if live.cut:
                continue
            if not ch.control(live.headers.created(live.flow.start)):
                break  # overflowed: this connection is gone too; the next one tries again
            if live.gen:
                again += 1
            live.gen = self._gen
            self.created_sent += 1
        if again:
            self.reannounced += again
            log.info("loopback7: announced %d live flows again on the new connection", again)

    def _link_down(self, ch: Channel, why: str | None) -> None:
        if self._channel is ch:
            self._channel = None
        self._done.add(ch)
        if not self._stopping:
            log.warning("loopback7: lost %s (%s); reconnecting", self.path, why or "closed")
        if why is not None:
            self.last_error = why
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(None)

    # -- the hub's calls (hot path) ---------------------------------------------------

    def flow_created(self, flow: Flow, now: float) -> None:
        if flow.l4 != "tcp":
            return  # UDP: DATA only, never CREATED (spec 4.6); see ``datagram``
        key, client_is_1 = flow_key(flow.client, flow.server, flow.l4, flow.hop)
        live = _Live(flow, FlowHeaders(key, client_is_1, binary=self.binary, vlan=self.vlan))
        self._flows[flow.id] = live
        ch = self._channel
        if ch is None:
            self._drop(NOT_CONNECTED, 0)
        elif ch.control(live.headers.created(flow.start)):
            live.gen = self._gen
            self.created_sent += 1

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        n = len(data)
        if not n:
            return
        live = self._flows.get(flow.id)
        if live is None or live.cut:
            return
        ch = self._channel
        if ch is None or live.gen != self._gen:
            self._drop(NOT_CONNECTED, n)
            return
        up = direction == UP
        if n <= self.chunk:
            self._data(ch, live, up, data, now)
            return
        pieces = split_payload(data, self.chunk)
        for i, piece in enumerate(pieces):
            if not self._data(ch, live, up, piece, now):
                reason = NOT_CONNECTED if ch.closed else CUT
                for rest in pieces[i + 1 :]:
                    self._drop(reason, len(rest))
                return

    def _data(
        self, ch: Channel, live: _Live, up: bool, body: bytes | memoryview, now: float
    ) -> bool:
        """One DATA event; False when the rest of this chunk cannot follow."""
        n = len(body)
        head = live.headers.data(up, n, now)
        if ch.data(live.flow, (head, body), len(head) + n):
            return True
        if ch.closed:
            return False
        if self.cut:
            live.cut = True
            ch.forget(live.flow)
            if ch.control(live.headers.destroyed("COMPROMISED", now)):
                self.destroyed_sent += 1
            return False
        return True  # skipped: a hole, framing intact

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        live = self._flows.pop(flow.id, None)
        if live is None or live.cut:
            return
        ch = self._channel
        if ch is None or live.gen != self._gen:
            self._drop(NOT_CONNECTED, 0)
            return
        ch.forget(flow)
        if ch.control(live.headers.destroyed(LOOPBACK7_REASONS[reason], now)):
            self.destroyed_sent += 1

    def datagram(
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        """Write one UDP datagram as a single DATA event (no CREATED/DESTROYED for UDP)."""
        n = len(data)
        if not n:
            return
        ch = self._channel
        if ch is None:
            self._drop(NOT_CONNECTED, n)
            return
        if n > self.chunk:
            self._drop(OVERSIZE, n)
            return
        key, src_is_1 = flow_key(src, dst, "udp", hop)
        headers = FlowHeaders(key, src_is_1, binary=self.binary, tcp=False, vlan=self.vlan)
        head = headers.data(True, n, now)
        ch.data_nowait((head, data), len(head) + n)


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


__all__ = ["Loopback7Writer"]
