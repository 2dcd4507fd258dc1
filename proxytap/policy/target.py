"""Where a request goes: host names, absolute-form request targets and ``Host`` values.

Pure functions; each is memoized because the same names and authorities come
back on every connection.

Host names (``normalize_host``: SOCKS5 ATYP 3, SOCKS4a, CONNECT, URLs, ``Host``)
    The name must be ASCII (IDNs arrive as ``xn--`` A-labels), at most 253
    characters after one trailing dot is dropped, made of dot-separated labels
    of 1..63 letters, digits, ``-`` or ``_``. Control characters, NUL, spaces,
    ``,``, ``/``, ``@``, ``%`` and every other character are rejected. Names are
    lower-cased. A name that is an IP literal is normalised to that address
    (``atyp`` "ipv4" / "ipv6"): a strict dotted quad, or IPv6 text without a
    zone. Other names whose last label is all digits (``127.1``, ``256.1.1.1``,
    ``0177.0.0.1``; no top-level domain is numeric) and names ``inet_aton``
    (and so ``getaddrinfo``) would read as an address (``0x7f000001``,
    ``0x7f.0.0.1``) are rejected, so a host name can never smuggle in an
    address that policy did not see. IPv6 text is always ``inet_ntop`` form
    (compressed, lower-case).

Request targets (``parse_target``; errors are ``ProtocolError`` with the status)
    Origin-form and asterisk-form: 400 (a forward proxy, not a reverse proxy);
    ``https://`` and other schemes: 501; userinfo, a bad host or port: 400. The
    port defaults to 80; the fragment is dropped; an empty path becomes ``/``
    (``*`` for OPTIONS).

``Host`` values (``parse_host``)
    ``host[:port]`` or ``[v6][:port]``; ``host:`` (an empty port) means the
    default one. Anything else is ``None``: the caller decides what that costs.

The authority-form target of CONNECT is ``proxytap.proto.httpconnect.parse_authority``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Final

from proxytap.policy.message import request_error

__all__ = [
    "ORIGIN_FORM_REASON",
    "Target",
    "normalize_host",
    "parse_host",
    "parse_target",
]

ORIGIN_FORM_REASON: Final = (
    "proxytap is a forward proxy, not a reverse proxy: "
    "the request target must be an absolute http:// URI"
)

_LABEL: Final = re.compile(r"[A-Za-z0-9_-]{1,63}")
_IPV6_TEXT: Final = re.compile(r"[0-9A-Fa-f:.]+")
_VISIBLE: Final = re.compile(rb"[\x21-\x7e]+")
_SCHEME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*")


@functools.lru_cache(maxsize=8192)  # pure; the same names come back on every connection
def normalize_host(name: str) -> tuple[str, str] | None:
    """Check a host name from the wire; return ``(host, atyp)`` or ``None``.

    Applies the rules in the module docstring: IP literals become ``ipv4`` /
    ``ipv6`` in canonical text, names become lower-case ``domain``; anything
    invalid or numerically ambiguous gives ``None``.
    """
    if ":" in name:
        if _IPV6_TEXT.fullmatch(name) is None:
            return None
        try:
            packed = ipaddress.IPv6Address(name).packed
        except ValueError:
            return None
        return socket.inet_ntop(socket.AF_INET6, packed), "ipv6"
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    try:
        return str(ipaddress.IPv4Address(name)), "ipv4"
    except ValueError:
        pass
    if name.rpartition(".")[2].isdigit():
        return None  # 256.1.1.1, 1.2.3.4.5: no top-level domain is all digits
    try:
        socket.inet_aton(name)
    except OSError:
        return name.lower(), "domain"
    return None  # 0x7f000001, 0x7f.0.0.1: the resolver would read an address


@dataclass(frozen=True, slots=True)
class Target:
    """Where an absolute-form URI points and what goes upstream."""

    host: str  # normalized (lower case, IP literals canonical, no brackets)
    port: int
    authority: bytes  # the Host value, as the URI spelled it
    path: bytes  # origin-form (or "*" for OPTIONS)


def parse_target(url: bytes, method: bytes) -> Target:
    """Check an absolute-form request target; raises ``ProtocolError``.

    The authority is parsed once per distinct value (memoized); the rest of the
    URI is cut off as it is (characters checked, the fragment dropped).
    """
    if url.startswith(b"/"):
        raise request_error(ORIGIN_FORM_REASON)
    if url == b"*":
        raise request_error("asterisk-form is for origin servers: " + ORIGIN_FORM_REASON)
    if _VISIBLE.fullmatch(url) is None:
        raise request_error("invalid character in request target")
    scheme, sep, rest = url.partition(b"://")
    if not sep or _SCHEME.fullmatch(scheme) is None:
        raise request_error("invalid request target")
    scheme = scheme.lower()
    if scheme != b"http":
        if scheme == b"https":
            raise request_error(
                "https:// URLs go through a CONNECT tunnel, not a plain request", 501
            )
        raise request_error("only http:// URLs are forwarded", 501)
    end = len(rest)
    for sep in (b"/", b"?", b"#"):
        i = rest.find(sep, 0, end)
        if i >= 0:
            end = i
    authority = rest[:end]
    host, port = _http_authority(authority)
    path = rest[end:]
    if b"#" in path:
        path = path.partition(b"#")[0]
    if not path:
        path = b"*" if method == b"OPTIONS" else b"/"
    elif path[0] == 0x3F:  # "?"
        path = b"/" + path
    return Target(host, port, authority, path)


@functools.lru_cache(maxsize=1024)
def _http_authority(authority: bytes) -> tuple[str, int]:
    """``host[:port]`` of an http URI: normalized host, port (80 when absent)."""
    if b"@" in authority:
        raise request_error("userinfo is not allowed in an http URI")
    if authority.startswith(b"["):
        host, bracket, rest = authority[1:].partition(b"]")
        if not bracket or b":" not in host:
            raise request_error("invalid host in request target")
    else:
        host, colon, port_text = authority.partition(b":")
        rest = colon + port_text
    port = 80
    if rest:
        digits = rest[1:]
        if rest[:1] != b":" or not digits.isdigit() or len(digits) > 5:
            raise request_error("invalid port in request target")
        port = int(digits)
        if not 1 <= port <= 65535:
            raise request_error("invalid port in request target")
    checked = normalize_host(host.decode("ascii")) if host else None  # _VISIBLE: ASCII
    if checked is None:
        raise request_error("invalid host in request target")
    return checked[0], port


@functools.lru_cache(maxsize=1024)
def parse_host(value: bytes) -> tuple[str, int | None] | None:
    """A ``Host`` value as ``(host, port or None)``; ``None`` when it is not one."""
    text = value.decode("latin-1")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or ":" not in host:
            return None
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
    port: int | None = None
    if rest:
        digits = rest[1:]
        if rest[0] != ":":
            return None
        if digits:  # "host:" (an empty port) means the default one
            if not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
                return None
            port = int(digits)
            if not 1 <= port <= 65535:
                return None
    checked = normalize_host(host)
    if checked is None:
        return None
    return checked[0], port
