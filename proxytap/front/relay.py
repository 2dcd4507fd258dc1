"""The relay: bytes both ways between the client and the destination, tapped.

Two asyncio protocols, one per direction, each reading one transport and
writing the other (Protocol/Transport callbacks, not streams: on uvloop that
moves about twice the bytes per CPU second). Backpressure: when a transport's
write buffer passes the high-water mark, reading stops on the transport that
feeds it. Half-close is kept: EOF one way becomes ``write_eof`` on the other
and the reverse direction keeps flowing until it ends too. A reset on one
side resets the other. An idle timer closes tunnels with no bytes either way.

Every chunk goes to the export hub synchronously (``Hub.data``); the hub never
blocks. With the default export policy (``drop``) the tap never slows the
relay beyond its own CPU cost; under ``wait`` an export consumer that is
behind holds the flow (``export_hold``): both sides stop being read, like the
relay's own backpressure, until the consumer catches up or ``max_wait`` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxytap.flows.table import DOWN, UP, CloseReason, Flow, State

if TYPE_CHECKING:
    from proxytap.export.hub import Hub
    from proxytap.modules.api import Context

_LINGER_RST = struct.pack("ii", 1, 0)
EARLY_LIMIT = 64 << 10  # bytes read from a side before the relay starts; then reading pauses


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST (SO_LINGER 0), dropping anything still buffered."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()  # type: ignore[attr-defined]


class Early:
    """Bytes (and an EOF) read from one side of a tunnel before the relay starts.

    Reading goes on while the tunnel is set up, and pauses only once
    ``EARLY_LIMIT`` bytes wait (the relay resumes it): pausing and resuming
    every new tunnel would cost two poller updates.
    """

    __slots__ = ("chunks", "eof", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.eof = False

    def add(self, data: bytes, transport: asyncio.Transport | None) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= EARLY_LIMIT and transport is not None:
            transport.pause_reading()


class PendingUpstream(asyncio.Protocol):
    """The upstream transport's protocol between connect and the relay's start.

    Whatever arrives before the client has its reply is kept (``Early``) and
    replayed to the relay; a loss is remembered and replayed too.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.early = Early()
        self.lost = False
        self.exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.early.add(data, self.transport)

    def eof_received(self) -> bool:
        self.early.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc


class _Side(asyncio.Protocol):
    """Reads ``rx``, writes ``tx``; taps what it reads as ``direction``."""

    __slots__ = ("direction", "eof", "flow", "full", "hub", "reading", "relay", "rx", "tx")

    def __init__(
        self, relay: Relay, direction: int, rx: asyncio.Transport, tx: asyncio.Transport
    ) -> None:
        self.relay = relay
        self.flow = relay.flow
        self.hub = relay.hub
        self.direction = direction
        self.rx = rx
        self.tx = tx
        self.eof = False
        self.full = False  # rx's write buffer is past the high-water mark
        self.reading = True  # rx is being read (the relay resumes it at start)

    def data_received(self, data: bytes) -> None:
        self.tx.write(data)
        flow = self.flow
        if self.direction == UP:
            flow.bytes_up += len(data)
            flow.chunks_up += 1
        else:
            flow.bytes_down += len(data)
            flow.chunks_down += 1
        hub = self.hub
        if hub is not None:
            hub.data(flow, self.direction, data, time.time())

    def eof_received(self) -> bool:
        relay = self.relay
        if relay.closed:  # the tunnel ended while this EOF waited (``Relay.start`` replays)
            return False
        self.eof = True
        other = relay.down if self is relay.up else relay.up
        if other.eof:
            relay.finish(CloseReason.NORMAL)
            return False
        self.flow.state = State.HALF_CLOSED
        self.reading = False  # never read again: uvloop would repeat the EOF
        if self.tx.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.tx.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        if relay.closed:
            return
        if exc is not None:
            relay.finish(CloseReason.RESET, cause=self)
        else:
            relay.finish(CloseReason.NORMAL)

    # our rx transport's write buffer is full: stop reading what fills it
    def pause_writing(self) -> None:
        self.full = True
        self.relay.update_reading()

    def resume_writing(self) -> None:
        self.full = False
        self.relay.update_reading()

    def set_reading(self, want: bool) -> None:
        if want is not self.reading:
            self.reading = want
            with contextlib.suppress(Exception):
                if want:
                    self.rx.resume_reading()
                else:
                    self.rx.pause_reading()


