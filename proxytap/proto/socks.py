"""Server side of the SOCKS4, SOCKS4a and SOCKS5 handshakes, sans-IO.

``SocksServer`` takes bytes (``receive_data``) and hands back events
(``next_event``): an ``AuthRequest`` (RFC 1929, SOCKS5 only), then one
``ConnectRequest``, or ``NEED_DATA``. Bytes for the client come from
``data_to_send`` (method selection, RFC 1929 status) and ``reply`` (the final
answer to the ``ConnectRequest``). No sockets, no clock, no asyncio.

Framing
    The first byte picks the protocol: 0x04 SOCKS4/4a, 0x05 SOCKS5; anything
    else is a ``ProtocolError`` with ``socks_code=None`` and an empty reply (the
    peer does not speak SOCKS, there is nothing sensible to answer). Bytes may
    arrive in any split, one at a time or greeting, sub-negotiation, request and
    early data in one chunk: the outcome is the same. Every message has a fixed
    maximum size (SOCKS5 greeting 257 bytes, RFC 1929 request 513, SOCKS5
    request 262, SOCKS4a request 520: USERID and hostname at most 255 bytes
    each plus their NUL), so the parser never waits on more than 520 bytes of
    one message; a SOCKS4 USERID or hostname with no NUL within 256 bytes is an
    error. Everything after the request is early data for the destination and
    is returned, untouched, by ``trailing_data()`` (bytes received after the
    request completed are appended there too).

Replies on errors
    A ``ProtocolError`` from ``next_event`` carries in ``reply`` everything the
    client still has to be sent before the connection is closed: output queued
    by the parser and not yet taken with ``data_to_send()`` (e.g. the method
    selection when greeting and a bad request came in one chunk), followed by
    the error reply. Send ``exc.reply``, then close. Once raised, the same error
    is raised again by every later ``next_event``.

SOCKS5 (RFC 1928) decisions
    * Greeting with NMETHODS 0, or no offered method the server accepts:
      reply ``05 FF``, ``socks_code=0xFF``.
    * Method choice: the first of the server's ``methods`` (preference order)
      the client offers. Only NO_AUTH and USERPASS exist here.
    * RFC 1929: VER must be 1 (else reply ``01 01``, ``socks_code=0x01``);
      ULEN and PLEN 0..255 (an empty name is passed on, policy decides);
      username and password are decoded latin-1 so every byte survives.
      ``auth_result(ok)`` queues ``01 00`` or ``01 01``; after a failure the
      next ``next_event`` raises ``ProtocolError`` (``socks_code=0x01``).
    * Request VER other than 5: 0x01 general failure.
    * CMD: 1 CONNECT; 3 UDP ASSOCIATE only when the server was made with
      ``udp_associate=True`` (it then returns an ``UdpAssociateRequest``);
      BIND (2), UDP ASSOCIATE otherwise, and any other value: 0x07 command
      not supported.
    * RSV is not checked: RFC 1928 calls it reserved and some clients send
      garbage there; ignoring it costs nothing.
    * ATYP other than 1, 3, 4: 0x08 address type not supported. VER, CMD and
      ATYP are checked in that order as soon as the 4-byte header is in
      (without a known ATYP the request length is unknown).
    * Domain names (ATYP 3, and the SOCKS4a hostname): see *Host names*.
      Any invalid name, including an empty one: 0x04 host unreachable, the
      answer a name that does not resolve gets (``Failure.DNS_ERROR``).
    * DST.PORT 0: 0x01 general failure (nothing can be connected to there;
      0x02 is kept for policy decisions). UDP ASSOCIATE is the exception:
      there DST.ADDR/DST.PORT say where the client will send its datagrams
      from, and 0.0.0.0 / port 0 mean "not known yet" (RFC 1928 section 4).
    * Error replies are ``05 REP 00 01 00 00 00 00 00 00``.

SOCKS4 / SOCKS4a decisions
    * The whole request (header, USERID, SOCKS4a hostname) is read first, then
      checked in this order: CD must be 1 (CONNECT; BIND and anything else are
      rejected), SOCKS4 must be allowed (it has no authentication, so it is
      refused when ``methods`` does not contain NO_AUTH), the hostname must be
      valid, DSTPORT must not be 0. Every rejection replies
      ``00 5B 00 00 00 00 00 00`` with ``socks_code=0x5B``.
    * DSTIP ``0.0.0.x`` with x != 0 means SOCKS4a: a NUL-terminated hostname
      follows the USERID. ``0.0.0.0`` is a plain (if useless) IPv4 address.

UDP datagrams (RFC 1928 section 7)
    ``parse_udp_datagram`` reads the header a client puts before every
    datagram it sends to the relay (RSV 2 bytes, FRAG, ATYP, DST.ADDR,
    DST.PORT, then the payload) and ``udp_header`` builds the one the relay
    puts before every datagram it returns (the source address, always an IP
    literal). RSV is not checked (as in requests); FRAG is returned, not
    judged: the shell drops fragments (proxytap does not reassemble, which the
    RFC allows). A datagram too short for its header, an unknown ATYP, an
    invalid domain name or DST.PORT 0 is a ``ProtocolError`` (no reply: UDP
    has none; the shell drops and counts it).

Host names (SOCKS5 ATYP 3, SOCKS4a)
    Checked and normalised by ``proxytap.policy.target.normalize_host``, the
    one judge of host names for every front end (its docstring has the rules):
    ASCII labels only, lower-cased, IP literals in canonical text, and no
    name a resolver would read as an address.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn

from proxytap.errors import ProtocolError
from proxytap.policy.target import normalize_host

__all__ = [
    "ATYP_NOT_SUPPORTED",
    "COMMAND_NOT_SUPPORTED",
    "GENERAL_FAILURE",
    "HOST_UNREACHABLE",
    "NEED_DATA",
    "NO_ACCEPTABLE",
    "NO_AUTH",
    "SOCKS4_GRANTED",
    "SOCKS4_REJECTED",
    "SUCCEEDED",
    "UDP_ASSOCIATE",
    "USERPASS",
    "AuthRequest",
    "ConnectRequest",
    "NeedData",
    "SocksServer",
    "UdpAssociateRequest",
    "UdpDatagram",
    "parse_udp_datagram",
    "udp_header",
]


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel."""

    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

