"""Reading a forwarded client connection's requests: llhttp, limits, exchanges.

``RequestReader`` is the callback object of the connection's llhttp request
parser. It counts the limits while llhttp parses, so nothing over a limit is
buffered: the request line (``limits.max_request_line``, 414), the head
(``limits.max_head``) and the field count (``limits.max_headers``, 431). A
head that does not arrive in one read must be complete within
``timeouts.handshake`` (408), like the first one (slowloris on a kept-alive
connection); a timer is armed only then, so whole heads cost nothing.

Each complete head goes through the header rules (memoized for heads up to
``CACHE_HEAD`` bytes: a repeated request costs a dict lookup) and becomes an
``Exchange``, handed to the forwarder (``request_head``). Body bytes are
framed for upstream here (chunked bodies, which llhttp de-chunks, are chunked
again with the same codings and trailers) and handed on (``send_up``); with
body modules they pass the modules first, or wait, as they came, until the
request hooks have run (``prepare``). Errors go to ``request_error``.

A CONNECT head after earlier requests is not an exchange: its head (rebuilt
from what llhttp parsed) and every byte after it go to the forwarder
(``connect_request``), which hands the connection to the CONNECT handshake
once the requests before it are answered. Upgrades: a WebSocket request stops llhttp after
its head, and what follows waits unparsed for the 101 (``hold``); an h2c
upgrade with a body has the body parsed by a fresh parser fed a made-up head
(``synthetic``) and is forwarded without ``Upgrade``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from proxytap.errors import ProtocolError
from proxytap.front.authn import auth_failed, auth_throttled, check_proxy_authorization
from proxytap.front.http_exchange import (
    CACHE_HEAD,
    TRACE_HIDDEN,
    Exchange,
    refusal,
    wire,
    wire_cached,
)
from proxytap.intercept import onboarding
from proxytap.modules.api import Context
from proxytap.proto.http1 import chunk, last_chunk, request_body, request_framing_field

if TYPE_CHECKING:
    from proxytap.flows.table import Connection
    from proxytap.front.http_forward import HttpForwarder
    from proxytap.front.services import Services

log = logging.getLogger("proxytap.front.http")

_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


class RequestReader:
    """llhttp's callbacks for one client connection's requests."""

    def __init__(self, owner: HttpForwarder, services: Services, conn: Connection) -> None:
        self.owner = owner
        self.services = services
        self.conn = conn
        cfg = services.config
        self.max_head = cfg.limits.max_head
        self.max_line = cfg.limits.max_request_line
        self.max_headers = cfg.limits.max_headers
        self.head_timeout = cfg.timeouts.handshake
        self.rules = services.rules
        self.chain = services.chains[conn.listener]
        self.client_ip = conn.client[0]
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None  # the request whose body is being read
        # the request head being parsed
        self.in_head = False
        self.url_parts: list[bytes] = []
        self.head_size = 0
        self.head_fed = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.synthetic = False  # feeding a made-up head to parse an h2c request's body
        self.head_timer: asyncio.TimerHandle | None = None
        self.auth_ok = b""  # the Proxy-Authorization value already verified on this connection
        self.connect_head: bytes | None = None  # a CONNECT head read; llhttp stops after it
        self.closed = False

    def close(self) -> None:
        """The connection is over: no timer, and nothing refers back to the forwarder.

        The parser calls back into this object and this object into the
        forwarder, which holds it: reference cycles, which only the cyclic
        collector frees, and rarely (app.py).
        """
        self.stop_head_timer()
        self.parser = httptools.HttpRequestParser(None)
        self.parsing = None
        self.in_head = False  # no head timer is armed after this
        self.closed = True
        del self.owner

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def cut(self) -> Exchange | None:
        """A request error: no head or body is being read any more; the one cut off."""
        req = self.parsing
        self.parsing = None
        self.in_head = False
        return req

    # -- feeding --------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse client bytes; errors are answered through the forwarder."""
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
                cause = refusal("the proxy failed to process the request", 500)
            self.owner.request_error(cause)
            return
        except httptools.HttpParserError as exc:
            self.owner.request_error(refusal(f"malformed HTTP request: {exc}"))
            return
        if self.in_head:
            if self.head_fed > self.max_head:
                self.owner.request_error(refusal("request head too large", 431))
            elif self.head_timer is None:  # slowloris on a later head: same deadline
                self.head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self) -> None:
        self.head_timer = None
        if self.in_head:
            self.owner.head_late()

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head; ``rest`` followed it."""
        owner = self.owner
        if owner.closed:
            return
        req = self.parsing
        self.parser = httptools.HttpRequestParser(self)
        head = self.connect_head
        if head is not None:  # a CONNECT: the handshake takes the head and what follows
            self.connect_head = None
            owner.connect_request(head + rest)
            return
        if req is None or req.websocket or req.done:
            # a WebSocket handshake: the rest waits for the 101 (or for the next request)
            if req is not None:
                req.done = True
                self.parsing = None
            owner.hold(rest)
            return
        # an upgrade we do not relay, with a body: parse the body with a fresh parser
        self.synthetic = True
        framing = request_framing_field(request_body(req.to.length, req.chunked), req.to.length)
        self.feed(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        if rest and not owner.closed:
            self.feed(rest)

    # -- llhttp callbacks -----------------------------------------------------------

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
            raise refusal("request line too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.synthetic:
            return
        if not self.in_head:
            self.trailers.append((name, value))
            return
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise refusal("request head too large", 431)
        headers = self.headers
        if len(headers) >= self.max_headers:
            raise refusal("too many header fields", 431)
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.synthetic:
            return
        self.in_head = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.parser.get_method() == b"CONNECT":
            # not forwarded: the CONNECT handshake parses this head again, as if it were the
            # connection's first (its rules, authentication and replies); llhttp treats
            # CONNECT as an upgrade and stops right after it (``_upgraded``)
            self.connect_head = self._connect_head()
            return
        req = self._build_request()
        owner = self.owner
        if self.services.auth is not None:
            self.check_credentials(req)  # before it is the request being read: 407 refuses it
        self.parsing = req
        owner.request_head(req)

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
        self.owner.send_up(req, body)

    def on_message_complete(self) -> None:
        req = self.parsing
        if req is None:  # pragma: no cover
            return
        if req.websocket is False and self.parser.should_upgrade() and req.has_body():
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
                self.owner.send_up(req, last_chunk(trailers))
        req.done = True
        self.parsing = None
        if req.local:
            self.owner.local_done(req)

    # -- credentials ----------------------------------------------------------------

    def check_credentials(self, req: Exchange) -> None:
        """Proxy authentication, per request: a value verified once is not checked again."""
        creds = req.to.credentials
        if creds is None:
            self.services.refused("auth", "proxy authentication required")
            err = ProtocolError(
                "proxy authentication required", status=407, proxy_status="http_request_denied"
            )
            if not req.drainable():
                raise err  # answered at once; the connection closes
            # the usual first step of a client's authentication: answered once read,
            # the connection kept for the retry with credentials
            req.local = True
            req.denial = err
            return
        if creds != self.auth_ok:
            throttled = auth_throttled(self.services, self.conn)
            if throttled is not None:
                raise throttled  # answered 429, the connection closes
            req.auth_pending = True
            self.services.tasks.spawn(self._authenticate(req, creds))

    async def _authenticate(self, req: Exchange, creds: bytes) -> None:
        auth = self.services.auth
        assert auth is not None
        user, err = await check_proxy_authorization(auth, creds.decode("latin-1"))
        if self.closed:  # the connection closed meanwhile
            return
        if err is None:
            self.auth_ok = creds
            self.conn.user = user
            req.auth_pending = False
            self.owner.authenticated(req)
            return
        auth_failed(self.services, self.conn, user)
        self.owner.unauthenticated(req, err)

    # -- exchanges ------------------------------------------------------------------

    def _connect_head(self) -> bytes:
        """The CONNECT head as llhttp parsed it (one field per line, OWS trimmed)."""
        parts = [b"CONNECT ", b"".join(self.url_parts), b" HTTP/"]
        parts.append(self.parser.get_http_version().encode("ascii", "replace"))
        parts.append(b"\r\n")
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _build_request(self) -> Exchange:
        parser = self.parser
        method = parser.get_method()
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
        req = Exchange(to, http10, self.loop.time())
        if not http10:
            req.keep_alive = parser.should_keep_alive()
        if to.codings:
            req.chunked = True
        if to.websocket and parser.should_upgrade():
            req.websocket = True
        if to.host == onboarding.RESERVED_HOST:
            # the onboarding page through the proxy (a phone set up to use it fetches the CA)
            req.local = True
            req.onboarding = onboarding.answer(self.services.config.tls.ca_dir, to.path)
            return req
        if to.max_forwards == 0:
            # the proxy is the final recipient: no destination, no module sees it
            req.local = True
            if method == b"TRACE":
                req.trace = self._received_head(method, version)
            return req
        if chain.active:
            self._with_modules(req)
        if req.prepared:
            req.head = wire_cached(to)
        return req

    def _received_head(self, method: bytes, version: bytes) -> bytes:
        """The head as received (fields as llhttp parsed them), without credentials."""
        parts = [method, b" ", b"".join(self.url_parts), b" ", version, b"\r\n"]
        for name, value in self.headers:
            if name.lower() not in TRACE_HIDDEN:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _with_modules(self, req: Exchange) -> None:
        """A module context for ``req``; its hooks wait until it is active (``prepare``)."""
        conn = self.conn
        to = req.to
        chain = self.chain
        req.ctx = Context(
            listener=conn.listener,
            protocol="http-forward",
            client=conn.client,
            host=to.host,
            port=to.port,
            user=conn.user,
        )
        if chain.connect_hooks or chain.request_hooks or chain.c2s_data:
            req.prepared = False
            if chain.c2s_data:
                req.held = []

    def prepare(self, req: Exchange) -> None:
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
            req.head = wire(head, changed=True)
        else:
            req.head = wire_cached(req.to)
        held = req.held
        if held is not None:
            req.held = None
            send_up = self.owner.send_up
            for body in held:
                body = self._filter_body(req, body)
                if body:
                    send_up(req, chunk(body) if req.chunked else body)
            if req.held_end:
                send_up(req, last_chunk(req.trailers))

    def _filter_body(self, req: Exchange, body: bytes) -> bytes:
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
