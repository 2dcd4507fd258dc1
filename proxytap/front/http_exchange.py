"""What the two sides of a forwarded client connection share: exchanges, states, output.

The plain-HTTP forwarder is three objects per client connection:
``HttpForwarder`` (``http_forward``: the client connection, its queue of
exchanges, answers, endings), its ``RequestReader`` (``http_client``: llhttp
on the client's bytes, limits, building an ``Exchange`` per request) and one
``UpstreamConnection`` per origin connection (``http_upstream``: connect,
response heads, body framing towards the client). They talk through named
calls; what they all touch per chunk lives here, in small slotted objects:

* ``Exchange``: one request, from its head to the end of its response.
* ``ClientOut``: the client's output, corked while one read is handled (writes
  made meanwhile go out in one ``write``), the upstream writes corked the same
  way, and the activity counter of the idle timer.
* ``UpPhase`` / ``ClientPhase``: the states of an upstream connection and of
  the client connection, one enum each instead of a set of flags that could
  contradict each other. An exchange itself keeps two facts (its request was
  read whole, its response head was relayed): they are independent (an
  origin may answer before the request body ends), so they stay two flags.
"""

from __future__ import annotations

import functools
import time
from enum import IntEnum
from typing import TYPE_CHECKING, Final

from proxytap.errors import ProtocolError
from proxytap.hostport import hostport
from proxytap.logstream import access
from proxytap.modules.api import Context
from proxytap.policy.message import RequestHead, serialize
from proxytap.proto.http1 import request_head, response_head

if TYPE_CHECKING:
    import asyncio

    from proxytap.flows.table import Endpoint
    from proxytap.front.http_upstream import UpstreamConnection

MAX_IDLE_UPSTREAMS: Final = 8  # idle upstream connections kept per client connection
LINGER: Final = 2.0  # seconds a closing client connection is drained before the close
CACHE_HEAD: Final = 4096  # request heads up to this size are memoized by the header rules
# a request refused 407 whose body is at most this long is read and dropped, and the
# connection kept for the retry with credentials; a longer, chunked or
# Expect: 100-continue body is not waited for: answered at once, then closed
DRAIN_MAX: Final = 1 << 20
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


@functools.cache
def response_keys(listener: str, source: str) -> dict[int, tuple[str, str, str]]:
    """``stats.http_responses`` keys of one listener and responder, by status // 100.

    Made once per (listener, responder), so counting a response builds no tuple.
    """
    return {c: (listener, f"{c}xx", source) for c in range(10)}


class UpPhase(IntEnum):
    """An upstream connection's state."""

    CONNECTING = 0  # being opened for its first request
    CLOSED = 1  # no flow any more (closed before or after it was ready)
    IDLE = 2  # kept for the next request to its (host, port)
    HEAD = 3  # a request started: waiting for (or reading) the response head
    BODY = 4  # the final head went to the client: relaying the body
    DONE = 5  # the response ended in this read; the forwarder acts on it after the read
    TUNNEL = 6  # after 101: bytes relayed unparsed both ways


class ClientPhase(IntEnum):
    """The client connection's state."""

    HTTP = 0  # requests are read and answered
    TUNNEL = 1  # after 101: bytes relayed unparsed both ways
    LINGER = 2  # the last answer is written; half-closed, drained until the close
    CLOSED = 3


