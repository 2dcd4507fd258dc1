"""proxytap.proto.pcap: synthesized TCP/IP conversations, checked by an independent reader.

The reader below parses pcap, IPv4/IPv6, TCP and UDP on its own and verifies
checksums with a plain word-by-word sum (not the module's modulo trick).
A few tests also hand a file to tshark, the reference the export tests use.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.proto.pcap import (
    ACK,
    FIN,
    LINKTYPE_RAW,
    PSH,
    RST,
    SYN,
    TcpConversation,
    checksum,
    global_header,
    record,
    records,
    udp_packet,
)

UP, DOWN = 1, 2
CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.2", 8443)
CLIENT6 = ("::1", 40000)
SERVER6 = ("2001:db8::5", 443)


def word_sum(data: bytes) -> int:
    """Ones' complement sum of 16-bit words, the slow, obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


@dataclass
class Pkt:
    ts: float
    version: int
    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes
    options: bytes
    caplen: int
    origlen: int


def parse_file(blob: bytes) -> tuple[int, int, list[Pkt]]:
    magic, major, minor, _tz, _sig, snaplen, linktype = struct.unpack_from("<IHHiIII", blob)
    assert (magic, major, minor) == (0xA1B2C3D4, 2, 4)
    pkts = []
    off = 24
    while off < len(blob):
        sec, usec, caplen, origlen = struct.unpack_from("<IIII", blob, off)
        assert usec < 1_000_000 and caplen <= origlen and caplen <= snaplen
        off += 16
        data = blob[off : off + caplen]
        off += caplen
        pkts.append(parse_packet(sec + usec / 1e6, data, caplen, origlen))
    assert off == len(blob)
    return snaplen, linktype, pkts


def parse_packet(ts: float, data: bytes, caplen: int, origlen: int) -> Pkt:
    version = data[0] >> 4
    truncated = caplen < origlen
    if version == 4:
        ihl = (data[0] & 15) * 4
        total, _ident, frag, _ttl, proto = struct.unpack_from("!HHHBB", data, 2)
        assert total == origlen and frag == 0x4000
        assert word_sum(data[:ihl]) == 0xFFFF, "IPv4 header checksum"
        src, dst = data[12:16], data[16:20]
        l4 = data[ihl:]
        pseudo = src + dst + struct.pack("!BBH", 0, proto, total - ihl)
    else:
        assert version == 6
        plen, proto = struct.unpack_from("!HB", data, 4)
        assert plen + 40 == origlen
        src, dst = data[8:24], data[24:40]
        l4 = data[40:]
        pseudo = src + dst + struct.pack("!I3xB", plen, proto)
    if not truncated:
        assert word_sum(pseudo + l4) == 0xFFFF, "L4 checksum"
    if proto == 6:
        sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", l4)
        hlen = (off >> 4) * 4
        return Pkt(
            ts, version, src, dst, 6, sport, dport, seq, ack, flags, l4[hlen:], l4[20:hlen],
            caplen, origlen,
        )  # fmt: skip
    assert proto == 17
    sport, dport, length, cks = struct.unpack_from("!HHHH", l4)
    assert cks != 0 and (truncated or length == len(l4))
    return Pkt(ts, version, src, dst, 17, sport, dport, 0, 0, 0, l4[8:], b"", caplen, origlen)


def conversation_file(conv: TcpConversation, chunks: list[tuple[int, bytes]], reset: bool) -> bytes:
    out = [global_header()]
    t = 1795300775.25
    out.append(records(conv.open(t)))
    for i, (d, payload) in enumerate(chunks):
        out.append(records(conv.data(d, payload, t + i * 0.001)))
    out.append(records(conv.close(reset, t + 1)))
    return b"".join(out)


def check_stream(pkts: list[Pkt], client_port: int) -> dict[int, bytes]:
    """Sequence and acknowledgement bookkeeping as tshark's analysis would do it;
    returns the payload each way, reassembled by sequence number."""
    syn, synack, ack = pkts[:3]
    assert syn.flags == SYN and syn.sport == client_port
    assert synack.flags == SYN | ACK and synack.ack == (syn.seq + 1) & 0xFFFFFFFF
    assert ack.flags == ACK and ack.seq == synack.ack and ack.ack == (synack.seq + 1) & 0xFFFFFFFF
    nxt = {UP: ack.seq, DOWN: ack.ack}
    acked = {UP: ack.seq, DOWN: ack.ack}  # highest acknowledged, per sender
    data = {UP: bytearray(), DOWN: bytearray()}
    for p in pkts[3:]:
        d = UP if p.sport == client_port else DOWN
        peer = DOWN if d == UP else UP
        assert p.seq == nxt[d], "no gap, no overlap"
        assert p.flags & ACK and p.ack == nxt[peer], "acks exactly what the peer sent"
        acked[peer] = p.ack
        data[d] += p.payload
        nxt[d] = (nxt[d] + len(p.payload) + (1 if p.flags & (FIN | SYN) else 0)) & 0xFFFFFFFF
    return {d: bytes(v) for d, v in data.items()}


