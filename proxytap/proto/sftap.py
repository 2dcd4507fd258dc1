"""SF-TAP flow interface: the flow key and the header codec (pure, no I/O).

This is the wire format of the SF-TAP flow abstractor (``shared/spec/
sftap-flow-interface.md``), the one its analyzers read from ``<home>/tcp/<name>``
and the one an abstractor's ``loopback7`` socket accepts. Nothing here touches a
socket or a clock: callers pass the time in.

Protocol decisions, each from the spec or the original abstractor's source:

* **Endpoint 1 is the numerically smaller endpoint**, compared as the original's
  ``fabs_peer`` (a ``memcmp`` over a 16-byte network-order address with IPv4 in
  the first 4 bytes and the rest zero, then the big-endian port). ``ip1`` is
  *not* the client; ``from`` says who sent a chunk (1: endpoint 1, 2: endpoint 2).
* **Mixed families.** A proxy can join an IPv4 client to an IPv6 destination
  (or the reverse). SF-TAP has one ``l3`` per flow, so the IPv4 side is written
  as an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) and ``l3=ipv6``.
* **Addresses are ``inet_ntop`` text** (``socket.inet_ntop``, not ``ipaddress``:
  Python's ``str(IPv6Address)`` prints ``::ffff:102:304`` where glibc prints
  ``::ffff:1.2.3.4``).
* **Identical key bytes.** ``FlowKey`` renders its ``ip1=..,...,l4=..`` prefix
  once; every event of the flow reuses those bytes, because analyzers key their
  sessions by these strings.
* **Time** is printed like C's ``%.17g`` (the original uses
  ``boost::lexical_cast<std::string>(double)``, which is 17 significant
  digits). Python's ``%.17g`` on bytes is correctly rounded, as glibc's is, so
  both print the same digits, exponent form (``1e+17``) and sign (``-0``).
* **Field order is fixed**: some analyzers parse the line positionally.

The binary header (spec section 2) is 64 bytes, packed::

    offset size field
         0   16 addr1      network order; IPv4 in bytes 0-3, bytes 4-15 zero
        16   16 addr2      same
        32    8 tv_sec     int64, host order   } struct timeval on LP64
        40    8 tv_usec    int64, host order   }
        48    2 port1      uint16, big-endian
        50    2 port2      uint16, big-endian
        52    1 event      0 CREATED, 1 DESTROYED, 2 DATA
        53    1 from       0 addr1, 1 addr2, 3 none
        54    2 len        uint16, host order (so DATA chunks are <= 65535 bytes)
        56    1 hop        uint8
        57    1 l3_proto   0 IPv4 (IPPROTO_IP), 41 IPv6 (IPPROTO_IPV6)
        58    1 l4_proto   6 TCP, 17 UDP
        59    1 match      0 up, 1 down, 2 none
        60    1 reason     0 NORMAL, 1 RESET, 2 TIMEOUT, 3 COMPROMISED
        61    3 unused     zero
                           = 64 bytes

CREATED and DESTROYED carry ``from`` 3, ``match`` 2 and ``len`` 0; ``reason``
is 0 except on DESTROYED. The decoder ignores those fields where the event does
not use them (the original leaves ``from`` set to whatever packet triggered a
CREATED), and checks every field that changes the meaning or the framing.
"""

from __future__ import annotations

import functools
import math
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

from proxytap.errors import ProtocolError
from proxytap.flows.table import CloseReason

Endpoint = tuple[str, int]

CREATED: Final = "CREATED"
DESTROYED: Final = "DESTROYED"
DATA: Final = "DATA"

EVENTS: Final = (CREATED, DESTROYED, DATA)
MATCHES: Final = ("up", "down", "none")
#: SF-TAP's four reasons (binary codes 0-3), and SHUTDOWN (4): proxytap's own, for a
#: flow the proxy reset because it was still open when its shutdown grace ran out.
REASON_NAMES: Final = ("NORMAL", "RESET", "TIMEOUT", "COMPROMISED", "SHUTDOWN")

