"""Plain HTTP/1.x forwarding: absolute-form requests, each routed by its own URL.

``ClientConnection`` hands over the client's connection once it has read a
request head that is not CONNECT. From then on ``HttpForwarder`` (the client
transport's protocol) parses requests with httptools (llhttp, strict) and
sends each one, in origin-form, over an upstream connection to the host in
its URL. Upstream connections belong to the client connection: an idle one is
kept per ``(host, port)`` (at most ``MAX_IDLE_UPSTREAMS``) and reused, and all
of them close with the client connection. Each upstream connection is one
inner flow in the flow table, tapped like a tunnel: UP is exactly what the
proxy wrote to the origin (the rewritten head, the body as framed), DOWN
exactly what the origin sent.

Decisions
    * Heads: llhttp parses every request head of the connection, the first one
      included (the handshake only frames it), and the header rules
      (``proxytap.policy.headers``, the built-in modules ``validate`` and
      ``rewrite``) judge and rewrite each one: framing, field syntax, limits,
      targets, ``Host`` (it must match the URI: 400 otherwise), methods,
      hop-by-hop fields, Forwarded / X-Forwarded-For, Via, user rules. The
      statuses are documented there. The rules memoize heads they have seen
      (``HeaderRules.prepare_request`` / ``prepare_response``): the hot path
      of a repeated request costs a dict lookup. CONNECT after the first
      request of a connection: 400 (tunnels start on a fresh connection).
    * Limits: the request line (``limits.max_request_line``, 414), the head
      (``limits.max_head``) and the field count (``limits.max_headers``, 431)
      are counted while llhttp parses, so nothing over a limit is buffered; a
      response head over ``max_head`` is a 502. A head that does not arrive in
      one read must be complete within ``timeouts.handshake`` (408), like the
      first one (slowloris on a kept-alive connection); a timer is armed only
      then, so whole heads cost nothing.
    * Policy: ``Services.connect`` judges every destination (name, then each
      address) with the connection's user. With authentication configured,
      every request needs ``Proxy-Authorization`` (407 and a challenge
      otherwise); a value verified once on a connection is not checked again.
    * Rewriting: the request goes upstream as ``METHOD origin-form HTTP/1.1``
      with ``Host`` first (from the URI), the rewritten fields, then our own
      framing (``Transfer-Encoding`` when the body is chunked again,
      ``Connection: Upgrade`` for WebSocket); ``Connection`` towards the client
      is ours (keep-alive or close).
    * Modules (``proxytap.modules``): with user modules on the listener each
      request gets a ``Context``; ``on_connect`` and the request hooks run when
      the request becomes active (its user is known then), body bytes read
      before that wait, as they came, for the hooks. Response hooks run on
      the memoized response head; body hooks see de-chunked bodies (chunked
      responses are then de-chunked and chunked again: ``_RECHUNK``). A
      refusal or a module error before the response answers with its status
      (500 for errors) and closes the connection; after it, the connection is
      closed. Without modules nothing of this runs.
    * Request bodies stream; nothing is held whole. Content-Length bodies go
      through byte for byte; llhttp hands over chunked bodies de-chunked, so
      they are chunked again (same transfer codings, chunk sizes as read,
      trailers kept).
    * Responses: the head is located raw (``\r\n\r\n``) and llhttp parses just
      that; the head is rewritten from the raw bytes (cached: an origin sends
      the same heads again and again). The body then goes through llhttp, which
      finds its end, and on to the client exactly as it came: Content-Length
      bodies (never a byte past the length), and chunked bodies for HTTP/1.1
      clients, extensions and trailers included. A body that ends when the
      origin closes is chunked for an HTTP/1.1 client, so the client connection
      stays open and a truncated body shows; an HTTP/1.0 client gets it as it
      is (and chunked ones de-chunked), and its connection closes.
    * HEAD: llhttp cannot be told that a response has no body (httptools
      exposes no "skip body"); since the forwarder feeds it heads separately,
      after the final head of a HEAD response it simply takes a new parser.
      204, 304 and 1xx have no body in llhttp already.
    * 1xx: interim responses (100 Continue, 103) are relayed to HTTP/1.1
      clients and dropped for HTTP/1.0 ones (RFC 9110 section 15.2); the final
      response follows. ``Expect`` is forwarded end to end (dropped for 1.0).
    * HTTP/1.0 clients are answered in HTTP/1.1 and the connection is closed
      after each response (RFC 9112 section 9.3: a proxy must not keep a
      persistent connection with an HTTP/1.0 client).
    * A response that starts before its request is complete (an early error,
      a refused 100-continue) says ``Connection: close``; after it both the
      client connection and that upstream connection close. Bytes after a
      complete response end that upstream connection (nothing is smuggled).
    * Pipelining: requests are answered in order, one at a time. Once a
      request beyond the one being answered has been read, the client is no
      longer read; what was read waits (never more than one read's worth).
    * WebSocket: ``Upgrade: websocket`` + ``Connection: upgrade`` is forwarded
      with both; on 101 the 101 is relayed and the connection becomes a raw
      relay both ways (still the same flow, still tapped). Client bytes sent
      before the 101 are held, not parsed. Other upgrades (h2c) are forwarded
      without ``Upgrade``.
    * Errors: connect failures answer ``Failure.http_status`` with its
      ``Proxy-Status`` type; an origin that closes or resets before a final
      response head gives 502 ``http_response_incomplete``; an invalid
      response 502 ``http_protocol_error``; no bytes for ``timeouts.idle`` 504
      ``http_response_timeout``. Once part of a response was sent, the client
      connection is just closed (reset when the origin reset). A request
      without a body that fails on a reused upstream connection before any
      response byte (the origin's keep-alive ran out) is retried once on a new
      connection (idempotent methods only). After an error reply or a
      ``Connection: close`` response, the client connection is half-closed
      and drained for ``LINGER`` seconds, so unread request bytes do not turn
      the close into a reset that destroys the reply.
    * Backpressure: a transport whose write buffer passes
      ``limits.write_buffer_high`` pauses reading on the transport that feeds
      it, both ways.
    * Logs: one line per request on the ``proxytap.access`` logger (method,
      host, path without query, status, bytes); raise its level to silence it.
      ``up`` / ``down`` count what went to and came from the origin for that
      request, head and body, as the flow does: a connection's one request
      has the numbers of its flow in the flow log.
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
from types import SimpleNamespace
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxytap.errors import Failure, ProtocolError, UpstreamError, classify_os_error
from proxytap.flows.table import DOWN, UP, CloseReason, Connection, Flow, endpoint
from proxytap.front.relay import reset
from proxytap.logstream import access
from proxytap.modules.api import Context
from proxytap.policy.auth import parse_proxy_authorization, proxy_authenticate_header
from proxytap.policy.headers import ORIGIN_FORM_REASON, RequestHead, serialize
from proxytap.proto import httpconnect
from proxytap.proto.http1 import (
    CRLF,
    END_CHUNKED,
    Body,
    chunk,
    chunk_size_line,
    interim_head,
    is_close_delimited,
    last_chunk,
    request_body,
    request_framing_field,
    request_head,
    response_body,
    response_framing_field,
    response_head,
)

if TYPE_CHECKING:
    from proxytap.export.hub import Hub
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front.http")

MAX_IDLE_UPSTREAMS: Final = 8  # idle upstream connections kept per client connection
LINGER: Final = 2.0  # seconds a closing client connection is drained before the close
CACHE_HEAD: Final = 4096  # request heads up to this size are memoized by the header rules

__all__ = ["LINGER", "MAX_IDLE_UPSTREAMS", "ORIGIN_FORM_REASON", "HttpForwarder"]

_IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
_VERSIONS: Final = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

# stats.http_responses keys: (status class, who answered)
_ORIGIN_KEYS: Final = {c: (f"{c}xx", "origin") for c in range(10)}
_PROXY_KEYS: Final = {c: (f"{c}xx", "proxy") for c in range(10)}

# how a response body goes to the client (module globals: compared per chunk)
_NONE: Final = Body.NONE
_RAW: Final = Body.RAW
_WRAP: Final = Body.WRAP
_DECHUNK: Final = Body.DECHUNK
_RECHUNK: Final = Body.RECHUNK


class _BadResponse(Exception):
    """The origin broke HTTP (or a module refused or failed): what the client gets."""

    def __init__(
        self, reason: str, proxy_status: str = "http_protocol_error", status: int = 502
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.proxy_status = proxy_status
        self.status = status

    @classmethod
    def of(cls, exc: ProtocolError) -> _BadResponse:
        return cls(exc.reason, exc.proxy_status, exc.status)


def _refusal(reason: str, status: int = 400) -> ProtocolError:
    return ProtocolError(reason, status=status, proxy_status="http_request_error")


def _wire(head: RequestHead, changed: bool = False) -> bytes:
    """What goes upstream: origin-form, HTTP/1.1, Host first, our own framing fields.

    ``changed``: modules changed the head (its fields are serialized afresh).
    """
    return request_head(
        head.method,
        head.path,
        head.authority,
        serialize(head.headers) if changed else head.serialized(),
        head.codings,
        head.websocket,
    )


_wires: dict[int, tuple[RequestHead, bytes]] = {}  # id(shared head) -> its bytes


def _wire_cached(head: RequestHead) -> bytes:
    """``_wire`` of a head shared through the rules' memo: built once per head."""
    hit = _wires.get(id(head))
    if hit is not None and hit[0] is head:
        return hit[1]
    wire = _wire(head)
    if len(_wires) >= 512:
        _wires.clear()
    _wires[id(head)] = (head, wire)
    return wire


