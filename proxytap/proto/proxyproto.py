"""The receiving side of the PROXY protocol, versions 1 and 2, sans-IO.

A load balancer in TCP mode (HAProxy ``send-proxy`` / ``send-proxy-v2``, AWS
NLB, ...) opens its own connection to proxytap, so the socket's peer is the
balancer. It first sends one PROXY header saying whom the connection is for:
the client's address and port and the address it connected to. Everything
after the header is the client's own bytes. ``ProxyHeaderReader`` takes bytes
(``receive_data``) and returns one ``ProxyHeader`` or ``NEED_DATA``
(``next_event``); the client's bytes that followed the header come from
``trailing_data``. No sockets, no clock, no asyncio.

The rules are those of HAProxy's specification (doc/proxy-protocol.txt); a
header that breaks any of them raises ``ProxyHeaderError`` and the shell
closes the connection without answering (there is nobody to answer: the
balancer already told its client the connection is up). The version is
recognised from the first byte, ``P`` (v1) or ``\\r`` (v2), and a byte that
cannot begin the expected signature fails at once: a client that speaks HTTP
or SOCKS straight to a PROXY-protocol listener is refused on its first byte,
never waited for.

Version 1 (text)
    ``PROXY TCP4|TCP6|UNKNOWN SRC DST SRCPORT DSTPORT\\r\\n``, at most 107
    bytes with the CRLF; no CRLF within 107 bytes, a bare LF, or anything
    but ASCII is an error. Exactly one space between fields, exactly six
    fields for TCP4 and TCP6. TCP4 addresses are dotted quads without
    leading zeros; TCP6 addresses are IPv6 text (no zone id); the family
    must match the addresses. Ports are decimal 0..65535 without leading
    zeros. ``UNKNOWN`` may be followed by anything up to the CRLF, which is
    ignored: the connection's own endpoints are used (``source`` is None).

Version 2 (binary)
    The 12-byte signature, then version and command (version 2; command
    LOCAL 0x0 or PROXY 0x1, anything else is an error), family and
    transport, and the length of what follows (big-endian). The length is
    bounded (``MAX_V2_LENGTH``, far above what balancers send): a longer
    header is refused rather than buffered.

    * ``LOCAL`` (health checks, connections the balancer makes for itself):
      the block is skipped whatever it holds, the connection's own
      endpoints are used.
    * ``PROXY`` over TCP/IPv4 (``0x11``) or TCP/IPv6 (``0x21``): the
      addresses and ports are taken from the address block (12 or 36
      bytes; a shorter block is an error). What follows it must be
      well-formed TLVs (type, 16-bit length, value) that fill the block
      exactly; they are kept (``tlvs``) and otherwise ignored.
    * ``PROXY`` with ``UNSPEC`` (``0x00``), or a combination the
      specification defines but a TCP proxy cannot carry (UDP over IPv4 or
      IPv6, UNIX stream or datagram: ``0x12``, ``0x22``, ``0x31``,
      ``0x32``): the specification has the receiver fall back to the
      connection's own endpoints; the block must still be long enough for
      the family's addresses.
    * Any other family or transport byte is an error.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

from proxytap.errors import ProtocolError

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "NEED_DATA",
    "SIGNATURE_V2",
    "NeedData",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "v1_header",
    "v2_header",
]

Endpoint = tuple[str, int]


class NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel."""

    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

V1_PREFIX: Final = b"PROXY "
MAX_V1_LENGTH: Final = 107  # the longest v1 line, CRLF included
SIGNATURE_V2: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16  # signature, version/command, family/transport, length
# Bytes after the fixed part: addresses and TLVs. HAProxy's own TLVs (ALPN, authority,
# unique id, SSL) and the cloud balancers' (AWS VPC endpoint, GCP PSC, Azure link id)
# stay well under this; a larger header is refused, not buffered.
MAX_V2_LENGTH: Final = 4096

LOCAL: Final = "local"
PROXY: Final = "proxy"

