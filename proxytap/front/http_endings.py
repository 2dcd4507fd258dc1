"""How a forwarded client connection ends: the proxy's own answers, lingering, timers.

``HttpForwarder`` (``http_forward``) is the client connection's protocol;
this base class holds its endings: the proxy's own error response (counted
by status class, then close), a refused request, the lingering close after a
final answer (so an RST does not destroy it), the close and teardown of the
connection with every upstream connection and flow it owns, and the keep-alive
and idle timers. The state is the forwarder's (set up in its ``__init__``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from proxytap.errors import ProtocolError
from proxytap.flows.table import CloseReason, Connection
from proxytap.front.authn import Throttled
from proxytap.front.http_client import RequestReader
from proxytap.front.http_exchange import (
    LINGER,
    ClientOut,
    ClientPhase,
    Exchange,
    log_access,
    response_keys,
)
from proxytap.front.http_upstream import UpstreamConnection
from proxytap.front.relay import reset
from proxytap.front.replies import http_error
from proxytap.hostport import hostport
from proxytap.modules.api import Context
from proxytap.modules.chain import Chain

if TYPE_CHECKING:
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front.http")

_HTTP = ClientPhase.HTTP
_TUNNEL = ClientPhase.TUNNEL
_LINGER = ClientPhase.LINGER
_CLOSED = ClientPhase.CLOSED


class HttpEndings(asyncio.Protocol):
    """The ending half of ``HttpForwarder``."""

    services: Services
    conn: Connection
    transport: asyncio.Transport
    chain: Chain
    modules: bool
    loop: asyncio.AbstractEventLoop
    out: ClientOut
    reader: RequestReader
    phase: ClientPhase
    queue: deque[Exchange]
    idle: dict[tuple[str, int], UpstreamConnection]
    upstreams: set[UpstreamConnection]
    tunnel: UpstreamConnection | None
    tunnel_ctx: Context | None
    broken: ProtocolError | None
    client_eof: bool
    keepalive: float
    idle_timeout: float
    seen: int
    active_at: float
    idle_since: float
    timer: asyncio.TimerHandle | None

    if TYPE_CHECKING:  # the forwarder's own, called from here

        def _end(self, req: Exchange) -> None: ...

        def _timed(self, req: Exchange) -> None: ...

        def update_reading(self) -> None: ...

    # -- errors and endings ---------------------------------------------------------

    def reply(
        self,
        req: Exchange | None,
        status: int,
        reason: str,
        proxy_status: str,
        retry_after: int | None = None,
    ) -> None:
        """Answer with the proxy's own error response, then close."""
        if self.phase is _CLOSED or self.phase is _LINGER:
            return
        self.out.flush()
        self.services.stats.http_responses[
            response_keys(self.conn.listener, "proxy")[status // 100]
        ] += 1
        include_body = req is None or not req.is_head
        config = self.services.config
        self.transport.write(
            http_error(
                config,
                status,
                reason,
                proxy_status,
                include_body=include_body,
                retry_after=retry_after,
            )
        )
        self._linger()

    def _reply_error(self, err: ProtocolError) -> None:
        if isinstance(err, Throttled):  # logged once a window (auth_throttled)
            self.reply(None, err.status, err.reason, err.proxy_status, err.retry_after)
            return
        log.info("http %s refused: %s", hostport(*self.conn.client), err.reason)
        if err.status != 407:
            self.services.stats.protocol_errors[(self.conn.listener, "http")] += 1
        self.reply(None, err.status, err.reason, err.proxy_status)

    def request_error(self, err: ProtocolError) -> None:
        """The client broke HTTP (or asked for something we refuse): the reader's call."""
        req = self.reader.cut()
        if req is not None:
            self._end(req)
        if req is not None and self.queue and req is not self.queue[0]:
            self.queue.remove(req)  # a pipelined request that never started
            req = None
        if req is not None:
            # the active request, cut off in its body
            up = req.upstream
            self.queue.popleft()
            if up is not None:
                up.close(CloseReason.ERROR)
            if req.responded:
                self._close(CloseReason.NORMAL)
                return
            self.queue.clear()
        self.broken = err
        if not self.queue:
            self._reply_error(err)

    def _linger(self) -> None:
        """Our last response is written: half-close, drain the client briefly, then close."""
        if self.phase is _CLOSED or self.phase is _LINGER:
            return
        self.phase = _LINGER
        self.out.flush()
        for up in list(self.upstreams):
            up.close(CloseReason.NORMAL)
        transport = self.transport
        if self.client_eof or not transport.can_write_eof():
            self._close(CloseReason.NORMAL)
            return
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()
        self.update_reading()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(LINGER, self._close, CloseReason.NORMAL)

    def _close(self, reason: CloseReason, reset_client: bool = False) -> None:
        if self.phase is _CLOSED:
            return
        self.out.flush()
        transport = self.transport
        self._teardown(reason)
        if reset_client:
            reset(transport)
        elif not transport.is_closing():
            transport.close()

    def _teardown(self, reason: CloseReason) -> None:
        """The client connection is over: close every upstream and flow, once."""
        if self.phase is _CLOSED:
            return
        self.phase = _CLOSED
        self.out.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for up in list(self.upstreams):
            up.close(reason if up.req is not None else CloseReason.NORMAL)  # idle ones: NORMAL
        self.idle.clear()
        if self.modules:
            for req in self.queue:
                self._end(req)
            if self.tunnel_ctx is not None:
                self.chain.on_close(self.tunnel_ctx)
        self.queue.clear()
        self.services.table.close_connection(self.conn)
        self.services.live.discard(self)
        # Let go of what refers back to this object: the reader (and its parser's
        # callbacks), an upstream (its ``fwd``) through the WebSocket relay. Cycles
        # are freed only by the cyclic collector, and rarely (app.py).
        self.reader.close()
        self.tunnel = None

    def _tick(self) -> None:
        self.timer = None
        if self.phase is _CLOSED or self.phase is _LINGER:
            return
        now = self.loop.time()
        activity = self.out.activity
        if activity != self.seen:
            self.seen = activity
            self.active_at = now
        busy = self.tunnel is not None or bool(self.queue)
        # busy: no bytes for ``idle``; else between requests (or a head arriving slowly)
        deadline = self.active_at + self.idle_timeout if busy else self.idle_since + self.keepalive
        if now >= deadline:
            self._timed_out(busy)
            return
        step = min(deadline - now, self.keepalive)
        self.timer = self.loop.call_later(step, self._tick)

    def _timed_out(self, busy: bool) -> None:
        if not busy:
            log.debug("http %s keep-alive timeout", hostport(*self.conn.client))
            self._close(CloseReason.NORMAL)
            return
        req = self.queue[0] if self.queue else None
        if req is not None and not req.responded and req.done:
            up = req.upstream
            if up is not None:
                up.close(CloseReason.TIMEOUT)
            self.queue.popleft()
            self._timed(req)
            log_access(self.conn.client, req, self.loop.time())
            self._end(req)
            self.reply(req, 504, "the destination did not answer in time", "http_response_timeout")
            return
        self._close(CloseReason.TIMEOUT)
