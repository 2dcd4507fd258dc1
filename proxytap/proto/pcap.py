"""Inner flows as synthesized TCP/IP packets in a pcap file: pure framing.

Packet tools (Wireshark, tshark, Zeek, Suricata, Arkime) read packets, not
SF-TAP flow events. This module writes one inner flow (true client <-> true
destination, the proxy stripped out) as the TCP conversation those two
endpoints would have had, and a SOCKS5 UDP datagram as one UDP packet. Bytes
and times in, bytes out: no I/O, no clock (the caller passes ``now``).

File format: **classic pcap** (microsecond timestamps, magic ``a1b2c3d4``),
not pcapng. Every reader takes it (libpcap, tshark, Zeek, Suricata, tcpdump,
scapy), it is the stream format PCAP-over-IP consumers (Arkime, NetworkMiner,
``tshark -r -``) expect, and a file cut at any record boundary stays
readable, which rotation and a reader joining mid-stream rely on. pcapng's
per-packet comments (flow uid, requested host) would be nice, but the JSON
flow log already links the uid and the requested host to the same
(client, destination, start) tuple, so nothing is lost by the simpler format.

Link type: **LINKTYPE_RAW (101)**, each record a bare IPv4 or IPv6 packet
(the version nibble says which). There is no Ethernet header to invent (the
MAC addresses would be fiction), and a record is 14 bytes smaller.

The conversation:

* At flow start (``open``): SYN (client -> server, MSS and window-scale
  options), SYN/ACK, ACK, stamped with the flow's start time.
* ``data``: the payload cut into segments of at most ``mss`` bytes (PSH on
  the last one of a chunk), sequence numbers counted per direction; the
  other side ACKs every second segment and the end of every chunk, so
  tshark's analysis sees every byte acknowledged and nothing unseen. A
  window scale of 2**7 (8 MiB window) keeps large chunks under the window.
* ``close``: a normal end is a FIN/ACK exchange (client first, then the
  server, each ACKed); a reset (or a shutdown, an error) is one RST/ACK from
  the client at its next sequence number.
* Initial sequence numbers and IPv4 identifications come from a hash of
  the flow uid: random-looking, yet the same flow gives the same file.
* A client and a destination of different families (an IPv4 client of an
  IPv6 origin through a dual-stack proxy) are written as IPv6, the IPv4 side
  as its IPv4-mapped address (``::ffff:a.b.c.d``).

Checksums are real (IPv4 header, TCP and UDP over the IPv4 or IPv6
pseudo-header), so ``tcp.check_checksum`` and ``ip.check_checksum`` pass.
A caller that loses packets (a full buffer) keeps the conversation's state
moving (``skip``), so a reader sees the gap as "previous segment not
captured", which is what it is.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable

Endpoint = tuple[str, int]
Packet = tuple[float, bytes]  # (timestamp, the IP packet)

LINKTYPE_RAW = 101
PCAP_MAGIC = 0xA1B2C3D4  # classic pcap, microsecond timestamps
DEFAULT_MSS = 1460
DEFAULT_SNAPLEN = 65535
MAX_MSS = 65535 - 20 - 20  # an IPv4 total length is 16 bits: IP and TCP headers leave this

UP = 1  # client -> server (proxytap.flows.table.UP)
DOWN = 2

# TCP flags
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

WSCALE = 7  # window scale shift announced in the SYNs
WINDOW = 0xFFFF  # advertised window field (<< WSCALE: 8 MiB)
ACK_EVERY = 2  # the receiver ACKs every second full segment (delayed ACK)
TTL = 64
_PROTO_TCP = 6
_PROTO_UDP = 17
_MAX_UDP_PAYLOAD = {4: 65535 - 20 - 8, 6: 65535 - 8}

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
# SYN options: MSS (kind 2), NOP, window scale (kind 3): 8 bytes, data offset 7
_SYN_OPTIONS = struct.Struct("!BBHBBBB")


def global_header(snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_RAW) -> bytes:
    """The 24-byte classic pcap file header (little-endian, as libpcap writes it)."""
    return _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype)


def record(ts: float, packet: bytes, snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """One pcap record: header (time, captured and original length) and the packet,
    cut to ``snaplen`` bytes (the original length is kept, as a capture does)."""
    sec = int(ts)
    usec = round((ts - sec) * 1_000_000)
    if usec >= 1_000_000:  # rounding up to the next second
        sec, usec = sec + 1, usec - 1_000_000
    sec = max(0, sec)
    caplen = min(len(packet), snaplen)
    return _RECORD.pack(sec, usec, caplen, len(packet)) + packet[:caplen]


def records(packets: Iterable[Packet], snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """The records of ``packets``, in one buffer (each packet copied once)."""
    parts: list[bytes] = []
    for ts, pkt in packets:
        sec = int(ts)
        usec = round((ts - sec) * 1_000_000)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        n = len(pkt)
        if n > snaplen:
            parts += (_RECORD.pack(max(0, sec), usec, snaplen, n), pkt[:snaplen])
        else:
            parts += (_RECORD.pack(max(0, sec), usec, n, n), pkt)
    return b"".join(parts)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``.

    The ones' complement sum of 16-bit words is the big-endian integer modulo
    0xFFFF (2**16 is 1 modulo 0xFFFF), which ``int.from_bytes`` computes in C:
    much faster than a Python loop over the words of every segment.
    """
    if len(data) & 1:
        data += b"\0"
    return _complement(int.from_bytes(data, "big"))


