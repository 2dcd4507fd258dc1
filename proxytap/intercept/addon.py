"""proxytap inside the TLS engine: sessions, header rules and modules, export, TLS events.

``Session`` is one intercepted tunnel as proxytap sees it: the inner flow
(true client, true server, the tunnel's uid), the module context of the
tunnel, the export order of its decrypted exchanges
(``proxytap.intercept.render``) and its end. ``ProxytapAddon`` is the one
mitmproxy addon that connects the engine's events to sessions, keyed by the
engine's client connection id (the engine knows nothing else of proxytap):

* request and response heads go through the same header rules and module
  chain as plain HTTP (``proxytap.policy.headers``, ``proxytap.modules``),
  adapted here; a refusal or a failing rule or module answers the request
  with the same status and ``Proxy-Status`` as plain HTTP (fail closed);
* bodies are streamed (never held whole) and copied to the export as they
  pass; WebSocket messages and raw TCP inside TLS are exported as payloads;
  the engine's per-flow message lists are cleared as they are read;
* the TLS legs' version and cipher go on the flow record; a client that
  rejects proxytap's certificate is remembered (pinning fail-open); an
  origin certificate that fails verification is counted and logged, and the
  client gets a 502 that names the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy import tcp as mtcp
from mitmproxy.tls import TlsData

from proxytap.errors import ProtocolError
from proxytap.flows.table import DOWN, UP, CloseReason, Flow
from proxytap.hostport import hostport
from proxytap.intercept.leg import Leg
from proxytap.intercept.render import Exchange, ExchangeOrder, request_line, status_line, with_host
from proxytap.modules.api import Context
from proxytap.policy.hopbyhop import connection_tokens
from proxytap.policy.message import RequestHead, ResponseHead
from proxytap.proto.httpconnect import proxy_status_value

if TYPE_CHECKING:
    from proxytap.front.relay import Relay
    from proxytap.front.services import Services
    from proxytap.intercept.engine import _Handler
    from proxytap.proto.tlshello import ClientHello

log = logging.getLogger("proxytap.intercept")

# the client refused proxytap's certificate: what the engine's error says then
_REJECTED = ("unknown ca", "bad certificate", "certificate unknown", "does not trust")
_HANDSHAKE_CLOSE = "disconnected during the handshake"
_NO_BODY = frozenset((204, 304))
REFUSED_BODY_MAX = 1 << 20  # a refused request's body read (and dropped) to answer it


def upstream_tls_reason(error: str) -> str:
    """The metric label of an origin's TLS failure, from the engine's error text."""
    text = error.lower()
    if "expired" in text:
        return "expired"
    if "hostname mismatch" in text or "doesn't match" in text or "not valid for" in text:
        return "wrong_name"
    if "self-signed" in text or "self signed" in text or "unable to get local issuer" in text:
        return "untrusted"
    if "verify" in text or "certificate" in text:
        return "invalid"
    return "handshake"


class Session:
    """One intercepted tunnel (see the module docstring)."""

    def __init__(self, services: Services, relay: Relay, flow: Flow, hello: ClientHello) -> None:
        self.services = services
        self.relay = relay
        self.flow = flow
        self.hub = self.services.hub
        self.ctx: Context | None = relay.ctx
        self.chain = self.services.chains[flow.outer.listener]
        self.handler: _Handler | None = None
        self.reason: CloseReason | None = None
        self.order = ExchangeOrder(self.emit)
        self.exchanges: dict[str, Exchange] = {}  # engine flow id -> export
        self.emitted = False  # decrypted bytes went to the export
        self.upstream_error: str | None = None  # the origin's TLS failed (its certificate)
        name = hello.sni or flow.requested_host
        try:
            ipaddress.ip_address(name)
            self.server_name: str | None = hello.sni
        except ValueError:
            self.server_name = name
        self.cipher: Flow | None = None
        if self.services.config.tls.export_ciphertext and self.hub is not None:
            self.cipher = self.services.open_flow(
                flow.outer, flow.server, flow.requested_host, flow.requested_port
            )
            self.cipher.sni, self.cipher.alpn = flow.sni, flow.alpn
            self.cipher.ja3, self.cipher.ja4 = flow.ja3, flow.ja4
        flow.valve = self

    # -- export -------------------------------------------------------------------

    def emit(self, direction: int, data: bytes) -> None:
        """Decrypted bytes of the inner flow (rendered HTTP/1.1, WebSocket or TCP payload)."""
        if not data:
            return
        if not self.emitted:
            self.emitted = True
            if self.hub is not None:  # classified on the decrypted bytes, timed from them
                self.hub.rearm(self.flow)
        self._tap(self.flow, direction, data)

    def cipher_up(self, data: bytes) -> None:
        if self.cipher is not None and data:
            self._tap(self.cipher, UP, data)

    def cipher_down(self, data: bytes) -> None:
        if self.cipher is not None and data:
            self._tap(self.cipher, DOWN, data)

    def _tap(self, flow: Flow, direction: int, data: bytes) -> None:
        """Count ``data`` on ``flow`` and hand it to the export."""
        if direction == UP:
            flow.bytes_up += len(data)
            flow.chunks_up += 1
        else:
            flow.bytes_down += len(data)
            flow.chunks_down += 1
        if self.hub is not None:
            self.hub.data(flow, direction, data, time.time())

    # -- life ---------------------------------------------------------------------

    def export_hold(self, held: bool) -> None:
        """``Valve``: an export consumer under "wait" is behind: stop reading both legs."""
        handler = self.handler
        if handler is None:
            return
        for io in list(handler.transports.values()):
            leg = getattr(io.writer, "transport", None)
            if isinstance(leg, Leg):
                leg.hold(held)

    def shutdown(self, force: bool) -> None:
        if force and self.handler is not None:
            self.reason = CloseReason.SHUTDOWN
            self.handler.stop()

    def finish(self, reason: CloseReason) -> None:
        """The engine is done with the connection: the flows close, the tunnel ends."""
        self.flow.valve = None
        for ex in list(self.exchanges.values()):
            ex.end()
        self.exchanges.clear()
        now = time.time()
        if self.cipher is not None:
            self.services.flow_closed(self.cipher, reason, now)
        relay = self.relay
        relay.on_done(relay, reason)


class ProxytapAddon:
    """The engine's hooks, mapped onto sessions (see the module docstring)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.sessions: dict[str, Session] = {}

    def _session(self, conn: Any) -> Session | None:
        return self.sessions.get(conn.id)

    # -- TLS ----------------------------------------------------------------------

    def tls_established_client(self, data: TlsData) -> None:
        session = self._session(data.context.client)
        if session is None:
            return
        flow = session.flow
        conn = data.conn
        flow.tls_version = conn.tls_version
        flow.tls_cipher = conn.cipher
        self.services.stats.intercept[("intercepted", "tls")] += 1

    def tls_failed_client(self, data: TlsData) -> None:
        session = self._session(data.context.client)
        if session is None:
            return
        error = (data.conn.error or "").lower()
        flow = session.flow
        stats = self.services.stats
        if any(r in error for r in _REJECTED) or _HANDSHAKE_CLOSE in error:
            host = session.server_name or flow.requested_host
            remembered = self.services.pins.record(flow.client[0], host, time.monotonic())
            stats.intercept_client_failures["rejected"] += 1
            log.warning(
                "intercept: client %s rejected proxytap's certificate for %s (%s)%s",
                hostport(*flow.client),
                host,
                data.conn.error,
                f"; passed through for {self.services.pins.ttl:g}s" if remembered else "",
            )
        else:
            stats.intercept_client_failures["other"] += 1
            log.info(
                "intercept: TLS with client %s failed: %s", hostport(*flow.client), data.conn.error
            )

    def tls_failed_server(self, data: TlsData) -> None:
        session = self._session(data.context.client)
        if session is None:
            return
        error = data.conn.error or "TLS handshake failed"
        reason = upstream_tls_reason(error)
        self.services.stats.intercept_upstream_errors[reason] += 1
        session.upstream_error = error
        flow = session.flow
        log.warning(
            "intercept: origin %s (%s) failed TLS verification: %s",
            hostport(flow.requested_host, flow.requested_port),
            hostport(*flow.server),
            error,
        )

    # -- HTTP ---------------------------------------------------------------------

    def requestheaders(self, f: http.HTTPFlow) -> None:
        session = self._session(f.client_conn)
        if session is None:
            return
        req = f.request
        h2 = not req.http_version.startswith("HTTP/1")
        ex = session.order.start(keep_length=not h2)
        session.exchanges[f.id] = ex
        if session.upstream_error is not None:  # nothing goes to an origin that failed TLS
            status = "tls_certificate_error"
            if upstream_tls_reason(session.upstream_error) == "handshake":
                status = "tls_protocol_error"
            err = ProtocolError(
                f"the origin's TLS failed: {session.upstream_error}",
                status=502,
                proxy_status=status,
            )
            _refuse(session, f, err)
            return
        try:
            head = _judge_request(session, f)
        except ProtocolError as err:
            self.services.stats.intercept[("refused", "request")] += 1
            ex.request_head(_line(req), _fields(req, h2))
            _refuse(session, f, err)
            return
        ex.request_head(request_line(head.method, head.path, _version(req)), _fields(req, h2))
        req.stream = _streamer(session, ex, UP, head.chunked or h2)

    def request(self, f: http.HTTPFlow) -> None:
        session = self._session(f.client_conn)
        ex = None if session is None else session.exchanges.get(f.id)
        if ex is not None:
            if f.request.raw_content:  # not streamed: a refused request's body, read whole
                ex.body(UP, f.request.raw_content)
            ex.message_end(UP)

    def responseheaders(self, f: http.HTTPFlow) -> None:
        session = self._session(f.client_conn)
        ex = None if session is None else session.exchanges.get(f.id)
        resp = f.response
        if session is None or ex is None or resp is None:
            return
        h2 = not resp.http_version.startswith("HTTP/1")
        bodyless = f.request.method == "HEAD" or resp.status_code < 200
        bodyless = bodyless or resp.status_code in _NO_BODY
        line = status_line(resp.status_code, resp.data.reason, resp.data.http_version)
        ex.response_head(line, list(resp.headers.fields), bodyless)
        try:
            chunked = _judge_response(session, f)
        except ProtocolError as err:
            self.services.stats.intercept[("refused", "response")] += 1
            _replace_response(session, f, err)
            return
        resp.stream = _streamer(session, ex, DOWN, chunked or h2)

    def response(self, f: http.HTTPFlow) -> None:
        session = self._session(f.client_conn)
        if session is None:
            return
        ex = session.exchanges.pop(f.id, None)
        if ex is not None:
            ex.message_end(UP)
            if f.response is not None and f.response.raw_content:  # not streamed: ours
                ex.body(DOWN, f.response.raw_content)
            ex.message_end(DOWN)
            ex.end()
        self.services.stats.intercept_requests[_protocol(f)] += 1

    def error(self, f: http.HTTPFlow) -> None:
        session = self._session(f.client_conn)
        if session is None:
            return
        ex = session.exchanges.pop(f.id, None)
        if ex is not None:
            ex.end()

    # -- WebSocket and raw TCP inside TLS ---------------------------------------------

    def websocket_message(self, f: http.HTTPFlow) -> None:
        session = self._session(f.client_conn)
        ws = f.websocket
        if ws is None:
            return
        if session is not None:
            for msg in ws.messages:
                if not _filter_payload(session, msg, msg.from_client):
                    f.kill()  # type: ignore[no-untyped-call]
                    break
                session.emit(UP if msg.from_client else DOWN, msg.content)
        ws.messages.clear()  # the engine would keep every message of the connection

    def tcp_message(self, f: mtcp.TCPFlow) -> None:
        session = self._session(f.client_conn)
        if session is not None:
            for msg in f.messages:
                if not _filter_payload(session, msg, msg.from_client):
                    f.kill()  # type: ignore[no-untyped-call]
                    break
                session.emit(UP if msg.from_client else DOWN, msg.content)
        f.messages.clear()