class _Request:
    """One client request, from its head to the end of its response.

    A plain class with class-level defaults: only what differs is set per
    request (one exists per request, so its creation is on the hot path).
    """

    head = b""  # the head sent upstream
    chunked = False  # the body goes upstream chunked again
    done = False  # the whole request has been read
    keep_alive = False  # the client wants the connection kept
    keep = False  # our answer
    websocket = False
    auth_pending = False  # its credentials are being checked: not sent yet
    upstream: _Upstream | None = None
    responded = False  # the final response head went to the client
    retried = False
    status = 0
    body_bytes = 0
    up_bytes = 0  # written to the origin for this request (head and body as framed)
    down_bytes = 0  # received from the origin while answering it (head and body)
    # modules: the context, and the body read before the request hooks ran
    ctx: Context | None = None
    prepared = True  # the request hooks ran (or there are none): ``head`` is final
    held: list[bytes] | None = None  # body bytes read before that, as they came
    held_end = False  # ... and the body ended
    trailers: list[tuple[bytes, bytes]] = []  # ... with these trailers
    ended = False  # on_close ran / the access log line was written

    def __init__(self, to: RequestHead, http10: bool, start: float) -> None:
        self.method = to.method
        self.to = to
        self.http10 = http10
        self.start = start
        self.is_head = to.method == b"HEAD"
        self.pending: list[bytes] = []  # framed body waiting for the upstream connection


