"""Whole SF-TAP messages over a raw stream socket: one ``sendmsg`` per message.

Real SF-TAP consumers read a header line, then the body with ONE
``read(len)``, and take a short read for corruption; the abstractor closes
its loopback7 connection on one (spec sections 3 and 4.5). An asyncio
transport coalesces queued writes and flushes them at arbitrary byte
boundaries, which is exactly what produces short reads, so no transport is
used here. A ``Channel`` owns one connected, non-blocking AF_UNIX stream
socket and guarantees message integrity this way:

* **One message, one call.** Each message (header and body) goes out in one
  ``sendmsg`` of its own, never merged with another message.
* **Only when it fits whole.** A message is sent only when the kernel send
  buffer has room for all of it: the room is the socket's SO_SNDBUF minus
  what the kernel holds for the socket (``SIOCOUTQ``), and a message needs its
  size plus the kernel's per-buffer overhead (``cost``; measured: about 700
  bytes per ``sk_buff``, one per 32 KiB). The kernel keeps allocating while
  what it holds is under SO_SNDBUF, so with that room a ``sendmsg`` on an
  AF_UNIX stream socket never stops part way. The room is tracked locally
  and re-read from the kernel only when a message seems not to fit.
* **A bounded queue of whole messages** holds what does not fit yet; epoll
  reports the socket writable once a quarter of the buffer is free, and the
  queue is sent then, message by message. Should the kernel still take only
  part of a message, the rest goes next, before anything else, so the stream
  stays framed; that is counted (``partial_sends``) and tested to stay 0.
* **Overload policy.** ``drop`` (default): a DATA message that does not fit
  the queue (``limit`` bytes) is dropped whole and counted; the proxied
  traffic never slows (like a transport's high-water mark, a queue under
  ``limit`` takes one more message). ``wait`` (lossless): DATA is still queued
  (up to twice ``limit``), and every flow that adds to a queue past ``limit`` is *held*:
  its relay stops reading both sides (``Flow.hold``) until the queue is back
  under half of ``limit``. A consumer that stays behind for ``max_wait``
  seconds loses its holds: its flows go on and its DATA is dropped
  (``max_wait``) until it has caught up. CREATED and DESTROYED are queued up
  to ``headroom`` bytes beyond ``limit``; a consumer that needs more is
  disconnected (``overflow``). A consumer that goes away releases every flow
  it held.
* Bytes the peer sends are read and discarded; its end of file closes the
  channel (an analyzer has nothing to say; the abstractor never writes).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import socket
import termios
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxytap.flows.table import Flow

log = logging.getLogger(__name__)

OVERLOAD_POLICIES = ("drop", "wait")
BUFFER_FULL = "buffer_full"
MAX_WAIT = "max_wait"
OVERFLOW = "overflow"
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux; not in every Python build
MIN_SNDBUF = 128 << 10  # room for the largest message (64 KiB body) with its overhead

Part = bytes | memoryview
Message = Sequence[Part]


def cost(n: int) -> int:
    """Kernel buffer bytes a message of ``n`` bytes may take (payload plus overhead)."""
    return n + (n >> 4) + 2048


def size_sndbuf(sock: socket.socket, want: int) -> int:
    """Set SO_SNDBUF to ``want`` bytes; the value the kernel uses (it doubles the request).

    An unprivileged request is capped at ``net.core.wmem_max``; with
    CAP_NET_ADMIN, SO_SNDBUFFORCE passes the cap.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
    got: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if got < want:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
        except OSError:
            pass
        else:
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return got