# v2 family/transport byte -> (name, address block size)
_FAMILIES: Final = {
    0x00: ("unspec", 0),
    0x11: ("tcp4", 12),
    0x12: ("udp4", 12),
    0x21: ("tcp6", 36),
    0x22: ("udp6", 36),
    0x31: ("unix", 216),
    0x32: ("unix-dgram", 216),
}
_CARRIED: Final = {0x11: socket.AF_INET, 0x21: socket.AF_INET6}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One PROXY header as read.

    ``source`` is the client (address text, port) when the header carries
    one, None when the connection's own peer is the client (v2 LOCAL, v1
    UNKNOWN, v2 UNSPEC and the families a TCP proxy falls back on).
    ``destination`` is the address the client connected to (the balancer's
    frontend), when carried. ``family``: tcp4, tcp6, unknown (v1), unspec,
    udp4, udp6, unix, unix-dgram. ``length``: the header's bytes on the wire.
    """

    version: int
    command: str
    family: str
    source: Endpoint | None
    destination: Endpoint | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


class ProxyHeaderError(ProtocolError):
    """The PROXY header is malformed, or the connection ended before it was whole.

    ``closed`` tells the two apart (a refusal reason each in metrics). No
    reply is sent for either: the connection is closed.
    """

    def __init__(self, reason: str, *, closed: bool = False) -> None:
        super().__init__(reason, proxy_status="http_request_error")
        self.closed = closed


class _State(enum.Enum):
    READING = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2, told apart by the first byte).

    Use::

        reader.receive_data(chunk)        # b"" on EOF
        event = reader.next_event()       # ProxyHeader, or NEED_DATA
        ... then reader.trailing_data(): the client's bytes after the header

    ``next_event`` raises ``ProxyHeaderError``; once raised, the same error
    is raised again. At most ``V2_FIXED + MAX_V2_LENGTH`` bytes are ever
    buffered before a verdict.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._state = _State.READING
        self._error: ProxyHeaderError | None = None
        self._header: ProxyHeader | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the connection; ``b""`` means it was closed (EOF)."""
        if self._state is _State.ERROR:
            return
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        self._buf += data

    def trailing_data(self) -> bytes:
        """Take the bytes that followed the header (the client's first bytes)."""
        if self._state is not _State.DONE:
            return b""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    @property
    def complete(self) -> bool:
        return self._state is _State.DONE

    def next_event(self) -> ProxyHeader | NeedData:
        """The header once whole, else ``NEED_DATA``; ``ProxyHeaderError`` when broken."""
        if self._state is _State.ERROR:
            assert self._error is not None
            raise self._error
        if self._state is _State.DONE:
            assert self._header is not None
            return self._header
        try:
            header = self._parse()
        except ProxyHeaderError as exc:
            self._state = _State.ERROR
            self._error = exc
            self._buf.clear()
            raise
        if header is NEED_DATA:
            if self._eof:
                self._state = _State.ERROR
                got = len(self._buf)
                self._buf.clear()
                what = f"after {got} bytes of it" if got else "before sending it"
                self._error = ProxyHeaderError(
                    f"connection closed {what} (PROXY header incomplete)", closed=True
                )
                raise self._error
            return NEED_DATA
        self._state = _State.DONE
        self._header = header
        del self._buf[: header.length]
        return header

    # -- parsing ---------------------------------------------------------------------

    def _parse(self) -> ProxyHeader | NeedData:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] == V1_PREFIX[0]:
            return _parse_v1(buf)
        if buf[0] == SIGNATURE_V2[0]:
            return _parse_v2(buf)
        raise ProxyHeaderError(f"not a PROXY header (first byte 0x{buf[0]:02x})")


def _fail(reason: str) -> ProxyHeaderError:
    return ProxyHeaderError(f"malformed PROXY v1 header: {reason}")


def _parse_v1(buf: bytearray) -> ProxyHeader | NeedData:
    head = bytes(buf[: len(V1_PREFIX)])
    if not V1_PREFIX.startswith(head):
        raise _fail("does not start with 'PROXY '")
    end = buf.find(b"\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(buf) >= MAX_V1_LENGTH:
            raise _fail(f"no CRLF within {MAX_V1_LENGTH} bytes")
        return NEED_DATA
    if end == 0 or buf[end - 1] != 0x0D:
        raise _fail("line ends in LF without CR")
    raw = bytes(buf[: end - 1])
    if not raw.isascii() or b"\r" in raw:
        raise _fail("not a line of ASCII text")
    fields = raw.decode("ascii").split(" ")
    length = end + 1
    if len(fields) < 2 or fields[0] != "PROXY":
        raise _fail("does not start with 'PROXY '")
    proto = fields[1]
    if proto == "UNKNOWN":  # the rest of the line is ignored, as the specification says
        return ProxyHeader(1, PROXY, "unknown", None, None, length)
    if proto not in ("TCP4", "TCP6"):
        raise _fail(f"protocol {proto!r} is none of TCP4, TCP6, UNKNOWN")
    if len(fields) != 6:
        raise _fail(f"{proto} needs 4 fields after it, one space apart")
    src = _v1_address(fields[2], proto)
    dst = _v1_address(fields[3], proto)
    sport = _v1_port(fields[4])
    dport = _v1_port(fields[5])
    return ProxyHeader(1, PROXY, proto.lower(), (src, sport), (dst, dport), length)


def _v1_address(text: str, proto: str) -> str:
    if proto == "TCP4":
        try:
            return str(ipaddress.IPv4Address(text))  # leading zeros are refused too
        except ValueError:
            raise _fail(f"{text!r} is not an IPv4 address") from None
    if "%" in text:
        raise _fail(f"{text!r}: no zone id in a PROXY header")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise _fail(f"{text!r} is not an IPv6 address") from None


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and 1 <= len(text) <= 5):
        raise _fail(f"port {text!r} is not a decimal number")
    if len(text) > 1 and text[0] == "0":
        raise _fail(f"port {text!r} has a leading zero")
    port = int(text)
    if port > 65535:
        raise _fail(f"port {text} is over 65535")
    return port


