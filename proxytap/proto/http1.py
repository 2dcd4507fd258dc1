"""HTTP/1.x message framing for a forwarding intermediary: pure, no I/O.

What the plain-HTTP forwarder must decide about every message besides its
fields, written once here so that it can be read (and tested) as a table:

* how a request body is delimited (``request_body``: none, Content-Length,
  chunked; RFC 9112 section 6.3, rules 4-6 for requests);
* how a response body is delimited, given the request method, the status and
  the client's version, and how it is passed on (``response_body``: RFC 9112
  section 6.3 rules 1-7, and section 9.3 for HTTP/1.0 clients, which never
  get chunked bodies);
* the wire forms the forwarder writes: the upstream request head, the
  response heads towards the client, chunks, the last chunk with trailers.

llhttp (httptools) parses; this module only says what a parsed message means
for framing and builds bytes. Nothing here allocates beyond the bytes it
returns: ``response_body`` and ``request_body`` return enum members, so the
hot path pays one call per message.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Final

__all__ = [
    "CRLF",
    "END_CHUNKED",
    "Body",
    "RequestBody",
    "chunk",
    "chunk_size_line",
    "interim_head",
    "is_close_delimited",
    "last_chunk",
    "request_body",
    "request_framing_field",
    "request_head",
    "response_body",
    "response_framing_field",
    "response_head",
]

CRLF: Final = b"\r\n"
END_CHUNKED: Final = b"0\r\n\r\n"  # the last chunk of a chunked body without trailers


class RequestBody(IntEnum):
    """How a request body is delimited (RFC 9112 section 6.3)."""

    NONE = 0  # no body (neither Content-Length nor Transfer-Encoding, or Content-Length: 0)
    LENGTH = 1  # Content-Length: passed on byte for byte
    CHUNKED = 2  # chunked: llhttp de-chunks it, the forwarder chunks it again


class Body(IntEnum):
    """How a response body goes from the origin to the client.

    The order matters to nobody; the numbers are stable for logs and tests.
    """

    NONE = 0  # no body: HEAD, 204, 304 (and nothing is read for one)
    RAW = 1  # as received: Content-Length, chunked to HTTP/1.1, close-delimited to HTTP/1.0
    WRAP = 2  # close-delimited from the origin, chunked to an HTTP/1.1 client
    DECHUNK = 3  # chunked from the origin, close-delimited to an HTTP/1.0 client
    RECHUNK = 4  # chunked both ways, de-chunked for body modules and chunked again
    INTERIM = 5  # 1xx other than 101: no body, the final response follows
    TUNNEL = 6  # 101 Switching Protocols, or 2xx to CONNECT: the connection is no HTTP any more


def request_body(length: int, chunked: bool) -> RequestBody:
    """The body of a validated request head (``length`` -1: no Content-Length).

    A request's last transfer coding is always chunked once validated, so
    ``chunked`` is just "has Transfer-Encoding".
    """
    if chunked:
        return RequestBody.CHUNKED
    if length > 0:
        return RequestBody.LENGTH
    return RequestBody.NONE


def request_framing_field(body: RequestBody, length: int) -> bytes:
    """The framing field line of a request with that body (empty for none)."""
    if body is RequestBody.CHUNKED:
        return b"Transfer-Encoding: chunked"
    return b"Content-Length: %d" % max(length, 0)


def response_body(
    method: bytes,
    status: int,
    length: int,
    chunked: bool,
    http10_client: bool,
    filtered: bool,
) -> Body:
    """How the response to ``method`` with ``status`` is framed and passed on.

    ``length``: the validated Content-Length (-1: none); ``chunked``: the last
    transfer coding is chunked; ``http10_client``: the client asked in
    HTTP/1.0 (it gets no chunked body); ``filtered``: body modules see the
    bytes (a chunked body is then de-chunked and chunked again).
    """
    if status < 200:
        return Body.TUNNEL if status == 101 else Body.INTERIM
    if method == b"CONNECT" and status < 300:
        return Body.TUNNEL
    if method == b"HEAD" or status == 204 or status == 304:
        return Body.NONE
    if length >= 0:
        return Body.RAW
    if chunked:
        if http10_client:
            return Body.DECHUNK
        return Body.RECHUNK if filtered else Body.RAW
    # the body ends when the origin closes
    return Body.RAW if http10_client else Body.WRAP


def response_framing_field(body: Body, chunked: bool, codings: bytes) -> bytes:
    """The ``Transfer-Encoding`` field the forwarder adds for ``body`` (or ``b""``).

    ``codings`` is the origin's transfer-coding list: kept (a proxy does not
    remove codings it does not undo), with chunked appended when the proxy
    chunks a close-delimited body itself.
    """
    if body is Body.WRAP:
        return b"Transfer-Encoding: " + (codings + b", chunked" if codings else b"chunked") + CRLF
    if chunked and (body is Body.RAW or body is Body.RECHUNK):
        return b"Transfer-Encoding: " + codings + CRLF
    return b""


def is_close_delimited(body: Body, length: int, chunked: bool) -> bool:
    """The origin ends this body by closing (so the connection cannot be reused)."""
    return (body is Body.RAW or body is Body.WRAP) and length < 0 and not chunked


def request_head(
    method: bytes,
    path: bytes,
    authority: bytes,
    fields: bytes,
    codings: bytes,
    websocket: bool,
) -> bytes:
    """An upstream request head: origin-form, HTTP/1.1, Host first, our own framing.

    ``fields`` is the serialized field block (each line with its CRLF);
    ``codings`` the Transfer-Encoding list to send (``b""``: none);
    ``websocket`` adds ``Connection: Upgrade`` (the ``Upgrade`` field is in
    ``fields``).
    """
    out = [method, b" ", path, b" HTTP/1.1\r\nHost: ", authority, CRLF, fields]
    if codings:
        out += (b"Transfer-Encoding: ", codings, CRLF)
    if websocket:
        out.append(b"Connection: Upgrade\r\n")
    out.append(CRLF)
    return b"".join(out)


def response_head(line: bytes, fields: bytes, framing: bytes, keep_alive: bool) -> bytes:
    """A final response head towards the client: ``Connection`` is always ours."""
    return b"".join(
        (
            line,
            CRLF,
            fields,
            framing,
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
        )
    )


def interim_head(line: bytes, fields: bytes, switching: bool) -> bytes:
    """A 1xx head towards the client; 101 keeps ``Connection: Upgrade``."""
    return b"".join((line, CRLF, fields, b"Connection: Upgrade\r\n\r\n" if switching else CRLF))


def chunk_size_line(size: int) -> bytes:
    """The line before a chunk's data (the data and a CRLF follow, written separately)."""
    return b"%x\r\n" % size


def chunk(data: bytes) -> bytes:
    """One whole chunk (for small pieces: one copy instead of three writes)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The last chunk, with the trailer fields llhttp read, and the final CRLF."""
    out = [b"0\r\n"]
    for name, value in trailers:
        out += (name, b": ", value, CRLF)
    out.append(CRLF)
    return b"".join(out)