# -- the adapter: engine messages <-> proxytap heads ------------------------------------


def _version(req: http.Request | http.Response) -> bytes:
    return req.data.http_version if req.http_version.startswith("HTTP/1") else b"HTTP/1.1"


def _line(req: http.Request) -> bytes:
    return request_line(req.data.method, req.data.path, _version(req))


def _fields(req: http.Request, h2: bool) -> list[tuple[bytes, bytes]]:
    fields = list(req.headers.fields)
    if h2:
        fields = with_host(fields, req.data.authority or req.host.encode("idna"))
    return fields


def _protocol(f: http.HTTPFlow) -> str:
    return "http1" if f.request.http_version.startswith("HTTP/1") else "http2"


def _judge_request(session: Session, f: http.HTTPFlow) -> RequestHead:
    """The request through validate, rewrite and the modules; written back to ``f``."""
    req = f.request
    h2 = not req.http_version.startswith("HTTP/1")
    rules = session.services.rules
    chain = session.chain
    original = list(req.headers.fields)
    fields = with_host(original, req.data.authority or req.host.encode("idna"))
    head = RequestHead(
        req.data.method, req.data.path, _version(req), fields, session.flow.client[0]
    )
    try:
        host_value, _ = rules.check_request(head)
        head.host, head.port = req.host, req.port
        head.authority = host_value or req.data.authority
        head.path = req.data.path
        if chain.rewrite_requests:
            rules.rewrite_request(head)
        if chain.request_hooks:
            ctx = _context(session)
            chain.request(ctx, head)  # each hook's result is rechecked by the chain
    except ProtocolError:
        raise
    except Exception as exc:  # a bug in a rule or a module: fail closed
        raise chain.failed(chain.names[0][-1], "request", exc) from exc
    out = list(head.headers)
    had_host = any(n.lower() == b"host" for n, _ in original)
    if (not h2 or had_host) and head.authority:
        out.insert(0, (b"Host", head.authority))
    if not h2 and head.chunked:
        out.append((b"Transfer-Encoding", head.codings or b"chunked"))
    if not h2 and head.close:  # the engine ends the client connection after the response
        out.append((b"Connection", b"close"))
    if not h2 and head.websocket:
        out = [(n, v) for n, v in out if n.lower() not in (b"connection", b"upgrade")]
        out += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    req.headers = http.Headers(out)
    if head.path != req.data.path:
        req.path = head.path.decode("latin-1")
    return head