def _fail2(reason: str) -> ProxyHeaderError:
    return ProxyHeaderError(f"malformed PROXY v2 header: {reason}")


def _parse_v2(buf: bytearray) -> ProxyHeader | NeedData:
    n = min(len(buf), len(SIGNATURE_V2))
    if buf[:n] != SIGNATURE_V2[:n]:
        raise _fail2("bad signature")
    if len(buf) < V2_FIXED:
        return NEED_DATA
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != 2:
        raise _fail2(f"version {version}, not 2")
    if command not in (0, 1):
        raise _fail2(f"command 0x{command:x} is neither LOCAL nor PROXY")
    family = buf[13]
    (length,) = struct.unpack_from(">H", buf, 14)
    if length > MAX_V2_LENGTH:
        raise _fail2(f"{length} bytes of addresses and TLVs, over {MAX_V2_LENGTH}")
    known = _FAMILIES.get(family)
    if command == 1 and known is None:
        raise _fail2(f"address family and transport 0x{family:02x} are not defined")
    total = V2_FIXED + length
    if len(buf) < total:
        return NEED_DATA
    name = known[0] if known is not None else "unspec"
    if command == 0:  # LOCAL: the block is discarded, family included
        return ProxyHeader(2, LOCAL, name, None, None, total)
    assert known is not None
    size = known[1]
    if length < size:
        raise _fail2(f"{name} needs {size} bytes of addresses, the header has {length}")
    af = _CARRIED.get(family)
    if af is None:  # UNSPEC, or a family a TCP proxy falls back on: the socket's peer
        return ProxyHeader(2, PROXY, name, None, None, total)
    block = bytes(buf[V2_FIXED:total])
    alen = 4 if af == socket.AF_INET else 16
    src = str(ipaddress.ip_address(block[:alen]))  # the same text as a v1 header's
    dst = str(ipaddress.ip_address(block[alen : 2 * alen]))
    sport, dport = struct.unpack_from(">HH", block, 2 * alen)
    tlvs = _tlvs(block[size:])
    return ProxyHeader(2, PROXY, name, (src, sport), (dst, dport), total, tlvs)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Type-length-value records that fill ``data`` exactly (bounded by the header's length)."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise _fail2(f"{len(data) - pos} bytes left after the TLVs, too few for one")
        kind = data[pos]
        (size,) = struct.unpack_from(">H", data, pos + 1)
        start = pos + 3
        if start + size > len(data):
            raise _fail2(f"TLV 0x{kind:02x} of {size} bytes runs past the header")
        out.append((kind, data[start : start + size]))
        pos = start + size
    return tuple(out)


# -- writing (tests, tools) --------------------------------------------------------------


def v1_header(source: Endpoint | None, destination: Endpoint | None = None) -> bytes:
    """A v1 line for ``source`` -> ``destination`` (``UNKNOWN`` when ``source`` is None)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_header(
    source: Endpoint | None,
    destination: Endpoint | None = None,
    *,
    local: bool = False,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header: PROXY over TCP for ``source`` -> ``destination``; LOCAL or UNSPEC without."""
    tail = b"".join(bytes((k,)) + struct.pack(">H", len(v)) + v for k, v in tlvs)
    if local or source is None or destination is None:
        command = 0x20 if local else 0x21
        return SIGNATURE_V2 + bytes((command, 0x00)) + struct.pack(">H", len(tail)) + tail
    af = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    block = (
        socket.inet_pton(af, source[0])
        + socket.inet_pton(af, destination[0])
        + struct.pack(">HH", source[1], destination[1])
        + tail
    )
    family = 0x21 if af == socket.AF_INET6 else 0x11
    return SIGNATURE_V2 + bytes((0x21, family)) + struct.pack(">H", len(block)) + block