#: Largest DATA chunk on a served flow socket: the binary ``len`` is 16 bits.
SERVED_CHUNK: Final = 65535
#: The DATA chunk proxytap serves by default: small enough that header and body
#: fit one AF_UNIX socket buffer (an ``sk_buff`` carries at most 32 KiB of pages
#: plus a ~3.7 KiB head: 36,544 bytes with 4 KiB pages). A larger message is
#: queued as two buffers, and a reader woken by the first can get a short
#: ``read(len)`` even though the message went out in one ``sendmsg`` (measured:
#: 113 short reads per 100,000 messages of 64 KiB, none at 36,400 bytes or less).
SERVED_CHUNK_DEFAULT: Final = 32768
#: Largest DATA chunk written into an abstractor's loopback7 (spec section 4).
LOOPBACK7_CHUNK: Final = 16384
#: What ``vlan=`` carries when the flag is on: "no VLAN" for a VLAN-aware build.
NO_VLAN: Final = -1

#: How a proxy close maps to an SF-TAP reason on served flow sockets. A
#: proxy-side error (policy, protocol violation) ends the flow abruptly, which
#: analyzers know as RESET; SF-TAP has no better word for it. A flow cut at
#: shutdown says so (SHUTDOWN), so an analyzer can tell it from a peer's reset.
REASONS: Final[dict[CloseReason, str]] = {
    CloseReason.NORMAL: "NORMAL",
    CloseReason.RESET: "RESET",
    CloseReason.TIMEOUT: "TIMEOUT",
    CloseReason.ERROR: "RESET",
    CloseReason.SHUTDOWN: "SHUTDOWN",
}
#: The same for loopback7: the abstractor knows only its own four reasons (and
#: re-emits NORMAL whatever it is sent, spec 4.9), so a shutdown goes in as RESET.
LOOPBACK7_REASONS: Final[dict[CloseReason, str]] = {**REASONS, CloseReason.SHUTDOWN: "RESET"}

HEADER_SIZE: Final = 64
_HEADER = struct.Struct("=32sqq4sBBHBBBBB3x")
assert _HEADER.size == HEADER_SIZE

_L3_CODE = {"ipv4": 0, "ipv6": 41}
_L3_NAME = {0: "ipv4", 41: "ipv6"}
_L4_CODE = {"tcp": 6, "udp": 17}
_L4_NAME = {6: "tcp", 17: "udp"}
_MATCH_CODE = {"up": 0, "down": 1, "none": 2}
_REASON_CODE = {name: i for i, name in enumerate(REASON_NAMES)}
_FROM_CODE = {1: 0, 2: 1, None: 3}
_FROM_NAME: dict[int, int | None] = {0: 1, 1: 2, 3: None}

_V4_PAD = bytes(12)
_V4_MAPPED = bytes(10) + b"\xff\xff"


def format_time(t: float) -> str:
    """``t`` as C's ``printf("%.17g", t)`` prints it (17 significant digits)."""
    return format(t, ".17g")


def _pack_addr(ip: str, l3: str) -> bytes:
    """16 bytes as the original's ``l3_addr`` union holds them."""
    try:
        if l3 == "ipv4":
            return socket.inet_pton(socket.AF_INET, ip) + _V4_PAD
        return socket.inet_pton(socket.AF_INET6, ip)
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"bad {l3} address {ip!r}") from exc


def _ntop(packed: bytes, l3: str) -> str:
    if l3 == "ipv4":
        return socket.inet_ntop(socket.AF_INET, packed[:4])
    return socket.inet_ntop(socket.AF_INET6, packed)


