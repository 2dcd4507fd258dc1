"""HTTP/1 message heads as plain data: what the header rules judge and modules change.

A head is a method (or status), a target, a version and a list of
``(name, value)`` pairs, all ``bytes``; ``str`` is accepted at the entry points
and encoded as latin-1 (every byte survives). No sockets and no parser types:
the plain-HTTP forwarder builds heads from what llhttp parsed, the CONNECT
handshake from what ``proxytap.proto.httpconnect`` parsed.

The routing and framing attributes (``host``, ``length``, ``chunked`` ...) are
filled by ``proxytap.policy.headers.HeaderRules.validate_request`` /
``validate_response``; this module only holds them. The errors a bad head is
answered with are built here too, so target parsing and validation word them
alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from proxytap.errors import ProtocolError

__all__ = [
    "REQUEST_ERROR",
    "RESPONSE_ERROR",
    "RESPONSE_TOO_BIG",
    "Fields",
    "RequestHead",
    "ResponseHead",
    "as_bytes",
    "get_field",
    "remove_fields",
    "request_error",
    "response_error",
    "serialize",
    "split_head",
    "to_bytes",
]

Fields = list[tuple[bytes, bytes]]

# Proxy-Status error types (RFC 9209)
REQUEST_ERROR: Final = "http_request_error"
RESPONSE_ERROR: Final = "http_protocol_error"
RESPONSE_TOO_BIG: Final = "http_response_header_section_size"

_OWS: Final = b" \t"


def request_error(
    reason: str, status: int = 400, proxy_status: str = REQUEST_ERROR
) -> ProtocolError:
    """A request the client gets ``status`` for (400 unless said otherwise)."""
    return ProtocolError(reason, status=status, proxy_status=proxy_status)


def response_error(reason: str, proxy_status: str = RESPONSE_ERROR) -> ProtocolError:
    """A response from the origin that cannot be forwarded: the client gets 502."""
    return ProtocolError(reason, status=502, proxy_status=proxy_status)


def to_bytes(text: bytes | str) -> bytes:
    """``text`` as bytes (``str`` encoded as latin-1)."""
    return text.encode("latin-1") if isinstance(text, str) else text


def as_bytes(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Fields:
    """A header list as ``bytes`` pairs (``str`` encoded as latin-1)."""
    return [
        (
            n.encode("latin-1") if isinstance(n, str) else n,
            v.encode("latin-1") if isinstance(v, str) else v,
        )
        for n, v in headers
    ]


def serialize(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``name: value\\r\\n`` for each field."""
    return b"".join(b"%s: %s\r\n" % field for field in fields)


def split_head(raw: bytes) -> tuple[bytes, Fields]:
    """Start line and fields of a raw head as a strict parser (llhttp) accepted it.

    ``raw`` ends with the blank line; lines end with CRLF; values come back
    without their leading OWS and with their trailing OWS, as llhttp hands them
    over (validation strips and judges it). A line without a colon becomes a
    field with an empty name, which validation rejects.
    """
    lines = raw.split(b"\r\n")
    fields = []
    for line in lines[1:-2]:
        name, _, value = line.partition(b":")
        fields.append((name, value.lstrip(_OWS)))
    return lines[0], fields


def get_field(fields: Sequence[tuple[bytes, bytes]], name: bytes | str) -> bytes | None:
    """The value of the first field called ``name`` (any case), or ``None``."""
    key = to_bytes(name).lower()
    for n, v in fields:
        if n.lower() == key:
            return v
    return None


def remove_fields(fields: Sequence[tuple[bytes, bytes]], name: bytes | str) -> Fields:
    """A new list without the fields called ``name`` (any case)."""
    key = to_bytes(name).lower()
    return [(n, v) for n, v in fields if n.lower() != key]