def _judge_response(session: Session, f: http.HTTPFlow) -> bool:
    """The response through validate, rewrite and the modules; True when it is chunked."""
    resp = f.response
    assert resp is not None
    h2 = not resp.http_version.startswith("HTTP/1")
    rules = session.services.rules
    chain = session.chain
    head = ResponseHead(resp.status_code, _version(resp), list(resp.headers.fields))
    try:
        rules.validate_response(head)
        if chain.rewrite_responses:
            rules.rewrite_response(head)
        if chain.response_hooks:
            chain.response(_context(session), head)
    except ProtocolError:
        raise
    except Exception as exc:
        raise chain.failed(chain.names[1][-1], "response", exc) from exc
    out = list(head.headers)
    if not h2 and head.chunked:
        out.append((b"Transfer-Encoding", head.codings or b"chunked"))
    if not h2 and b"close" in connection_tokens(list(resp.headers.fields)):
        out.append((b"Connection", b"close"))  # the origin closes: so does the client leg
    if not h2 and resp.status_code == 101:
        out = [(n, v) for n, v in out if n.lower() not in (b"connection", b"upgrade")]
        out += [
            (b"Connection", b"Upgrade"),
            (b"Upgrade", resp.headers.get("upgrade", "websocket").encode("latin-1")),
        ]
    resp.headers = http.Headers(out)
    return head.chunked