@dataclass(frozen=True, slots=True)
class FlowKey:
    """One flow's identity as SF-TAP prints it, rendered once.

    ``ip1``/``port1`` is the smaller endpoint when the key comes from
    ``flow_key``; the constructor itself does not reorder (a decoder must keep
    what the peer sent). Addresses are stored in ``inet_ntop`` form whatever
    spelling was passed. ``prefix`` is the text header's key part, ``head`` its
    bytes, ``head_vlan`` the same with ``vlan=-1`` after ``port2`` (loopback7).
    An invalid field raises ``ProtocolError``.
    """

    ip1: str
    ip2: str
    port1: int
    port2: int
    hop: int
    l3: str
    l4: str
    prefix: str = field(init=False, repr=False, compare=False)
    head: bytes = field(init=False, repr=False, compare=False)
    head_vlan: bytes = field(init=False, repr=False, compare=False)
    addrs: bytes = field(init=False, repr=False, compare=False)
    ports: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.l3 not in _L3_CODE:
            raise ProtocolError(f"bad l3 {self.l3!r}")
        if self.l4 not in _L4_CODE:
            raise ProtocolError(f"bad l4 {self.l4!r}")
        for port in (self.port1, self.port2):
            if not 0 <= port <= 0xFFFF:
                raise ProtocolError(f"bad port {port}")
        if not 0 <= self.hop <= 0xFF:
            raise ProtocolError(f"bad hop {self.hop}")
        a1 = _pack_addr(self.ip1, self.l3)
        a2 = _pack_addr(self.ip2, self.l3)
        setattr_ = object.__setattr__
        setattr_(self, "ip1", _ntop(a1, self.l3))
        setattr_(self, "ip2", _ntop(a2, self.l3))
        self._render(a1, a2)

    @classmethod
    def _checked(
        cls, a1: bytes, a2: bytes, port1: int, port2: int, hop: int, l3: str, l4: str
    ) -> FlowKey:
        """A key from packed addresses already checked and ordered (``flow_key``'s way)."""
        if not 0 <= hop <= 0xFF:
            raise ProtocolError(f"bad hop {hop}")
        if l4 not in _L4_CODE:
            raise ProtocolError(f"bad l4 {l4!r}")
        key = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(key, "ip1", _ntop(a1, l3))
        setattr_(key, "ip2", _ntop(a2, l3))
        setattr_(key, "port1", port1)
        setattr_(key, "port2", port2)
        setattr_(key, "hop", hop)
        setattr_(key, "l3", l3)
        setattr_(key, "l4", l4)
        key._render(a1, a2)
        return key

    def _render(self, a1: bytes, a2: bytes) -> None:
        setattr_ = object.__setattr__
        ip1, ip2 = self.ip1, self.ip2
        ends = f"ip1={ip1},ip2={ip2},port1={self.port1},port2={self.port2}"
        rest = f",hop={self.hop},l3={self.l3},l4={self.l4}"
        setattr_(self, "prefix", ends + rest)
        setattr_(self, "head", (ends + rest).encode("ascii"))
        setattr_(self, "head_vlan", f"{ends},vlan={NO_VLAN}{rest}".encode("ascii"))
        setattr_(self, "addrs", a1 + a2)
        setattr_(self, "ports", struct.pack("!HH", self.port1, self.port2))

    def head_for(self, vlan: int | None) -> bytes:
        """The key bytes, with ``vlan=N`` after ``port2`` when ``vlan`` is set."""
        if vlan is None:
            return self.head
        if vlan == NO_VLAN:
            return self.head_vlan
        ends = f"ip1={self.ip1},ip2={self.ip2},port1={self.port1},port2={self.port2}"
        return f"{ends},vlan={vlan},hop={self.hop},l3={self.l3},l4={self.l4}".encode("ascii")


@functools.lru_cache(maxsize=4096)
def _addr16(ip: str) -> tuple[bytes, bool]:
    """(16-byte comparable address, is IPv4) for an endpoint's text address."""
    try:
        return socket.inet_pton(socket.AF_INET, ip) + _V4_PAD, True
    except (OSError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0]), False
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"bad address {ip!r}") from exc