def _complement(total: int) -> int:
    """The checksum field for a sum of 16-bit words ``total``: its ones' complement
    folded into 1..0xFFFF (never 0 for data that is not all zeros: a sum that is a
    multiple of 0xFFFF is 0xFFFF, as the end-around carry gives), complemented. So
    a sum of 0xFFFF gives 0x0000, what stacks send, not 0xFFFF ("-0", which RFC 1624
    says a receiver may accept but Wireshark flags)."""
    return ~((total - 1) % 0xFFFF + 1 if total else 0) & 0xFFFF


def _addresses(a: str, b: str) -> tuple[int, bytes, bytes]:
    """(IP version, packed a, packed b); mixed families become IPv6 (IPv4-mapped)."""
    ia = ipaddress.ip_address(a.split("%", 1)[0])
    ib = ipaddress.ip_address(b.split("%", 1)[0])
    if ia.version == ib.version:
        return ia.version, ia.packed, ib.packed
    return 6, _v6(ia), _v6(ib)


def _v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if ip.version == 6:
        return ip.packed
    return b"\0" * 10 + b"\xff\xff" + ip.packed


def _ip(version: int, src: bytes, dst: bytes, proto: int, payload: bytes, ident: int) -> bytes:
    if version == 4:
        head = _IPV4.pack(0x45, 0, 20 + len(payload), ident, 0x4000, TTL, proto, 0, src, dst)
        cks = checksum(head)
        return head[:10] + cks.to_bytes(2, "big") + head[12:] + payload
    return _IPV6.pack(6 << 28, len(payload), proto, TTL, src, dst) + payload


