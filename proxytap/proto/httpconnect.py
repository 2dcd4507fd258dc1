"""HTTP proxy request heads, CONNECT targets and the proxy's own responses, sans-IO.

``head_end`` frames a request head in a receive buffer, ``parse_head`` parses it
(RFC 9112, strictly), ``parse_authority`` checks a CONNECT target, and
``connect_established`` / ``error_response`` build what the proxy answers. No
sockets, no clock; every failure from a peer's bytes is a ``ProtocolError``
with ``proxy_status="http_request_error"`` and the HTTP status to answer with.

Decisions
    * Line endings: CRLF only. A bare LF (RFC 9112 section 2.2 lets a
      recipient accept one, llhttp does not) is rejected with 400 by
      ``head_end`` as soon as it arrives, and so is a CR anywhere but directly
      before an LF: this parser must not accept a head the plain-HTTP
      forwarder's parser (llhttp) would read differently.
    * Empty lines before the request line are skipped (RFC 9112 section 2.2
      SHOULD), CRLF or LF as llhttp does (they frame nothing); they count
      towards ``head_length`` and the size limit.
    * Size: ``head_end`` raises 414 when the request line (without its line
      ending) is longer than ``line_limit`` and 431 when the head, blank line
      included, does not end within ``limit`` bytes; when both hold, the one
      detectable first as bytes arrive wins, so any split gives the same answer.
    * Request line: ``method SP target SP version`` with single spaces, method
      a token, target visible ASCII only (0x21-0x7E: anything else must be
      percent-encoded). Version ``HTTP/1.0`` or ``HTTP/1.1``; a higher HTTP/1
      minor version (``HTTP/1.2``) is handled as ``HTTP/1.1`` (RFC 9110 section
      2.5); any other ``HTTP/d.d`` is 505; anything else is 400.
    * Header fields: ``name ":" OWS value OWS``; name a token (so no
      whitespace before the colon, no empty name, ASCII only); value made of
      VCHAR, obs-text (0x80-0xFF, decoded latin-1), SP and HTAB; NUL and every
      other control character is rejected. obs-fold (a line starting with SP
      or HTAB) is rejected (400), as RFC 9112 section 5.2 allows.
    * CONNECT authority: ``host:port`` or ``[IPv6]:port``. ``host`` is a
      strict dotted-quad IPv4 address or a host name by the rules of
      ``proxytap.policy.target.normalize_host`` (letters, digits, ``-``, ``_``,
      labels 1..63, at most 253, one trailing dot dropped, lower-cased, no
      percent-encoding, no numeric forms such as ``127.1`` or ``0x7f000001``
      that a resolver would read as an address). IPv6 goes in brackets, without
      a zone, and comes back ``inet_ntop``-canonical without brackets. Port:
      1 to 5 ASCII digits, 1..65535. No userinfo, no path, nothing else (400).
    * Responses: ``Proxy-Status`` (RFC 9209) is ``<proxy_name>; error=<type>``
      plus ``; details="..."`` when given; the proxy name is sent as an
      sf-token when it is one, else as an sf-string; details are an sf-string
      with ``\\`` and ``"`` escaped and any character outside printable ASCII
      replaced by ``?``. The body is ``reason + "\\n"`` in UTF-8 plain text.
"""

from __future__ import annotations

import functools
import http
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from proxytap.errors import ProtocolError
from proxytap.policy.target import normalize_host

__all__ = [
    "MAX_HEAD",
    "MAX_LINE",
    "RequestHead",
    "connect_established",
    "error_response",
    "head_end",
    "parse_authority",
    "parse_head",
    "proxy_status_value",
    "request_line",
]

MAX_HEAD: Final = 65536
MAX_LINE: Final = 8192

_ERROR: Final = "http_request_error"

