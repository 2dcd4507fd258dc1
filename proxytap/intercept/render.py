"""Decrypted HTTP as HTTP/1.1 bytes for the export, in an order analyzers can pair (pure).

An intercepted connection is exported as one inner flow between the true
client and the true server (the TCP ports of the TLS connection), on
``tcp/http``: requests in the client-to-server direction, responses in the
other, each rendered as an HTTP/1.1 message:

* HTTP/1.x messages keep their request line or status line and their header
  fields as the engine parsed them (names' case and order kept); request
  fields are the ones sent to the origin (after proxytap's header rules),
  responses the ones the origin sent (before them), as for plain HTTP.
* HTTP/2 messages become HTTP/1.1: ``Host`` from ``:authority`` (first, when
  the request had none), the status line with the standard reason phrase.
* Bodies keep ``Content-Length`` framing when the message had it; otherwise a
  body is sent chunked (``Transfer-Encoding: chunked`` added), and a response
  that may have a body but has none gets ``Content-Length: 0``, so a parser
  never reads a response until the connection closes.
* HTTP/2 streams run concurrently; an HTTP/1.1 analyzer pairs the n-th
  request with the n-th response of a connection. So exchanges are written
  one at a time, whole, in the order they end (``ExchangeOrder``): the one
  being written streams straight through, the others wait in memory (at most
  ``WAIT_CAP`` bytes each; past it the rest of that body is left out and the
  message carries ``X-Proxytap-Truncated: 1``, with its length fixed up).
"""

from __future__ import annotations

import http
from collections.abc import Callable, Sequence
from typing import Final

from proxytap.flows.table import DOWN, UP

WAIT_CAP: Final = 1 << 20  # body bytes kept per waiting exchange (both directions)
TRUNCATED: Final = (b"X-Proxytap-Truncated", b"1")
_CL: Final = b"content-length"
_TE: Final = b"transfer-encoding"
_HOST: Final = b"host"

Fields = Sequence[tuple[bytes, bytes]]
Emit = Callable[[int, bytes], None]


def _has(fields: Fields, name: bytes) -> bytes | None:
    for n, v in fields:
        if n.lower() == name:
            return v
    return None


def _block(fields: Fields) -> bytes:
    return b"".join(n + b": " + v + b"\r\n" for n, v in fields)


def request_line(method: bytes, target: bytes, version: bytes) -> bytes:
    """``version``: the message's own (``HTTP/1.0`` / ``HTTP/1.1``); HTTP/2 and 3 say 1.1."""
    if not version.startswith(b"HTTP/1."):
        version = b"HTTP/1.1"
    return method + b" " + target + b" " + version + b"\r\n"


def status_line(status: int, reason: bytes, version: bytes) -> bytes:
    if not version.startswith(b"HTTP/1."):
        version = b"HTTP/1.1"
    if not reason:
        try:
            reason = http.HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
    return version + b" %d " % status + reason + b"\r\n"


def with_host(fields: Fields, authority: bytes) -> list[tuple[bytes, bytes]]:
    """HTTP/2 fields with ``Host`` first (from ``:authority``) unless one is there."""
    out = list(fields)
    if authority and _has(out, _HOST) is None:
        out.insert(0, (b"Host", authority))
    return out


class Message:
    """One message being exported: its start line and fields, then body chunks."""

    __slots__ = ("bodyless", "chunked", "done", "fields", "keep_length", "line", "started", "wait")

    def __init__(self, line: bytes, fields: Fields, bodyless: bool, keep_length: bool) -> None:
        self.line = line
        self.fields = list(fields)
        self.bodyless = bodyless  # 1xx / 204 / 304 / a response to HEAD: framing as it is
        self.keep_length = keep_length  # HTTP/1: Content-Length kept; HTTP/2: bodies chunked
        self.started = False  # the head has been emitted
        self.chunked = False
        self.done = False
        self.wait: list[bytes] | None = None  # body kept while the exchange waits its turn

    def head(self, body_follows: bool, truncated: bool) -> bytes:
        """The head, framed for what follows."""
        fields = self.fields
        if not self.bodyless:
            te = _has(fields, _TE)
            cl = _has(fields, _CL)
            if te is not None and b"chunked" in te.lower():
                self.chunked = True
            elif body_follows and (truncated or cl is None or not self.keep_length):
                fields = [(n, v) for n, v in fields if n.lower() not in (_CL, _TE)]
                fields.append((b"Transfer-Encoding", b"chunked"))
                self.chunked = True
            elif not body_follows and self.line[:5] == b"HTTP/" and (cl is None or truncated):
                fields = [(n, v) for n, v in fields if n.lower() != _CL]
                fields.append((b"Content-Length", b"0"))
        if truncated:
            fields = [*fields, TRUNCATED]
        self.started = True
        return self.line + _block(fields) + b"\r\n"

    def frame(self, chunk: bytes) -> bytes:
        if not self.chunked:
            return chunk
        return b"%x\r\n" % len(chunk) + chunk + b"\r\n"

    def tail(self) -> bytes:
        return b"0\r\n\r\n" if self.chunked else b""