def flow_key(
    client: Endpoint, server: Endpoint, l4: str = "tcp", hop: int = 0
) -> tuple[FlowKey, bool]:
    """Normalize (client, server) to SF-TAP's key; also say whether the client is endpoint 1.

    Endpoints compare as the original's ``fabs_peer``: 16-byte address, then
    port. If exactly one side is IPv4 it becomes IPv4-mapped IPv6 and the flow
    is ``l3=ipv6`` (ordering is decided on the mapped form). When both
    endpoints are equal the client is endpoint 1, so the two directions still
    get different ``from`` values.
    """
    ca, c4 = _addr16(client[0])
    sa, s4 = _addr16(server[0])
    if c4 and s4:
        l3 = "ipv4"
    else:
        l3 = "ipv6"
        if c4:
            ca = _V4_MAPPED + ca[:4]
        if s4:
            sa = _V4_MAPPED + sa[:4]
    cport, sport = client[1], server[1]
    client_is_1 = (ca, cport) <= (sa, sport)
    if client_is_1:
        a1, p1, a2, p2 = ca, cport, sa, sport
    else:
        a1, p1, a2, p2 = sa, sport, ca, cport
    for port in (cport, sport):
        if not 0 <= port <= 0xFFFF:
            raise ProtocolError(f"bad port {port}")
    return FlowKey._checked(a1, a2, p1, p2, hop, l3, l4), client_is_1


def flow_hash(key: FlowKey) -> int:
    """The original abstractor's flow hash (``fabs_id::get_hash``), for ``balance``.

    ``ports = port1 ^ port2``; IPv4 XORs both addresses as big-endian 32-bit
    words; IPv6 XORs the four words of each address and, as the original reads
    one word past each 16-byte address into ``l4_port`` and its zero padding,
    ``port << 16`` of each endpoint too. Then ``+= hop`` (mod 2**32) and the two
    16-bit halves are XORed: a value in 0..65535, taken modulo ``balance``.
    """
    h = key.port1 ^ key.port2
    a = key.addrs
    if key.l3 == "ipv4":
        h ^= int.from_bytes(a[0:4]) ^ int.from_bytes(a[16:20])
    else:
        for i in range(0, 32, 4):
            h ^= int.from_bytes(a[i : i + 4])
        h ^= (key.port1 << 16) ^ (key.port2 << 16)
    h = (h + key.hop) & 0xFFFFFFFF
    return (h & 0xFFFF) ^ (h >> 16)


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded header. ``length`` is the body size that follows (DATA only).

    ``from_`` is 1 or 2 (``None`` for "none"), ``match`` is "up", "down" or
    "none", both only on DATA; ``reason`` only on DESTROYED; ``vlan`` only when
    the text line carried one (binary headers have no VLAN).
    """

    event: str
    key: FlowKey
    time: float
    from_: int | None = None
    match: str | None = None
    length: int = 0
    reason: str | None = None
    vlan: int | None = None


# -- text encoding -------------------------------------------------------------


def encode_created(key: FlowKey, t: float, *, vlan: int | None = None) -> bytes:
    """``...,event=CREATED,time=T\\n``; ``t`` is the flow's start time."""
    return key.head_for(vlan) + b",event=CREATED,time=%.17g\n" % t


def encode_destroyed(key: FlowKey, reason: str, t: float, *, vlan: int | None = None) -> bytes:
    """``...,event=DESTROYED,reason=R,time=T\\n``."""
    return key.head_for(vlan) + b",event=DESTROYED,reason=%s,time=%.17g\n" % (
        reason.encode("ascii"),
        t,
    )


def data_head(key: FlowKey, from_: int | None, match: str, *, vlan: int | None = None) -> bytes:
    """The part of a DATA line that is fixed for one flow and direction, up to ``len=``.

    Sinks compute it once per flow and direction and finish each line with
    ``data_line``, so the hot path formats only the length and the time.
    """
    f = b"none" if from_ is None else b"%d" % from_
    return key.head_for(vlan) + b",event=DATA,from=%s,match=%s,len=" % (f, match.encode("ascii"))


