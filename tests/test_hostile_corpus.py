"""The hostile corpus: malformed and smuggling inputs against a real proxy, each with its answer.

Every case goes over a real socket to an in-process proxy (handshake timeout
0.5 s, for the slowloris cases) in front of ``StrictOrigin``, a raw asyncio
server that records every byte it receives and parses requests itself, more
strictly than RFC 9112 asks (exactly what a correct proxy sends: origin-form,
``Host`` first, ``name: value`` fields of tokens and clean values, no hop-by-hop
fields, one framing, canonical chunks). Each case states:

* the answer: the HTTP statuses the client gets, in order, and the
  ``Proxy-Status`` error type of a final proxy answer, or the exact SOCKS
  reply bytes up to the close;
* how many complete requests the origin receives: 0 for everything refused,
  and never two from one (the smuggling vectors carry a second request in
  their body).

The origin must end with no violation at all: nothing malformed ever reached
it. Meanwhile a well-behaved client keeps doing real requests (plain HTTP
keep-alive, CONNECT, SOCKS5) to a second strict origin and must see every one
of them succeed. A third origin sends malformed *responses*; the client must
get a 502 instead. The statuses are the ones documented in
``proxytap.policy.headers`` and ``proxytap.proto``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy

from tests.conftest import ProxyFactory, RunningProxy

# -- the strict, recording origin -----------------------------------------------------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(
    rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|TRACE|PATCH) (/[\x21-\x7e]*|\*) HTTP/1\.1"
)
_FIELD = re.compile(
    rb"(" + _TCHAR + rb"+): ([\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?"
)
_HOP = {
    b"connection",
    b"proxy-connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authorization",
    b"proxy-authenticate",
}
_CODINGS = {b"chunked", b"gzip", b"deflate", b"compress"}


class Violation(Exception):
    pass


@dataclass
class StrictOrigin:
    """Parses what it gets strictly; records requests, raw bytes and violations."""

    name: str
    requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = field(
        default_factory=list
    )
    raw: list[bytearray] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    incomplete: int = 0  # connections closed in the middle of a request (a body the proxy cut)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.raw.append(raw)

        async def until(sep: bytes, limit: int) -> bytes:
            data = await reader.readuntil(sep)
            raw.extend(data)
            if len(data) > limit:
                raise Violation(f"line or head over {limit} bytes")
            return data

        async def exactly(n: int) -> bytes:
            data = await reader.readexactly(n)
            raw.extend(data)
            return data

        try:
            while True:
                try:
                    head = await until(b"\r\n\r\n", 1 << 17)
                except asyncio.IncompleteReadError as exc:
                    raw.extend(exc.partial)
                    if exc.partial:
                        self.incomplete += 1
                    return
                method, path, fields = self.parse_head(head)
                try:
                    body = await self.read_body(fields, until, exactly)
                except asyncio.IncompleteReadError as exc:
                    raw.extend(exc.partial)
                    self.incomplete += 1
                    return
                self.requests.append((method, path, fields, body))
                reply = self.reply(method, path)
                writer.write(reply)
                await writer.drain()
        except Violation as exc:
            self.violations.append(f"{self.name}: {exc}: {bytes(raw)[-300:]!r}")
        except (ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def parse_head(self, head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
        lines = head[:-4].split(b"\r\n")
        for line in lines:
            if b"\r" in line or b"\n" in line or b"\x00" in line:
                raise Violation("CR, LF or NUL inside a line")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise Violation(f"bad request line {lines[0][:100]!r}")
        fields = []
        for line in lines[1:]:
            field_match = _FIELD.fullmatch(line)
            if field_match is None:
                raise Violation(f"bad field line {line[:100]!r}")
            fields.append((field_match[1], field_match[2] or b""))
        names = [n.lower() for n, _ in fields]
        if not names or names[0] != b"host" or names.count(b"host") != 1:
            raise Violation("Host missing, not first or repeated")
        websocket = (b"upgrade", b"websocket") in [(n.lower(), v.lower()) for n, v in fields]
        for name in names:
            if (
                name in _HOP
                and name != b"transfer-encoding"
                and not (websocket and name in (b"upgrade", b"connection"))
            ):
                raise Violation(f"hop-by-hop field {name!r}")
        cl = [v for n, v in fields if n.lower() == b"content-length"]
        te = [v for n, v in fields if n.lower() == b"transfer-encoding"]
        if cl and te:
            raise Violation("Content-Length and Transfer-Encoding")
        if len(cl) > 1 or len(te) > 1:
            raise Violation("framing field repeated")
        if cl and re.fullmatch(rb"0|[1-9][0-9]{0,17}", cl[0]) is None:
            raise Violation(f"Content-Length not canonical: {cl[0]!r}")
        if te:
            codings = [c.strip() for c in te[0].split(b",")]
            if codings[-1] != b"chunked" or len(set(codings)) != len(codings):
                raise Violation(f"bad Transfer-Encoding {te[0]!r}")
            if not set(codings) <= _CODINGS:
                raise Violation(f"unknown coding in {te[0]!r}")
        return match[1], match[2], fields

    @staticmethod
    async def read_body(fields, until, exactly) -> bytes:  # type: ignore[no-untyped-def]
        values = {n.lower(): v for n, v in fields}
        if b"content-length" in values:
            return bytes(await exactly(int(values[b"content-length"])))
        if b"transfer-encoding" not in values:
            return b""
        body = bytearray()
        while True:
            line = await until(b"\r\n", 100)
            if re.fullmatch(rb"[0-9a-f]{1,15}\r\n", line) is None:
                raise Violation(f"bad chunk size line {line!r}")
            size = int(line, 16)
            if size == 0:
                while (trailer := await until(b"\r\n", 8192)) != b"\r\n":
                    if _FIELD.fullmatch(trailer[:-2]) is None:
                        raise Violation(f"bad trailer {trailer!r}")
                return bytes(body)
            chunk = await exactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise Violation("chunk data not followed by CRLF")
            body += chunk[:-2]

    def reply(self, method: bytes, path: bytes) -> bytes:
        body = b"%s %d %s %s" % (self.name.encode(), len(self.requests), method, path)
        if method == b"HEAD":
            body = b""
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Origin: %s\r\n\r\n%s" % (
            len(body),
            self.name.encode(),
            body,
        )


# -- an origin whose responses are malformed ------------------------------------------

OK_LINE = b"HTTP/1.1 200 OK\r\n"
EVIL_RESPONSES = {
    b"cl-te": OK_LINE + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"two-cl": OK_LINE + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    b"cl-list": OK_LINE + b"Content-Length: 2, 2\r\n\r\nab",
    b"te-twice": OK_LINE + b"Transfer-Encoding: chunked\r\n" * 2 + b"\r\n0\r\n\r\n",
    b"te-xchunked": OK_LINE + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    # llhttp would read this body up to the close, a client as chunked: a desync
    b"te-tab": OK_LINE + b"Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n" + OK_LINE + b"\r\n",
    b"te-not-last": OK_LINE + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    b"ctl": OK_LINE + b"X-A: a\x01b\r\nContent-Length: 0\r\n\r\n",
    b"nul": OK_LINE + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"obs-fold": OK_LINE + b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"bad-name": OK_LINE + b"X A: b\r\nContent-Length: 0\r\n\r\n",
    b"bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"http2": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"many": OK_LINE + b"X-A: b\r\n" * 101 + b"Content-Length: 0\r\n\r\n",
    b"huge": OK_LINE + b"X-A: " + b"b" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
    b"not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
}


async def evil_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        key = head.split(b" ", 2)[1].removeprefix(b"/r/")
        writer.write(EVIL_RESPONSES[key])
        await writer.drain()
        await reader.read()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


# -- the corpus -----------------------------------------------------------------------

ERR = "http_request_error"
DENIED = "http_request_denied"
BAD_RESPONSE = "http_protocol_error"
SOCKS5_OK_GREETING = b"\x05\x00"


def s5_error(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


S4_REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class Case:
    """``{P}`` in ``send`` is the strict origin's port, ``{E}`` the evil origin's."""

    id: str
    send: bytes
    answers: tuple[int, ...] = ()  # HTTP statuses, in order
    error: str | None = ERR  # Proxy-Status type of the final answer (None: an origin's answer)
    socks: bytes | None = None  # SOCKS: exactly the bytes received until the close
    forwarded: int = 0  # complete requests the strict origin receives
    listener: str = "http"
    dribble: float = 0.0  # seconds between single bytes (slowloris)
    before: bytes = b""  # sent at once and answered first (its answer is answers[0])


GET = b"GET http://127.0.0.1:{P}/ HTTP/1.1\r\n"
POST = b"POST http://127.0.0.1:{P}/ HTTP/1.1\r\n"
CL = b"Content-Length: "
TE = b"Transfer-Encoding: "
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # what a desync would show
CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"
CARRIER = b"%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)  # a chunked body holding a request


def ok(case_id: str, send: bytes, forwarded: int = 1) -> Case:
    return Case(case_id, send, (200,), None, forwarded=forwarded)


def bad(case_id: str, send: bytes, status: int = 400, error: str = ERR) -> Case:
    return Case(case_id, send, (status,), error)


def socks(case_id: str, send: bytes, reply: bytes) -> Case:
    return Case(case_id, send, socks=reply, listener="socks")


S5 = b"\x05\x01\x00"  # greeting: one method, no authentication
S5_CONNECT = b"\x05\x01\x00"  # VER CMD RSV


def s5_domain(name: bytes, port: int = 80) -> bytes:
    return S5 + S5_CONNECT + b"\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")


CORPUS: list[Case] = [
    # -- CL.TE / TE.CL: both framings at once ------------------------------------------
    bad("cl-te", POST + CL + b"6\r\n" + TE + b"chunked\r\n\r\n0\r\n\r\nG"),
    bad("te-cl", POST + TE + b"chunked\r\n" + CL + b"3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"),
    bad("cl-te-embedded-request", POST + CL + b"4\r\n" + TE + b"chunked\r\n\r\n" + CARRIER),
    bad("te-cl-zero", POST + TE + b"chunked\r\n" + CL + b"0\r\n\r\n" + SMUGGLED),
    bad("cl-te-identity", POST + CL + b"5\r\n" + TE + b"identity\r\n\r\nhello"),
    bad(
        "cl-te-far-apart",
        POST + CL + b"5\r\nX-A: 1\r\nX-B: 2\r\n" + TE + b"chunked\r\n\r\n0\r\n\r\n",
    ),
    # -- TE.TE: obfuscated Transfer-Encoding -------------------------------------------
    bad("te-xchunked", POST + TE + b"xchunked\r\n\r\n" + CHUNKED_BODY, 501),
    bad("te-chunked-identity", POST + TE + b"chunked, identity\r\n\r\n" + CHUNKED_BODY),
    bad("te-identity-chunked", POST + TE + b"identity, chunked\r\n\r\n" + CHUNKED_BODY, 501),
    bad("te-x-then-chunked", POST + TE + b"xchunked, chunked\r\n\r\n" + CHUNKED_BODY, 501),
    bad("te-tab-before-colon", POST + b"Transfer-Encoding\t: chunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-twice", POST + TE + b"chunked\r\n" + TE + b"chunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-repeated-list", POST + TE + b"chunked, chunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-leading-comma", POST + TE + b",chunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-trailing-comma", POST + TE + b"chunked,\r\n\r\n" + CHUNKED_BODY),
    bad("te-parameter", POST + TE + b"chunked;q=1\r\n\r\n" + CHUNKED_BODY),
    bad("te-quoted", POST + TE + b'"chunked"\r\n\r\n' + CHUNKED_BODY),
    bad("te-vertical-tab", POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-nul", POST + TE + b"chunked\x00\r\n\r\n" + CHUNKED_BODY),
    bad("te-folded", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + CHUNKED_BODY),
    bad("te-gzip-only", POST + TE + b"gzip\r\n\r\n" + CHUNKED_BODY),
    bad("te-chunked-not-last", POST + TE + b"chunked, gzip\r\n\r\n" + CHUNKED_BODY),
    bad("te-http10", b"POST http://127.0.0.1:{P}/ HTTP/1.0\r\n" + TE + b"chunked\r\n\r\n0\r\n\r\n"),
    bad("te-empty", POST + TE + b"\r\n\r\n" + CHUNKED_BODY),
    ok("te-padded", POST + b"Transfer-Encoding:   chunked  \r\n\r\n" + CHUNKED_BODY),
    bad("te-trailing-tab", POST + TE + b"chunked\t\r\n\r\n" + CHUNKED_BODY),
    bad("te-tab-inside", POST + TE + b"gzip,\tchunked\r\n\r\n" + CHUNKED_BODY),
    ok("te-upper-case", POST + TE + b"CHUNKED\r\n\r\n" + CHUNKED_BODY),
    ok("te-two-fields", POST + TE + b"gzip\r\n" + TE + b"chunked\r\n\r\n" + CHUNKED_BODY),
    ok(
        "te-named-in-connection",
        POST + TE + b"chunked\r\nConnection: Transfer-Encoding\r\n\r\n" + CHUNKED_BODY,
    ),
    ok(
        "cl-named-in-connection", POST + CL + b"5\r\nConnection: Content-Length, close\r\n\r\nhello"
    ),
    # a look-alike of a framing field is refused (servers mapping "-" to "_" would frame by it)
    bad(
        "te-underscore-look-alike",
        POST + b"Transfer_Encoding: chunked\r\n" + CL + b"5\r\n\r\nhello",
    ),
    ok("chunked-body-carrying-a-request", POST + TE + b"chunked\r\n\r\n" + CARRIER),
    ok("cl-body-carrying-a-request", POST + CL + b"%d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)),
    # -- Content-Length variants -------------------------------------------------------
    ok("cl-leading-zeros", POST + CL + b"005\r\n\r\nhello"),
    ok("cl-ows", POST + b"Content-Length:\t 5 \t\r\n\r\nhello"),
    bad("cl-plus", POST + CL + b"+5\r\n\r\nhello"),
    bad("cl-minus", POST + CL + b"-5\r\n\r\nhello"),
    bad("cl-minus-zero", POST + CL + b"-0\r\n\r\n"),
    bad("cl-inner-space", POST + CL + b"5 5\r\n\r\nhello"),
    bad("cl-twice-equal", POST + CL + b"5\r\n" + CL + b"5\r\n\r\nhello"),
    bad("cl-twice-differing", POST + CL + b"5\r\n" + CL + b"6\r\n\r\nhello!"),
    bad("cl-list", POST + CL + b"5, 5\r\n\r\nhello"),
    bad("cl-hex", POST + CL + b"0x5\r\n\r\nhello"),
    bad("cl-overflow", POST + CL + b"99999999999999999999999\r\n\r\n"),
    bad("cl-19-digits", POST + CL + b"0000000000000000005\r\n\r\nhello"),
    bad("cl-empty", POST + CL + b"\r\n\r\n"),
    bad("cl-decimal-point", POST + CL + b"5.0\r\n\r\nhello"),
    bad("cl-unicode-digit", POST + CL + "\u0665".encode() + b"\r\n\r\nhello"),
    # -- chunked bodies (the head went upstream; the body is cut at the bad chunk) ------
    bad("chunk-size-not-hex", POST + TE + b"chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    bad("chunk-size-plus", POST + TE + b"chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n"),
    bad("chunk-size-0x", POST + TE + b"chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n"),
    bad("chunk-size-overflow", POST + TE + b"chunked\r\n\r\nfffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    bad("chunk-data-too-long", POST + TE + b"chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"),
    bad("chunk-size-bare-lf", POST + TE + b"chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"),
    bad("chunk-ext-bare-cr", POST + TE + b"chunked\r\n\r\n3;a\rb\r\nabc\r\n0\r\n\r\n"),
    bad("chunk-trailer-obs-fold", POST + TE + b"chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n"),
    # -- header syntax -----------------------------------------------------------------
    bad("nul-in-value", GET + b"X-A: a\x00b\r\n\r\n"),
    bad("cr-in-value", GET + b"X-A: a\rb\r\n\r\n"),
    bad("lf-in-value", GET + b"X-A: a\nb: c\r\n\r\n"),
    bad("ctl-in-value", GET + b"X-A: a\x01b\r\n\r\n"),
    bad("esc-in-value", GET + b"X-A: a\x1b[31mb\r\n\r\n"),
    bad("del-in-value", GET + b"X-A: a\x7f\r\n\r\n"),
    bad("obs-fold-space", GET + b"X-A: a\r\n b\r\n\r\n"),
    bad("obs-fold-tab", GET + b"X-A: a\r\n\tb\r\n\r\n"),
    bad("space-before-first-field", GET + b" X-A: a\r\n\r\n"),
    bad("space-in-name", GET + b"X A: b\r\n\r\n"),
    bad("empty-name", GET + b": b\r\n\r\n"),
    bad("no-colon", GET + b"X-A\r\n\r\n"),
    bad("nul-in-name", GET + b"X\x00A: b\r\n\r\n"),
    bad("non-ascii-name", GET + b"X-\xe4: b\r\n\r\n"),
    bad("slash-in-name", GET + b"X/A: b\r\n\r\n"),
    bad("bracket-in-name", GET + b"X[A]: b\r\n\r\n"),
    bad("cr-cr-lf", GET + b"X-A: a\r\r\n\r\n"),
    bad("bare-lf-request-line", b"GET http://127.0.0.1:{P}/ HTTP/1.1\nX-A: a\r\n\r\n"),
    bad("bare-lf-field", GET + b"X-A: a\n\r\n"),
    bad("bare-lf-everywhere", b"GET http://127.0.0.1:{P}/ HTTP/1.1\nHost: x\n\n"),
    Case(
        "bare-lf-second-head",
        GET + b"\r\n" + b"GET http://127.0.0.1:{P}/two HTTP/1.1\nX: a\n\n",
        (200, 400),
        forwarded=1,
    ),
    Case(
        "obs-fold-second-head",
        GET + b"\r\n" + GET + b"X-A: a\r\n b\r\n\r\n",
        (200, 400),
        forwarded=1,
    ),
    ok("obs-text-value", GET + b"X-A: caf\xe9\r\n\r\n"),
    ok(
        "hop-by-hop-fields-stripped",
        GET
        + b"Connection: X-Secret, keep-alive\r\nX-Secret: 1\r\nTE: trailers\r\n"
        + b"Keep-Alive: 9\r\nProxy-Connection: x\r\n\r\n",
    ),
    # -- sizes -------------------------------------------------------------------------
    bad("field-too-large", GET + b"X-A: " + b"a" * 70000 + b"\r\n\r\n", 431),
    bad(
        "head-too-large",
        GET + b"X-A: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 1700 + b"\r\n",
        431,
    ),
    bad("too-many-fields", GET + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
    ok("as-many-fields-as-allowed", GET + b"X-A: 1\r\n" * 100 + b"\r\n"),
    bad(
        "request-line-too-long",
        b"GET http://127.0.0.1:{P}/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
        414,
    ),
    Case(
        "second-head-too-many-fields",
        GET + b"\r\n" + GET + b"X-A: 1\r\n" * 101 + b"\r\n",
        (200, 431),
        forwarded=1,
    ),
    # -- request line, URI, Host -------------------------------------------------------
    bad("origin-form", b"GET / HTTP/1.1\r\nHost: 127.0.0.1:{P}\r\n\r\n"),
    bad("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1:{P}\r\n\r\n"),
    bad("https-uri", b"GET https://127.0.0.1:{P}/ HTTP/1.1\r\n\r\n", 501),
    bad("ftp-uri", b"GET ftp://127.0.0.1:{P}/ HTTP/1.1\r\n\r\n", 501),
    bad("userinfo", b"GET http://user:pw@127.0.0.1:{P}/ HTTP/1.1\r\n\r\n"),
    bad("space-in-host", b"GET http://exa mple/ HTTP/1.1\r\n\r\n"),
    bad("port-zero", b"GET http://127.0.0.1:0/ HTTP/1.1\r\n\r\n"),
    bad("port-too-big", b"GET http://127.0.0.1:70000/ HTTP/1.1\r\n\r\n"),
    bad("hex-host", b"GET http://0x7f000001:{P}/ HTTP/1.1\r\n\r\n"),
    bad("decimal-host", b"GET http://2130706433:{P}/ HTTP/1.1\r\n\r\n"),
    bad("short-ipv4-host", b"GET http://127.1:{P}/ HTTP/1.1\r\n\r\n"),
    bad("percent-host", b"GET http://%31%32%37.0.0.1:{P}/ HTTP/1.1\r\n\r\n"),
    bad("non-ascii-uri", b"GET http://127.0.0.1:{P}/\xc3\xa9 HTTP/1.1\r\n\r\n"),
    bad("host-mismatch", GET + b"Host: evil.example\r\n\r\n"),
    bad("host-port-mismatch", GET + b"Host: 127.0.0.1:1\r\n\r\n"),
    bad("host-default-port-mismatch", GET + b"Host: 127.0.0.1\r\n\r\n"),
    bad("two-hosts", GET + b"Host: 127.0.0.1:{P}\r\nHost: 127.0.0.1:{P}\r\n\r\n"),
    bad("host-with-userinfo", GET + b"Host: u@127.0.0.1:{P}\r\n\r\n"),
    bad("host-with-path", GET + b"Host: 127.0.0.1:{P}/x\r\n\r\n"),
    bad("host-empty", GET + b"Host:\r\n\r\n"),
    ok("host-same-other-spelling", GET + b"Host: 127.0.0.1.:{P}\r\n\r\n"),
    ok("uri-fragment-dropped", b"GET http://127.0.0.1:{P}/p#frag HTTP/1.1\r\n\r\n"),
    bad("unknown-method", b"FOO http://127.0.0.1:{P}/ HTTP/1.1\r\n\r\n"),
    bad("lower-case-method", b"get http://127.0.0.1:{P}/ HTTP/1.1\r\n\r\n"),
    bad("method-not-allowed", b"PROPFIND http://127.0.0.1:{P}/ HTTP/1.1\r\n\r\n", 501, DENIED),
    bad("purge-not-allowed", b"PURGE http://127.0.0.1:{P}/ HTTP/1.1\r\n\r\n", 501, DENIED),
    bad("http2-version", b"GET http://127.0.0.1:{P}/ HTTP/2.0\r\n\r\n", 505),
    bad("http12-version", b"GET http://127.0.0.1:{P}/ HTTP/1.2\r\n\r\n"),
    bad("http09-request", b"GET http://127.0.0.1:{P}/\r\n\r\n", 505),
    bad("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    # a CONNECT after a request opens a tunnel (as a first one would), never reaches the
    # origin as a request: the request in the tunnel is the second one it sees
    Case(
        "connect-after-a-request",
        GET
        + b"\r\n"
        + b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\n\r\n"
        + b"GET /in-the-tunnel HTTP/1.1\r\nHost: 127.0.0.1:{P}\r\n\r\n",
        (200, 200, 200),
        None,
        forwarded=2,
    ),
    # -- CONNECT -----------------------------------------------------------------------
    bad("connect-no-port", b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n"),
    bad("connect-port-zero", b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n"),
    bad("connect-port-too-big", b"CONNECT 127.0.0.1:65536 HTTP/1.1\r\n\r\n"),
    bad("connect-port-sign", b"CONNECT 127.0.0.1:+80 HTTP/1.1\r\n\r\n"),
    bad("connect-userinfo", b"CONNECT u:p@127.0.0.1:{P} HTTP/1.1\r\n\r\n"),
    bad("connect-path", b"CONNECT 127.0.0.1:{P}/x HTTP/1.1\r\n\r\n"),
    bad("connect-uri", b"CONNECT http://127.0.0.1:{P} HTTP/1.1\r\n\r\n"),
    bad("connect-ipv6-no-brackets", b"CONNECT ::1:443 HTTP/1.1\r\n\r\n"),
    bad("connect-ipv6-zone", b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n"),
    bad("connect-hex-host", b"CONNECT 0x7f000001:{P} HTTP/1.1\r\n\r\n"),
    bad("connect-percent-host", b"CONNECT ex%61mple.com:443 HTTP/1.1\r\n\r\n"),
    bad("connect-empty-host", b"CONNECT :443 HTTP/1.1\r\n\r\n"),
    bad("connect-with-body", b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\n" + CL + b"5\r\n\r\nhello"),
    bad(
        "connect-chunked", b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\n" + TE + b"chunked\r\n\r\n0\r\n\r\n"
    ),
    bad("connect-two-hosts", b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    bad("connect-obs-fold", b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n"),
    bad("connect-nul", b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\nX-A: a\x00\r\n\r\n"),
    bad("connect-bare-lf", b"CONNECT 127.0.0.1:{P} HTTP/1.1\nHost: a\n\n"),
    bad("connect-double-space", b"CONNECT  127.0.0.1:{P} HTTP/1.1\r\n\r\n"),
    bad(
        "connect-too-many-fields",
        b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n",
        431,
    ),
    bad("connect-lower-case", b"connect 127.0.0.1:{P} HTTP/1.1\r\n\r\n"),
    bad("connect-http2", b"CONNECT 127.0.0.1:{P} HTTP/2.0\r\n\r\n", 505),
    Case(
        "connect-private-destination",
        b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n",
        (403,),
        "destination_ip_prohibited",
    ),
    # -- SOCKS -------------------------------------------------------------------------
    socks("socks5-nmethods-zero", b"\x05\x00", b"\x05\xff"),
    socks("socks5-no-acceptable-method", b"\x05\x01\x02", b"\x05\xff"),
    socks("socks5-truncated-greeting", b"\x05\x03\x00", b""),
    socks("socks-unknown-version", b"\x06\x01\x00", b""),
    socks("http-to-socks-listener", b"GET / HTTP/1.1\r\n\r\n", b""),
    socks(
        "socks5-request-version-4",
        S5 + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        SOCKS5_OK_GREETING + s5_error(0x01),
    ),
    socks(
        "socks5-bind",
        S5 + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
        SOCKS5_OK_GREETING + s5_error(0x07),
    ),
    socks(  # UDP ASSOCIATE is served; its request is read as strictly as a CONNECT
        "socks5-udp-associate-empty-domain",
        S5 + b"\x05\x03\x00\x03\x00\x00\x00",
        SOCKS5_OK_GREETING + s5_error(0x04),
    ),
    socks(
        "socks5-unknown-command",
        S5 + b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50",
        SOCKS5_OK_GREETING + s5_error(0x07),
    ),
    socks(
        "socks5-bad-atyp",
        S5 + b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50",
        SOCKS5_OK_GREETING + s5_error(0x08),
    ),
    socks(
        "socks5-domain-length-zero",
        S5 + b"\x05\x01\x00\x03\x00\x00\x50",
        SOCKS5_OK_GREETING + s5_error(0x04),
    ),
    socks(
        "socks5-domain-with-space", s5_domain(b"exa mple.com"), SOCKS5_OK_GREETING + s5_error(0x04)
    ),
    socks(
        "socks5-domain-with-nul",
        s5_domain(b"example.com\x00.evil"),
        SOCKS5_OK_GREETING + s5_error(0x04),
    ),
    socks(
        "socks5-domain-hex-address", s5_domain(b"0x7f000001"), SOCKS5_OK_GREETING + s5_error(0x04)
    ),
    socks("socks5-port-zero", s5_domain(b"localhost", 0), SOCKS5_OK_GREETING + s5_error(0x01)),
    socks("socks5-truncated-request", S5 + b"\x05\x01\x00\x01\x7f\x00", SOCKS5_OK_GREETING),
    socks(
        "socks5-private-destination",
        S5 + b"\x05\x01\x00\x01\x0a\x00\x00\x01\x01\xbb",
        SOCKS5_OK_GREETING + s5_error(0x02),
    ),
    socks(
        "socks5-auth-subnegotiation-unasked",
        S5 + b"\x01\x04user\x04pass",
        SOCKS5_OK_GREETING + s5_error(0x01),
    ),
    socks("socks4-bind", b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00", S4_REJECTED),
    socks("socks4-port-zero", b"\x04\x01\x00\x00\x7f\x00\x00\x01\x00", S4_REJECTED),
    socks(
        "socks4-userid-too-long",
        b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300 + b"\x00",
        S4_REJECTED,
    ),
    socks("socks4a-empty-domain", b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", S4_REJECTED),
    socks(
        "socks4a-domain-too-long",
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"a" * 300 + b"\x00",
        S4_REJECTED,
    ),
    socks("socks4a-bad-domain", b"\x04\x01\x00\x50\x00\x00\x00\x01\x00exa mple\x00", S4_REJECTED),
    socks("socks4-truncated", b"\x04\x01\x00\x50\x7f", b""),
    socks("socks4-private-destination", b"\x04\x01\x01\xbb\x0a\x00\x00\x01\x00", S4_REJECTED),
    # -- slowloris: a head dribbled slower than the handshake timeout (0.5 s) ----------
    Case("slow-http-head", GET + b"X-A: 1\r\n\r\n", (408,), ERR, dribble=0.1),
    Case(
        "slow-later-head",
        GET + b"X-A: 1\r\n\r\n",
        (200, 408),
        ERR,
        forwarded=1,
        dribble=0.1,
        before=GET + b"\r\n",
    ),
    Case("slow-connect-head", b"CONNECT 127.0.0.1:{P} HTTP/1.1\r\n\r\n", (408,), ERR, dribble=0.1),
    Case("slow-socks5-greeting", b"\x05\x01\x00", socks=b"", listener="socks", dribble=0.3),
    Case(
        "slow-socks5-request",
        S5 + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        socks=SOCKS5_OK_GREETING,
        listener="socks",
        dribble=0.1,
    ),
    Case("silent-client", b"", socks=b"", listener="mixed"),
    Case(
        "tls-to-http-port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32), (408,), ERR
    ),
    # -- malformed responses from an origin: never relayed ----------------------------
    *(
        Case(
            f"response-{key.decode()}",
            b"GET http://127.0.0.1:{E}/r/" + key + b" HTTP/1.1\r\n\r\n",
            (502,),
            "http_response_header_section_size" if key in (b"many", b"huge") else BAD_RESPONSE,
        )
        for key in EVIL_RESPONSES
    ),
]


# -- running it -----------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response (Content-Length or none); returns (status, head)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"\r\ncontent-length: *([0-9]+)", head, re.IGNORECASE)
    if match is not None:
        await reader.readexactly(int(match[1]))
    return status, head


async def run_case(case: Case, proxy: RunningProxy, ports: dict[bytes, int]) -> str | None:
    """Send one case; the problem with the answer, or None."""
    data = case.send
    for key, port in ports.items():
        data = data.replace(key, str(port).encode())
    reader, writer = await asyncio.open_connection(*proxy.addr(case.listener))
    heads = []
    answers = list(case.answers)
    try:
        if case.before:  # a whole request first, answered, then the case on the same connection
            writer.write(case.before.replace(b"{P}", str(ports[b"{P}"]).encode()))
            status, head = await asyncio.wait_for(read_response(reader), 5)
            if status != answers[0]:
                return f"status {status} for the request before, expected {answers[0]}"
            heads.append(head)
            answers.pop(0)
        if case.dribble:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                if reader.at_eof():
                    break
                await asyncio.sleep(case.dribble)
                if len(reader._buffer) or reader.at_eof():  # type: ignore[attr-defined]
                    break  # answered already
        else:
            writer.write(data)
        if case.socks is not None:
            got = await asyncio.wait_for(reader.read(), 5)
            return None if got == case.socks else f"SOCKS reply {got!r}, expected {case.socks!r}"
        for expected in answers:
            status, head = await asyncio.wait_for(read_response(reader), 5)
            heads.append(head)
            if status != expected:
                return f"status {status}, expected {expected}: {head[:300]!r}"
        last = heads[-1]
        proxy_status = re.search(rb"\r\nProxy-Status: proxytap; error=([a-z_]+)", last)
        got_error = proxy_status[1].decode() if proxy_status else None
        if got_error != case.error:
            return f"Proxy-Status error {got_error}, expected {case.error}: {last[:300]!r}"
        if case.error is not None:  # the proxy's own final answer: the connection ends
            rest = await asyncio.wait_for(reader.read(), 5)
            if rest:
                return f"bytes after the final answer: {rest[:100]!r}"
        return None
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        return f"{type(exc).__name__} {exc!r}"
    finally:
        writer.close()


@dataclass
class GoodClient:
    """A well-behaved client doing real requests all along: every one must work."""

    proxy: RunningProxy
    origin: StrictOrigin
    done: int = 0
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        port = self.origin.port
        request = b"GET http://127.0.0.1:%d/good HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
        reader, writer = await asyncio.open_connection(*self.proxy.http)
        round_no = 0
        try:
            while not stop.is_set():
                round_no += 1
                writer.write(request % (port, port))  # plain HTTP, one keep-alive connection
                await self.expect(read_response(reader), "keep-alive GET")
                if round_no % 5 == 0:
                    await self.tunnel()
                await asyncio.sleep(0.01)
        finally:
            writer.close()

    async def expect(self, awaitable: object, what: str, origin: bool = True) -> None:
        try:
            status, head = await asyncio.wait_for(awaitable, 5)  # type: ignore[arg-type]
        except Exception as exc:
            self.failures.append(f"{what}: {exc!r}")
            return
        if status != 200 or (origin and b"X-Origin: good" not in head):
            self.failures.append(f"{what}: {head[:200]!r}")
        else:
            self.done += 1

    async def tunnel(self) -> None:
        port = self.origin.port
        inner = b"GET /tunnel HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
        reader, writer = await asyncio.open_connection(*self.proxy.http)
        try:
            writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % port + inner)
            await self.expect(read_response(reader), "CONNECT", origin=False)
            await self.expect(read_response(reader), "request in the tunnel")
        finally:
            writer.close()
        try:
            sock = await Proxy(ProxyType.SOCKS5, *self.proxy.socks).connect(
                "127.0.0.1", port, timeout=5
            )
        except Exception as exc:
            self.failures.append(f"SOCKS5 connect: {exc!r}")
            return
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(inner)
            await self.expect(read_response(reader), "request through SOCKS5")
        finally:
            writer.close()


@pytest.fixture
async def strict_origin() -> AsyncIterator[StrictOrigin]:
    origin = StrictOrigin("strict")
    await origin.start()
    yield origin
    assert origin.server is not None
    origin.server.close()


def test_the_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 100
    assert len({c.id for c in CORPUS}) == len(CORPUS)


async def test_hostile_corpus(
    start_proxy: ProxyFactory, strict_origin: StrictOrigin, raw_server: ProxyFactory
) -> None:
    proxy: RunningProxy = await start_proxy(handshake=0.5)
    good_origin = StrictOrigin("good")
    await good_origin.start()
    evil = await raw_server(evil_origin)
    ports = {b"{P}": strict_origin.port, b"{E}": evil.port}
    good = GoodClient(proxy, good_origin)
    stop = asyncio.Event()
    background = asyncio.create_task(good.run(stop))
    problems: dict[str, str] = {}
    try:
        for case in CORPUS:
            before = len(strict_origin.requests)
            problem = await run_case(case, proxy, ports)
            await asyncio.sleep(0.02)  # what reached the origin has been read by now
            got = len(strict_origin.requests) - before
            if problem is None and got != case.forwarded:
                problem = f"the origin got {got} requests, expected {case.forwarded}"
            if problem is not None:
                problems[case.id] = problem
            assert not background.done(), background
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(background, 10)
        assert good_origin.server is not None
        good_origin.server.close()
    assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())
    # nothing malformed ever reached an origin, nothing was smuggled
    assert strict_origin.violations == []
    assert good_origin.violations == []
    assert all(path != b"/smuggled" for _, path, _, _ in strict_origin.requests)
    assert len(strict_origin.requests) == sum(c.forwarded for c in CORPUS)
    # the well-behaved client was served all along
    assert good.failures == []
    assert good.done >= 30, good.done
    # the proxy is still fine, and counted what it refused
    assert not proxy.app.services.stats.module_errors
    errors = proxy.app.services.stats.protocol_errors  # (listener, family): all listeners
    assert sum(n for (_, family), n in errors.items() if family == "http") >= 80


PARITY = [
    c
    for c in CORPUS
    if c.listener == "http"
    and len(c.answers) == 1
    and not c.dribble
    and c.error is not None
    and not c.send.startswith((b"CONNECT", b"connect", b"\x16"))
    and b"{E}" not in c.send
]


async def test_first_and_later_heads_get_the_same_answer(
    start_proxy: ProxyFactory, strict_origin: StrictOrigin
) -> None:
    """The first head of a connection (read by the handshake) and a later one (read by the
    forwarder) go through the same parser and the same rules: a refused head gets the same
    answer in either place, so no parser differential sits between them."""
    assert len(PARITY) >= 80
    proxy: RunningProxy = await start_proxy(handshake=0.5)
    ports = {b"{P}": strict_origin.port}
    problems = {}
    for case in PARITY:
        later = Case(
            case.id,
            GET + b"\r\n" + case.send,
            (200, *case.answers),
            case.error,
            forwarded=1 + case.forwarded,
        )
        problem = await run_case(later, proxy, ports)
        if problem is not None:
            problems[case.id] = problem
    assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())
    assert strict_origin.violations == []
