"""Plain HTTP/1.x forwarding: absolute-form requests, each routed by its own URL.

``ClientConnection`` hands over the client's connection once it has read a
request head that is not CONNECT. From then on ``HttpForwarder`` (the client
transport's protocol) has its ``RequestReader`` (``http_client``) parse the
requests with httptools (llhttp, strict) and sends each one, in origin-form,
over an ``UpstreamConnection`` (``http_upstream``) to the host in its URL.
Upstream connections belong to the client connection: an idle one is kept per
``(host, port)`` (at most ``MAX_IDLE_UPSTREAMS``) and reused, and all of them
close with the client connection. Each upstream connection is one inner flow
in the flow table, tapped like a tunnel: UP is exactly what the proxy wrote to
the origin (the rewritten head, the body as framed), DOWN exactly what the
origin sent. Framing decisions are ``proxytap.proto.http1``'s.

This module is the client connection: the queue of exchanges, credentials,
dispatch to upstream connections, the end of each exchange, the proxy's own
answers, timers and the close.

Decisions (heads and bodies: ``http_client``; responses: ``http_response``)
    * Policy: ``Services.open`` judges every destination with the
      connection's user; with authentication configured every request needs
      ``Proxy-Authorization`` (407 otherwise), checked once per value. A 407
      to a request read whole (its body, up to ``DRAIN_MAX``, read and
      dropped) keeps the connection for the client's retry with credentials;
      a chunked, larger or ``Expect: 100-continue`` body is not waited for:
      answered at once, then closed.
    * Modules: ``on_connect`` and the request hooks run when a request becomes
      active. A refusal or module error before the response answers with its
      status (500 for errors) and closes; after it, the connection is closed.
    * HTTP/1.0 clients get HTTP/1.1 answers and a close after each (RFC 9112
      section 9.3); so does a response that starts before its request is
      complete, and that upstream connection closes too.
    * Pipelining: requests are answered in order, one at a time; once a
      request beyond the active one has been read, the client is not read.
    * CONNECT after earlier requests: once they are answered, the connection
      goes to the CONNECT handshake (``ClientConnection.after_requests``) as
      if the CONNECT had been its first request; the upstream connections
      close normally. Nothing is read past the CONNECT head until then.
    * WebSocket: on 101 the connection becomes a raw relay both ways (the same
      flow, still tapped); client bytes sent before the 101 are held.
    * Errors: connect failures answer ``Failure.http_status``; an origin that
      ends before a final head 502 ``http_response_incomplete``; an invalid
      response 502 ``http_protocol_error``; no bytes for ``timeouts.idle``
      504. Once part of a response was sent, the client is just closed (reset
      when the origin reset). After an error reply or a ``Connection: close``
      response the client is half-closed and drained for ``LINGER`` seconds,
      so unread request bytes do not turn the close into a reset.
    * Backpressure: a write buffer past ``limits.write_buffer_high`` pauses
      reading on the transport that feeds it, both ways; so does an export
      consumer behind under ``wait``.
    * Logs: one line per request on ``proxytap.access``; ``up`` / ``down``
      count what went to and came from the origin for it, as the flow does.
    * Performance: protocol callbacks only; a task exists only while a new
      upstream connection is made (or credentials are first checked). Writes
      made while one read is handled are joined and written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from proxytap.errors import ProtocolError
from proxytap.flows.stats import observe
from proxytap.flows.table import CloseReason, Connection
from proxytap.front.http_client import RequestReader
from proxytap.front.http_endings import HttpEndings
from proxytap.front.http_exchange import (
    LINGER,
    MAX_IDLE_UPSTREAMS,
    ClientOut,
    ClientPhase,
    Exchange,
    UpPhase,
    local_answer,
    log_access,
    refusal,
    response_keys,
)
from proxytap.front.http_upstream import UpstreamConnection
from proxytap.front.replies import http_error
from proxytap.hostport import hostport
from proxytap.logstream import access
from proxytap.modules.api import Context

if TYPE_CHECKING:
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front.http")

__all__ = ["LINGER", "MAX_IDLE_UPSTREAMS", "HttpForwarder"]

_HTTP = ClientPhase.HTTP
_TUNNEL = ClientPhase.TUNNEL
_LINGER = ClientPhase.LINGER
_CLOSED = ClientPhase.CLOSED
_UP_IDLE = UpPhase.IDLE
_UP_READY = UpPhase.IDLE  # phases from here on: connected
# the ``method`` label of request latencies: few values, so few series
METHOD_CLASSES = {b"GET": "GET", b"POST": "POST"}
OTHER = "other"


class HttpForwarder(HttpEndings):
    """The client connection's protocol once it forwards plain HTTP."""

    def __init__(self, services: Services, conn: Connection, transport: asyncio.Transport) -> None:
        self.services = services
        self.conn = conn
        self.transport = transport
        cfg = services.config
        self.high_water = cfg.limits.write_buffer_high
        self.keepalive = cfg.timeouts.http_keepalive
        self.idle_timeout = cfg.timeouts.idle
        self.chain = chain = services.chains[conn.listener]
        # what an OPTIONS with Max-Forwards: 0 is told we forward (CONNECT is no forwarding)
        self.allow = ", ".join(m for m in cfg.http.methods if m != "CONNECT").encode("ascii")
        self.modules = chain.active  # any module beyond the fused built-ins
        self.loop = asyncio.get_running_loop()
        self.out = ClientOut(transport)
        self.reader = RequestReader(self, services, conn)
        self.phase = _HTTP
        self.queue: deque[Exchange] = deque()  # parsed, not yet answered; [0] is active
        self.idle: dict[tuple[str, int], UpstreamConnection] = {}
        self.upstreams: set[UpstreamConnection] = set()
        self.tunnel: UpstreamConnection | None = None  # WebSocket after 101
        self.tunnel_ctx: Context | None = None  # its modules' context
        self.held = b""  # client bytes read but not parsed (after an upgrade request)
        self.connect_data: bytes | None = None  # a CONNECT head and what followed it
        self.broken: ProtocolError | None = None  # answer once the queue is done, then close
        self.reading = True
        self.client_blocked = False  # our write buffer to the client is full
        self.client_eof = False
        self.draining = False
        self.seen = 0
        self.active_at = self.loop.time()
        self.idle_since = self.active_at
        self.timer: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        return self.phase is _CLOSED

    # -- life cycle -----------------------------------------------------------------

    def start(self, initial: bytes) -> None:
        """Take over the client connection; ``initial`` is everything read so far."""
        self.services.live.add(self)
        self.transport.set_write_buffer_limits(high=self.high_water)
        self.timer = self.loop.call_later(min(self.keepalive, self.idle_timeout), self._tick)
        if initial:
            self.data_received(initial)

    def shutdown(self, force: bool) -> None:
        """Proxy shutdown: close now if ``force`` or idle, else after the current response."""
        if self.phase is _CLOSED:
            return
        if force:  # still mid-exchange after the grace: reset both sides, say why
            self._close(CloseReason.SHUTDOWN, reset_client=True)
            return
        self.draining = True
        if self.tunnel is None and not self.queue and not self.reader.in_head:
            self._close(CloseReason.NORMAL)

    # -- client transport callbacks -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is not _HTTP:
            if phase is _TUNNEL:
                self.out.activity += 1
                self._tunnel_up(data)
            return  # lingering: drained and dropped
        self.out.activity += 1
        if self.connect_data is not None:  # not HTTP any more: the tunnel's first bytes
            self.connect_data += data
        elif self.broken is None:
            self._process(data)

    def eof_received(self) -> bool:
        phase = self.phase
        if phase is _CLOSED:
            return False
        self.client_eof = True
        if phase is _TUNNEL:
            tunnel = self.tunnel
            assert tunnel is not None
            if tunnel.eof:
                self._close(CloseReason.NORMAL)
                return False
            tunnel.write_eof()
            return True
        if phase is _LINGER:
            self._close(CloseReason.NORMAL)
            return False
        reader = self.reader
        if reader.in_head or reader.parsing is not None:
            # a request cut short can never complete
            active = self.queue[0] if self.queue else None
            if active is not None and active is reader.parsing and active.upstream is not None:
                active.upstream.close(CloseReason.NORMAL)
            self._close(CloseReason.NORMAL)
            return False
        if not self.queue:
            self._close(CloseReason.NORMAL)
            return False
        return True  # answer what was asked, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown(CloseReason.RESET if exc is not None else CloseReason.NORMAL)

    def pause_writing(self) -> None:
        self._client_writable(False)

    def resume_writing(self) -> None:
        self._client_writable(True)

    def _client_writable(self, writable: bool) -> None:
        """The client's write buffer passed the high-water mark, or drained: the feed follows."""
        self.client_blocked = not writable
        up = self.tunnel
        if up is None and self.queue:
            up = self.queue[0].upstream
        if up is not None:
            up.set_reading(writable)

    # -- reading requests (the reader's calls) --------------------------------------

    def _process(self, data: bytes) -> None:
        """Parse what the client sent; what that writes upstream goes out once, at the end."""
        out = self.out
        out.ucork = True
        try:
            self.reader.feed(data)
        finally:
            out.ucork = False
        dirty = out.dirty
        if dirty:
            out.dirty = []
            for up in dirty:
                up.flush()
        if self.phase is not _CLOSED:
            if self.connect_data is not None and not self.queue and self.broken is None:
                self._to_tunnel()
                return
            self.update_reading()

    def request_head(self, req: Exchange) -> None:
        """A request head was read (the reader's call): queue it, start it if first."""
        if self.phase is not _HTTP:
            return  # answered locally and closing, in this very read: not served
        queue = self.queue
        queue.append(req)
        if len(queue) == 1:
            self._dispatch(req)

    def send_up(self, req: Exchange, data: bytes) -> None:
        """Framed request body bytes (the reader's call): upstream, or kept until connected."""
        if req.local:
            return  # answered by the proxy: its body (if any) is read and dropped
        up = req.upstream
        if up is not None and up.req is req and up.phase >= _UP_READY:
            up.send(data)
        else:
            req.pending.append(data)

    def connect_request(self, data: bytes) -> None:
        """A CONNECT head and what followed it (the reader's call): a tunnel, once idle."""
        self.connect_data = data

    def hold(self, rest: bytes) -> None:
        """Bytes after a WebSocket request head: kept unparsed until it is answered."""
        self.held += rest

    def head_late(self) -> None:
        """A head did not arrive within ``timeouts.handshake`` (the reader's timer)."""
        if self.phase is _HTTP and self.broken is None:
            log.info("http %s: request head too slow", hostport(*self.conn.client))
            self.request_error(refusal("the request head did not arrive in time", 408))
            self.update_reading()

    def authenticated(self, req: Exchange) -> None:
        """``req``'s credentials are good (the reader's call): send it, if it is active."""
        if self.queue and self.queue[0] is req and req.upstream is None:
            self._dispatch_safely(req)
            self.update_reading()

    def unauthenticated(self, req: Exchange, err: ProtocolError) -> None:
        """``req``'s credentials are bad (the reader's call): refused.

        A 407 to a request whose body can be read whole is answered once it is
        (a local answer) and the connection kept; else it is answered, then
        the connection closes. Requests queued before it are answered first.
        """
        req.auth_pending = False
        if (
            err.status == 407
            and req.upstream is None
            and req in self.queue
            and self.phase is _HTTP
            and req.drainable()
        ):
            req.local = True
            req.denial = err
            req.pending = []  # body bytes read meanwhile: dropped
            if req.done and self.queue[0] is req:
                self._answer_locally(req)
            return
        if req in self.queue:
            if req.upstream is not None:
                req.upstream.close(CloseReason.ERROR)
            self.queue.remove(req)
        self._refuse(req, err)

    # -- sending requests -----------------------------------------------------------

    def _dispatch(self, req: Exchange, fresh: bool = False) -> None:
        """Make ``req`` the active request: find or open its upstream connection.

        Raises ``ProtocolError`` when a module refuses or fails (``prepare``).
        """
        if req.auth_pending:
            return  # _authenticate dispatches it
        if req.local:
            if req.done:  # else once it is (``local_done``)
                self._answer_locally(req)
            return
        if not req.prepared:
            self.reader.prepare(req)
        to = req.to
        up = None if fresh else self.idle.pop((to.host, to.port), None)
        if up is None:
            up = UpstreamConnection(self, self.out, to.host, to.port)
            self.upstreams.add(up)
            up.task = self.services.tasks.spawn(up.connect())
        up.take(req)
        if up.phase is _UP_IDLE:
            up.start(req, self.client_blocked)

    def _dispatch_safely(self, req: Exchange) -> None:
        """``_dispatch`` outside a parser callback: a module refusal is answered here."""
        try:
            self._dispatch(req)
        except ProtocolError as err:
            self.queue.clear()  # the active request: the connection closes after the answer
            self._refuse(req, err)

    def _refuse(self, req: Exchange, err: ProtocolError) -> None:
        """``req`` (nothing of it sent upstream) is refused: answered once the queue is empty."""
        if self.reader.parsing is req:
            self.reader.parsing = None
        self._end(req)
        self.broken = err
        if not self.queue:
            self._reply_error(err)

    def _timed(self, req: Exchange) -> None:
        """``req`` was answered (the origin's response ended, or the proxy's): its latency."""
        key = (self.conn.listener, METHOD_CLASSES.get(req.method, OTHER))
        observe(self.services.stats.http_seconds, key, time.monotonic() - req.began)

    def _end(self, req: Exchange) -> None:
        """The exchange of ``req`` is over: the modules' on_close, once."""
        ctx = req.ctx
        if ctx is not None and not ctx.closed:
            self.chain.on_close(ctx)

    def update_reading(self) -> None:
        """Read the client unless what it sent cannot go anywhere yet."""
        phase = self.phase
        if phase is _LINGER:
            want = True
        elif phase is _TUNNEL:
            tunnel = self.tunnel
            want = tunnel is not None and not (tunnel.blocked or tunnel.export_held)
        else:
            queue = self.queue
            if not queue:
                want = True
            elif (
                len(queue) > 1
                or self.reader.in_head
                or self.held
                or queue[0].websocket
                or self.connect_data is not None
            ):
                # a pipelined request waits, read but not started, or what follows a
                # WebSocket handshake is not HTTP: read no more until it is answered
                want = False
            else:
                req = queue[0]
                up = req.upstream
                # done: only notice a client that goes away, or its next request
                # local: its body is read and dropped
                want = (
                    req.done
                    or req.local
                    or (
                        up is not None
                        and up.phase >= _UP_READY
                        and not (up.blocked or up.export_held)
                    )
                )
        if want is not self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- the upstream connections' calls ----------------------------------------------

    def upstream_ready(self, up: UpstreamConnection, req: Exchange) -> None:
        """``up`` is connected: send its request."""
        up.start(req, self.client_blocked)
        self.update_reading()

    def upstream_gone(self, up: UpstreamConnection, was_idle: bool) -> None:
        """``up`` closed: it is no longer one of ours, nor kept idle."""
        self.upstreams.discard(up)
        if was_idle and self.idle.get(up.key) is up:
            del self.idle[up.key]

    def keeps(self, req: Exchange) -> bool:
        """Whether the connection stays open after the response to ``req`` (our answer)."""
        return req.keep_alive and req.done and not self.draining and not self.services.draining

    def retry(self, req: Exchange) -> bool:
        """Send ``req`` again on a new connection, if it is still the active request."""
        if self.phase is _CLOSED or not self.queue or self.queue[0] is not req:
            return False
        req.retried = True
        req.upstream = None
        self._dispatch(req, fresh=True)
        return True

    def local_done(self, req: Exchange) -> None:
        """A request the proxy answers itself was read whole (the reader's call)."""
        if self.phase is _HTTP and self.queue and self.queue[0] is req and not req.auth_pending:
            self._answer_locally(req)

    def _answer_locally(self, req: Exchange) -> None:
        """A request read whole that the proxy answers: 407 (credentials missing or
        wrong), or 200 (OPTIONS / TRACE with ``Max-Forwards: 0``); then the next one."""
        keep = req.keep = self.keeps(req)
        err = req.denial
        if err is not None:
            log.info("http %s refused: %s", hostport(*self.conn.client), err.reason)
            req.status = err.status
            answer = http_error(
                self.services.config,
                err.status,
                err.reason,
                err.proxy_status,
                include_body=not req.is_head,
                close=not keep,
            )
        else:
            req.status = 200
            answer = local_answer(req, self.allow, keep)
        req.responded = True
        keys = response_keys(self.conn.listener, "proxy")
        self.services.stats.http_responses[keys[req.status // 100]] += 1
        self.out.write(answer)
        now = self.loop.time()
        self.idle_since = now
        self.out.activity += 1
        self.queue.popleft()
        self._timed(req)
        if access.enabled():
            log_access(self.conn.client, req, now)
        self._answered(keep)

    def response_done(self, up: UpstreamConnection, req: Exchange, reusable: bool) -> None:
        """The response to ``req`` was relayed completely."""
        now = self.loop.time()
        self.idle_since = now
        self.out.activity += 1
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        self._timed(req)
        if access.enabled():
            log_access(self.conn.client, req, now)
        if req.ctx is not None:
            self._end(req)
        if self.phase is _CLOSED:
            return
        if reusable and self.phase is not _LINGER:
            up.park()
            idle = self.idle
            idle[up.key] = up
            if len(idle) > MAX_IDLE_UPSTREAMS:
                idle.pop(next(iter(idle))).close(CloseReason.NORMAL)
        else:
            up.close(CloseReason.NORMAL)
        self._answered(req.keep)

    def _answered(self, keep: bool) -> None:
        """The active request was answered: close, or go on with what comes next."""
        if not keep:
            self._linger()
        elif (
            self.queue
            or self.held
            or self.broken is not None
            or self.client_eof
            or self.connect_data is not None
        ):
            self._next()
        elif self.draining or self.services.draining:
            self._close(CloseReason.NORMAL)
        elif not self.reading:
            self.update_reading()

    def _next(self) -> None:
        """Start the next queued request, or answer a refusal, or parse what is held."""
        if self.queue:
            self._dispatch_safely(self.queue[0])
            if self.phase is not _CLOSED:
                self.update_reading()
        elif self.broken is not None:
            self._reply_error(self.broken)
        elif self.connect_data is not None:
            self._to_tunnel()
        elif self.client_eof:
            self._close(CloseReason.NORMAL)
        elif self.held:
            held = self.held
            self.held = b""
            self._process(held)

    def upstream_failed(self, up: UpstreamConnection, req: Exchange, reason: CloseReason) -> None:
        """``up`` failed while serving ``req``: connect failed, closed early, or broke HTTP."""
        if self.phase is _CLOSED or not self.queue or self.queue[0] is not req:
            return
        self.queue.popleft()
        if not req.responded:
            req.status = up.error[0]  # the access line shows the proxy's own answer
        self._timed(req)
        log_access(self.conn.client, req, self.loop.time())
        self._end(req)
        if not req.responded:
            status, why, proxy_status = up.error
            self.reply(req, status, why, proxy_status)
            return
        self.out.flush()
        self._close(reason, reset_client=reason is CloseReason.RESET)

    # -- CONNECT after earlier requests ------------------------------------------------

    def _to_tunnel(self) -> None:
        """Every request before the CONNECT is answered: the handshake takes the connection.

        The upstream connections close normally; the flow-table connection stays
        open (the handshake, then the tunnel, close it).
        """
        from proxytap.front.handshake import ClientConnection

        data = self.connect_data
        assert data is not None
        self.connect_data = None
        self.out.flush()
        self.phase = _CLOSED  # late upstream callbacks find this forwarder gone
        self.out.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for up in list(self.upstreams):
            up.close(CloseReason.NORMAL)
        self.idle.clear()
        self.services.live.discard(self)
        self.reader.close()
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()
        ClientConnection.after_requests(
            self.services, self.conn, self.transport, data, self.client_eof
        )

    # -- WebSocket: after a 101, bytes go through unparsed ----------------------------

    def upgrade(self, up: UpstreamConnection, rest: bytes) -> None:
        """101 relayed: from now on bytes go through unparsed, both ways."""
        self.tunnel = up
        self.phase = _TUNNEL
        req = self.queue.popleft() if self.queue else None
        if req is not None:
            self._timed(req)  # its response ends with the 101 head
            log_access(self.conn.client, req, self.loop.time())
            self.tunnel_ctx = req.ctx  # its on_close runs when the tunnel ends
        if rest:
            self.out.write(rest)
        held = self.held
        self.held = b""
        if held:
            self.data_received(held)
            if self.phase is _CLOSED:
                return
        up.set_reading(not self.client_blocked)
        self.update_reading()

    def _tunnel_up(self, data: bytes) -> None:
        tunnel = self.tunnel
        assert tunnel is not None
        if self.tunnel_ctx is not None and self.chain.c2s_data:
            try:
                data = self.chain.client_to_server(self.tunnel_ctx, data)
            except ProtocolError:  # logged and counted by the chain
                self._close(CloseReason.ERROR)
                return
        tunnel.write(data)

    def tunnel_down(self, data: bytes) -> None:
        """Origin bytes after the 101 (the upstream connection's call)."""
        ctx = self.tunnel_ctx
        if ctx is not None and self.chain.s2c_data:
            try:
                data = self.chain.server_to_client(ctx, data)
            except ProtocolError:  # logged and counted by the chain
                self._close(CloseReason.ERROR)
                return
        self.out.write(data)

    def tunnel_eof(self) -> bool:
        """The origin half-closed the WebSocket relay: pass it on (or close, both done)."""
        self.out.flush()
        if self.client_eof:
            self._close(CloseReason.NORMAL)
            return False
        if self.transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()
        return True

    def tunnel_lost(self, reason: CloseReason, was_reset: bool) -> None:
        self._close(reason, reset_client=was_reset)