def data_line(head: bytes, length: int, t: float) -> bytes:
    """The text DATA header line for a body of ``length`` bytes (``head`` from ``data_head``)."""
    return head + b"%d,time=%.17g\n" % (length, t)


def encode_data(
    key: FlowKey,
    from_: int | None,
    match: str,
    payload_len: int,
    t: float,
    *,
    vlan: int | None = None,
) -> bytes:
    """``...,event=DATA,from=F,match=M,len=N,time=T\\n``; ``payload_len`` bytes follow."""
    return data_head(key, from_, match, vlan=vlan) + b"%d,time=%.17g\n" % (payload_len, t)


def encode_text(ev: Event) -> bytes:
    """Any ``Event`` as its text line (the inverse of ``decode_text``)."""
    if ev.event == CREATED:
        return encode_created(ev.key, ev.time, vlan=ev.vlan)
    if ev.event == DESTROYED:
        return encode_destroyed(ev.key, ev.reason or "NORMAL", ev.time, vlan=ev.vlan)
    return encode_data(ev.key, ev.from_, ev.match or "none", ev.length, ev.time, vlan=ev.vlan)


# -- binary encoding -----------------------------------------------------------


def _timeval(t: float) -> tuple[int, int]:
    sec = math.floor(t)
    usec = round((t - sec) * 1_000_000)
    if usec >= 1_000_000:
        sec += 1
        usec -= 1_000_000
    return sec, usec


def _pack(
    key: FlowKey, event: int, t: float, from_: int, length: int, match: int, reason: int
) -> bytes:
    sec, usec = _timeval(t)
    return _HEADER.pack(
        key.addrs,
        sec,
        usec,
        key.ports,
        event,
        from_,
        length,
        key.hop,
        _L3_CODE[key.l3],
        _L4_CODE[key.l4],
        match,
        reason,
    )


def pack_created(key: FlowKey, t: float) -> bytes:
    """The 64-byte binary CREATED header (time rounded to microseconds)."""
    return _pack(key, 0, t, 3, 0, 2, 0)


def pack_destroyed(key: FlowKey, reason: str, t: float) -> bytes:
    """The 64-byte binary DESTROYED header."""
    return _pack(key, 1, t, 3, 0, 2, _REASON_CODE[reason])


def pack_data(key: FlowKey, from_: int | None, match: str, payload_len: int, t: float) -> bytes:
    """The 64-byte binary DATA header; ``payload_len`` must be 0..65535."""
    if not 0 <= payload_len <= 0xFFFF:
        raise ValueError(f"binary DATA len {payload_len} does not fit 16 bits")
    return _pack(key, 2, t, _FROM_CODE[from_], payload_len, _MATCH_CODE[match], 0)


def encode_binary(ev: Event) -> bytes:
    """Any ``Event`` as its binary header (``vlan`` is not representable and is dropped)."""
    if ev.event == CREATED:
        return pack_created(ev.key, ev.time)
    if ev.event == DESTROYED:
        return pack_destroyed(ev.key, ev.reason or "NORMAL", ev.time)
    return pack_data(ev.key, ev.from_, ev.match or "none", ev.length, ev.time)


# -- one flow's headers -----------------------------------------------------------