_BLANK_LINES: Final = re.compile(rb"(?:\r?\n)*")
_HEAD_END: Final = re.compile(rb"\r\n\r\n")
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
_TCHARS: Final = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN: Final = re.compile(rb"[" + _TCHARS + rb"]+")
_REQUEST_LINE: Final = re.compile(
    rb"([" + _TCHARS + rb"]+) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])",
)
_BAD_VALUE_BYTE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PORT: Final = re.compile(r"[0-9]{1,5}")
_SF_TOKEN: Final = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_HEADER_VALUE_OK: Final = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head; ``head_length`` bytes of the buffer were the head."""

    method: str
    target: str
    version: str  # "HTTP/1.1" | "HTTP/1.0"
    headers: tuple[tuple[str, str], ...]  # names as sent, values without OWS
    head_length: int

    def values(self, name: str) -> tuple[str, ...]:
        """Every value of the header ``name`` (case-insensitive), in order."""
        key = name.lower()
        return tuple(value for field_name, value in self.headers if field_name.lower() == key)


def _error(reason: str, status: int = 400) -> ProtocolError:
    return ProtocolError(reason, status=status, proxy_status=_ERROR)


def _skip_blank_lines(buf: bytes | bytearray, endpos: int) -> int:
    match = _BLANK_LINES.match(buf, 0, endpos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def head_end(
    buf: bytes | bytearray, limit: int = MAX_HEAD, line_limit: int = MAX_LINE
) -> int | None:
    """Offset just past the blank line that ends the head, or ``None`` for more bytes.

    Raises ``ProtocolError`` 414 when the request line is longer than
    ``line_limit`` bytes (its line ending not counted), 431 when the head
    does not end within ``limit`` bytes and 400 at the first bare LF.
    """
    start = _skip_blank_lines(buf, limit)
    if start >= limit:
        raise _error("request head too large", 431)
    window = start + line_limit + 2  # the line, maybe a CR, the LF
    # A too-long request line is known once ``window`` bytes are in, a too-large
    # head once ``limit`` bytes are: the smaller decides, so the answer does not
    # depend on how the bytes were split.
    too_long = _error("request line too long", 414) if window <= limit else None
    newline = buf.find(b"\n", start, window)
    if newline < 0:
        if len(buf) >= window:
            raise too_long or _error("request head too large", 431)
        if len(buf) >= limit:
            raise _error("request head too large", 431)
        return None
    cr = buf[newline - 1 : newline] == b"\r"
    if not cr and newline < limit:  # (past the limit the head is too large anyway)
        raise _error("bare LF in request head: lines end with CRLF")
    if newline - start - cr > line_limit:
        raise too_long or _error("request head too large", 431)
    match = _HEAD_END.search(buf, newline - 1, limit)
    bare = _BARE_LF.search(buf, newline + 1, match.end() if match is not None else limit)
    if bare is not None:
        raise _error("bare LF in request head: lines end with CRLF")
    if match is not None:
        return match.end()
    if len(buf) >= limit:
        raise _error("request head too large", 431)
    return None


def request_line(buf: bytes | bytearray) -> bytes:
    """The request line of a framed head (``head_end`` found its end), without CRLF."""
    start = _skip_blank_lines(buf, len(buf))
    return bytes(buf[start : buf.find(b"\r\n", start)])


def parse_head(buf: bytes | bytearray) -> RequestHead:
    """Parse the request head at the start of ``buf`` (bytes after it are ignored)."""
    start = _skip_blank_lines(buf, len(buf))
    match = _HEAD_END.search(buf, start)
    if match is None:
        raise _error("incomplete request head")
    end = match.end()
    lines = bytes(buf[start:end]).split(b"\r\n")[:-2]  # drop the blank line and after
    for line in lines:
        if b"\r" in line:
            raise _error("stray CR in request head")
        if b"\n" in line:
            raise _error("bare LF in request head: lines end with CRLF")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        raise _error("malformed request line")
    method, target, version = (part.decode("ascii") for part in request_line.groups())
    if version.startswith("HTTP/1.") and version != "HTTP/1.0":
        version = "HTTP/1.1"
    elif version != "HTTP/1.0":
        raise _error("HTTP version not supported", 505)
    headers = tuple(_parse_field(line) for line in lines[1:])
    return RequestHead(method, target, version, headers, end)


def _parse_field(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise _error("obsolete line folding in header")
    name, colon, value = line.partition(b":")
    if not colon:
        raise _error("header line without colon")
    if not name:
        raise _error("empty header name")
    if _TOKEN.fullmatch(name) is None:
        if name[-1:] in (b" ", b"\t"):
            raise _error("whitespace before colon in header")
        raise _error("invalid header name")
    value = value.strip(b" \t")
    if _BAD_VALUE_BYTE.search(value) is not None:
        raise _error("invalid character in header value")
    return name.decode("ascii"), value.decode("latin-1")


@functools.lru_cache(maxsize=8192)  # pure; errors are raised, never cached
def parse_authority(target: str) -> tuple[str, int]:
    """Check a CONNECT request-target; return ``(host, port)``."""
    if target.startswith("["):
        inner, bracket, rest = target[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise _error("malformed bracketed authority")
        checked = normalize_host(inner)
        if checked is None or checked[1] != "ipv6":
            raise _error("invalid IPv6 address in authority")
        port_text = rest[1:]
    else:
        if target.count(":") != 1:
            raise _error("authority must be host:port")
        name, _, port_text = target.partition(":")
        checked = normalize_host(name)
        if checked is None:
            raise _error("invalid host in authority")
    if _PORT.fullmatch(port_text) is None or not 1 <= int(port_text) <= 65535:
        raise _error("invalid port in authority")
    return checked[0], int(port_text)


def _check_version(version: str) -> None:
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ValueError(f"unsupported response version {version!r}")


def connect_established(version: str = "HTTP/1.1") -> bytes:
    """The 200 response that opens a CONNECT tunnel."""
    _check_version(version)
    return f"{version} 200 Connection established\r\n\r\n".encode("ascii")


def _sf_string(text: str) -> str:
    chars = ("?" if not " " <= c <= "~" else "\\" + c if c in '\\"' else c for c in text)
    return '"' + "".join(chars) + '"'


def proxy_status_value(proxy_name: str, error: str, details: str | None = None) -> str:
    """An RFC 9209 ``Proxy-Status`` member: ``name; error=type[; details="..."]``."""
    if _SF_TOKEN.fullmatch(error) is None:
        raise ValueError(f"Proxy-Status error type is not a token: {error!r}")
    name = proxy_name if _SF_TOKEN.fullmatch(proxy_name) else _sf_string(proxy_name)
    value = f"{name}; error={error}"
    if details is not None:
        value += f"; details={_sf_string(details)}"
    return value


def error_response(
    status: int,
    reason: str,
    proxy_status: str,
    *,
    version: str = "HTTP/1.1",
    proxy_name: str = "proxytap",
    details: str | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
    close: bool = True,
    include_body: bool = True,
) -> bytes:
    """A complete 4xx/5xx response from the proxy itself.

    ``reason`` becomes the plain-text body (never put errno text in it);
    ``proxy_status`` is the RFC 9209 error type. ``include_body=False`` keeps
    ``Content-Length`` but leaves the body out (answers to HEAD). Raises
    ``ValueError`` on a status outside 400..599 or an invalid extra header.
    """
    _check_version(version)
    if not 400 <= status <= 599:
        raise ValueError(f"not an error status: {status}")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    body = (reason + "\n").encode("utf-8")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Proxy-Status", proxy_status_value(proxy_name, proxy_status, details)),
        *extra_headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    lines = [f"{version} {status} {phrase}"]
    for name, value in headers:
        if _TOKEN.fullmatch(name.encode("latin-1")) is None:
            raise ValueError(f"invalid header name {name!r}")
        if _HEADER_VALUE_OK.fullmatch(value) is None or value != value.strip(" \t"):
            raise ValueError(f"invalid value for header {name!r}")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if include_body else head
