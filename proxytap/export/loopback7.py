"""Feed a running SF-TAP abstractor: write every inner flow into its ``loopback7`` socket.

proxytap connects as a client to ``<home>/loopback7`` of an existing flow
abstractor and writes each flow in the text format; the abstractor classifies
it and hands it to its own analyzers. The abstractor's reader is fragile, so
this writer follows spec section 4 to the letter:

1. The key is normalized here (smaller endpoint is ``ip1``/``port1``).
2. ``hop`` is the flow's own (0 for a flow the proxy saw first-hand; the
   abstractor adds 1). ``vlan=-1`` follows ``port2`` unless ``vlan=False``.
3. CREATED first, then DATA (``from=1|2``), then exactly one DESTROYED. A flow
   whose CREATED did not go out on the current connection never gets DATA or
   DESTROYED on it: after a reconnect, flows created before are not resumed,
   because closing the connection made the abstractor destroy them.
4. DATA has ``1 <= len <= 16384`` (larger chunks are split, empty ones are not
   sent: a zero-length DATA wedges the abstractor's reader) and each header is
   written together with its body in one ``transport.write``, since the
   abstractor reads the body with a single ``read()``.
5. UDP is DATA only, one event per datagram, never CREATED or DESTROYED (which
   would crash the abstractor). A datagram over 16384 bytes is dropped rather
   than split (a split would read as two datagrams) and counted ``oversize``.
6. When the socket is absent or the abstractor goes away, proxying goes on:
   events are counted as dropped and the writer reconnects with backoff
   (0.1 s doubling to 5 s; reset once a connection has lasted ``backoff_max``).

Nothing here awaits on the hub's path. The connection has a bounded buffer
(``buffer_limit``, the transport's high-water mark): while it is full, DATA is
dropped whole (``buffer_full``) and CREATED/DESTROYED still go out up to
``control_headroom`` bytes beyond it; past that the connection is dropped
(``overflow``), which makes the abstractor destroy its flows, and the writer
reconnects. With ``on_gap="cut"`` a flow that lost DATA is ended at once with
DESTROYED instead of continuing with a hole.

Drop reasons (``drops`` counts events, ``dropped_bytes`` their payload bytes):
``not_connected`` (no connection, or the flow's connection went away),
``buffer_full``, ``overflow``, ``oversize``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

from proxytap.errors import ConfigError
from proxytap.flows.table import UP, CloseReason, Endpoint, Flow
from proxytap.proto.sftap import (
    LOOPBACK7_CHUNK,
    NO_VLAN,
    REASONS,
    FlowKey,
    data_head,
    data_message,
    encode_created,
    encode_destroyed,
    flow_key,
    split_payload,
)

if TYPE_CHECKING:
    from proxytap.config import ExportConfig

log = logging.getLogger(__name__)

NOT_CONNECTED = "not_connected"
BUFFER_FULL = "buffer_full"
OVERFLOW = "overflow"
OVERSIZE = "oversize"


class _Link(asyncio.Protocol):
    """One connection to the abstractor."""

    def __init__(self, owner: Loopback7Writer) -> None:
        self.owner = owner
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner._link_up(cast(asyncio.WriteTransport, transport), self)

    def data_received(self, data: bytes) -> None:
        pass  # the abstractor never writes on loopback7

    def eof_received(self) -> bool | None:
        return None  # the abstractor went away: close, reconnect

    def pause_writing(self) -> None:
        self.owner._paused = True

    def resume_writing(self) -> None:
        self.owner._paused = False
        self.owner._over = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._link_down(exc)
        if not self.lost.done():
            self.lost.set_result(None)


class _Sent:
    """A flow whose CREATED went out on connection number ``gen``."""

    __slots__ = ("down_head", "gen", "key", "up_head")

    def __init__(self, key: FlowKey, client_is_1: bool, gen: int, vlan: int | None) -> None:
        self.key = key
        self.gen = gen
        up_from, down_from = (1, 2) if client_is_1 else (2, 1)
        self.up_head = data_head(key, up_from, "up", vlan=vlan)
        self.down_head = data_head(key, down_from, "down", vlan=vlan)


class _Lost:
    """A flow none of whose events will go out, and why (for counting)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_NOT_CONNECTED = _Lost(NOT_CONNECTED)
_BUFFER_FULL = _Lost(BUFFER_FULL)