class Exchange:
    """A request and its response, as they go out (or wait) in the export."""

    __slots__ = (
        "keep_length",
        "order",
        "over",
        "request",
        "response",
        "seq",
        "truncated",
        "waited",
    )

    def __init__(self, order: ExchangeOrder, seq: int, keep_length: bool) -> None:
        self.order = order
        self.seq = seq
        self.keep_length = keep_length
        self.request: Message | None = None
        self.response: Message | None = None
        self.truncated = False
        self.over = False
        self.waited = 0  # body bytes kept while waiting

    def request_head(self, line: bytes, fields: Fields) -> None:
        self.request = Message(line, fields, False, self.keep_length)

    def response_head(self, line: bytes, fields: Fields, bodyless: bool) -> None:
        self.response = Message(line, fields, bodyless, self.keep_length)

    def body(self, direction: int, chunk: bytes) -> None:
        msg = self.request if direction == UP else self.response
        if msg is None or msg.done or not chunk:
            return
        if self.order.current is self:
            emit = self.order.emit
            if not msg.started:
                emit(direction, msg.head(True, self.truncated))
            emit(direction, msg.frame(chunk))
            return
        if self.waited + len(chunk) > WAIT_CAP:
            self.truncated = True
            return
        self.waited += len(chunk)
        if msg.wait is None:
            msg.wait = []
        msg.wait.append(chunk)

    def message_end(self, direction: int) -> None:
        msg = self.request if direction == UP else self.response
        if msg is None or msg.done:
            return
        msg.done = True
        if self.order.current is self:
            self._close(direction, msg)

    def end(self) -> None:
        """The exchange is over (its response ended, or it failed)."""
        self.order.ended(self)

    def _close(self, direction: int, msg: Message) -> None:
        emit = self.order.emit
        if not msg.started:
            emit(direction, msg.head(False, self.truncated))
        tail = msg.tail()
        if tail:
            emit(direction, tail)

    def drain(self) -> None:
        """This exchange's turn: what waited goes out; from now on it streams."""
        for direction, msg in ((UP, self.request), (DOWN, self.response)):
            if msg is None:
                continue
            waited, msg.wait = msg.wait, None
            if waited:
                self.order.emit(direction, msg.head(True, self.truncated))
                for chunk in waited:
                    self.order.emit(direction, msg.frame(chunk))
            if msg.done:
                self._close(direction, msg)
        self.waited = 0

    def close_all(self) -> None:
        """Whatever is still open ends here (a failed exchange: what was seen, then the end)."""
        for direction, msg in ((UP, self.request), (DOWN, self.response)):
            if msg is not None and not msg.done:
                msg.done = True
                self._close(direction, msg)


class ExchangeOrder:
    """The exchanges of one decrypted connection, written to ``emit`` one at a time.

    ``current`` streams straight through; the others wait (see the module
    docstring). The next turn goes to the waiting exchange that started first.
    """

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.current: Exchange | None = None
        self.waiting: dict[int, Exchange] = {}  # by sequence number (start order)
        self._seq = 0

    def start(self, keep_length: bool = True) -> Exchange:
        ex = Exchange(self, self._seq, keep_length)
        self._seq += 1
        if self.current is None:
            self.current = ex
        else:
            self.waiting[ex.seq] = ex
        return ex

    def ended(self, ex: Exchange) -> None:
        ex.over = True
        if self.current is not ex:
            return  # it waits for its turn, whole
        ex.close_all()
        self.current = None
        while self.waiting:
            nxt = self.waiting.pop(min(self.waiting))
            self.current = nxt
            nxt.drain()
            if not nxt.over:
                return
            nxt.close_all()
            self.current = None