# Authentication methods (RFC 1928 section 3).
NO_AUTH: Final = 0x00
USERPASS: Final = 0x02
NO_ACCEPTABLE: Final = 0xFF

# SOCKS5 reply codes (RFC 1928 section 6) used by this module.
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
HOST_UNREACHABLE: Final = 0x04
COMMAND_NOT_SUPPORTED: Final = 0x07
ATYP_NOT_SUPPORTED: Final = 0x08

# SOCKS5 commands (RFC 1928 section 4).
CONNECT: Final = 0x01
UDP_ASSOCIATE: Final = 0x03

# SOCKS4 reply codes.
SOCKS4_GRANTED: Final = 0x5A
SOCKS4_REJECTED: Final = 0x5B

MAX_FIELD: Final = 255  # SOCKS4 USERID and SOCKS4a hostname, without the NUL

_SOCKS4_ERROR_REPLY: Final = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
_AUTH_FAILED_REPLY: Final = b"\x01\x01"
_AUTH_OK_REPLY: Final = b"\x01\x00"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A client's CONNECT request.

    ``host`` is IPv4 text, IPv6 text (``inet_ntop`` form) or a lower-case
    domain name; ``atyp`` says which ("ipv4", "ipv6", "domain").
    """

    version: int
    host: str
    port: int
    atyp: str
    user_id: bytes = b""

    @property
    def protocol(self) -> str:
        """``socks5``, ``socks4a`` (SOCKS4 carrying a host name) or ``socks4``."""
        if self.version == 5:
            return "socks5"
        return "socks4a" if self.atyp == "domain" else "socks4"


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """RFC 1929 credentials, decoded latin-1; the password stays out of ``repr``."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class UdpAssociateRequest:
    """A SOCKS5 UDP ASSOCIATE request (RFC 1928 sections 4 and 7).

    ``host`` and ``port`` are where the client says it will send datagrams
    from (``0.0.0.0`` / ``::`` and 0 when it does not know yet); ``atyp`` as in
    ``ConnectRequest``.
    """

    host: str
    port: int
    atyp: str
    version: int = 5

    @property
    def protocol(self) -> str:
        return "socks5"

    @property
    def unspecified(self) -> bool:
        """The client gave no address (all zeros, or a name: nothing to compare with)."""
        return self.atyp == "domain" or self.host in ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One datagram from a client to the relay: its destination and payload."""

    frag: int
    host: str
    port: int
    atyp: str
    data: bytes


Request = ConnectRequest | UdpAssociateRequest
Event = ConnectRequest | AuthRequest | UdpAssociateRequest


class _State(enum.Enum):
    VERSION = enum.auto()
    GREETING = enum.auto()
    AUTH = enum.auto()
    AUTH_WAIT = enum.auto()
    AUTH_FAILED = enum.auto()
    REQUEST5 = enum.auto()
    REQUEST4 = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


def _pack_address(host: str) -> bytes:
    """An IP literal in network order (4 or 16 bytes); ``ValueError`` if it is none."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, host)
        except OSError:
            continue
    raise ValueError(f"not an IP address: {host!r}")