class RequestHead:
    """A request head as plain data: what validate reads and rewrite and modules change.

    Filled by validate: ``host``, ``port``, ``authority`` (where it goes),
    ``path`` (origin-form; modules may change it), ``length`` (-1: none),
    ``chunked`` and ``codings`` (the Transfer-Encoding list, ``b""`` for
    none), ``websocket``, ``close`` (``Connection: close``) and
    ``credentials`` (the ``Proxy-Authorization`` value), ``max_forwards``
    (OPTIONS / TRACE: the ``Max-Forwards`` value received, -1 for none).
    ``headers`` then holds end-to-end fields only.
    """

    __slots__ = (
        "authority",
        "block",
        "chunked",
        "client",
        "close",
        "codings",
        "credentials",
        "headers",
        "host",
        "length",
        "max_forwards",
        "method",
        "path",
        "port",
        "target",
        "version",
        "websocket",
    )

    def __init__(
        self,
        method: bytes | str,
        target: bytes | str,
        version: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]],
        client: str | None = None,
    ) -> None:
        self.method = to_bytes(method)
        self.target = to_bytes(target)
        self.version = to_bytes(version)
        if isinstance(headers, list) and (not headers or type(headers[0][0]) is bytes):
            self.headers: Fields = list(headers)  # bytes already (the forwarder's case)
        else:
            self.headers = as_bytes(headers)
        self.block: bytes | None = None  # serialized(), once; None after a change
        self.client = client  # the client's address, for Forwarded / X-Forwarded-For
        self.host = ""
        self.port = 0
        self.authority = b""
        self.path = b""
        self.length = -1
        self.chunked = False
        self.codings = b""
        self.websocket = False
        self.close = False
        self.credentials: bytes | None = None
        self.max_forwards = -1

    @property
    def http10(self) -> bool:
        return self.version == b"HTTP/1.0"

    def copy(self) -> RequestHead:
        other = RequestHead.__new__(RequestHead)
        for name in RequestHead.__slots__:
            setattr(other, name, getattr(self, name))
        other.headers = list(self.headers)
        other.block = None
        return other

    def retarget(self, target: bytes) -> RequestHead:
        """A copy for another target (``headers`` shared, not copied); routing unset."""
        other = RequestHead.__new__(RequestHead)
        other.method = self.method
        other.target = target
        other.version = self.version
        other.headers = self.headers
        other.block = self.block
        other.client = self.client
        other.host, other.port, other.authority, other.path = "", 0, b"", b""
        other.length = self.length
        other.chunked = self.chunked
        other.codings = self.codings
        other.websocket = self.websocket
        other.close = self.close
        other.credentials = self.credentials
        other.max_forwards = self.max_forwards
        return other

    def serialized(self) -> bytes:
        """``headers`` as ``name: value CRLF`` lines (kept: heads from the memo share it)."""
        block = self.block
        if block is None:
            block = self.block = serialize(self.headers)
        return block

    # helpers for modules
    def get(self, name: bytes | str) -> bytes | None:
        return get_field(self.headers, name)

    def get_all(self, name: bytes | str) -> list[bytes]:
        key = to_bytes(name).lower()
        return [v for n, v in self.headers if n.lower() == key]

    def remove(self, name: bytes | str) -> None:
        self.headers = remove_fields(self.headers, name)

    def add(self, name: bytes | str, value: bytes | str) -> None:
        self.headers.append((to_bytes(name), to_bytes(value)))

    def set(self, name: bytes | str, value: bytes | str) -> None:
        self.headers = remove_fields(self.headers, name)
        self.headers.append((to_bytes(name), to_bytes(value)))


class ResponseHead:
    """A response head as plain data; validate fills ``length``, ``chunked``, ``codings``."""

    __slots__ = ("chunked", "codings", "headers", "length", "reason", "status", "version")

    def __init__(
        self,
        status: int,
        version: bytes | str,
        headers: Iterable[tuple[bytes | str, bytes | str]],
        reason: bytes | str = b"",
    ) -> None:
        self.status = status
        self.version = to_bytes(version)
        self.reason = to_bytes(reason)
        self.headers: Fields = as_bytes(headers)
        self.length = -1
        self.chunked = False
        self.codings = b""

    @property
    def http10(self) -> bool:
        return self.version == b"HTTP/1.0"

    def copy(self) -> ResponseHead:
        other = ResponseHead.__new__(ResponseHead)
        for name in ResponseHead.__slots__:
            setattr(other, name, getattr(self, name))
        other.headers = list(self.headers)
        return other

    get = RequestHead.get
    get_all = RequestHead.get_all
    remove = RequestHead.remove
    add = RequestHead.add
    set = RequestHead.set