class BadResponse(Exception):
    """The origin broke HTTP (or a module refused or failed): what the client gets."""

    def __init__(
        self, reason: str, proxy_status: str = "http_protocol_error", status: int = 502
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.proxy_status = proxy_status
        self.status = status

    @classmethod
    def of(cls, exc: ProtocolError) -> BadResponse:
        return cls(exc.reason, exc.proxy_status, exc.status)


def refusal(reason: str, status: int = 400) -> ProtocolError:
    """A request the proxy refuses (``http_request_error``)."""
    return ProtocolError(reason, status=status, proxy_status="http_request_error")


def wire(head: RequestHead, changed: bool = False) -> bytes:
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


def wire_cached(head: RequestHead) -> bytes:
    """``wire`` of a head shared through the rules' memo: built once per head."""
    hit = _wires.get(id(head))
    if hit is not None and hit[0] is head:
        return hit[1]
    out = wire(head)
    if len(_wires) >= 512:
        _wires.clear()
    _wires[id(head)] = (head, out)
    return out


class Exchange:
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
    local = False  # answered by the proxy itself (OPTIONS / TRACE with Max-Forwards: 0)
    trace = b""  # TRACE: the head to echo (as received, without credentials)
    # http://proxytap.ca/...: the onboarding answer (status, content type, body)
    onboarding: tuple[int, str, bytes] | None = None
    denial: ProtocolError | None = None  # local: a 407 to answer once the request is read
    auth_pending = False  # its credentials are being checked: not sent yet
    upstream: UpstreamConnection | None = None
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

    def __init__(self, to: RequestHead, http10: bool, start: float) -> None:
        self.method = to.method
        self.to = to
        self.http10 = http10
        self.start = start  # the loop's clock (the access line, timers)
        # the latency histogram's: the loop's clock may count whole milliseconds only
        self.began = time.monotonic()
        self.is_head = to.method == b"HEAD"
        self.pending: list[bytes] = []  # framed body waiting for the upstream connection

    def has_body(self) -> bool:
        return self.chunked or self.to.length > 0

    def drainable(self) -> bool:
        """Whether a refusal may wait for the whole request and keep the connection."""
        if not self.has_body():
            return True
        if self.chunked or self.to.length > DRAIN_MAX:
            return False
        # the client waits for a 100 before its body: it may never come
        return not any(n.lower() == b"expect" for n, _ in self.to.headers)


class ClientOut:
    """The client's output and what both sides count, shared by one connection's objects.

    While the forwarder handles one read of the client (``ucork``) upstream
    writes are collected per upstream connection (``dirty``) and written once
    at the end; while an upstream connection handles one read of the origin
    (``corked``) writes to the client are collected and written once.
    ``activity`` counts reads on either side, for the idle timer.
    """

    __slots__ = ("activity", "chunks", "closed", "corked", "dirty", "transport", "ucork")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.corked = False
        self.chunks: list[bytes] = []
        self.ucork = False
        self.dirty: list[UpstreamConnection] = []
        self.activity = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        """Write to the client (joined with the rest of this read when corked)."""
        if self.corked:
            self.chunks.append(data)
        elif not self.closed:
            self.transport.write(data)

    def flush(self) -> None:
        out = self.chunks
        if out:
            self.chunks = []
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))


# fields a TRACE answer never echoes: credentials (RFC 9110 section 9.3.8: "likely to
# contain sensitive data"); Proxy-Authorization above all, it is the proxy's own password
TRACE_HIDDEN: Final = frozenset((b"proxy-authorization", b"authorization", b"cookie"))


def local_answer(req: Exchange, allow: bytes, keep: bool) -> bytes:
    """The proxy's own 200 to an OPTIONS or TRACE with ``Max-Forwards: 0``.

    Also the answers to ``http://proxytap.ca/`` (``onboarding``). (A 407, the
    other local answer, is built by ``replies.http_error``.)
    """
    if req.onboarding is not None:
        status, ctype, body = req.onboarding
        line = b"HTTP/1.1 %d %s" % (status, b"OK" if status == 200 else b"Not Found")
        fields = b"Content-Type: " + ctype.encode("ascii") + b"\r\nCache-Control: no-store\r\n"
        if req.is_head:
            body = b""
        return response_head(line, fields, b"Content-Length: %d\r\n" % len(body), keep) + body
    if req.method == b"TRACE":
        fields = b"Content-Type: message/http\r\n"
        body = req.trace
    else:
        fields = b"Allow: " + allow + b"\r\n"
        body = b""
    framing = b"Content-Length: %d\r\n" % len(body)
    return response_head(b"HTTP/1.1 200 OK", fields, framing, keep) + body


def log_access(client: Endpoint, req: Exchange, now: float) -> None:
    """The access log line: one per request, never payload bytes."""
    to = req.to
    access(
        "%s %s %s%s %s up=%d down=%d %.3fs",
        hostport(*client),
        req.method.decode("latin-1"),
        hostport(to.host, to.port),
        to.path.partition(b"?")[0].decode("latin-1"),
        req.status or "-",
        req.up_bytes,
        req.down_bytes,
        now - req.start,
    )