# -- checksums -----------------------------------------------------------------------------


@given(st.binary(max_size=3000))
def test_checksum_agrees_with_the_word_sum(data: bytes) -> None:
    cks = checksum(data)
    padded = data + b"\0" if len(data) % 2 else data
    assert word_sum(padded + cks.to_bytes(2, "big")) == 0xFFFF


def test_checksum_known_value() -> None:
    # RFC 1071's example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


# -- the property: any sequence of chunks ----------------------------------------------------

chunks_strategy = st.lists(
    st.tuples(st.sampled_from([UP, DOWN]), st.binary(min_size=0, max_size=5000)), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(
    chunks=chunks_strategy,
    mss=st.integers(min_value=1, max_value=1600),
    v6=st.booleans(),
    reset=st.booleans(),
    uid=st.text(min_size=1, max_size=20),
)
def test_any_chunks_give_valid_packets_carrying_the_input(
    chunks: list[tuple[int, bytes]], mss: int, v6: bool, reset: bool, uid: str
) -> None:
    client, server = (CLIENT6, SERVER6) if v6 else (CLIENT, SERVER)
    conv = TcpConversation(client, server, uid, mss=mss)
    _snaplen, linktype, pkts = parse_file(conversation_file(conv, chunks, reset))
    assert linktype == LINKTYPE_RAW
    assert all(p.version == (6 if v6 else 4) for p in pkts)
    assert all(len(p.payload) <= mss for p in pkts)
    got = check_stream(pkts, client[1])
    for d in (UP, DOWN):
        assert got[d] == b"".join(p for dd, p in chunks if dd == d)
    last = pkts[-1]
    if reset:
        assert last.flags == RST | ACK and last.sport == client[1]
    else:
        assert [p.flags for p in pkts[-4:]] == [FIN | ACK, ACK, FIN | ACK, ACK]


# -- details -----------------------------------------------------------------------------


def test_segments_acks_and_timestamps() -> None:
    conv = TcpConversation(CLIENT, SERVER, "Fabc", mss=1000)
    hs = conv.open(10.0)
    assert [t for t, _ in hs] == [10.0] * 3
    pkts = conv.data(DOWN, b"x" * 2500, 11.5)
    _, _, parsed = parse_file(global_header() + records(pkts))
    # 1000, 1000, ACK, 500 (PSH), ACK: the receiver acks every second segment and the end
    assert [(p.sport, len(p.payload), p.flags) for p in parsed] == [
        (8443, 1000, ACK),
        (8443, 1000, ACK),
        (40000, 0, ACK),
        (8443, 500, ACK | PSH),
        (40000, 0, ACK),
    ]
    assert all(p.ts == 11.5 for p in parsed)
    assert parsed[2].ack == parsed[1].seq + 1000 and parsed[4].ack == parsed[3].seq + 500


def test_syn_announces_mss_and_window_scale() -> None:
    conv = TcpConversation(CLIENT, SERVER, "Fabc", mss=1234)
    _, _, (syn, synack, _ack) = parse_file(global_header() + records(conv.open(1.0)))
    for p in (syn, synack):
        assert p.options == bytes([2, 4]) + (1234).to_bytes(2, "big") + bytes([1, 3, 3, 7])


def test_sequence_numbers_come_from_the_uid() -> None:
    def first_seq(uid: str) -> tuple[int, int]:
        _, _, (syn, synack, _) = parse_file(
            global_header() + records(TcpConversation(CLIENT, SERVER, uid).open(1.0))
        )
        return syn.seq, synack.seq

    assert first_seq("F1") == first_seq("F1")  # reproducible files
    assert first_seq("F1") != first_seq("F2")
    a, b = first_seq("F1")
    assert a != b


def test_sequence_numbers_wrap() -> None:
    conv = TcpConversation(CLIENT, SERVER, "Fwrap", mss=100)
    conv.open(1.0)
    conv.skip(UP, (1 << 32) - 50 - conv._seq[UP])  # 50 bytes before the wrap
    _, _, parsed = parse_file(global_header() + records(conv.data(UP, b"y" * 150, 2.0)))
    assert [p.seq for p in parsed if p.payload] == [(1 << 32) - 50, 50]


def test_skip_leaves_a_gap_a_reader_can_see() -> None:
    conv = TcpConversation(CLIENT, SERVER, "Fgap")
    conv.open(1.0)
    first = conv.data(UP, b"a" * 10, 2.0)
    conv.skip(UP, 7)
    second = conv.data(UP, b"b" * 10, 3.0)
    _, _, parsed = parse_file(global_header() + records(first + second))
    a, b = (p for p in parsed if p.payload)
    assert b.seq == a.seq + 10 + 7


def test_data_before_open_opens_and_after_close_is_ignored() -> None:
    conv = TcpConversation(CLIENT, SERVER, "Fx")
    pkts = conv.data(UP, b"hi", 5.0)
    assert len(pkts) == 3 + 2  # handshake, segment, ACK
    conv.close(False, 6.0)
    assert conv.data(UP, b"late", 7.0) == [] and conv.close(True, 8.0) == []


def test_mixed_families_are_written_as_ipv6_with_a_mapped_address() -> None:
    conv = TcpConversation(CLIENT, SERVER6, "Fmix")
    _, _, parsed = parse_file(global_header() + records(conv.data(UP, b"q", 1.0)))
    syn = parsed[0]
    assert syn.version == 6
    assert syn.src == b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])