def _pseudo(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def _seed(uid: str, what: str) -> int:
    digest = hashlib.blake2b(f"{uid}/{what}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


class TcpConversation:
    """One inner TCP flow as packets; the state is the next sequence number each way.

    ``client`` and ``server`` are ``(ip text, port)``; ``uid`` seeds the
    initial sequence numbers. Every method returns the packets to write, in
    order, as ``(timestamp, IP packet)``.
    """

    __slots__ = (
        "_cport",
        "_dst",
        "_ident",
        "_ip_sum",
        "_mss",
        "_seq",
        "_sport",
        "_src",
        "_sum",
        "_version",
        "closed",
        "opened",
    )

    def __init__(self, client: Endpoint, server: Endpoint, uid: str, mss: int = DEFAULT_MSS):
        if not 1 <= mss <= MAX_MSS:
            raise ValueError(f"mss must be 1..{MAX_MSS}")
        self._version, self._src, self._dst = _addresses(client[0], server[0])
        self._cport, self._sport = client[1], server[1]
        self._mss = mss
        # index by direction: [unused, UP (client), DOWN (server)]
        isn_c, isn_s = _seed(uid, "c"), _seed(uid, "s")
        self._seq = [0, isn_c, isn_s]  # next sequence number each side sends
        self._ident = [0, _seed(uid, "ic") & 0xFFFF, _seed(uid, "is") & 0xFFFF]
        # the constant parts of the checksums (the same either way round): the
        # pseudo-header's addresses and protocol; IPv4's version, flags, TTL, addresses
        addrs = int.from_bytes(self._src, "big") + int.from_bytes(self._dst, "big")
        self._sum = (addrs + _PROTO_TCP) % 0xFFFF
        self._ip_sum = (addrs + 0x4500 + 0x4000 + (TTL << 8 | _PROTO_TCP)) % 0xFFFF
        self.opened = False
        self.closed = False

    # -- the conversation ----------------------------------------------------------

    def open(self, now: float) -> list[Packet]:
        """The three-way handshake (a second call returns nothing)."""
        if self.opened:
            return []
        self.opened = True
        c, s = self._seq[UP], self._seq[DOWN]
        out = [
            (now, self._segment(UP, SYN, c, 0, b"", syn=True)),
            (now, self._segment(DOWN, SYN | ACK, s, c + 1, b"", syn=True)),
            (now, self._segment(UP, ACK, c + 1, s + 1, b"")),
        ]
        self._seq[UP] = (c + 1) & 0xFFFFFFFF
        self._seq[DOWN] = (s + 1) & 0xFFFFFFFF
        return out

    def data(self, direction: int, payload: bytes, now: float) -> list[Packet]:
        """``payload`` sent by ``direction`` (UP: client): segments and the peer's ACKs."""
        out = self.open(now)
        if self.closed or not payload:
            return out
        peer = DOWN if direction == UP else UP
        mss = self._mss
        ack = self._seq[peer]
        seq = self._seq[direction]
        n = len(payload)
        view = memoryview(payload)
        unacked = 0
        for off in range(0, n, mss):
            part = view[off : off + mss]
            last = off + mss >= n
            flags = ACK | PSH if last else ACK
            out.append((now, self._segment(direction, flags, seq, ack, bytes(part))))
            seq = (seq + len(part)) & 0xFFFFFFFF
            unacked += 1
            if last or unacked >= ACK_EVERY:
                out.append((now, self._segment(peer, ACK, ack, seq, b"")))
                unacked = 0
        self._seq[direction] = seq
        return out

    def skip(self, direction: int, size: int) -> None:
        """Account ``size`` bytes sent by ``direction`` without packets (they were lost:
        a reader then sees a gap in the sequence numbers, not a silent splice)."""
        self.opened = True
        self._seq[direction] = (self._seq[direction] + size) & 0xFFFFFFFF

    def close(self, reset: bool, now: float) -> list[Packet]:
        """The end: FIN/ACK both ways, or one RST/ACK from the client."""
        out = self.open(now)
        if self.closed:
            return out
        self.closed = True
        c, s = self._seq[UP], self._seq[DOWN]
        if reset:
            out.append((now, self._segment(UP, RST | ACK, c, s, b"")))
            return out
        out += [
            (now, self._segment(UP, FIN | ACK, c, s, b"")),
            (now, self._segment(DOWN, ACK, s, c + 1, b"")),
            (now, self._segment(DOWN, FIN | ACK, s, c + 1, b"")),
            (now, self._segment(UP, ACK, c + 1, s + 1, b"")),
        ]
        self._seq[UP] = (c + 1) & 0xFFFFFFFF
        self._seq[DOWN] = (s + 1) & 0xFFFFFFFF
        return out

    # -- one packet ------------------------------------------------------------------

    def _segment(
        self, sender: int, flags: int, seq: int, ack: int, payload: bytes, *, syn: bool = False
    ) -> bytes:
        # The hot path (once per MSS of relayed data): checksums are sums modulo
        # 0xFFFF (see ``checksum``), so the constant parts (addresses, protocol)
        # are summed once per flow, and each part is packed once.
        if sender == UP:
            src, dst, sport, dport = self._src, self._dst, self._cport, self._sport
        else:
            src, dst, sport, dport = self._dst, self._src, self._sport, self._cport
        options = _SYN_OPTIONS.pack(2, 4, self._mss, 1, 3, 3, WSCALE) if syn else b""
        hlen = 20 + len(options)
        tcp_len = hlen + len(payload)
        seq &= 0xFFFFFFFF
        ack &= 0xFFFFFFFF
        offset = (hlen // 4) << 4
        head = _TCP.pack(sport, dport, seq, ack, offset, flags, WINDOW, 0, 0) + options
        body = int.from_bytes(payload, "big")
        if len(payload) & 1:
            body <<= 8  # the pad byte
        total = self._sum + tcp_len + int.from_bytes(head, "big") + body
        cks = _complement(total)
        head = _TCP.pack(sport, dport, seq, ack, offset, flags, WINDOW, cks, 0) + options
        ident = self._ident[sender]
        self._ident[sender] = (ident + 1) & 0xFFFF
        if self._version == 4:
            ip_cks = _complement(self._ip_sum + 20 + tcp_len + ident)
            ip = _IPV4.pack(0x45, 0, 20 + tcp_len, ident, 0x4000, TTL, _PROTO_TCP, ip_cks, src, dst)
        else:
            ip = _IPV6.pack(6 << 28, tcp_len, _PROTO_TCP, TTL, src, dst)
        return b"".join((ip, head, payload))


def udp_packet(src: Endpoint, dst: Endpoint, payload: bytes, now: float) -> Packet:
    """One UDP datagram ``src`` -> ``dst`` (cut to what one IP packet holds)."""
    version, s, d = _addresses(src[0], dst[0])
    payload = payload[: _MAX_UDP_PAYLOAD[version]]
    length = 8 + len(payload)
    head = _UDP.pack(src[1], dst[1], length, 0)
    cks = checksum(_pseudo(version, s, d, _PROTO_UDP, length) + head + payload)
    # 0 means "no checksum" in UDP: a computed 0 is sent as its other form, 0xFFFF
    head = _UDP.pack(src[1], dst[1], length, cks or 0xFFFF)
    return now, _ip(version, s, d, _PROTO_UDP, head + payload, 0)


__all__ = [
    "DEFAULT_MSS",
    "DEFAULT_SNAPLEN",
    "LINKTYPE_RAW",
    "MAX_MSS",
    "Packet",
    "TcpConversation",
    "checksum",
    "global_header",
    "record",
    "records",
    "udp_packet",
]