def _name_from_wire(raw: bytes) -> tuple[str, str] | None:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return normalize_host(text)


def _address(atyp: int, raw: bytes) -> tuple[str, str] | None:
    """(host, kind) of a SOCKS5 address field (``raw`` without the name length), or None."""
    if atyp == 1:
        return socket.inet_ntop(socket.AF_INET, raw), "ipv4"
    if atyp == 4:
        return socket.inet_ntop(socket.AF_INET6, raw), "ipv6"
    return _name_from_wire(raw)


def _socks5_error(reason: str, code: int) -> ProtocolError:
    reply = bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))
    return ProtocolError(reason, socks_code=code, reply=reply)


def _socks4_error(reason: str) -> ProtocolError:
    return ProtocolError(reason, socks_code=SOCKS4_REJECTED, reply=_SOCKS4_ERROR_REPLY)


class SocksServer:
    """One client's SOCKS handshake, from the first byte to the ``ConnectRequest``.

    ``methods`` are the SOCKS5 authentication methods the server accepts, in
    preference order (NO_AUTH and/or USERPASS). ``udp_associate``: SOCKS5
    CMD 3 is accepted and returned as an ``UdpAssociateRequest`` (answered
    with ``reply`` like a CONNECT; ``trailing_data`` is then bytes the client
    sent on the control connection after its request). Use::

        server.receive_data(chunk)            # b"" on EOF
        event = server.next_event()           # until NEED_DATA
        if isinstance(event, AuthRequest): server.auth_result(ok)
        send(server.data_to_send())
        ... on ConnectRequest: connect, send(server.reply(code, bind)),
            then relay server.trailing_data() first.
    """

    def __init__(self, *, methods: Sequence[int] = (NO_AUTH,), udp_associate: bool = False) -> None:
        chosen = tuple(dict.fromkeys(methods))
        if not chosen:
            raise ValueError("at least one SOCKS5 method is needed")
        for method in chosen:
            if method not in (NO_AUTH, USERPASS):
                raise ValueError(f"unsupported SOCKS5 method 0x{method:02x}")
        self._methods = chosen
        self._udp = udp_associate
        self._buf = bytearray()
        self._out = bytearray()
        self._state = _State.VERSION
        self._eof = False
        self._error: ProtocolError | None = None
        self._request: Request | None = None
        self._selected: int | None = None

    # -- feeding --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the client; ``b""`` means the client closed (EOF)."""
        if self._state is _State.ERROR:
            return
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        self._buf += data

    def data_to_send(self) -> bytes:
        """Take the bytes queued for the client (method selection, RFC 1929 status)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Take the bytes the client sent after its request (early data)."""
        if self._state is not _State.DONE:
            raise RuntimeError("trailing_data() before the request is complete")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- state ----------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True once the ``ConnectRequest`` has been returned."""
        return self._state is _State.DONE

    @property
    def eof_received(self) -> bool:
        return self._eof

    @property
    def selected_method(self) -> int | None:
        """The SOCKS5 method chosen in the greeting, if any."""
        return self._selected

    @property
    def request(self) -> Request | None:
        return self._request

    # -- events ---------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """Parse what is buffered: an event, ``NEED_DATA``, or ``ProtocolError``."""
        if self._error is not None:
            raise self._error
        if self._state is _State.DONE:
            raise RuntimeError("the handshake is complete; use reply() and trailing_data()")
        if self._state is _State.AUTH_WAIT:
            raise RuntimeError("call auth_result() before next_event()")
        try:
            while True:
                result = _HANDLERS[self._state](self)
                if result is None:
                    continue  # state advanced, keep parsing
                if result is NEED_DATA and self._eof:
                    raise ProtocolError("connection closed during handshake")
                return result
        except ProtocolError as exc:
            exc.reply = self.data_to_send() + exc.reply
            self._error = exc
            self._state = _State.ERROR
            raise

    def auth_result(self, ok: bool) -> None:
        """Answer the ``AuthRequest``: queues ``01 00`` or ``01 01``.

        After a failure the next ``next_event()`` raises ``ProtocolError``
        (``socks_code=0x01``); its ``reply`` holds ``01 01`` unless it was
        already taken with ``data_to_send()``.
        """
        if self._state is not _State.AUTH_WAIT:
            raise RuntimeError("auth_result() without a pending AuthRequest")
        if ok:
            self._out += _AUTH_OK_REPLY
            self._state = _State.REQUEST5
        else:
            self._out += _AUTH_FAILED_REPLY
            self._state = _State.AUTH_FAILED

    def reply(self, code: int, bind: tuple[str, int] = ("0.0.0.0", 0)) -> bytes:
        """The final reply to the ``ConnectRequest``.

        ``code`` is a SOCKS5 reply code (0 = succeeded). SOCKS4 maps 0 (and
        0x5A) to 0x5A granted, keeps 0x5B..0x5D, and sends 0x5B for any other
        code; an IPv6 ``bind`` address is sent as 0.0.0.0 there.
        """
        if self._request is None:
            raise RuntimeError("reply() before a ConnectRequest")
        if not 0 <= code <= 0xFF:
            raise ValueError(f"reply code out of range: {code}")
        host, port = bind
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"bind port out of range: {port}")
        packed = _pack_address(host)
        if self._request.version == 4:
            if code in (SUCCEEDED, SOCKS4_GRANTED):
                cd = SOCKS4_GRANTED
            elif 0x5B <= code <= 0x5D:
                cd = code
            else:
                cd = SOCKS4_REJECTED
            ip4 = packed if len(packed) == 4 else bytes(4)
            return struct.pack("!BBH", 0, cd, port) + ip4
        atyp = 1 if len(packed) == 4 else 4
        return bytes((5, code, 0, atyp)) + packed + struct.pack("!H", port)

    # -- parsers: each returns an event, NEED_DATA, or None (state advanced) ----

    def _consume(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _parse_version(self) -> NeedData | None:
        if not self._buf:
            return NEED_DATA
        first = self._buf[0]
        if first == 5:
            self._state = _State.GREETING
        elif first == 4:
            self._state = _State.REQUEST4
        else:
            raise ProtocolError(f"not a SOCKS handshake (first byte 0x{first:02x})")
        return None

    def _parse_greeting(self) -> NeedData | None:
        buf = self._buf
        if len(buf) < 2:
            return NEED_DATA
        nmethods = buf[1]
        if nmethods == 0:
            raise ProtocolError(
                "SOCKS5 greeting offers no methods",
                socks_code=NO_ACCEPTABLE,
                reply=bytes((5, NO_ACCEPTABLE)),
            )
        if len(buf) < 2 + nmethods:
            return NEED_DATA
        offered = self._consume(2 + nmethods)[2:]
        for method in self._methods:
            if method in offered:
                break
        else:
            raise ProtocolError(
                "no acceptable SOCKS5 authentication method",
                socks_code=NO_ACCEPTABLE,
                reply=bytes((5, NO_ACCEPTABLE)),
            )
        self._selected = method
        self._out += bytes((5, method))
        self._state = _State.AUTH if method == USERPASS else _State.REQUEST5
        return None

    def _parse_auth(self) -> AuthRequest | NeedData:
        buf = self._buf
        if len(buf) < 2:
            return NEED_DATA
        if buf[0] != 1:
            raise ProtocolError(
                f"unsupported username/password version 0x{buf[0]:02x}",
                socks_code=0x01,
                reply=_AUTH_FAILED_REPLY,
            )
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return NEED_DATA
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return NEED_DATA
        message = self._consume(3 + ulen + plen)
        self._state = _State.AUTH_WAIT
        return AuthRequest(
            username=message[2 : 2 + ulen].decode("latin-1"),
            password=message[3 + ulen :].decode("latin-1"),
        )

    def _auth_failed(self) -> NoReturn:
        raise ProtocolError("SOCKS5 username/password authentication failed", socks_code=0x01)

    def _parse_request5(self) -> Request | NeedData:
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        ver, cmd, _rsv, atyp = buf[:4]
        if ver != 5:
            raise _socks5_error(f"SOCKS5 request with version {ver}", GENERAL_FAILURE)
        if cmd != CONNECT and not (cmd == UDP_ASSOCIATE and self._udp):
            raise _socks5_error(f"SOCKS5 command {cmd} not supported", COMMAND_NOT_SUPPORTED)
        if atyp == 1:
            addr_len = 4
        elif atyp == 4:
            addr_len = 16
        elif atyp == 3:
            if len(buf) < 5:
                return NEED_DATA
            addr_len = 1 + buf[4]
        else:
            raise _socks5_error(f"SOCKS5 address type {atyp} not supported", ATYP_NOT_SUPPORTED)
        total = 4 + addr_len + 2
        if len(buf) < total:
            return NEED_DATA
        message = self._consume(total)
        raw = message[4 : 4 + addr_len]
        (port,) = struct.unpack("!H", message[-2:])
        checked = _address(atyp, raw if atyp != 3 else raw[1:])
        if checked is None:
            raise _socks5_error("invalid SOCKS5 domain name", HOST_UNREACHABLE)
        host, kind = checked
        if cmd == UDP_ASSOCIATE:  # where the client sends from: zeros are "not known yet"
            return self._done(UdpAssociateRequest(host=host, port=port, atyp=kind))
        if port == 0:
            raise _socks5_error("SOCKS5 request for port 0", GENERAL_FAILURE)
        return self._done(ConnectRequest(version=5, host=host, port=port, atyp=kind))

    def _parse_request4(self) -> ConnectRequest | NeedData:
        buf = self._buf
        if len(buf) < 8:
            return NEED_DATA
        end_uid = self._find_nul(8, "SOCKS4 USERID")
        if end_uid is None:
            return NEED_DATA
        ip = bytes(buf[4:8])
        socks4a = ip[:3] == b"\x00\x00\x00" and ip[3] != 0
        end = end_uid
        if socks4a:
            end_host = self._find_nul(end_uid + 1, "SOCKS4a hostname")
            if end_host is None:
                return NEED_DATA
            end = end_host
        message = self._consume(end + 1)
        cd = message[1]
        (port,) = struct.unpack("!H", message[2:4])
        user_id = message[8:end_uid]
        if cd != 1:
            raise _socks4_error(f"SOCKS4 command {cd} not supported")
        if NO_AUTH not in self._methods:
            raise _socks4_error("SOCKS4 has no authentication and this server requires it")
        if socks4a:
            checked = _name_from_wire(message[end_uid + 1 : end])
            if checked is None:
                raise _socks4_error("invalid SOCKS4a hostname")
            host, kind = checked
        else:
            host, kind = socket.inet_ntop(socket.AF_INET, ip), "ipv4"
        if port == 0:
            raise _socks4_error("SOCKS4 request for port 0")
        request = ConnectRequest(version=4, host=host, port=port, atyp=kind, user_id=user_id)
        return self._done(request)

    def _find_nul(self, start: int, what: str) -> int | None:
        """Index of the NUL ending a field that starts at ``start``, at most 255 bytes."""
        end = self._buf.find(0, start, start + MAX_FIELD + 1)
        if end >= 0:
            return end
        if len(self._buf) - start > MAX_FIELD:
            raise _socks4_error(f"{what} longer than {MAX_FIELD} bytes")
        return None

    def _done[R: Request](self, request: R) -> R:
        self._request = request
        self._state = _State.DONE
        return request


_Handler = Callable[[SocksServer], Event | NeedData | None]


# The transition table: which parser runs in which state. AUTH_WAIT, DONE and
# ERROR have none (next_event handles them before dispatching).
_HANDLERS: Final[dict[_State, _Handler]] = {
    _State.VERSION: SocksServer._parse_version,
    _State.GREETING: SocksServer._parse_greeting,
    _State.AUTH: SocksServer._parse_auth,
    _State.AUTH_FAILED: SocksServer._auth_failed,
    _State.REQUEST5: SocksServer._parse_request5,
    _State.REQUEST4: SocksServer._parse_request4,
}


# -- UDP datagrams (RFC 1928 section 7) ------------------------------------------------

_UDP_ADDR_LEN: Final = {1: 4, 4: 16}


def parse_udp_datagram(datagram: bytes | bytearray | memoryview) -> UdpDatagram:
    """Split a client's datagram into its header's destination and the payload.

    Raises ``ProtocolError`` (``socks_code=None``, empty ``reply``) when the
    header is short or invalid; see *UDP datagrams* in the module docstring.
    """
    view = memoryview(datagram)
    n = len(view)
    if n < 4:
        raise ProtocolError(f"SOCKS5 UDP datagram of {n} bytes: shorter than its header")
    frag, atyp = view[2], view[3]
    if atyp == 3:
        if n < 5:
            raise ProtocolError("SOCKS5 UDP datagram ends in its domain name length")
        start, addr_len = 5, view[4]
    elif atyp in _UDP_ADDR_LEN:
        start, addr_len = 4, _UDP_ADDR_LEN[atyp]
    else:
        raise ProtocolError(f"SOCKS5 UDP datagram with address type {atyp}")
    end = start + addr_len
    if n < end + 2:
        raise ProtocolError(f"SOCKS5 UDP datagram of {n} bytes: shorter than its header")
    checked = _address(atyp, bytes(view[start:end]))
    if checked is None:
        raise ProtocolError("SOCKS5 UDP datagram with an invalid domain name")
    host, kind = checked
    port = (view[end] << 8) | view[end + 1]
    if port == 0:
        raise ProtocolError("SOCKS5 UDP datagram to port 0")
    return UdpDatagram(frag=frag, host=host, port=port, atyp=kind, data=bytes(view[end + 2 :]))


def udp_header(host: str, port: int, frag: int = 0) -> bytes:
    """The header before a datagram's payload: ``host`` an IP literal or a domain name.

    The relay sends the source of a reply (an IP literal); clients (and tests)
    may address a destination by name. ``ValueError`` for a name over 255
    bytes or a port out of range.
    """
    if not 0 <= port <= 0xFFFF or not 0 <= frag <= 0xFF:
        raise ValueError(f"port or FRAG out of range: {port}, {frag}")
    try:
        packed = _pack_address(host)
    except ValueError:
        name = host.encode("idna")
        if not 0 < len(name) <= MAX_FIELD:
            raise ValueError(f"domain name of {len(name)} bytes") from None
        return bytes((0, 0, frag, 3, len(name))) + name + struct.pack("!H", port)
    atyp = 1 if len(packed) == 4 else 4
    return bytes((0, 0, frag, atyp)) + packed + struct.pack("!H", port)