class Relay:
    """One tunnel's two directions, its flow record and its idle timer."""

    __slots__ = (
        "_seen",
        "_timer",
        "closed",
        "ctx",
        "down",
        "flow",
        "held",
        "hub",
        "idle",
        "on_done",
        "up",
    )

    def __init__(
        self,
        flow: Flow,
        hub: Hub | None,
        idle: float,
        on_done: Callable[[Relay, CloseReason], None],
    ) -> None:
        self.flow = flow
        self.hub = hub
        self.idle = idle
        self.on_done = on_done
        self.closed = False
        self.held = False  # an export consumer under the "wait" policy is behind
        self.ctx: Context | None = None  # the tunnel's module context (the TLS engine uses it)
        self._seen = 0
        self._timer: asyncio.TimerHandle | None = None
        self.up: _Side
        self.down: _Side

    def start(
        self,
        client: asyncio.Transport,
        server: asyncio.Transport,
        pending: PendingUpstream,
        early: bytes = b"",
        high_water: int = 1 << 20,
        client_eof: bool = False,
        inspect: Callable[[Relay], asyncio.Protocol] | None = None,
        sides: Callable[[Relay, int, asyncio.Transport, asyncio.Transport], _Side] | None = None,
    ) -> None:
        """Take over both transports; ``early`` holds client bytes read with the handshake.

        ``client_eof``: the client half-closed before the relay started.

        ``inspect`` builds a protocol that sees the client's first bytes before
        the relay does (the ClientHello check) and hands over to ``self.up``.
        ``sides`` builds the two directions instead of ``_Side`` (modules that
        filter tunnel bytes: ``proxytap.front.modchain``).
        """
        make = _Side if sides is None else sides
        self.up = make(self, UP, client, server)
        self.down = make(self, DOWN, server, client)
        for transport in (client, server):
            transport.set_write_buffer_limits(high=high_water)
        first: asyncio.Protocol = inspect(self) if inspect is not None else self.up
        client.set_protocol(first)
        server.set_protocol(self.down)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.idle, self._idle_check)
        if early:
            first.data_received(early)
        if client_eof and not self.closed:
            first.eof_received()
        for chunk in pending.early.chunks:
            self.down.data_received(chunk)
        if pending.lost:
            self.down.connection_lost(pending.exc)
            return
        if pending.early.eof:
            self.down.eof_received()
        if not self.closed:  # a side that ended is not read again (uvloop would repeat the EOF)
            self.flow.valve = self
            self.held = bool(self.flow.holders)  # the export may be behind on early bytes
            self.update_reading(force=True)  # Early may have paused either side

    def update_reading(self, force: bool = False) -> None:
        """Read a side unless its bytes cannot go anywhere now.

        A side is not read when it ended, when the other side's write buffer
        is full (backpressure), or while an export consumer holds the flow.
        ``force``: the transports' state is unknown; tell both what is wanted.
        """
        if self.closed:
            return
        up, down = self.up, self.down
        held = self.held
        want_up = not (held or up.eof or down.full)
        want_down = not (held or down.eof or up.full)
        if force:
            up.reading = not want_up
            down.reading = not want_down
        up.set_reading(want_up)
        down.set_reading(want_down)

    def export_hold(self, held: bool) -> None:
        """``Valve``: the export asks to pause (or resume) reading both sides."""
        self.held = held
        self.update_reading()

    def _idle_check(self) -> None:
        if self.closed:
            return
        seen = self.flow.chunks_up + self.flow.chunks_down
        if seen == self._seen:
            self.finish(CloseReason.TIMEOUT)
            return
        self._seen = seen
        self._timer = asyncio.get_running_loop().call_later(self.idle, self._idle_check)

    def shutdown(self, force: bool) -> None:
        """Proxy shutdown: a draining tunnel keeps going until ``force``, then both sides
        are reset, so neither peer takes the cut for a normal end."""
        if force:
            self.finish(CloseReason.SHUTDOWN)

    def detach(self) -> None:
        """Let go of both transports without closing them (the TLS engine takes them over).

        ``on_done`` is then the new owner's to call when the tunnel ends.
        """
        if self._end():
            self.up.relay = self.down.relay = _FINISHED

    def _end(self) -> bool:
        """The relay stops (once: False if it had): no valve, no idle timer."""
        if self.closed:
            return False
        self.closed = True
        self.flow.valve = None
        if self._timer is not None:
            self._timer.cancel()
        return True

    def finish(self, reason: CloseReason, cause: _Side | None = None) -> None:
        """Close both sides once; a reset on one side resets the other; shutdown resets both."""
        if not self._end():
            return
        for side in (self.up, self.down):
            transport = side.rx
            if transport.is_closing():
                continue
            if (reason is CloseReason.RESET and side is not cause) or (
                reason is CloseReason.SHUTDOWN
            ):
                reset(transport)
            else:
                transport.close()
        self.on_done(self, reason)
        # The sides and the relay refer to each other, and the flow, both
        # transports and the handshake hang off them: a cycle, which only the
        # cyclic collector would free, and app.py makes it run rarely. The
        # transports still call the sides (connection_lost, resume_writing while
        # a close flushes); all a side needs from then on is a closed relay.
        self.up.relay = self.down.relay = _FINISHED


def _finished() -> Relay:
    relay = Relay.__new__(Relay)
    relay.closed = True
    return relay


_FINISHED = _finished()  # what the sides of a finished tunnel refer to: closed, holds nothing


class _Linger(asyncio.Protocol):
    """Discards what the client still sends after our final answer, then closes."""

    def __init__(
        self, transport: asyncio.Transport, budget: int, on_closed: Callable[[], None] | None
    ) -> None:
        self.transport = transport
        self.budget = budget
        self.on_closed = on_closed

    def data_received(self, data: bytes) -> None:
        self.budget -= len(data)
        if self.budget < 0:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_closed is not None:
            self.on_closed()


def linger_close(
    transport: asyncio.Transport,
    timeout: float = 2.0,
    budget: int = 1 << 16,
    on_closed: Callable[[], None] | None = None,
) -> bool:
    """Close after a final error answer without losing it.

    Closing a socket with unread input makes the kernel send an RST, which can
    destroy the answer before the client reads it. So: send FIN after the
    answer, keep reading (and discarding, up to ``budget`` bytes) until the
    client closes or ``timeout`` passes, then close (Apache's lingering close).
    True when it lingers: ``on_closed`` is then called once the socket is closed
    (the caller counts the descriptor as in use until then).
    """
    if transport.is_closing():
        return False
    if not transport.can_write_eof():
        transport.close()
        return False
    try:
        transport.write_eof()
    except (OSError, RuntimeError):
        transport.close()
        return False
    transport.set_protocol(_Linger(transport, budget, on_closed))
    transport.resume_reading()
    asyncio.get_running_loop().call_later(timeout, transport.close)
    return True
