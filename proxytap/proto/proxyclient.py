"""Client side of the upstream-proxy handshakes (chaining), sans-IO.

``ProxyClient`` asks an upstream proxy to open a connection to a destination,
over HTTP CONNECT (RFC 9110 section 9.3.6), SOCKS5 (RFC 1928, RFC 1929
user/password) or SOCKS4 / SOCKS4a. ``start()`` gives the first bytes to send,
``receive_data(data)`` takes whatever the proxy answered (any split) and
returns the next bytes to send; once the tunnel is up ``established`` holds the
result: the address the proxy reported (SOCKS ``BND.ADDR`` / ``BND.PORT``;
``None`` for HTTP, which reports none) and the destination's bytes that came in
the same read as the reply (``rest``: never lost, the relay sends them on).
``receive_data(b"")`` means the proxy closed. No sockets, no clock, no asyncio.

Why not python-socks' own connectors: its asyncio API returns only the
socket (not the SOCKS reply, so no ``BND.ADDR``), and its HTTP CONNECT reader
takes one ``recv`` as the whole response: a head split over two reads fails,
and destination bytes that arrive with the ``200`` (a server that speaks first:
SMTP, SSH) are dropped.

Refusals raise ``ChainRefused`` with the ``Failure`` to answer the client
with and ``stage``: ``auth`` (the proxy wants other credentials: HTTP 407,
SOCKS5 user/password status not 0 or no acceptable method), ``refused`` (the
proxy answered with a failure for this destination) or ``protocol`` (the
answer was malformed, too large, or the proxy closed before answering). The
``Failure`` is as precise as the answer allows:

* SOCKS5 REP: 02 -> ``PROHIBITED``, 03 -> ``NET_UNREACHABLE``, 04 ->
  ``HOST_UNREACHABLE``, 05 -> ``REFUSED``, 06 -> ``TIMEOUT``, 01, 07, 08 and
  others -> ``INTERNAL``.
* SOCKS4 CD 0x5B (rejected or failed; SOCKS4 says no more) ->
  ``HOST_UNREACHABLE``; 0x5C / 0x5D (identd) -> ``PROXY_CONFIG``.
* HTTP: 407 -> ``PROXY_CONFIG``; else a ``Proxy-Status`` error type
  proxytap knows (RFC 9209; proxytap and other RFC 9209 proxies send one)
  is taken as is; else 403 -> ``DENIED``, 504 -> ``TIMEOUT``, 502 / 503 ->
  ``HOST_UNREACHABLE``, anything else -> ``INTERNAL``.
* Credentials refused -> ``PROXY_CONFIG`` (proxytap's own configuration is
  wrong, not the client's request).
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from proxytap.errors import Failure, ProxytapError

MAX_HEAD: Final = 16384  # bytes of an upstream's CONNECT response head

# stages of a refusal (the ``reason`` label of proxytap_upstream_proxy_errors_total)
AUTH: Final = "auth"
REFUSED: Final = "refused"
PROTOCOL: Final = "protocol"


class Kind(enum.Enum):
    """The handshake spoken to the upstream proxy."""

    HTTP = "http"
    SOCKS4 = "socks4"  # a name is sent SOCKS4a-style (0.0.0.x + hostname)
    SOCKS5 = "socks5"


@dataclass(frozen=True, slots=True)
class Established:
    """The tunnel is up: ``bound`` is SOCKS BND.ADDR/BND.PORT (None for HTTP)."""

    bound: tuple[str, int] | None
    rest: bytes  # destination bytes that followed the reply


class ChainRefused(ProxytapError):
    """The upstream proxy did not open the tunnel; ``failure`` is what to answer."""

    def __init__(self, stage: str, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.stage = stage
        self.failure = failure
        self.detail = detail


_SOCKS5_FAILURE = {
    0x02: Failure.PROHIBITED,
    0x03: Failure.NET_UNREACHABLE,
    0x04: Failure.HOST_UNREACHABLE,
    0x05: Failure.REFUSED,
    0x06: Failure.TIMEOUT,
}
_HTTP_FAILURE = {
    403: Failure.DENIED,
    407: Failure.PROXY_CONFIG,
    502: Failure.HOST_UNREACHABLE,
    503: Failure.HOST_UNREACHABLE,
    504: Failure.TIMEOUT,
}
_BY_TYPE = {f.value: f for f in Failure}
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?")
_PROXY_STATUS_ERROR = re.compile(rb"(?:^|[;\s])error=\"?([a-z_]+)", re.IGNORECASE)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class ProxyClient:
    """One handshake with an upstream proxy, asking for ``host``:``port``.

    ``host`` is a name or an IP literal; a name is sent as a name (the proxy
    resolves it). SOCKS4 cannot carry IPv6 nor 0.0.0.x (the SOCKS4a marker):
    ``ValueError`` here, so the caller decides before anything is sent.
    SOCKS4 sends ``username`` as its USERID and has no password.
    """

    def __init__(
        self,
        kind: Kind,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        max_head: int = MAX_HEAD,
    ) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        self.kind = kind
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.max_head = max_head
        self.ip = _ip(host)
        if kind is Kind.SOCKS4 and isinstance(self.ip, ipaddress.IPv6Address):
            raise ValueError("SOCKS4 cannot ask for an IPv6 address")
        if kind is Kind.SOCKS4 and self.ip is not None and self.ip.packed[:3] == b"\0\0\0":
            raise ValueError("SOCKS4 cannot ask for 0.0.0.x (it means a SOCKS4a name)")
        self.buf = bytearray()
        self.state = "start"
        self.established: Established | None = None

    # -- requests -------------------------------------------------------------------

    def start(self) -> bytes:
        """The first bytes to send (greeting or request)."""
        if self.kind is Kind.HTTP:
            self.state = "http"
            return self._http_request()
        if self.kind is Kind.SOCKS4:
            self.state = "socks4"
            return self._socks4_request()
        self.state = "methods"
        methods = b"\x00\x02" if self.username is not None else b"\x00"
        return b"\x05" + bytes([len(methods)]) + methods

    def _http_request(self) -> bytes:
        host = f"[{self.ip}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        authority = f"{host}:{self.port}".encode("idna" if not host.isascii() else "ascii")
        lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
        if self.username is not None:
            secret = f"{self.username}:{self.password or ''}".encode()
            lines.append(b"Proxy-Authorization: Basic " + base64.b64encode(secret))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _socks4_request(self) -> bytes:
        user = (self.username or "").encode()
        port = self.port.to_bytes(2, "big")
        if self.ip is not None:
            return b"\x04\x01" + port + self.ip.packed + user + b"\x00"
        name = self.host.encode("idna")
        return b"\x04\x01" + port + b"\x00\x00\x00\x01" + user + b"\x00" + name + b"\x00"

    def _socks5_request(self) -> bytes:
        head = b"\x05\x01\x00"
        port = self.port.to_bytes(2, "big")
        if isinstance(self.ip, ipaddress.IPv4Address):
            return head + b"\x01" + self.ip.packed + port
        if isinstance(self.ip, ipaddress.IPv6Address):
            return head + b"\x04" + self.ip.packed + port
        name = self.host.encode("idna")
        if not 1 <= len(name) <= 255:
            raise ChainRefused(PROTOCOL, Failure.DNS_ERROR, "host name too long for SOCKS5")
        return head + b"\x03" + bytes([len(name)]) + name + port

    # -- replies --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> bytes:
        """Take the proxy's bytes (``b""``: it closed); return what to send next."""
        if self.established is not None:
            raise RuntimeError("the handshake is over")
        if not data:
            raise ChainRefused(
                PROTOCOL, Failure.INTERNAL, f"the upstream proxy closed in state {self.state}"
            )
        self.buf += data
        out = bytearray()
        while self.established is None:
            step = self._step()
            if step is None:
                break
            out += step
        return bytes(out)

    def _step(self) -> bytes | None:
        """One message, if whole: the bytes to send after it (may be empty); None: need more."""
        state = self.state
        if state == "http":
            return self._http_reply()
        if state == "socks4":
            return self._socks4_reply()
        if state == "methods":
            return self._socks5_method()
        if state == "auth":
            return self._socks5_auth()
        return self._socks5_reply()

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _http_reply(self) -> bytes | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > self.max_head:
                raise ChainRefused(PROTOCOL, Failure.INTERNAL, "response head too large")
            return None
        head = self._take(end + 4)
        first, _, fields = head.partition(b"\r\n")
        m = _STATUS_LINE.fullmatch(first)
        if m is None:
            shown = first[:80].decode("latin-1")
            raise ChainRefused(PROTOCOL, Failure.INTERNAL, f"not an HTTP status line: {shown!r}")
        status = int(m[1])
        if status < 200:  # an interim response: the final one follows
            return b""
        if status < 300:
            self._done(None)
            return b""
        failure = _http_failure(status, fields)
        stage = AUTH if status == 407 else REFUSED
        reason = first[13:80].decode("latin-1").strip()
        raise ChainRefused(stage, failure, f"HTTP {status} {reason}".strip())

    def _socks4_reply(self) -> bytes | None:
        if len(self.buf) < 8:
            return None
        reply = self._take(8)
        if reply[0] != 0:
            raise ChainRefused(PROTOCOL, Failure.INTERNAL, f"SOCKS4 reply version {reply[0]}")
        code = reply[1]
        if code == 0x5A:
            bound = (str(ipaddress.IPv4Address(reply[4:8])), int.from_bytes(reply[2:4], "big"))
            self._done(bound)
            return b""
        if code in (0x5C, 0x5D):
            raise ChainRefused(AUTH, Failure.PROXY_CONFIG, f"SOCKS4 code 0x{code:02X} (identd)")
        raise ChainRefused(REFUSED, Failure.HOST_UNREACHABLE, f"SOCKS4 code 0x{code:02X}")

    def _socks5_method(self) -> bytes | None:
        if len(self.buf) < 2:
            return None
        ver, method = self._take(2)
        if ver != 5:
            raise ChainRefused(PROTOCOL, Failure.INTERNAL, f"SOCKS5 method reply version {ver}")
        if method == 0x00:
            self.state = "reply"
            return self._socks5_request()
        if method == 0x02 and self.username is not None:
            self.state = "auth"
            user = self.username.encode()
            secret = (self.password or "").encode()
            return b"\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret
        if method == 0xFF:
            wanted = "other credentials" if self.username is not None else "credentials"
            raise ChainRefused(AUTH, Failure.PROXY_CONFIG, f"no acceptable method: needs {wanted}")
        raise ChainRefused(PROTOCOL, Failure.INTERNAL, f"SOCKS5 method 0x{method:02X} not offered")

    def _socks5_auth(self) -> bytes | None:
        if len(self.buf) < 2:
            return None
        _ver, status = self._take(2)
        if status != 0:
            raise ChainRefused(AUTH, Failure.PROXY_CONFIG, "user name or password refused")
        self.state = "reply"
        return self._socks5_request()

    def _socks5_reply(self) -> bytes | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        if buf[0] != 5:
            raise ChainRefused(PROTOCOL, Failure.INTERNAL, f"SOCKS5 reply version {buf[0]}")
        code = buf[1]
        if code != 0:  # servers may send a short reply on failure: judged on the code alone
            failure = _SOCKS5_FAILURE.get(code, Failure.INTERNAL)
            raise ChainRefused(REFUSED, failure, f"SOCKS5 reply 0x{code:02X}")
        if len(buf) < 4:
            return None
        atyp = buf[3]
        if atyp == 1:
            size = 4 + 4 + 2
        elif atyp == 4:
            size = 4 + 16 + 2
        elif atyp == 3:
            if len(buf) < 5:
                return None
            size = 4 + 1 + buf[4] + 2
        else:
            raise ChainRefused(PROTOCOL, Failure.INTERNAL, f"SOCKS5 reply address type {atyp}")
        if len(buf) < size:
            return None
        reply = self._take(size)
        port = int.from_bytes(reply[-2:], "big")
        if atyp == 1:
            host = str(ipaddress.IPv4Address(reply[4:8]))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(reply[4:20]))
        else:
            host = reply[5:-2].decode("latin-1")
        self._done((host, port))
        return b""

    def _done(self, bound: tuple[str, int] | None) -> None:
        self.state = "established"
        self.established = Established(bound, bytes(self.buf))
        self.buf.clear()


def _http_failure(status: int, fields: bytes) -> Failure:
    """The ``Failure`` of a refusing CONNECT response (its ``Proxy-Status`` first).

    A 407 is always ``PROXY_CONFIG``: it is about proxytap's own credentials,
    whatever error type the upstream names (proxytap says http_request_denied).
    """
    if status == 407:
        return Failure.PROXY_CONFIG
    found: Failure | None = None
    for line in fields.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep or name.strip().lower() != b"proxy-status":
            continue
        # the last member is the one closest to proxytap: the upstream proxy itself
        for member in value.split(b","):
            m = _PROXY_STATUS_ERROR.search(member)
            if m is not None and m[1].decode().lower() in _BY_TYPE:
                found = _BY_TYPE[m[1].decode().lower()]
    if found is not None:
        return found
    return _HTTP_FAILURE.get(status, Failure.INTERNAL)