class HttpForwarder(asyncio.Protocol):
    """The client connection's protocol once it forwards plain HTTP."""

    def __init__(self, services: Services, conn: Connection, transport: asyncio.Transport) -> None:
        self.services = services
        self.hub: Hub | None = services.hub
        self.conn = conn
        self.transport = transport
        cfg = services.config
        self.max_head = cfg.limits.max_head
        self.max_line = cfg.limits.max_request_line
        self.high_water = cfg.limits.write_buffer_high
        self.keepalive = cfg.timeouts.http_keepalive
        self.idle_timeout = cfg.timeouts.idle
        self.max_headers = cfg.limits.max_headers
        self.rules = services.rules
        self.chain = chain = services.chains[conn.listener]
        self.modules = chain.active  # any module beyond the fused built-ins
        self.client_ip = conn.client[0]
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()  # parsed, not yet answered; [0] is active
        self.parsing: _Request | None = None  # the request whose body is being read
        self.idle: dict[tuple[str, int], _Upstream] = {}
        self.upstreams: set[_Upstream] = set()
        self.tunnel: _Upstream | None = None  # WebSocket after 101
        self.tunnel_ctx: Context | None = None  # its modules' context
        self.held = b""  # client bytes read but not parsed (after an upgrade request)
        self.broken: ProtocolError | None = None  # answer once the queue is done, then close
        self.auth_ok = b""  # the Proxy-Authorization value already verified on this connection
        # the request head being parsed
        self.in_head = False
        self.url_parts: list[bytes] = []
        self.head_size = 0
        self.head_fed = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.synthetic = False  # feeding a made-up head to parse an h2c request's body
        # output corking: writes made while one read is handled go out together
        self.ucork = False
        self.dirty: list[_Upstream] = []
        self.ccork = False
        self.cout: list[bytes] = []
        # state
        self.reading = True
        self.client_blocked = False  # our write buffer to the client is full
        self.client_eof = False
        self.draining = False
        self.lingering = False
        self.closed = False
        self.activity = 0
        self.seen = 0
        self.active_at = self.loop.time()
        self.idle_since = self.active_at
        self.timer: asyncio.TimerHandle | None = None
        # a head that did not come in one read must be complete within timeouts.handshake
        self.head_timeout = cfg.timeouts.handshake
        self.head_timer: asyncio.TimerHandle | None = None

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
        if self.closed:
            return
        if force:  # still mid-exchange after the grace: reset both sides, say why
            self._close(CloseReason.SHUTDOWN, reset_client=True)
            return
        self.draining = True
        if self.tunnel is None and not self.queue and not self.in_head:
            self._close(CloseReason.NORMAL)

    # -- client transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # the transport was handed over; ``start`` does the set-up

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.activity += 1
        if self.tunnel is not None:
            if self.tunnel_ctx is not None and self.chain.c2s_data:
                try:
                    data = self.chain.client_to_server(self.tunnel_ctx, data)
                except ProtocolError:  # logged and counted by the chain
                    self._close(CloseReason.ERROR)
                    return
            self.tunnel.write(data)
            return
        if self.lingering or self.broken is not None:
            return  # drained and dropped
        self._process(data)

    def eof_received(self) -> bool:
        if self.closed:
            return False
        self.client_eof = True
        tunnel = self.tunnel
        if tunnel is not None:
            if tunnel.eof:
                self._close(CloseReason.NORMAL)
                return False
            tunnel.write_eof()
            return True
        if self.lingering:
            self._close(CloseReason.NORMAL)
            return False
        if self.in_head or self.parsing is not None:
            # a request cut short can never complete
            active = self.queue[0] if self.queue else None
            if active is not None and active is self.parsing and active.upstream is not None:
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
        self.client_blocked = True
        up = self.tunnel if self.tunnel is not None else self._active_upstream()
        if up is not None:
            up.set_reading(False)

    def resume_writing(self) -> None:
        self.client_blocked = False
        up = self.tunnel if self.tunnel is not None else self._active_upstream()
        if up is not None:
            up.set_reading(True)

    # -- reading requests -----------------------------------------------------------

    def _process(self, data: bytes) -> None:
        """Parse what the client sent; what that writes upstream goes out once, at the end."""
        self.ucork = True
        try:
            self._feed(data)
        finally:
            self.ucork = False
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for up in dirty:
                up.flush()
        if not self.closed:
            self._update_reading()

    def _feed(self, data: bytes) -> None:
        if self.in_head:
            self.head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[int(exc.args[0]) :])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, ProtocolError):
                log.error("internal error parsing a request", exc_info=cause)
                cause = _refusal("the proxy failed to process the request", 500)
            self._request_error(cause)
            return
        except httptools.HttpParserError as exc:
            self._request_error(_refusal(f"malformed HTTP request: {exc}"))
            return
        if self.in_head:
            if self.head_fed > self.max_head:
                self._request_error(_refusal("request head too large", 431))
            elif self.head_timer is None:  # slowloris on a later head: same deadline
                self.head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        self.head_timer = None
        if self.in_head and not self.closed and not self.lingering and self.broken is None:
            log.info("http %s:%d: request head too slow", *self.conn.client)
            self._request_error(_refusal("the request head did not arrive in time", 408))
            self._update_reading()

    def on_message_begin(self) -> None:
        if self.synthetic:
            return
        self.in_head = True
        self.url_parts = []
        self.head_size = 0
        self.head_fed = 0
        self.headers = []

    def on_url(self, url: bytes) -> None:
        if self.synthetic:
            return
        self.url_parts.append(url)
        self.head_size += len(url)
        if self.head_size > self.max_line:  # only the URL counted so far
            raise _refusal("request line too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.synthetic:
            return
        if not self.in_head:
            self.trailers.append((name, value))
            return
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise _refusal("request head too large", 431)
        headers = self.headers
        if len(headers) >= self.max_headers:
            raise _refusal("too many header fields", 431)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.synthetic:
            return
        self.in_head = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        req = self._build_request()
        self.parsing = req
        queue = self.queue
        queue.append(req)
        if len(queue) == 1:
            self._dispatch(req)

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None:  # pragma: no cover - llhttp calls on_body only inside a message
            return
        req.body_bytes += len(body)
        held = req.held
        if held is not None:  # the request hooks have not run yet
            held.append(body)
            return
        if req.ctx is not None and self.chain.c2s_data:
            body = self._filter_body(req, body)
            if not body:
                return
        if req.chunked:
            body = chunk(body)
        self._send_up(req, body)

    def _filter_body(self, req: _Request, body: bytes) -> bytes:
        """Request body bytes through the modules (raises ``ModuleError``)."""
        chain = self.chain
        out = chain.client_to_server(req.ctx, body)
        if not req.chunked and len(out) != len(body):
            raise chain.failed(
                chain.c2s_data[-1][0],
                "client_to_server",
                ValueError("a body with a Content-Length must keep its length"),
            )
        return out

    def on_message_complete(self) -> None:
        req = self.parsing
        if req is None:  # pragma: no cover
            return
        if req.websocket is False and self.parser.should_upgrade() and self._has_body(req):
            return  # an h2c upgrade with a body: _upgraded reads the body
        self.synthetic = False
        trailers = self.trailers
        if trailers:
            self.trailers = []
        if req.chunked:
            if req.held is not None:
                req.held_end = True
                req.trailers = trailers
            else:
                self._last_chunk(req, trailers)
        req.done = True
        self.parsing = None

    def _last_chunk(self, req: _Request, trailers: list[tuple[bytes, bytes]]) -> None:
        self._send_up(req, last_chunk(trailers))

    @staticmethod
    def _has_body(req: _Request) -> bool:
        return req.chunked or req.to.length > 0

    def _build_request(self) -> _Request:
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise _refusal("CONNECT must be the first request on a connection to the proxy")
        number = parser.get_http_version()
        version = _VERSIONS.get(number) or b"HTTP/" + number.encode("ascii", "replace")
        parts = self.url_parts
        chain = self.chain
        try:
            to = self.rules.prepare_request(
                method,
                parts[0] if len(parts) == 1 else b"".join(parts),
                version,
                self.headers,
                self.client_ip,
                chain.rewrite_requests,
                self.head_size <= CACHE_HEAD,
            )
        except ProtocolError:
            raise
        except Exception as exc:  # a bug in a rule: fail closed (500), logged and counted
            raise chain.failed(chain.names[0][0], "request", exc) from exc
        http10 = to.version == b"HTTP/1.0"
        req = _Request(to, http10, self.loop.time())
        if not http10:
            req.keep_alive = parser.should_keep_alive()
        if to.codings:
            req.chunked = True
        if to.websocket and parser.should_upgrade():
            req.websocket = True
        if self.modules:
            conn = self.conn
            req.ctx = Context(
                listener=conn.listener,
                protocol="http-forward",
                client=conn.client,
                host=to.host,
                port=to.port,
                user=conn.user,
            )
            if chain.connect_hooks or chain.request_hooks or chain.c2s_data:
                req.prepared = False  # _prepare runs them once the request is active
                if chain.c2s_data:
                    req.held = []
        if req.prepared:
            req.head = _wire_cached(to)
        if self.services.auth is not None:
            self._check_credentials(req)
        return req

    def _prepare(self, req: _Request) -> None:
        """The module hooks of a request that is about to go upstream (its user is known).

        Raises ``ProtocolError``: ``Refuse`` from a module, ``ModuleError``.
        """
        ctx = req.ctx
        assert ctx is not None
        chain = self.chain
        ctx.user = self.conn.user
        req.prepared = True
        chain.on_connect(ctx)
        if chain.request_hooks:
            head = req.to.copy()
            chain.request(ctx, head)
            req.to = head
            req.head = _wire(head, changed=True)
        else:
            req.head = _wire_cached(req.to)
        held = req.held
        if held is not None:
            req.held = None
            for body in held:
                body = self._filter_body(req, body)
                if body:
                    self._send_up(req, chunk(body) if req.chunked else body)
            if req.held_end:
                self._last_chunk(req, req.trailers)

    def _check_credentials(self, req: _Request) -> None:
        """Proxy authentication, per request: a value verified once is not checked again."""
        creds = req.to.credentials
        if creds is None:
            self.services.refused("auth", "proxy authentication required")
            raise ProtocolError(
                "proxy authentication required", status=407, proxy_status="http_request_denied"
            )
        if creds != self.auth_ok:
            req.auth_pending = True
            self.services.tasks.spawn(self._authenticate(req, creds))

    async def _authenticate(self, req: _Request, creds: bytes) -> None:
        auth = self.services.auth
        assert auth is not None
        user: str | None = None
        try:
            user, password = parse_proxy_authorization(creds.decode("latin-1"))
            ok = await auth.check(user, password)
        except ProtocolError as exc:
            err = exc
        else:
            err = ProtocolError(
                "wrong user name or password", status=407, proxy_status="http_request_denied"
            )
            if ok:
                if self.closed:
                    return
                self.auth_ok = creds
                self.conn.user = user
                req.auth_pending = False
                if self.queue and self.queue[0] is req and req.upstream is None:
                    self._dispatch_safely(req)
                    self._update_reading()
                return
        if self.closed:
            return
        self.services.refused("auth", "bad credentials")
        self.services.stats.auth_failures += 1
        log.info("http %s:%d authentication failed (user %r)", *self.conn.client, user)
        if req in self.queue:
            if req.upstream is not None:
                req.upstream.close(CloseReason.ERROR)
            self.queue.remove(req)
        if self.parsing is req:
            self.parsing = None
        self._end(req)
        self.broken = err
        if not self.queue:
            self._reply_error(err)

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head; ``rest`` followed it."""
        if self.closed:
            return
        req = self.parsing
        self.parser = httptools.HttpRequestParser(self)
        if req is None or req.websocket or req.done:
            # a WebSocket handshake: the rest waits for the 101 (or for the next request)
            if req is not None:
                req.done = True
                self.parsing = None
            self.held += rest
            return
        # an upgrade we do not relay, with a body: parse the body with a fresh parser
        self.synthetic = True
        framing = request_framing_field(request_body(req.to.length, req.chunked), req.to.length)
        self._feed(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        if rest and not self.closed:
            self._feed(rest)

    # -- sending requests -----------------------------------------------------------

    def _dispatch(self, req: _Request, fresh: bool = False) -> None:
        """Make ``req`` the active request: find or open its upstream connection.

        Raises ``ProtocolError`` when a module refuses or fails (``_prepare``).
        """
        if req.auth_pending:
            return  # _authenticate dispatches it
        if not req.prepared:
            self._prepare(req)
        to = req.to
        up = None if fresh else self.idle.pop((to.host, to.port), None)
        if up is None:
            up = _Upstream(self, to.host, to.port)
            self.upstreams.add(up)
            up.task = self.services.tasks.spawn(up.connect())
        else:
            up.idle = False
        up.req = req
        req.upstream = up
        if up.ready:
            self._start_request(up, req)

    def _dispatch_safely(self, req: _Request) -> None:
        """``_dispatch`` outside a parser callback: a module refusal is answered here."""
        try:
            self._dispatch(req)
        except ProtocolError as err:
            self._refuse_active(req, err)

    def _refuse_active(self, req: _Request, err: ProtocolError) -> None:
        """``req`` (the active request, nothing sent upstream) is refused: answer, close."""
        if self.parsing is req:
            self.parsing = None
        self.queue.clear()  # the connection closes after the answer
        self._end(req)
        self.broken = err
        self._reply_error(err)

    def _end(self, req: _Request) -> None:
        """The exchange of ``req`` is over: the modules' on_close, once."""
        ctx = req.ctx
        if ctx is not None and not ctx.closed:
            self.chain.on_close(ctx)

    def _start_request(self, up: _Upstream, req: _Request) -> None:
        flow = up.flow
        if flow is not None and up.authority is not req.to.authority:
            up.authority = req.to.authority
            flow.http_host = up.authority.decode("latin-1")
        ctx = req.ctx
        if ctx is not None and flow is not None:
            ctx.server = flow.server
            ctx.flow = flow
        # the response state of the connection
        up.served += 1
        up.got = 0
        up.in_head = True
        if up.hbuf:
            up.hbuf.clear()
        up.stray = False
        up.completed = None
        if req.http10 or self.chain.s2c_data:
            # chunked bodies are de-chunked for HTTP/1.0 clients and body modules: on_body
            events = SimpleNamespace(on_body=up.body, **vars(up.events))
            up.parser = httptools.HttpResponseParser(events)
        up.send(req.head)
        pending = req.pending
        if pending:
            req.pending = []
            for chunk in pending:
                up.send(chunk)
        if up.reading is self.client_blocked:
            up.set_reading(not self.client_blocked)

    def _send_up(self, req: _Request, data: bytes) -> None:
        up = req.upstream
        if up is not None and up.ready and up.req is req:
            up.send(data)
        else:
            req.pending.append(data)

    def _active_upstream(self) -> _Upstream | None:
        if self.queue:
            return self.queue[0].upstream
        return None

    def _update_reading(self) -> None:
        """Read the client unless what it sent cannot go anywhere yet."""
        if self.lingering:
            want = True
        elif self.tunnel is not None:
            want = not (self.tunnel.blocked or self.tunnel.export_held)
        else:
            queue = self.queue
            if not queue:
                want = True
            elif len(queue) > 1 or self.in_head or self.held or queue[0].websocket:
                # a pipelined request waits, read but not started, or what follows a
                # WebSocket handshake is not HTTP: read no more until it is answered
                want = False
            else:
                req = queue[0]
                up = req.upstream
                # done: only notice a client that goes away, or its next request
                want = req.done or (
                    up is not None and up.ready and not (up.blocked or up.export_held)
                )
        if want is not self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- responses ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write to the client (joined with the rest of this read when corked)."""
        if self.ccork:
            self.cout.append(data)
        elif not self.closed:
            self.transport.write(data)

    def flush(self) -> None:
        out = self.cout
        if out:
            self.cout = []
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def finished(self, up: _Upstream, req: _Request, reusable: bool) -> None:
        """The response to ``req`` was relayed completely."""
        now = self.loop.time()
        self.idle_since = now
        self.activity += 1
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        if access.enabled():
            self._log(req, now)
        if req.ctx is not None:
            self._end(req)
        if self.closed:
            return
        if reusable and not self.lingering:
            up.idle = True
            idle = self.idle
            idle[up.key] = up
            if len(idle) > MAX_IDLE_UPSTREAMS:
                idle.pop(next(iter(idle))).close(CloseReason.NORMAL)
            if not up.reading:
                up.set_reading(True)  # notice the origin closing it
        else:
            up.close(CloseReason.NORMAL)
        if not req.keep:
            self._linger()
        elif queue or self.held or self.broken is not None or self.client_eof:
            self._next()
        elif self.draining or self.services.draining:
            self._close(CloseReason.NORMAL)
        elif not self.reading:
            self._update_reading()

    def _next(self) -> None:
        """Start the next queued request, or answer a refusal, or parse what is held."""
        if self.queue:
            self._dispatch_safely(self.queue[0])
            if not self.closed:
                self._update_reading()
        elif self.broken is not None:
            self._reply_error(self.broken)
        elif self.client_eof:
            self._close(CloseReason.NORMAL)
        elif self.held:
            held = self.held
            self.held = b""
            self._process(held)

    def start_tunnel(self, up: _Upstream, rest: bytes) -> None:
        """101 relayed: from now on bytes go through unparsed, both ways."""
        self.tunnel = up
        req = self.queue.popleft() if self.queue else None
        if req is not None:
            self._log(req, self.loop.time())
            self.tunnel_ctx = req.ctx  # its on_close runs when the tunnel ends
        if rest:
            self.write(rest)
        held = self.held
        self.held = b""
        if held:
            self.data_received(held)
            if self.closed:
                return
        up.set_reading(not self.client_blocked)
        self._update_reading()

    def upstream_error(self, up: _Upstream, req: _Request, reason: CloseReason) -> None:
        """``up`` failed while serving ``req``: connect failed, closed early, or broke HTTP."""
        if self.closed or not self.queue or self.queue[0] is not req:
            return
        self.queue.popleft()
        if not req.responded:
            req.status = up.error[0]  # the access line shows the proxy's own answer
        self._log(req, self.loop.time())
        self._end(req)
        if not req.responded:
            status, why, proxy_status = up.error
            self.reply(req, status, why, proxy_status)
            return
        self.flush()
        self._close(reason, reset_client=reason is CloseReason.RESET)

    # -- errors and endings ---------------------------------------------------------

    def reply(self, req: _Request | None, status: int, reason: str, proxy_status: str) -> None:
        """Answer with the proxy's own error response, then close."""
        if self.closed or self.lingering:
            return
        self.flush()
        self.services.stats.http_responses[_PROXY_KEYS[status // 100]] += 1
        extra = []
        if status == 407:
            extra.append(proxy_authenticate_header(self.services.config.auth.realm))
        self.transport.write(
            httpconnect.error_response(
                status,
                reason,
                proxy_status,
                proxy_name=self.services.config.proxy_name,
                extra_headers=extra,
                include_body=req is None or not req.is_head,
            )
        )
        self._linger()

    def _reply_error(self, err: ProtocolError) -> None:
        log.info("http %s:%d refused: %s", *self.conn.client, err.reason)
        if err.status != 407:
            self.services.stats.protocol_errors["http"] += 1
        self.reply(None, err.status, err.reason, err.proxy_status)

    def _request_error(self, err: ProtocolError) -> None:
        """The client broke HTTP (or asked for something we refuse)."""
        req = self.parsing
        self.parsing = None
        self.in_head = False
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

    def _log(self, req: _Request, now: float) -> None:
        """The access log line: one per request, never payload bytes."""
        to = req.to
        access(
            "%s:%d %s %s:%d%s %s up=%d down=%d %.3fs",
            *self.conn.client,
            req.method.decode("latin-1"),
            to.host,
            to.port,
            to.path.partition(b"?")[0].decode("latin-1"),
            req.status or "-",
            req.up_bytes,
            req.down_bytes,
            now - req.start,
        )

    def _linger(self) -> None:
        """Our last response is written: half-close, drain the client briefly, then close."""
        if self.closed or self.lingering:
            return
        self.lingering = True
        self.flush()
        for up in list(self.upstreams):
            up.close(CloseReason.NORMAL)
        transport = self.transport
        if self.client_eof or not transport.can_write_eof():
            self._close(CloseReason.NORMAL)
            return
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()
        self._update_reading()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(LINGER, self._close, CloseReason.NORMAL)

    def _close(self, reason: CloseReason, reset_client: bool = False) -> None:
        if self.closed:
            return
        self.flush()
        transport = self.transport
        self._teardown(reason)
        if reset_client:
            reset(transport)
        elif not transport.is_closing():
            transport.close()

    def _teardown(self, reason: CloseReason) -> None:
        """The client connection is over: close every upstream and flow, once."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
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
        # Let go of what refers back to this object: the parser's callbacks, and an
        # upstream (its ``fwd``) through the request being read or the WebSocket
        # relay. Cycles are freed only by the cyclic collector, and rarely (app.py).
        self.parser = httptools.HttpRequestParser(None)
        self.parsing = None
        self.tunnel = None

    def _tick(self) -> None:
        self.timer = None
        if self.closed or self.lingering:
            return
        now = self.loop.time()
        if self.activity != self.seen:
            self.seen = self.activity
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
            log.debug("http %s:%d keep-alive timeout", *self.conn.client)
            self._close(CloseReason.NORMAL)
            return
        req = self.queue[0] if self.queue else None
        if req is not None and not req.responded and req.done:
            up = req.upstream
            if up is not None:
                up.close(CloseReason.TIMEOUT)
            self.queue.popleft()
            self._log(req, self.loop.time())
            self._end(req)
            self.reply(req, 504, "the destination did not answer in time", "http_response_timeout")
            return
        self._close(CloseReason.TIMEOUT)


class _Upstream(asyncio.Protocol):
    """One upstream connection of a client connection: one inner flow."""

    def __init__(self, fwd: HttpForwarder, host: str, port: int) -> None:
        self.fwd = fwd
        self.host = host
        self.port = port
        self.key = (host, port)
        self.hub = fwd.hub
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.flow: Flow | None = None
        self.authority = b""  # the Host of the last request: the flow's http_host
        self.req: _Request | None = None
        self.ready = False
        self.idle = False
        self.closed = False
        self.blocked = False  # our write buffer to the origin is full
        self.reading = True
        self.wanted = True  # reading as the exchange wants it, before an export hold
        self.export_held = False  # an export consumer under the "wait" policy is behind
        self.eof = False
        self.served = 0  # requests started on this connection
        self.out: list[bytes] = []
        self.is_dirty = False
        self.error = (502, "the destination sent an invalid HTTP response", "http_protocol_error")
        # the response being parsed: llhttp frames it, its head is read raw
        self.events = SimpleNamespace(
            on_message_begin=self.message_begin,
            on_headers_complete=self.headers_complete,
            on_message_complete=self.message_complete,
        )
        self.parser = httptools.HttpResponseParser(self.events)
        self.got = 0  # bytes received for the current request
        self.in_head = False
        self.hbuf = bytearray()  # a head that came in pieces
        self.raw_head = b""
        self.interim = False
        self.switching = False
        self.mode = _NONE
        self.body_left = -1  # Content-Length bytes still to relay; -1: llhttp decides
        self.close_delimited = False
        self.upkeep = False
        self.stray = False  # bytes followed a complete response
        self.completed: _Request | None = None
        self.filters = bool(fwd.chain.s2c_data)  # response bodies go through modules
        self.ctx: Context | None = None  # the modules' context of the response being relayed

    # -- connecting -----------------------------------------------------------------

    async def connect(self) -> None:
        fwd = self.fwd
        services = fwd.services
        try:
            sock = await services.connect(self.host, self.port, fwd.conn.user)
        except UpstreamError as exc:
            self._connect_failed(exc.failure, exc.detail)
            return
        except Exception as exc:  # never leave the client waiting
            self._connect_failed(classify_os_error(exc), repr(exc))
            return
        try:
            await fwd.loop.create_connection(lambda: self, sock=sock)
            assert self.transport is not None
            peer = endpoint(self.transport.get_extra_info("peername"))
        except BaseException as exc:
            if self.transport is not None:
                self.transport.abort()
            else:
                sock.close()
            if not isinstance(exc, Exception):
                raise
            self._connect_failed(classify_os_error(exc), repr(exc))
            return
        finally:
            self.task = None
        transport = self.transport
        if self.closed or fwd.closed:
            transport.close()
            return
        transport.set_write_buffer_limits(high=fwd.high_water)
        flow = services.table.open_flow(fwd.conn, peer, self.host, self.port, time.time())
        self.flow = flow
        flow.valve = self
        if self.hub is not None:
            self.hub.opened(flow)
        self.ready = True
        req = self.req
        if req is not None:
            fwd._start_request(self, req)
            fwd._update_reading()

    def _connect_failed(self, failure: Failure, detail: str) -> None:
        fwd = self.fwd
        req = self.req
        self.closed = True
        self.task = None
        self._unhook()
        fwd.upstreams.discard(self)
        log.info(
            "http %s:%d -> %s:%d connect failed: %s (%s)",
            *fwd.conn.client,
            self.host,
            self.port,
            failure.value,
            detail,
        )
        if req is not None:
            self.error = (failure.http_status, failure.description, failure.value)
            fwd.upstream_error(self, req, CloseReason.ERROR)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.pause_reading()  # until the flow exists and the request is on its way
        self.reading = False

    # -- writing ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.fwd.ucork:
            self.out.append(data)
            if not self.is_dirty:
                self.is_dirty = True
                self.fwd.dirty.append(self)
        else:
            self.write(data)

    def flush(self) -> None:
        self.is_dirty = False
        out = self.out
        if out:
            self.out = []
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def write(self, data: bytes) -> None:
        """Write to the origin and tap it as UP."""
        transport = self.transport
        flow = self.flow
        if self.closed or transport is None or flow is None:
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
        if want == self.reading or self.closed or self.transport is None:
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
        self.fwd._update_reading()

    def pause_writing(self) -> None:
        self.blocked = True
        self.fwd._update_reading()

    def resume_writing(self) -> None:
        self.blocked = False
        self.fwd._update_reading()

    # -- reading the response -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        flow = self.flow
        if self.closed or flow is None:
            return
        fwd = self.fwd
        flow.bytes_down += len(data)
        flow.chunks_down += 1
        if self.hub is not None:
            self.hub.data(flow, DOWN, data, time.time())
        fwd.activity += 1
        if fwd.tunnel is self:
            ctx = fwd.tunnel_ctx
            if ctx is not None and fwd.chain.s2c_data:
                try:
                    data = fwd.chain.server_to_client(ctx, data)
                except ProtocolError:  # logged and counted by the chain
                    fwd._close(CloseReason.ERROR)
                    return
            fwd.write(data)
            return
        req = self.req
        if req is None or self.stray:
            log.debug("http upstream %s:%d sent bytes out of turn", self.host, self.port)
            self.close(CloseReason.ERROR)
            return
        self.got += len(data)
        req.down_bytes += len(data)  # as the flow counts them: what the origin sent
        err: _BadResponse | None = None
        fwd.ccork = True
        try:
            if self.in_head:
                self._consume(data)
            else:
                self._body(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _BadResponse):
                err = cause
            elif isinstance(cause, ProtocolError):
                err = _BadResponse.of(cause)
            else:
                log.error("internal error parsing a response", exc_info=cause)
                err = _BadResponse("the proxy failed to process the response")
        except httptools.HttpParserUpgrade:
            err = _BadResponse("unexpected protocol switch")
        except httptools.HttpParserError as exc:
            err = _BadResponse(f"invalid HTTP response: {exc}")
        except _BadResponse as exc:
            err = exc
        except ProtocolError as exc:  # a body module failed
            err = _BadResponse.of(exc)
        finally:
            fwd.ccork = False
        if err is not None:
            self.completed = None
            self._broken(req, err)
            return
        fwd.flush()
        done = self.completed
        if done is not None:
            self.completed = None
            fwd.finished(
                self,
                done,
                self.upkeep and done.done and not self.close_delimited and not self.stray,
            )

    def _body(self, data: bytes) -> None:
        """Body bytes: llhttp finds the end, the bytes go to the client as they came."""
        left = self.body_left
        if 0 <= left < len(data):  # llhttp never sees what follows the body
            data = data[:left]
            self.stray = True
        mode = self.mode  # the response may complete in feed_data
        self.parser.feed_data(data)  # first: nothing after a broken chunk is relayed
        if mode == _RAW:
            if left > 0:
                self.body_left = left - len(data)
            if self.filters and data:
                data = self._filter(data, left >= 0)
            if data:
                self.fwd.write(data)
        elif mode == _WRAP:
            if self.filters:
                data = self._filter(data, False)
            if data:
                fwd = self.fwd
                fwd.write(chunk_size_line(len(data)))
                fwd.write(data)
                fwd.write(CRLF)
        # _DECHUNK, _RECHUNK: llhttp's on_body writes; _NONE: no body

    def _filter(self, data: bytes, same_length: bool) -> bytes:
        """Response body bytes through the modules (raises ``ModuleError``)."""
        chain = self.fwd.chain
        out = chain.server_to_client(self.ctx, data)
        if same_length and len(out) != len(data):
            raise chain.failed(
                chain.s2c_data[-1][0],
                "server_to_client",
                ValueError("a body with a Content-Length must keep its length"),
            )
        return out

    def _consume(self, data: bytes) -> None:
        """Response heads: found raw (to rewrite them), checked and framed by llhttp."""
        pos = 0
        size = len(data)
        max_head = self.fwd.max_head
        while pos < size:
            if not self.in_head:
                self._body(data[pos:])  # a copy of what follows a head, once
                return
            hbuf = self.hbuf
            if hbuf:  # the head started in an earlier read
                before = len(hbuf)
                hbuf += data[pos:] if pos else data
                end = hbuf.find(b"\r\n\r\n", max(0, before - 3))
                if end >= 0:
                    take = end + 4 - before
                    head = bytes(hbuf[: end + 4])
                    hbuf.clear()
            else:
                start = pos
                while data.startswith(b"\r\n", start):  # empty lines before a head
                    start += 2
                end = data.find(b"\r\n\r\n", start)
                if end >= 0:
                    take = end + 4 - pos
                    head = data[start : end + 4]
                else:
                    hbuf += data[start:]
            if end < 0:
                if len(hbuf) > max_head:
                    raise _BadResponse(
                        "response head too large", "http_response_header_section_size"
                    )
                self.parser.feed_data(data[pos:] if pos else data)  # fails early on garbage
                return
            if len(head) > max_head:
                raise _BadResponse("response head too large", "http_response_header_section_size")
            self.raw_head = head
            try:
                self.parser.feed_data(data[pos : pos + take] if pos or take < size else data)
            except httptools.HttpParserUpgrade:
                if not self.switching:
                    raise
                fwd = self.fwd
                fwd.ccork = False
                fwd.flush()
                fwd.start_tunnel(self, data[pos + take :])
                return
            pos += take
            if self.completed is not None:
                if pos < size:
                    self.stray = True  # nothing may follow a response we did not ask for
                return

    def body(self, body: bytes) -> None:
        """llhttp's de-chunked body data (HTTP/1.0 clients, body modules)."""
        mode = self.mode
        if mode in (_DECHUNK, _RECHUNK):
            if self.filters:
                body = self._filter(body, False)
                if not body:
                    return
            if mode == _RECHUNK:
                fwd = self.fwd
                fwd.write(chunk_size_line(len(body)))
                fwd.write(body)
                fwd.write(CRLF)
            else:
                self.fwd.write(body)

    def message_begin(self) -> None:
        if self.req is None or self.completed is not None:
            raise _BadResponse("a response nobody asked for")

    def headers_complete(self) -> None:
        req = self.req
        assert req is not None
        fwd = self.fwd
        parser = self.parser
        status = parser.get_status_code()
        chain = fwd.chain
        try:
            line, h, block = fwd.rules.prepare_response(
                self.raw_head, status, chain.rewrite_responses
            )
            if chain.response_hooks:
                h = h.copy()
                chain.response(req.ctx, h)
                block = serialize(h.headers)
        except ProtocolError as exc:
            raise _BadResponse.of(exc) from None
        except Exception as exc:  # a bug in a rule: fail closed, logged and counted
            raise _BadResponse.of(chain.failed(chain.names[1][0], "response", exc)) from None
        mode = response_body(req.method, status, h.length, h.chunked, req.http10, self.filters)
        if mode >= Body.INTERIM:  # 1xx (the forwarder never sends CONNECT upstream)
            self._interim(req, status, line, block)
            return
        self.in_head = False
        self.interim = False
        req.status = status
        fwd.services.stats.http_responses[_ORIGIN_KEYS[status // 100]] += 1
        self.upkeep = parser.should_keep_alive() and not (h.http10 and h.codings)
        self.close_delimited = is_close_delimited(mode, h.length, h.chunked)
        self.body_left = h.length if mode == _RAW else -1
        self.ctx = req.ctx
        self.mode = mode
        keep = req.keep_alive and req.done and not fwd.draining and not fwd.services.draining
        req.keep = keep
        fwd.write(
            response_head(line, block, response_framing_field(mode, h.chunked, h.codings), keep)
        )
        req.responded = True
        if req.is_head:  # llhttp would wait for a body: a new parser for the next response
            self.parser = httptools.HttpResponseParser(self.events)
            self._done(req)

    def _interim(self, req: _Request, status: int, line: bytes, block: bytes) -> None:
        """A 1xx response: relayed (not to HTTP/1.0 clients); 101 starts a WebSocket relay."""
        self.interim = True
        fwd = self.fwd
        if status == 101:
            if not req.websocket:
                raise _BadResponse("101 Switching Protocols without an upgrade request")
            req.status = 101
            req.responded = True
            self.switching = True
            fwd.services.stats.http_responses[_ORIGIN_KEYS[1]] += 1
        elif req.http10:
            return
        fwd.write(interim_head(line, block, status == 101))

    def message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        req = self.req
        if req is None or self.completed is not None:
            return
        self._done(req)

    def _done(self, req: _Request) -> None:
        """The response is complete (the forwarder acts on it after this read)."""
        if self.mode in (_WRAP, _RECHUNK):
            self.fwd.write(END_CHUNKED)
        self.mode = _NONE
        self.req = None
        self.completed = req

    def _broken(self, req: _Request, exc: _BadResponse) -> None:
        """The origin broke HTTP while answering ``req``."""
        log.info("http upstream %s:%d: %s", self.host, self.port, exc.reason)
        if exc.status != 502:  # a module refused the response, or failed
            self.error = (exc.status, exc.reason, exc.proxy_status)
        elif exc.proxy_status == "http_response_header_section_size":
            self.error = (502, "the destination's response head is too large", exc.proxy_status)
        else:
            self.error = (502, "the destination sent an invalid HTTP response", exc.proxy_status)
        self.req = None
        self.close(CloseReason.ERROR)
        self.fwd.upstream_error(self, req, CloseReason.ERROR)

    # -- the origin closing -------------------------------------------------------------

    def eof_received(self) -> bool:
        self.eof = True
        fwd = self.fwd
        if fwd.tunnel is self:
            fwd.flush()
            if fwd.client_eof:
                fwd._close(CloseReason.NORMAL)
                return False
            if fwd.transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    fwd.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        fwd = self.fwd
        reason = CloseReason.RESET if exc is not None else CloseReason.NORMAL
        req = self.req
        self._closed(reason)
        if fwd.tunnel is self:
            fwd._close(reason, reset_client=exc is not None)
            return
        if req is None:
            return  # idle: nothing lost
        if self.mode != _NONE and self.close_delimited and exc is None:
            # the origin's close ends a close-delimited body
            fwd.ccork = True
            try:
                self._done(req)
            finally:
                fwd.ccork = False
            fwd.flush()
            self.completed = None
            fwd.finished(self, req, False)
            return
        if (
            not req.responded
            and self.got == 0
            and self.served > 1
            and not req.retried
            and req.done
            and req.body_bytes == 0
            and not req.chunked
            and req.method in _IDEMPOTENT
            and not fwd.closed
            and fwd.queue
            and fwd.queue[0] is req
        ):
            # the origin dropped a kept connection just as we reused it: once more, fresh
            log.debug("http upstream %s:%d closed a reused connection; retrying", *self.key)
            req.retried = True
            req.upstream = None
            fwd._dispatch(req, fresh=True)
            return
        if exc is not None:
            log.info("http upstream %s:%d reset", self.host, self.port)
        self.error = (
            502,
            "the destination closed the connection before a complete response",
            "http_response_incomplete",
        )
        fwd.upstream_error(self, req, reason)

    def close(self, reason: CloseReason) -> None:
        """Close this connection (it is then no flow any more)."""
        if self.closed:
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
        if self.closed:
            return
        self.closed = True
        self._unhook()
        fwd = self.fwd
        fwd.upstreams.discard(self)
        if self.idle and fwd.idle.get(self.key) is self:
            del fwd.idle[self.key]
        flow = self.flow
        if flow is not None:
            flow.valve = None
            fwd.services.flow_closed(flow, reason, time.time())
            log.debug(
                "http flow %s:%d -> %s:%d (%s:%d) %s up=%d down=%d",
                *flow.client,
                self.host,
                self.port,
                *flow.server,
                reason.value,
                flow.bytes_up,
                flow.bytes_down,
            )