class Channel:
    """One consumer socket: whole messages, a bounded queue, the overload policy.

    ``on_closed(channel, why)`` is called once when the channel closes, for
    any reason (``why`` is None when the owner closed it).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        limit: int,
        headroom: int,
        overload: str = "drop",
        max_wait: float = 2.0,
        sndbuf: int = 4 << 20,
        on_closed: Callable[[Channel, str | None], None] | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.limit = limit
        self.low = limit // 2
        self.headroom = headroom
        self.wait = overload == "wait"
        self.max_wait = max_wait
        self.on_closed = on_closed
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.sndbuf = size_sndbuf(sock, sndbuf)
        self._room = self.sndbuf  # kernel buffer bytes believed free (re-read when short)
        self._outq = array.array("i", [0])
        self._queue: collections.deque[tuple[Message, int]] = collections.deque()
        self.queued = 0  # bytes in _queue
        self._writing = False  # waiting for the socket to be writable
        self._drained: asyncio.Future[None] | None = None  # ``drain`` waits on it
        self.closed = False
        self._held: dict[Flow, None] = {}
        self._wait_start = 0.0
        self._wait_timer: asyncio.TimerHandle | None = None
        self.lapsed = False  # behind past max_wait: DATA is dropped until it catches up
        self.dropped_last = False  # the last ``data`` call dropped its message
        # stats
        self.events_sent = 0
        self.bytes_sent = 0
        self.partial_sends = 0
        self.wait_seconds = 0.0
        self.wait_timeouts = 0
        self.drops: dict[str, int] = {}
        self.dropped_bytes: dict[str, int] = {}
        self.loop.add_reader(self.fd, self._readable)

    # -- the owner's calls --------------------------------------------------------------

    def data(self, flow: Flow, msg: Message, n: int) -> bool:
        """Send or queue one DATA message of ``n`` bytes for ``flow``; False: dropped whole.

        ``msg`` is (header, body). Under ``wait`` a flow that fills the queue is held.
        """
        self.dropped_last = False
        ready = self._ready()
        if ready is None:
            return False
        if ready and self._send(msg, n):
            return True
        # Like a transport's high-water mark: a queue under ``limit`` takes one more
        # message, so it holds at most ``limit`` plus one message.
        queued = self.queued
        if self.wait and not self.lapsed:
            if queued < 2 * self.limit:
                self._enqueue(msg, n)
                if self.queued > self.limit:
                    self._hold(flow)
                return True
        elif queued < self.limit:
            self._enqueue(msg, n)
            return True
        self.dropped_last = True
        self.drop(MAX_WAIT if self.lapsed else BUFFER_FULL, n - len(msg[0]))
        return False

    def data_nowait(self, msg: Message, n: int) -> bool:
        """DATA that nothing can hold (a UDP datagram): sent, queued or dropped, never waited on."""
        ready = self._ready()
        if ready is None:
            return False
        if ready and self._send(msg, n):
            return True
        if self.queued < self.limit:
            self._enqueue(msg, n)
            return True
        self.drop(BUFFER_FULL, n - len(msg[0]))
        return False

    def control(self, msg: bytes) -> bool:
        """Send or queue a CREATED or DESTROYED; past the headroom the consumer is dropped."""
        n = len(msg)
        ready = self._ready()
        if ready is None:
            return False
        if ready and self._send((msg,), n):
            return True
        if self.queued + n > self.limit + self.headroom:
            self.drop(OVERFLOW, 0)
            log.warning("%s: consumer cannot keep up; disconnecting it", self.name)
            self.close(OVERFLOW)
            return False
        self._enqueue((msg,), n)
        return True

    def forget(self, flow: Flow) -> None:
        """``flow`` ended: it is no longer held by this consumer."""
        if flow in self._held:
            del self._held[flow]
            flow.release(self)

    def drop(self, reason: str, payload: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if payload:
            self.dropped_bytes[reason] = self.dropped_bytes.get(reason, 0) + payload

    def in_kernel(self) -> int:
        """Bytes (with the kernel's overhead) sent but not yet read by the consumer."""
        if self.closed:
            return 0
        fcntl.ioctl(self.fd, termios.TIOCOUTQ, self._outq, True)
        return self._outq[0]

    @property
    def waiting(self) -> bool:
        return bool(self._held)

    def waited(self) -> float:
        """Seconds this consumer has held flows, a hold in progress included."""
        held = time.monotonic() - self._wait_start if self._held else 0.0
        return self.wait_seconds + held

    async def drain(self, timeout: float) -> None:
        """Wait until everything queued is sent (or ``timeout`` passes)."""
        if not self._queue or self.closed:
            return
        if self._drained is None:
            self._drained = self.loop.create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)

    def _wake_drain(self) -> None:
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    def close(self, why: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self._release_all()
        self._queue.clear()
        self.queued = 0
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
            self._writing = False
        self.sock.close()
        self._wake_drain()
        if self.on_closed is not None:
            self.on_closed(self, why)

    # -- sending ------------------------------------------------------------------------

    def _send(self, msg: Message, n: int) -> bool:
        """Send one message now if the kernel has room for all of it; False: not sent.

        In the rare case the kernel takes only part, the rest is queued in front.
        """
        need = cost(n)
        if need > self._room:
            fcntl.ioctl(self.fd, termios.TIOCOUTQ, self._outq, True)
            self._room = self.sndbuf - self._outq[0]
            if need > self._room:
                return False
        try:
            sent = self.sock.sendmsg(msg)
        except BlockingIOError:
            self._room = 0
            return False
        except OSError as exc:
            self._failed(exc)
            return True  # gone with the consumer
        self._room -= need
        self.bytes_sent += sent
        if sent == n:
            self.events_sent += 1
        else:  # should not happen (see the module docstring); keep the stream framed
            self.partial_sends += 1
            log.warning("%s: the kernel took %d of a %d-byte message", self.name, sent, n)
            self._queue.appendleft((_rest(msg, sent), n - sent))
            self.queued += n - sent
            self._want_write()
        return True

    def _enqueue(self, msg: Message, n: int) -> None:
        self._queue.append((msg, n))
        self.queued += n
        self._want_write()

    def _ready(self) -> bool | None:
        """True: nothing waits to be sent (after sending what has room now); None: closed.

        epoll reports the socket writable only once three quarters of its
        buffer are free; a consumer that reads steadily frees room long before
        that, so a message that arrives while others wait first tries to move
        them (one SIOCOUTQ read when they do not fit).
        """
        if self._queue:
            self._writable()
        if self.closed:
            return None
        return not self._queue

    def _want_write(self) -> None:
        if not self._writing and not self.closed:
            self._writing = True
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        queue = self._queue
        while queue and not self.closed:
            msg, n = queue[0]
            self.queued -= n
            queue.popleft()
            if not self._send(msg, n):
                queue.appendleft((msg, n))
                self.queued += n
                break
        if self.closed:
            return
        if not queue and self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
            self._wake_drain()
        if self.queued <= self.low:
            if self._held:
                self._release_all()
            self.lapsed = False

    # -- the "wait" policy ---------------------------------------------------------------

    def _hold(self, flow: Flow) -> None:
        held = self._held
        if flow in held:
            return
        if not held:
            self._wait_start = time.monotonic()  # the loop's clock may be in whole ms
            self._wait_timer = self.loop.call_later(self.max_wait, self._lapse)
        held[flow] = None
        flow.hold(self)

    def _lapse(self) -> None:
        """Still behind after ``max_wait``: let the flows go; drop DATA until caught up."""
        self._wait_timer = None
        if not self._held:
            return
        self.lapsed = True
        self.wait_timeouts += 1
        log.warning(
            "%s: consumer behind for %.1fs (max_wait); its flows go on and lose export data "
            "until it catches up",
            self.name,
            self.max_wait,
        )
        self._release_all()

    def _release_all(self) -> None:
        held = self._held
        if not held:
            return
        self._held = {}
        self.wait_seconds += time.monotonic() - self._wait_start
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        for flow in held:
            flow.release(self)

    # -- the peer -------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._failed(exc)
            return
        if not data:
            self.close("closed by the consumer")

    def _failed(self, exc: OSError) -> None:
        why = errno.errorcode.get(exc.errno or 0, str(exc))
        self.close(why)


class Totals:
    """The counters of readers that have left, folded into one."""

    __slots__ = ("bytes_sent", "dropped_bytes", "drops", "events_sent", "partial_sends", "waited")

    def __init__(self) -> None:
        self.events_sent = 0
        self.bytes_sent = 0
        self.partial_sends = 0
        self.waited = 0.0
        self.drops: dict[str, int] = {}
        self.dropped_bytes: dict[str, int] = {}

    def add(self, ch: Channel) -> None:
        self.events_sent += ch.events_sent
        self.bytes_sent += ch.bytes_sent
        self.partial_sends += ch.partial_sends
        self.waited += ch.wait_seconds
        for k, v in ch.drops.items():
            self.drops[k] = self.drops.get(k, 0) + v
        for k, v in ch.dropped_bytes.items():
            self.dropped_bytes[k] = self.dropped_bytes.get(k, 0) + v

    def copy(self) -> Totals:
        t = Totals()
        t.events_sent, t.bytes_sent = self.events_sent, self.bytes_sent
        t.partial_sends, t.waited = self.partial_sends, self.waited
        t.drops, t.dropped_bytes = dict(self.drops), dict(self.dropped_bytes)
        return t


def _rest(msg: Message, sent: int) -> list[Part]:
    """What is left of ``msg`` after its first ``sent`` bytes."""
    out: list[Part] = []
    for part in msg:
        n = len(part)
        if sent >= n:
            sent -= n
            continue
        out.append(memoryview(part)[sent:] if sent else part)
        sent = 0
    return out


__all__ = ["OVERLOAD_POLICIES", "Channel", "Totals", "cost", "size_sndbuf"]