def _context(session: Session) -> Context:
    ctx = session.ctx
    if ctx is None:
        flow = session.flow
        outer = flow.outer
        ctx = session.ctx = Context(
            listener=outer.listener,
            protocol=outer.protocol,
            client=flow.client,
            host=flow.requested_host,
            port=flow.requested_port,
            user=outer.user,
        )
        ctx.server = flow.server
        ctx.flow = flow
    return ctx


def _streamer(
    session: Session, ex: Exchange, direction: int, reframed: bool
) -> Callable[[bytes], bytes]:
    """The body callback: each chunk through the modules' data hooks, copied to the export."""
    chain = session.chain
    hooks = chain.c2s_data if direction == UP else chain.s2c_data
    filt = chain.client_to_server if direction == UP else chain.server_to_client

    def stream(chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        if direction == DOWN:
            ex.body(direction, chunk)  # the export gets the response as the origin sent it
        if hooks:
            out = filt(_context(session), chunk)
            if not reframed and len(out) != len(chunk):
                raise chain.failed(
                    hooks[-1][0],
                    "client_to_server" if direction == UP else "server_to_client",
                    ValueError("a body with a Content-Length must keep its length"),
                )
            chunk = out
        if direction == UP:
            ex.body(direction, chunk)  # and the request as it goes to the origin
        return chunk

    return stream


def _filter_payload(session: Session, msg: Any, from_client: bool) -> bool:
    """A WebSocket message or a TCP chunk inside TLS through the modules' byte hooks.

    False when a module refused or failed: the connection is closed (fail closed).
    """
    chain = session.chain
    hooks = chain.c2s_data if from_client else chain.s2c_data
    if not hooks:
        return True
    filt = chain.client_to_server if from_client else chain.server_to_client
    try:
        msg.content = filt(_context(session), msg.content)
    except ProtocolError as err:
        log.warning("intercept: a module closed %s: %s", session.flow.uid, err.reason)
        return False
    return True


def _refuse(session: Session, f: http.HTTPFlow, err: ProtocolError) -> None:
    """Answer ``f`` with proxytap's error instead of sending it on.

    The engine reads a request's body whole before it answers for an addon. A
    body that is not known to be small (over ``REFUSED_BODY_MAX``, or chunked)
    is not worth reading to refuse: the request's connection (or HTTP/2
    stream) is closed instead, as plain HTTP closes after its answer.
    """
    req = f.request
    length = req.headers.get("content-length")
    chunked = "chunked" in req.headers.get("transfer-encoding", "").lower()
    if chunked or (length is not None and (not length.isdigit() or int(length) > REFUSED_BODY_MAX)):
        log.info(
            "intercept: %s refused (%s), its body not read: closed", session.flow.uid, err.reason
        )
        f.kill()  # type: ignore[no-untyped-call]
        return
    f.response = _error_response(session, err)


def _error_response(session: Session, err: ProtocolError) -> http.Response:
    config = session.services.config
    status = err.status or 502
    body = (err.reason + "\n").encode("utf-8")
    details = err.reason if err.proxy_status.startswith("tls_") else None
    proxy_status = proxy_status_value(config.proxy_name, err.proxy_status, details)
    headers = {"Content-Type": "text/plain; charset=utf-8", "Proxy-Status": proxy_status}
    return http.Response.make(status, body, headers)


def _replace_response(session: Session, f: http.HTTPFlow, err: ProtocolError) -> None:
    """A response that fails the rules: the client gets our 502 instead; the origin's body
    is read and dropped (the engine has already started reading it)."""
    error = _error_response(session, err)
    body = error.content or b""
    f.response = error
    sent = False

    def swallow(chunk: bytes) -> bytes:
        nonlocal sent
        if chunk or sent:
            return b""
        sent = True
        return body

    error.stream = swallow