def test_mss_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        TcpConversation(CLIENT, SERVER, "F", mss=0)
    with pytest.raises(ValueError):
        TcpConversation(CLIENT, SERVER, "F", mss=65496)


def test_snaplen_cuts_records_and_keeps_the_original_length() -> None:
    conv = TcpConversation(CLIENT, SERVER, "Fsnap", mss=1460)
    pkts = conv.data(UP, b"z" * 1460, 1.0)
    blob = global_header(snaplen=100) + records(pkts, snaplen=100)
    snaplen, _, parsed = parse_file(blob)
    assert snaplen == 100
    seg = parsed[3]
    assert (seg.caplen, seg.origlen) == (100, 1500)


def test_record_timestamps_round_to_microseconds() -> None:
    assert struct.unpack_from("<II", record(1.9999996, b"\x45"))[:2] == (2, 0)
    assert struct.unpack_from("<II", record(1795300775.123456, b"\x45"))[:2] == (
        1795300775,
        123456,
    )


@given(st.binary(max_size=2000), st.booleans())
def test_udp_datagrams(payload: bytes, v6: bool) -> None:
    src, dst = (CLIENT6, SERVER6) if v6 else (CLIENT, SERVER)
    ts, pkt = udp_packet(src, dst, payload, 3.25)
    _, _, (p,) = parse_file(global_header() + record(ts, pkt))
    assert (p.proto, p.sport, p.dport, p.payload, p.ts) == (17, src[1], dst[1], payload, 3.25)


# -- tshark agrees ------------------------------------------------------------------------------


def tshark(*args: str) -> str:
    proc = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("v6", [False, True])
def test_tshark_reads_a_synthesized_conversation(tmp_path: Path, v6: bool) -> None:
    client, server = (CLIENT6, ("2001:db8::5", 80)) if v6 else (CLIENT, ("127.0.0.2", 8080))
    conv = TcpConversation(client, server, "Ftshark")
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    body = bytes(range(256)) * 40
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    path = tmp_path / "c.pcap"
    path.write_bytes(conversation_file(conv, [(UP, request), (DOWN, response)], False))
    checks = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
    assert tshark("-r", str(path), "-Y", "tcp.analysis.flags", *checks) == ""
    verbose = tshark("-r", str(path), "-V", *checks)
    assert "[Checksum Status: Good]" in verbose and "Bad" not in verbose
    assert tshark("-r", str(path), "-Y", "http.request", "-T", "fields", "-e", "http.host") == "x\n"
    udp = tmp_path / "u.pcap"
    udp.write_bytes(global_header() + record(*udp_packet(client, server, b"dns?", 1.0)))
    assert "Good" in tshark("-r", str(udp), "-V", "-o", "udp.check_checksum:TRUE")


def test_a_word_sum_of_ffff_gives_checksum_zero_not_ffff() -> None:
    """RFC 1624: the ones' complement sum of non-zero data is never +0, so a sum of
    0xFFFF is sent as checksum 0x0000, as stacks do; 0xFFFF (-0) is what Wireshark
    flags ("TCP CHECKSUM 0xFFFF"), found by a 100 MiB flow read back with tshark."""
    assert checksum(bytes.fromhex("1234edcb")) == 0x0000
    assert checksum(b"\xff\xff") == 0x0000
    assert checksum(b"\x00\x00") == 0xFFFF  # all zeros: the sum is +0
    # a segment whose sum is 0xFFFF: with payload 0000 the sum is S, so payload ~S
    probe = TcpConversation(CLIENT, SERVER, "Fcks")
    probe.open(1.0)
    seg = probe.data(UP, b"\0\0", 2.0)[0][1]
    s = ~int.from_bytes(seg[36:38], "big") & 0xFFFF
    conv = TcpConversation(CLIENT, SERVER, "Fcks")
    conv.open(1.0)
    seg = conv.data(UP, (0xFFFF - s).to_bytes(2, "big"), 2.0)[0][1]
    assert seg[36:38] == b"\0\0"
    _, _, (pkt,) = parse_file(global_header() + records([(2.0, seg)]))
    assert pkt.payload == (0xFFFF - s).to_bytes(2, "big")  # the reader's word sum checks it
    # the IPv4 header: over every ident, one header sums to 0xFFFF; it must carry 0x0000
    conv = TcpConversation(CLIENT, SERVER, "Fip")
    conv.open(1.0)
    seen = set()
    for _ in range(1 << 16):
        packet = conv.data(UP, b"z", 3.0)[0][1]
        seen.add(packet[10:12])
        assert word_sum(packet[:20]) == 0xFFFF
    assert b"\xff\xff" not in seen and b"\0\0" in seen