class FlowHeaders:
    """The headers of one flow's events, text or binary, with the fixed parts made once.

    ``client_is_1``: the client is endpoint 1 (``from=1`` for what it sends).
    TCP DATA carries ``match=up`` (client to server) or ``down``; UDP ``none``.
    ``vlan`` (text only) adds ``vlan=N`` after ``port2``.
    """

    __slots__ = (
        "binary",
        "down_from",
        "down_head",
        "down_match",
        "key",
        "up_from",
        "up_head",
        "up_match",
        "vlan",
    )

    def __init__(
        self,
        key: FlowKey,
        client_is_1: bool,
        *,
        binary: bool = False,
        tcp: bool = True,
        vlan: int | None = None,
    ) -> None:
        self.key = key
        self.binary = binary
        self.vlan = vlan
        self.up_from = 1 if client_is_1 else 2
        self.down_from = 2 if client_is_1 else 1
        self.up_match, self.down_match = ("up", "down") if tcp else ("none", "none")
        self.up_head = data_head(key, self.up_from, self.up_match, vlan=vlan)
        self.down_head = data_head(key, self.down_from, self.down_match, vlan=vlan)

    def created(self, t: float) -> bytes:
        if self.binary:
            return pack_created(self.key, t)
        return encode_created(self.key, t, vlan=self.vlan)

    def destroyed(self, reason: str, t: float) -> bytes:
        if self.binary:
            return pack_destroyed(self.key, reason, t)
        return encode_destroyed(self.key, reason, t, vlan=self.vlan)

    def data(self, up: bool, length: int, t: float) -> bytes:
        """The header of a DATA event whose body of ``length`` bytes follows."""
        if self.binary:
            if up:
                return pack_data(self.key, self.up_from, self.up_match, length, t)
            return pack_data(self.key, self.down_from, self.down_match, length, t)
        return data_line(self.up_head if up else self.down_head, length, t)


# -- decoding ------------------------------------------------------------------

_KEY_FIELDS = ("ip1", "ip2", "port1", "port2", "hop", "l3", "l4")
_EXTRA_FIELDS = {
    CREATED: frozenset(),
    DESTROYED: frozenset({"reason"}),
    DATA: frozenset({"from", "match", "len"}),
}
_UINT = re.compile(r"[0-9]{1,10}")
_VLAN = re.compile(r"-?[0-9]{1,5}")
_TIME = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[-+][0-9]+)?")
_MAX_LINE = 4096


def _uint(fields: dict[str, str], name: str, limit: int) -> int:
    value = fields[name]
    if _UINT.fullmatch(value) is None or int(value) > limit:
        raise ProtocolError(f"bad {name}={value!r}")
    return int(value)


