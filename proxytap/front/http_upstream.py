"""One upstream connection of a forwarded client connection: one inner flow.

``UpstreamConnection`` connects with ``Services.open`` (policy, resolution,
Happy Eyeballs; the address it returns is the flow's ip2), opens its flow
(``Services.open_flow``: the tap step every tunnel takes too), writes
requests (tapped as UP: exactly what the origin got) and reads responses
(tapped as DOWN: exactly what the origin sent).

Responses are read by the base class, ``ResponseReader`` (``http_response``).

Errors are kept in ``error`` (status, reason, Proxy-Status) for the
forwarder's answer. A request without a body that fails on a reused
connection before any response byte (the origin's keep-alive ran out) is
retried once on a new connection (idempotent methods only).

It talks to its forwarder through named calls only (``upstream_ready``,
``upstream_failed``, ``response_done``, ``upgrade``, ``upstream_gone``,
``keeps``, ``retry``, ``update_reading``, ``tunnel_*``) and to the client
through the shared ``ClientOut``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

import httptools

from proxytap.errors import Failure, UpstreamError, classify_os_error
from proxytap.flows.table import DOWN, UP, CloseReason, Endpoint, Flow
from proxytap.front.http_exchange import IDEMPOTENT, BadResponse, ClientOut, Exchange, UpPhase
from proxytap.front.http_response import TOO_LARGE, ResponseReader
from proxytap.front.relay import EARLY_LIMIT, PendingUpstream, reset
from proxytap.hostport import hostport
from proxytap.proto.http1 import Body

if TYPE_CHECKING:
    from proxytap.front.http_forward import HttpForwarder

log = logging.getLogger("proxytap.front.http")

# module globals: compared per chunk
_NONE = Body.NONE
_CLOSED = UpPhase.CLOSED
_IDLE = UpPhase.IDLE
_HEAD = UpPhase.HEAD
_TUNNEL = UpPhase.TUNNEL


class UpstreamConnection(ResponseReader):
    """One upstream connection of a client connection: one inner flow."""

    def __init__(self, fwd: HttpForwarder, out: ClientOut, host: str, port: int) -> None:
        super().__init__(fwd, out)
        self.conn = fwd.conn
        self.host = host
        self.port = port
        self.key = (host, port)
        self.hub = self.services.hub
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.flow: Flow | None = None  # None before the connect and once closed
        self.authority = b""  # the Host of the last request: the flow's http_host
        self.blocked = False  # our write buffer to the origin is full
        self.reading = True
        self.wanted = True  # reading as the exchange wants it, before an export hold
        self.export_held = False  # an export consumer under the "wait" policy is behind
        self.eof = False
        self.served = 0  # requests started on this connection
        self.out_chunks: list[bytes] = []
        self.is_dirty = False
        self.got = 0  # bytes received for the current request

    # -- connecting -----------------------------------------------------------------

    async def connect(self) -> None:
        try:
            transport, pending, peer = await self.services.open(
                self.host, self.port, self.conn.user, PendingUpstream, listener=self.conn.listener
            )
        except UpstreamError as exc:
            self._connect_failed(exc.failure, exc.detail, exc.message)
            return
        except Exception as exc:  # never leave the client waiting
            self._connect_failed(classify_os_error(exc), repr(exc))
            return
        finally:
            self.task = None
        if self.phase is _CLOSED or self.fwd.closed:
            transport.close()
            return
        self._attach(transport, pending, peer)

    def _attach(
        self, transport: asyncio.Transport, pending: PendingUpstream, peer: Endpoint
    ) -> None:
        """Connected: take the transport over, open the flow, start the request."""
        transport.set_protocol(self)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.services.config.limits.write_buffer_high)
        flow = self.services.open_flow(self.conn, peer, self.host, self.port, upstream=transport)
        self.flow = flow
        flow.valve = self
        early = pending.early
        self.reading = early.size < EARLY_LIMIT  # past it, ``Early`` paused the transport
        self.phase = _IDLE
        req = self.req
        if req is not None:
            self.fwd.upstream_ready(self, req)
        # what the origin did before it had a request, in order, now that there is a flow
        for data in early.chunks:
            self.data_received(data)
        if early.eof and not self.eof_received():
            transport.close()
        if pending.lost:
            self.connection_lost(pending.exc)

    def _connect_failed(self, failure: Failure, detail: str, message: str = "") -> None:
        """``message``: what the client is told (a policy refusal's rule and setting)."""
        req = self.req
        self.phase = _CLOSED
        self.task = None
        self._unhook()
        self.fwd.upstream_gone(self, False)
        message = message or failure.description
        log.info(
            "http %s -> %s connect failed: %s (%s): %s",
            hostport(*self.conn.client),
            hostport(self.host, self.port),
            failure.value,
            detail,
            message,
        )
        if req is not None:
            self.error = (failure.http_status, message, failure.value)
            self.fwd.upstream_failed(self, req, CloseReason.ERROR)

    # -- the forwarder's calls ------------------------------------------------------------

    def take(self, req: Exchange) -> None:
        """``req`` is this connection's next request (sent once connected)."""
        self.req = req
        req.upstream = self

    def start(self, req: Exchange, client_blocked: bool) -> None:
        """Send ``req`` (connected): a new response to read."""
        flow = self.flow
        if flow is not None and self.authority is not req.to.authority:
            self.authority = req.to.authority
            flow.http_host = self.authority.decode("latin-1")
        ctx = req.ctx
        if ctx is not None and flow is not None:
            ctx.server = flow.server
            ctx.flow = flow
        self.served += 1
        self.got = 0
        self.phase = _HEAD
        if self.hbuf:
            self.hbuf.clear()
        self.stray = False
        self.completed = None
        if req.http10 or self.filters:
            # chunked bodies are de-chunked for HTTP/1.0 clients and body modules: body()
            events = SimpleNamespace(on_body=self.body, **vars(self.events))
            self.parser = httptools.HttpResponseParser(events)
        self.send(req.head)
        pending = req.pending
        if pending:
            req.pending = []
            for data in pending:
                self.send(data)
        if self.reading is client_blocked:
            self.set_reading(not client_blocked)

    def park(self) -> None:
        """Idle, kept for the next request: read, to notice the origin closing it."""
        self.phase = _IDLE
        if not self.reading:
            self.set_reading(True)

    # -- writing ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write (collected while the forwarder handles one client read)."""
        out = self.out
        if out.ucork:
            self.out_chunks.append(data)
            if not self.is_dirty:
                self.is_dirty = True
                out.dirty.append(self)
        else:
            self.write(data)

    def flush(self) -> None:
        self.is_dirty = False
        chunks = self.out_chunks
        if chunks:
            self.out_chunks = []
            self.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def write(self, data: bytes) -> None:
        """Write to the origin and tap it as UP."""
        flow = self.flow
        transport = self.transport
        if flow is None or transport is None:  # not connected, or closed
            return
        transport.write(data)
        flow.bytes_up += len(data)
        flow.chunks_up += 1
        req = self.req
        if req is not None:
            req.up_bytes += len(data)
        if self.hub is not None:
            self.hub.data(flow, UP, data, time.time())

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()

    def set_reading(self, want: bool) -> None:
        self.wanted = want
        want = want and not self.export_held
        if want == self.reading or self.phase is _CLOSED or self.transport is None:
            return
        self.reading = want
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def export_hold(self, held: bool) -> None:
        """``Valve``: the export asks to pause (or resume) both sides of this flow."""
        self.export_held = held
        self.set_reading(self.wanted)
        self.fwd.update_reading()

    def pause_writing(self) -> None:
        self.blocked = True
        self.fwd.update_reading()

    def resume_writing(self) -> None:
        self.blocked = False
        self.fwd.update_reading()

    # -- reading the response -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        flow = self.flow
        if flow is None:
            return
        flow.bytes_down += len(data)
        flow.chunks_down += 1
        if self.hub is not None:
            self.hub.data(flow, DOWN, data, time.time())
        out = self.out
        out.activity += 1
        if self.phase is _TUNNEL:
            self.fwd.tunnel_down(data)
            return
        req = self.req
        if req is None or self.stray:
            log.debug("http upstream %s sent bytes out of turn", hostport(self.host, self.port))
            self.close(CloseReason.ERROR)
            return
        self.got += len(data)
        req.down_bytes += len(data)  # as the flow counts them: what the origin sent
        out.corked = True
        try:
            err = self._parse(data)
        finally:
            out.corked = False
        if err is not None:
            self.completed = None
            self._broken(req, err)
            return
        out.flush()
        done = self.completed
        if done is not None:
            self.completed = None
            reusable = self.upkeep and done.done and not self.close_delimited and not self.stray
            self.fwd.response_done(self, done, reusable)

    def _broken(self, req: Exchange, exc: BadResponse) -> None:
        """The origin broke HTTP while answering ``req``."""
        log.info("http upstream %s: %s", hostport(self.host, self.port), exc.reason)
        if exc.status != 502:  # a module refused the response, or failed
            self.error = (exc.status, exc.reason, exc.proxy_status)
        elif exc.proxy_status == TOO_LARGE:
            self.error = (502, "the destination's response head is too large", exc.proxy_status)
        else:
            self.error = (502, "the destination sent an invalid HTTP response", exc.proxy_status)
        self.req = None
        self.close(CloseReason.ERROR)
        self.fwd.upstream_failed(self, req, CloseReason.ERROR)

    def _switched(self, rest: bytes) -> None:
        self.fwd.upgrade(self, rest)

    # -- the origin closing -------------------------------------------------------------

    def eof_received(self) -> bool:
        self.eof = True
        if self.phase is _TUNNEL:
            return self.fwd.tunnel_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is _CLOSED:
            return
        reason = CloseReason.RESET if exc is not None else CloseReason.NORMAL
        tunnel = self.phase is _TUNNEL
        req = self.req
        self._closed(reason)
        if tunnel:
            self.fwd.tunnel_lost(reason, exc is not None)
            return
        if req is None:
            return  # idle: nothing lost
        if self.mode != _NONE and self.close_delimited and exc is None:
            # the origin's close ends a close-delimited body
            out = self.out
            out.corked = True
            try:
                self._done(req)
            finally:
                out.corked = False
            out.flush()
            self.completed = None
            self.fwd.response_done(self, req, False)
            return
        if self._retriable(req) and self.fwd.retry(req):
            # the origin dropped a kept connection just as we reused it: once more, fresh
            log.debug("http upstream %s closed a reused connection; retried", hostport(*self.key))
            return
        if exc is not None:
            log.info("http upstream %s reset", hostport(self.host, self.port))
        self.error = (
            502,
            "the destination closed the connection before a complete response",
            "http_response_incomplete",
        )
        self.fwd.upstream_failed(self, req, reason)

    def _retriable(self, req: Exchange) -> bool:
        """Lost on a reused connection before any response byte, and safe to send again."""
        return (
            not req.responded
            and self.got == 0
            and self.served > 1
            and not req.retried
            and req.done
            and req.body_bytes == 0
            and not req.chunked
            and req.method in IDEMPOTENT
        )

    def close(self, reason: CloseReason) -> None:
        """Close this connection (it is then no flow any more)."""
        if self.phase is _CLOSED:
            return
        transport = self.transport
        self._closed(reason)
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if transport is not None and not transport.is_closing():
            if reason is CloseReason.RESET or reason is CloseReason.SHUTDOWN:
                reset(transport)
            else:
                transport.close()

    def _unhook(self) -> None:
        """Closed: let go of what refers back to this object.

        The parser and ``events`` call back into it, and its request refers to it
        (``upstream``): reference cycles, which only the cyclic collector frees,
        and rarely (app.py). A closed connection parses nothing, serves no request.
        """
        self.events = SimpleNamespace()
        self.parser = httptools.HttpResponseParser(None)
        self.req = None

    def _closed(self, reason: CloseReason) -> None:
        if self.phase is _CLOSED:
            return
        was_idle = self.phase is _IDLE
        self.phase = _CLOSED
        self._unhook()
        self.fwd.upstream_gone(self, was_idle)
        flow = self.flow
        if flow is not None:
            self.flow = None
            flow.valve = None
            self.services.flow_closed(flow, reason, time.time())
            log.debug(
                "http flow %s -> %s (%s) %s up=%d down=%d",
                hostport(*flow.client),
                hostport(self.host, self.port),
                hostport(*flow.server),
                reason.value,
                flow.bytes_up,
                flow.bytes_down,
            )
