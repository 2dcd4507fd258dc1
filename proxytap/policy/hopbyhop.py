"""Hop-by-hop header fields (RFC 9110 section 7.6.1): which ones a proxy must not forward.

Pure functions over header lists: a list of ``(name, value)`` pairs as they
arrived, all ``bytes`` (the forwarding fast path) or all ``str`` (the
interception path, tests). Names compare case-insensitively; order and the
case of what is kept do not change.

Removed in both directions: ``Connection`` and every field it names,
``Proxy-Connection`` (and what it names: old clients send it as Connection's
twin), ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding`` (the
forwarder frames the message itself), ``Upgrade`` (unless a WebSocket upgrade
is being relayed), ``Proxy-Authorization`` and ``Proxy-Authenticate`` (they are
for the proxy, not the origin). ``Connection`` cannot remove the fields the
forwarder needs to frame and route the message (``Content-Length``, ``Host``):
listing them would be request smuggling, not a hop-by-hop option.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
"""Lower-case names that never cross the proxy as they are."""

PROTECTED = frozenset({"content-length", "host"})
"""Lower-case names a ``Connection`` field cannot make us drop."""

BytesHeaders = Sequence[tuple[bytes, bytes]]
StrHeaders = Sequence[tuple[str, str]]


class _Table:
    """The constants of one string type, so one body serves bytes and str."""

    __slots__ = ("comma", "connection", "hop", "protected", "upgrade", "websocket")

    def __init__(self, enc: Any) -> None:
        self.hop: frozenset[Any] = frozenset(enc(n) for n in HOP_BY_HOP)
        self.protected: frozenset[Any] = frozenset(enc(n) for n in PROTECTED)
        self.connection: frozenset[Any] = frozenset((enc("connection"), enc("proxy-connection")))
        self.comma: Any = enc(",")
        self.upgrade: Any = enc("upgrade")
        self.websocket: Any = enc("websocket")


_BYTES = _Table(lambda s: s.encode("ascii"))
_STR = _Table(lambda s: s)


def _table(headers: Sequence[tuple[Any, Any]]) -> _Table:
    return _BYTES if headers and isinstance(headers[0][0], bytes) else _STR


def _tokens(value: Any, comma: Any) -> Iterator[Any]:
    for part in value.split(comma):
        token = part.strip().lower()
        if token:
            yield token


@overload
def connection_tokens(headers: BytesHeaders) -> frozenset[bytes]: ...
@overload
def connection_tokens(headers: StrHeaders) -> frozenset[str]: ...
def connection_tokens(headers: Sequence[tuple[Any, Any]]) -> frozenset[Any]:
    """Lower-case tokens of every ``Connection`` and ``Proxy-Connection`` field."""
    t = _table(headers)
    out: set[Any] = set()
    for name, value in headers:
        if name.lower() in t.connection:
            out.update(_tokens(value, t.comma))
    return frozenset(out)


@overload
def has_token(headers: BytesHeaders, name: bytes, token: bytes) -> bool: ...
@overload
def has_token(headers: StrHeaders, name: str, token: str) -> bool: ...
def has_token(headers: Sequence[tuple[Any, Any]], name: Any, token: Any) -> bool:
    """Whether any ``name`` field lists ``token`` (comma-separated, case-insensitive)."""
    comma = b"," if isinstance(name, bytes) else ","
    name = name.lower()
    token = token.lower()
    return any(n.lower() == name and token in _tokens(v, comma) for n, v in headers)


@overload
def header_values(headers: BytesHeaders, name: bytes) -> list[bytes]: ...
@overload
def header_values(headers: StrHeaders, name: str) -> list[str]: ...
def header_values(headers: Sequence[tuple[Any, Any]], name: Any) -> list[Any]:
    """Every value of field ``name``, in order."""
    name = name.lower()
    return [v for n, v in headers if n.lower() == name]


def is_websocket_upgrade(headers: BytesHeaders | StrHeaders) -> bool:
    """``Upgrade: websocket`` together with ``Connection: upgrade`` (RFC 6455 section 4.1)."""
    t = _table(headers)
    if t.upgrade not in connection_tokens(headers):
        return False
    return has_token(headers, t.upgrade, t.websocket)


@overload
def strip_hop_by_hop(
    headers: BytesHeaders, *, keep_upgrade: bool = False
) -> list[tuple[bytes, bytes]]: ...
@overload
def strip_hop_by_hop(
    headers: StrHeaders, *, keep_upgrade: bool = False
) -> list[tuple[str, str]]: ...
def strip_hop_by_hop(
    headers: Sequence[tuple[Any, Any]], *, keep_upgrade: bool = False
) -> list[tuple[Any, Any]]:
    """``headers`` without hop-by-hop fields; a new list, the input is not changed.

    ``keep_upgrade`` keeps ``Upgrade`` (a WebSocket handshake being relayed);
    ``Connection`` itself is still removed: the forwarder writes its own.
    """
    t = _table(headers)
    drop = set(t.hop)
    drop.update(connection_tokens(headers) - t.protected)
    if keep_upgrade:
        drop.discard(t.upgrade)
    return [(n, v) for n, v in headers if n.lower() not in drop]


__all__ = [
    "HOP_BY_HOP",
    "PROTECTED",
    "connection_tokens",
    "has_token",
    "header_values",
    "is_websocket_upgrade",
    "strip_hop_by_hop",
]
