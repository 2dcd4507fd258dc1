"""The error hierarchy and the one table that maps an upstream failure to its replies.

``ProxytapError`` is the root. ``ProtocolError`` carries what to answer the peer
(an HTTP status or a SOCKS reply code) next to the reason. ``UpstreamError`` is
also an ``OSError`` so I/O code can treat it as one.
"""

from __future__ import annotations

import difflib
import enum
import errno
import socket
from collections.abc import Iterable


class ProxytapError(Exception):
    """Root of every error proxytap raises on purpose."""


class ConfigError(ProxytapError):
    """A configuration value is wrong; ``key`` names it, ``problem`` says why."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    """``key`` (``section.name``) is not a key here: say so, with the likeliest meant one."""
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, f"unknown key{hint}")


class ProtocolError(ProxytapError):
    """The peer broke its protocol.

    ``status`` is the HTTP status to answer with (HTTP paths), ``socks_code`` the
    SOCKS reply code (SOCKS paths; ``None`` where the protocol has no reply, e.g.
    a greeting with an unknown version). ``proxy_status`` is the RFC 9209 error
    type for the ``Proxy-Status`` header. ``reply`` holds the exact bytes a
    SOCKS parser wants sent before the connection is closed (may be empty).
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int = 400,
        socks_code: int | None = None,
        proxy_status: str = "http_request_error",
        reply: bytes = b"",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.socks_code = socks_code
        self.proxy_status = proxy_status
        self.reply = reply  # SOCKS paths: the exact bytes to send before closing


class Failure(enum.Enum):
    """Why an upstream connection could not be made.

    Each value is its RFC 9209 Proxy-Status error type. ``http_status``,
    ``socks5`` and ``socks4`` give the reply each front end sends.
    """

    DNS_ERROR = "dns_error"
    DNS_TIMEOUT = "dns_timeout"
    REFUSED = "connection_refused"
    TIMEOUT = "connection_timeout"
    NET_UNREACHABLE = "destination_ip_unroutable"
    HOST_UNREACHABLE = "destination_unavailable"
    PROHIBITED = "destination_ip_prohibited"
    DENIED = "http_request_denied"
    # out of descriptors or buffers (EMFILE, ENFILE, ENOBUFS, ENOMEM): the proxy's own
    # limit, a temporary condition, not a fault (RFC 9209 has no closer type)
    NO_RESOURCES = "connection_limit_reached"
    INTERNAL = "proxy_internal_error"
    # an upstream proxy (chaining) refused proxytap's credentials: the proxy's own
    # configuration is wrong, not the client's request
    PROXY_CONFIG = "proxy_configuration_error"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def socks5(self) -> int:
        return _SOCKS5_CODE[self]

    @property
    def description(self) -> str:
        return _DESCRIPTION[self]


_HTTP_STATUS = {
    Failure.DNS_ERROR: 502,
    Failure.DNS_TIMEOUT: 504,
    Failure.REFUSED: 502,
    Failure.TIMEOUT: 504,
    Failure.NET_UNREACHABLE: 502,
    Failure.HOST_UNREACHABLE: 502,
    Failure.PROHIBITED: 403,
    Failure.DENIED: 403,
    Failure.NO_RESOURCES: 503,
    Failure.INTERNAL: 502,
    Failure.PROXY_CONFIG: 502,
}

# RFC 1928 section 6.
_SOCKS5_CODE = {
    Failure.DNS_ERROR: 0x04,
    Failure.DNS_TIMEOUT: 0x04,
    Failure.REFUSED: 0x05,
    Failure.TIMEOUT: 0x06,
    Failure.NET_UNREACHABLE: 0x03,
    Failure.HOST_UNREACHABLE: 0x04,
    Failure.PROHIBITED: 0x02,
    Failure.DENIED: 0x02,
    Failure.NO_RESOURCES: 0x01,
    Failure.INTERNAL: 0x01,
    Failure.PROXY_CONFIG: 0x01,
}

_DESCRIPTION = {
    Failure.DNS_ERROR: "the destination name could not be resolved",
    Failure.DNS_TIMEOUT: "resolving the destination name timed out",
    Failure.REFUSED: "the destination refused the connection",
    Failure.TIMEOUT: "connecting to the destination timed out",
    Failure.NET_UNREACHABLE: "the destination network is unreachable",
    Failure.HOST_UNREACHABLE: "the destination host is unreachable",
    Failure.PROHIBITED: "the destination is not allowed by policy",
    Failure.DENIED: "the request is not allowed by policy",
    Failure.NO_RESOURCES: "the proxy has no connection to spare; try again later",
    Failure.INTERNAL: "the proxy could not connect to the destination",
    Failure.PROXY_CONFIG: "the proxy's upstream proxy refused its request (check the proxy's "
    "[[upstream.proxies]] credentials)",
}


class UpstreamError(ProxytapError, OSError):
    """Connecting upstream failed; ``failure`` says how (never the errno text)."""

    def __init__(self, failure: Failure, detail: str = "", message: str = "") -> None:
        super().__init__(message or failure.description)
        self.failure = failure
        self.detail = detail  # for logs only, never sent to the client
        # what the client is told instead of ``failure.description`` (a policy
        # refusal names its rule and the setting that would allow the request)
        self.message = message or failure.description


_ERRNO_FAILURE = {
    errno.ECONNREFUSED: Failure.REFUSED,
    errno.ETIMEDOUT: Failure.TIMEOUT,
    errno.ENETUNREACH: Failure.NET_UNREACHABLE,
    errno.ENETDOWN: Failure.NET_UNREACHABLE,
    errno.EHOSTUNREACH: Failure.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Failure.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: Failure.NET_UNREACHABLE,
    errno.EAFNOSUPPORT: Failure.NET_UNREACHABLE,
    errno.EACCES: Failure.PROHIBITED,
    errno.EPERM: Failure.PROHIBITED,
    errno.EMFILE: Failure.NO_RESOURCES,
    errno.ENFILE: Failure.NO_RESOURCES,
    errno.ENOBUFS: Failure.NO_RESOURCES,
    errno.ENOMEM: Failure.NO_RESOURCES,
}


def classify_os_error(exc: BaseException) -> Failure:
    """Map an exception from resolving or connecting to a ``Failure``."""
    if isinstance(exc, UpstreamError):
        return exc.failure
    if isinstance(exc, socket.gaierror):
        if exc.errno == socket.EAI_AGAIN:
            return Failure.DNS_TIMEOUT
        return Failure.DNS_ERROR
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_FAILURE.get(exc.errno, Failure.INTERNAL)
    return Failure.INTERNAL
