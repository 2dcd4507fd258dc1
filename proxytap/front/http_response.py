"""Reading an origin's responses: heads found raw, framed by llhttp, relayed to the client.

``ResponseReader`` is the response half of an ``UpstreamConnection``
(``http_upstream``), the base class that holds the response state and
llhttp's callbacks; the subclass adds the connection (connect, writes, the
close). The split is by concern, at no cost per chunk (one object, no
indirection).

The head is located raw (``\r\n\r\n``) and llhttp parses just that; the
head is rewritten from the raw bytes by the header rules (cached: an origin
sends the same heads again and again). How the body is framed and passed on
is ``proxytap.proto.http1.response_body``'s decision; llhttp finds the
body's end and the bytes go to the client as they came (Content-Length
bodies never a byte past the length; chunked bodies with extensions and
trailers), or chunked by us (a close-delimited body to an HTTP/1.1 client),
or de-chunked (to an HTTP/1.0 client, or for body modules, and chunked
again). HEAD: llhttp cannot be told that a response has no body (httptools
exposes no "skip body"); since heads are fed separately, after the final head
of a HEAD response a new parser is taken; 204, 304 and 1xx have no body in
llhttp already. 1xx are relayed to HTTP/1.1 clients and dropped for HTTP/1.0
ones (RFC 9110 section 15.2); 101 to a WebSocket request turns the connection
into a raw relay (``_switched``).
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING

import httptools

from proxytap.errors import ProtocolError
from proxytap.front.http_exchange import (
    BadResponse,
    ClientOut,
    Exchange,
    UpPhase,
    response_keys,
)
from proxytap.modules.api import Context
from proxytap.policy.message import serialize
from proxytap.proto.http1 import (
    CRLF,
    END_CHUNKED,
    Body,
    chunk_size_line,
    interim_head,
    is_close_delimited,
    response_body,
    response_framing_field,
    response_head,
)

if TYPE_CHECKING:
    from proxytap.front.http_forward import HttpForwarder

log = logging.getLogger("proxytap.front.http")

# module globals: compared per chunk
_NONE = Body.NONE
_RAW = Body.RAW
_WRAP = Body.WRAP
_DECHUNK = Body.DECHUNK
_RECHUNK = Body.RECHUNK
_HEAD = UpPhase.HEAD
_TUNNEL = UpPhase.TUNNEL
TOO_LARGE = "http_response_header_section_size"


class ResponseReader(asyncio.Protocol):
    """The responses of one upstream connection (the base of ``UpstreamConnection``)."""

    def __init__(self, fwd: HttpForwarder, out: ClientOut) -> None:
        self.fwd = fwd
        self.out = out
        self.services = services = fwd.services
        self.chain = chain = services.chains[fwd.conn.listener]
        self.counted = response_keys(fwd.conn.listener, "origin")
        self.max_head = services.config.limits.max_head
        self.phase = UpPhase.CONNECTING
        self.req: Exchange | None = None
        self.error = (502, "the destination sent an invalid HTTP response", "http_protocol_error")
        # the response being parsed: llhttp frames it, its head is read raw
        self.events = SimpleNamespace(
            on_message_begin=self.message_begin,
            on_headers_complete=self.headers_complete,
            on_message_complete=self.message_complete,
        )
        self.parser = httptools.HttpResponseParser(self.events)
        self.hbuf = bytearray()  # a head that came in pieces
        self.raw_head = b""
        self.interim = False
        self.switching = False
        self.mode = _NONE
        self.body_left = -1  # Content-Length bytes still to relay; -1: llhttp decides
        self.close_delimited = False
        self.upkeep = False
        self.stray = False  # bytes followed a complete response
        self.completed: Exchange | None = None
        self.filters = bool(chain.s2c_data)  # response bodies go through modules
        self.ctx: Context | None = None  # the modules' context of the response being relayed

    def _switched(self, rest: bytes) -> None:
        """101 relayed: the connection is a raw relay from now on; ``rest`` followed it."""
        raise NotImplementedError

    def _parse(self, data: bytes) -> BadResponse | None:
        """Response bytes through llhttp; what broke HTTP, if anything."""
        try:
            if self.phase is _HEAD:
                self._consume(data)
            else:
                self._body(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, BadResponse):
                return cause
            if isinstance(cause, ProtocolError):
                return BadResponse.of(cause)
            log.error("internal error parsing a response", exc_info=cause)
            return BadResponse("the proxy failed to process the response")
        except httptools.HttpParserUpgrade:
            return BadResponse("unexpected protocol switch")
        except httptools.HttpParserError as exc:
            return BadResponse(f"invalid HTTP response: {exc}")
        except BadResponse as exc:
            return exc
        except ProtocolError as exc:  # a body module failed
            return BadResponse.of(exc)
        return None

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
                self.out.write(data)
        elif mode == _WRAP:
            if self.filters:
                data = self._filter(data, False)
            if data:
                out = self.out
                out.write(chunk_size_line(len(data)))
                out.write(data)
                out.write(CRLF)
        # _DECHUNK, _RECHUNK: llhttp's on_body writes; _NONE: no body

    def _filter(self, data: bytes, same_length: bool) -> bytes:
        """Response body bytes through the modules (raises ``ModuleError``)."""
        chain = self.chain
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
        while pos < size:
            if self.phase is not _HEAD:
                self._body(data[pos:])  # a copy of what follows a head, once
                return
            found = self._find_head(data, pos)
            if found is None:
                return
            head, take = found
            self.raw_head = head
            try:
                self.parser.feed_data(data[pos : pos + take] if pos or take < size else data)
            except httptools.HttpParserUpgrade:
                if not self.switching:
                    raise
                self.phase = _TUNNEL
                out = self.out
                out.corked = False
                out.flush()
                self._switched(data[pos + take :])
                return
            pos += take
            if self.completed is not None:
                if pos < size:
                    self.stray = True  # nothing may follow a response we did not ask for
                return

    def _find_head(self, data: bytes, pos: int) -> tuple[bytes, int] | None:
        """The next whole head from ``data[pos:]`` (and earlier pieces): (head, bytes used).

        None: no whole head yet (kept; llhttp sees the bytes to fail early on garbage).
        """
        max_head = self.max_head
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
                raise BadResponse("response head too large", TOO_LARGE)
            self.parser.feed_data(data[pos:] if pos else data)
            return None
        if len(head) > max_head:
            raise BadResponse("response head too large", TOO_LARGE)
        return head, take

    def body(self, body: bytes) -> None:
        """llhttp's de-chunked body data (HTTP/1.0 clients, body modules)."""
        mode = self.mode
        if mode in (_DECHUNK, _RECHUNK):
            if self.filters:
                body = self._filter(body, False)
                if not body:
                    return
            out = self.out
            if mode == _RECHUNK:
                out.write(chunk_size_line(len(body)))
                out.write(body)
                out.write(CRLF)
            else:
                out.write(body)

    def message_begin(self) -> None:
        if self.req is None or self.completed is not None:
            raise BadResponse("a response nobody asked for")

    def headers_complete(self) -> None:
        req = self.req
        assert req is not None
        status = self.parser.get_status_code()
        chain = self.chain
        try:
            line, h, block = self.services.rules.prepare_response(
                self.raw_head, status, chain.rewrite_responses
            )
            if chain.response_hooks:
                h = h.copy()
                chain.response(req.ctx, h)
                block = serialize(h.headers)
        except ProtocolError as exc:
            raise BadResponse.of(exc) from None
        except Exception as exc:  # a bug in a rule: fail closed, logged and counted
            raise BadResponse.of(chain.failed(chain.names[1][0], "response", exc)) from None
        mode = response_body(req.method, status, h.length, h.chunked, req.http10, self.filters)
        if mode >= Body.INTERIM:  # 1xx (the forwarder never sends CONNECT upstream)
            self._interim(req, status, line, block)
            return
        self.phase = UpPhase.BODY
        self.interim = False
        req.status = status
        self.services.stats.http_responses[self.counted[status // 100]] += 1
        self.upkeep = self.parser.should_keep_alive() and not (h.http10 and h.codings)
        self.close_delimited = is_close_delimited(mode, h.length, h.chunked)
        self.body_left = h.length if mode == _RAW else -1
        self.ctx = req.ctx
        self.mode = mode
        keep = req.keep = self.fwd.keeps(req)
        framing = response_framing_field(mode, h.chunked, h.codings)
        self.out.write(response_head(line, block, framing, keep))
        req.responded = True
        if req.is_head:  # llhttp would wait for a body: a new parser for the next response
            self.parser = httptools.HttpResponseParser(self.events)
            self._done(req)

    def _interim(self, req: Exchange, status: int, line: bytes, block: bytes) -> None:
        """A 1xx response: relayed (not to HTTP/1.0 clients); 101 starts a WebSocket relay."""
        self.interim = True
        if status == 101:
            if not req.websocket:
                raise BadResponse("101 Switching Protocols without an upgrade request")
            req.status = 101
            req.responded = True
            self.switching = True
            self.services.stats.http_responses[self.counted[1]] += 1
        elif req.http10:
            return
        self.out.write(interim_head(line, block, status == 101))

    def message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        req = self.req
        if req is None or self.completed is not None:
            return
        self._done(req)

    def _done(self, req: Exchange) -> None:
        """The response is complete (the forwarder acts on it after this read)."""
        if self.mode == _WRAP or self.mode == _RECHUNK:
            self.out.write(END_CHUNKED)
        self.mode = _NONE
        self.phase = UpPhase.DONE
        self.req = None
        self.completed = req