def decode_text(line: bytes) -> Event:
    """Parse one text header line (with or without its ``\\n``).

    Strict: ASCII only, ``key=value`` items separated by ``,``, every field of
    the event present once and nothing else (``vlan`` allowed), canonical
    numbers, a finite time. Field order is not checked (``encode_text`` writes
    the spec's order). Anything else raises ``ProtocolError``.
    """
    if len(line) > _MAX_LINE:
        raise ProtocolError("header line too long")
    if line.endswith(b"\n"):
        line = line[:-1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("header line is not ASCII") from exc
    if "\n" in text or "\r" in text:
        raise ProtocolError("control character in header line")
    fields: dict[str, str] = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        if not eq or not name or "=" in value:
            raise ProtocolError(f"bad header item {item!r}")
        if name in fields:
            raise ProtocolError(f"duplicate header field {name!r}")
        fields[name] = value
    event = fields.get("event", "")
    if event not in _EXTRA_FIELDS:
        raise ProtocolError(f"bad event {event!r}")
    expected = {*_KEY_FIELDS, "event", "time"} | _EXTRA_FIELDS[event]
    names = fields.keys() - {"vlan"}
    if names != expected:
        raise ProtocolError(f"{event} header fields {sorted(names)} != {sorted(expected)}")
    key = FlowKey(
        fields["ip1"],
        fields["ip2"],
        _uint(fields, "port1", 0xFFFF),
        _uint(fields, "port2", 0xFFFF),
        _uint(fields, "hop", 0xFF),
        fields["l3"],
        fields["l4"],
    )
    tval = fields["time"]
    if _TIME.fullmatch(tval) is None or not math.isfinite(t := float(tval)):
        raise ProtocolError(f"bad time={tval!r}")
    vlan: int | None = None
    if "vlan" in fields:
        if _VLAN.fullmatch(fields["vlan"]) is None:
            raise ProtocolError(f"bad vlan={fields['vlan']!r}")
        vlan = int(fields["vlan"])
    if event == CREATED:
        return Event(CREATED, key, t, vlan=vlan)
    if event == DESTROYED:
        reason = fields["reason"]
        if reason not in _REASON_CODE:
            raise ProtocolError(f"bad reason={reason!r}")
        return Event(DESTROYED, key, t, reason=reason, vlan=vlan)
    from_: int | None
    if fields["from"] == "none":
        from_ = None
    elif fields["from"] in ("1", "2"):
        from_ = int(fields["from"])
    else:
        raise ProtocolError(f"bad from={fields['from']!r}")
    match = fields["match"]
    if match not in _MATCH_CODE:
        raise ProtocolError(f"bad match={match!r}")
    length = _uint(fields, "len", 0xFFFFFFFF)
    return Event(DATA, key, t, from_=from_, match=match, length=length, vlan=vlan)


def decode_binary(buf: bytes | bytearray | memoryview) -> Event:
    """Parse one 64-byte binary header; ``ProtocolError`` on any bad field."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"binary header is {len(buf)} bytes, not {HEADER_SIZE}")
    (addrs, sec, usec, ports, ev, frm, length, hop, l3c, l4c, match, reason) = _HEADER.unpack(buf)
    if ev > 2:
        raise ProtocolError(f"bad binary event {ev}")
    l3 = _L3_NAME.get(l3c)
    l4 = _L4_NAME.get(l4c)
    if l3 is None or l4 is None:
        raise ProtocolError(f"bad binary l3/l4 {l3c}/{l4c}")
    if not 0 <= usec < 1_000_000:
        raise ProtocolError(f"bad binary tv_usec {usec}")
    port1, port2 = struct.unpack("!HH", ports)
    key = FlowKey(_ntop(addrs[:16], l3), _ntop(addrs[16:], l3), port1, port2, hop, l3, l4)
    t = sec + usec / 1_000_000
    if ev == 0:
        return Event(CREATED, key, t)
    if ev == 1:
        if reason >= len(REASON_NAMES):
            raise ProtocolError(f"bad binary reason {reason}")
        return Event(DESTROYED, key, t, reason=REASON_NAMES[reason])
    if frm not in _FROM_NAME:
        raise ProtocolError(f"bad binary from {frm}")
    if match > 2:
        raise ProtocolError(f"bad binary match {match}")
    return Event(DATA, key, t, from_=_FROM_NAME[frm], match=MATCHES[match], length=length)


# -- chunking ------------------------------------------------------------------


def split_payload(data: bytes | bytearray | memoryview, limit: int) -> list[memoryview]:
    """``data`` as consecutive slices of 1..``limit`` bytes; ``[]`` for no data.

    Slices are memoryviews (no copy); ``header + piece`` copies each once into
    the single buffer written with its header.
    """
    if limit < 1:
        raise ValueError("chunk limit must be >= 1")
    view = memoryview(data)
    return [view[i : i + limit] for i in range(0, len(view), limit)]


__all__ = [
    "CREATED",
    "DATA",
    "DESTROYED",
    "HEADER_SIZE",
    "LOOPBACK7_CHUNK",
    "LOOPBACK7_REASONS",
    "NO_VLAN",
    "REASONS",
    "SERVED_CHUNK",
    "SERVED_CHUNK_DEFAULT",
    "Event",
    "FlowHeaders",
    "FlowKey",
    "data_head",
    "decode_binary",
    "decode_text",
    "encode_binary",
    "encode_created",
    "encode_data",
    "encode_destroyed",
    "encode_text",
    "flow_hash",
    "flow_key",
    "format_time",
    "pack_created",
    "pack_data",
    "pack_destroyed",
    "split_payload",
]