class Loopback7Writer:
    """A hub subscriber writing every flow into an abstractor's loopback7 socket.

    Stats: ``link_up``, ``connects``, ``reconnects`` (connections after the
    first), ``connect_failures``, ``last_error``, ``events_sent``,
    ``bytes_sent``, ``drops`` and ``dropped_bytes`` by reason, ``buffered``,
    ``flows`` (flows live on the current connection).
    """

    name: str

    def __init__(
        self,
        path: str,
        *,
        name: str = "loopback7",
        vlan: bool = True,
        buffer_limit: int = 8 << 20,
        control_headroom: int = 1 << 20,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        chunk: int = LOOPBACK7_CHUNK,
        on_gap: str = "skip",
        close_timeout: float = 1.0,
    ) -> None:
        if not 1 <= chunk <= LOOPBACK7_CHUNK:
            raise ConfigError("export.loopback7_chunk", f"must be 1..{LOOPBACK7_CHUNK}")
        if buffer_limit <= 0 or control_headroom <= 0:
            raise ConfigError("export.loopback7_buffer", "must be > 0")
        if on_gap not in ("skip", "cut"):
            raise ConfigError("export.on_gap", f"must be skip or cut, not {on_gap!r}")
        if not 0 < backoff_initial <= backoff_max:
            raise ConfigError("export.loopback7_backoff", "need 0 < initial <= max")
        self.name = name
        self.path = path
        self.vlan: int | None = NO_VLAN if vlan else None
        self.buffer_limit = buffer_limit
        self.control_headroom = control_headroom
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.chunk = chunk
        self.cut = on_gap == "cut"
        self.close_timeout = close_timeout
        self._transport: asyncio.WriteTransport | None = None
        self._link: _Link | None = None
        self._paused = False
        self._over = 0
        self._gen = 0  # connection number; 0 = never connected
        self._flows: dict[int, _Sent | _Lost] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connects = 0
        self.connect_failures = 0
        self.last_error: str | None = None
        self.events_sent = 0
        self.bytes_sent = 0
        # CREATED / DESTROYED events written; DATA = events_sent - both
        self.created_sent = 0
        self.destroyed_sent = 0
        self.drops: dict[str, int] = {}
        self.dropped_bytes: dict[str, int] = {}

    @classmethod
    def from_config(cls, exp: ExportConfig) -> Loopback7Writer:
        assert exp.loopback7 is not None
        return cls(exp.loopback7, vlan=exp.loopback7_vlan, buffer_limit=exp.loopback7_buffer)

    # -- stats ---------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return self._transport is not None

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    @property
    def buffered(self) -> int:
        t = self._transport
        return 0 if t is None else t.get_write_buffer_size()

    @property
    def flows(self) -> int:
        gen = self._gen
        return sum(1 for f in self._flows.values() if isinstance(f, _Sent) and f.gen == gen)

    def _drop(self, reason: str, payload: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if payload:
            self.dropped_bytes[reason] = self.dropped_bytes.get(reason, 0) + payload

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; returns at once (the abstractor may be down)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-connect")

    async def stop(self) -> None:
        """Stop reconnecting and close the connection (flushing for ``close_timeout``)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        link, transport = self._link, self._transport
        if transport is not None and link is not None:
            transport.close()  # flushes what is buffered, then closes
            await asyncio.wait([link.lost], timeout=self.close_timeout)
            if not link.lost.done():
                transport.abort()
                await asyncio.wait([link.lost], timeout=self.close_timeout)
        self._flows.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial
        while not self._stopping:
            try:
                _, link = await loop.create_unix_connection(lambda: _Link(self), self.path)
            except OSError as exc:
                self.connect_failures += 1
                if self.last_error != str(exc):
                    log.warning("loopback7: cannot connect to %s: %s", self.path, exc)
                self.last_error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            started = loop.time()
            await asyncio.shield(link.lost)  # stop() still waits on it after cancelling us
            if loop.time() - started >= self.backoff_max:
                delay = self.backoff_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _link_up(self, transport: asyncio.WriteTransport, link: _Link) -> None:
        transport.set_write_buffer_limits(high=self.buffer_limit, low=self.buffer_limit // 2)
        self._transport = transport
        self._link = link
        self._paused = False
        self._over = 0
        self._gen += 1
        self.connects += 1
        self.last_error = None
        # Flows of earlier connections are gone on the abstractor's side.
        for fid, st in self._flows.items():
            if isinstance(st, _Sent):
                self._flows[fid] = _NOT_CONNECTED
        log.info("loopback7: connected to %s (connection %d)", self.path, self.connects)

    def _link_down(self, exc: Exception | None) -> None:
        self._transport = None
        self._link = None
        if not self._stopping:
            log.warning("loopback7: lost %s (%s); reconnecting", self.path, exc or "closed")
        if exc is not None:
            self.last_error = str(exc)

    # -- writing ---------------------------------------------------------------------

    def _control(self, msg: bytes) -> bool:
        """Write CREATED/DESTROYED, past the buffer limit up to the headroom."""
        t = self._transport
        if t is None or t.is_closing():
            return False
        if self._paused:
            self._over += len(msg)
            if self._over > self.control_headroom:
                self._drop(OVERFLOW, 0)
                log.warning("loopback7: abstractor is not reading; dropping the connection")
                t.abort()
                self._transport = None
                return False
        t.write(msg)
        self.events_sent += 1
        self.bytes_sent += len(msg)
        return True

    # -- the hub's calls (hot path) ---------------------------------------------------

    def flow_created(self, flow: Flow, now: float) -> None:
        if self._transport is None:
            self._flows[flow.id] = _NOT_CONNECTED
            self._drop(NOT_CONNECTED, 0)
            return
        key, client_is_1 = flow_key(flow.client, flow.server, flow.l4, flow.hop)
        if flow.l4 != "tcp":  # UDP: DATA only, never CREATED (spec 4.5)
            self._flows[flow.id] = _Sent(key, client_is_1, self._gen, self.vlan)
            return
        if self._control(encode_created(key, flow.start, vlan=self.vlan)):
            self.created_sent += 1
            self._flows[flow.id] = _Sent(key, client_is_1, self._gen, self.vlan)
        else:
            lost = _NOT_CONNECTED if self._transport is None else _BUFFER_FULL
            self._flows[flow.id] = lost
            self._drop(lost.reason, 0)

    def flow_data(self, flow: Flow, direction: int, data: bytes, now: float) -> None:
        n = len(data)
        if not n:
            return
        st = self._flows.get(flow.id)
        if st is None:
            return
        if isinstance(st, _Lost):
            self._drop(st.reason, n)
            return
        if st.gen != self._gen or self._transport is None:
            self._flows[flow.id] = _NOT_CONNECTED
            self._drop(NOT_CONNECTED, n)
            return
        if n <= self.chunk:
            self._data(flow, st, direction, data, now)
            return
        if flow.l4 != "tcp":  # a datagram is never split
            self._drop(OVERSIZE, n)
            return
        pieces = split_payload(data, self.chunk)
        for i, piece in enumerate(pieces):
            self._data(flow, st, direction, piece, now)
            now_st = self._flows.get(flow.id)
            if now_st is not st:  # connection gone or flow cut: count the rest, send nothing
                reason = now_st.reason if isinstance(now_st, _Lost) else NOT_CONNECTED
                for rest in pieces[i + 1 :]:
                    self._drop(reason, len(rest))
                return

    def _data(
        self, flow: Flow, st: _Sent, direction: int, body: bytes | memoryview, now: float
    ) -> bool:
        t = self._transport
        if t is None or t.is_closing():
            self._drop(NOT_CONNECTED, len(body))
            self._flows[flow.id] = _NOT_CONNECTED
            return False
        if self._paused:
            self._drop(BUFFER_FULL, len(body))
            if self.cut and flow.l4 == "tcp":
                self._flows[flow.id] = _BUFFER_FULL
                if self._control(encode_destroyed(st.key, "COMPROMISED", now, vlan=self.vlan)):
                    self.destroyed_sent += 1
            return False
        msg = data_message(st.up_head if direction == UP else st.down_head, body, now)
        t.write(msg)  # header and body in one write (spec 4.4)
        self.events_sent += 1
        self.bytes_sent += len(msg)
        return True

    def flow_destroyed(self, flow: Flow, reason: CloseReason, now: float) -> None:
        st = self._flows.pop(flow.id, None)
        if not isinstance(st, _Sent) or flow.l4 != "tcp":
            return
        if st.gen != self._gen or self._transport is None:
            self._drop(NOT_CONNECTED, 0)
            return
        if self._control(encode_destroyed(st.key, REASONS[reason], now, vlan=self.vlan)):
            self.destroyed_sent += 1
        else:
            self._drop(NOT_CONNECTED if self._transport is None else OVERFLOW, 0)

    def datagram(
        self, src: Endpoint, dst: Endpoint, data: bytes, now: float, *, hop: int = 0
    ) -> None:
        """Write one UDP datagram as a single DATA event (no CREATED/DESTROYED for UDP)."""
        n = len(data)
        if not n:
            return
        t = self._transport
        if t is None or t.is_closing():
            self._drop(NOT_CONNECTED, n)
            return
        if n > self.chunk:
            self._drop(OVERSIZE, n)
            return
        if self._paused:
            self._drop(BUFFER_FULL, n)
            return
        key, src_is_1 = flow_key(src, dst, "udp", hop)
        msg = data_message(data_head(key, 1 if src_is_1 else 2, "none", vlan=self.vlan), data, now)
        t.write(msg)
        self.events_sent += 1
        self.bytes_sent += len(msg)


__all__ = ["Loopback7Writer"]
