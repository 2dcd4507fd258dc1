"""The SF-TAP flow key and header codec: byte tables from the spec, then fuzzing."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ProtocolError
from proxytap.flows.table import CloseReason
from proxytap.proto import sftap
from proxytap.proto.sftap import (
    CREATED,
    DATA,
    DESTROYED,
    Event,
    FlowKey,
    decode_binary,
    decode_text,
    encode_binary,
    encode_created,
    encode_data,
    encode_destroyed,
    encode_text,
    flow_hash,
    flow_key,
    format_time,
    pack_created,
    pack_data,
    pack_destroyed,
    split_payload,
)

# -- the spec's example, byte for byte --------------------------------------------

T0 = 1795300775.9750471
T1 = 1795300775.9750979
T2 = 1795300775.975183


def test_spec_example_lines() -> None:
    key, client_is_1 = flow_key(("10.0.0.1", 40000), ("93.184.216.34", 443))
    assert client_is_1
    assert encode_created(key, T0) == (
        b"ip1=10.0.0.1,ip2=93.184.216.34,port1=40000,port2=443,hop=0,l3=ipv4,l4=tcp,"
        b"event=CREATED,time=1795300775.9750471\n"
    )
    assert encode_data(key, 1, "up", 517, T1) == (
        b"ip1=10.0.0.1,ip2=93.184.216.34,port1=40000,port2=443,hop=0,l3=ipv4,l4=tcp,"
        b"event=DATA,from=1,match=up,len=517,time=1795300775.9750979\n"
    )
    assert encode_destroyed(key, "NORMAL", T2) == (
        b"ip1=10.0.0.1,ip2=93.184.216.34,port1=40000,port2=443,hop=0,l3=ipv4,l4=tcp,"
        b"event=DESTROYED,reason=NORMAL,time=1795300775.975183\n"
    )


def test_positional_fields_for_analyzers() -> None:
    # spec section 5: ip1 is field 0, hop 4, event 7, from 8, len 10
    key, _ = flow_key(("10.0.0.1", 40000), ("93.184.216.34", 443), hop=3)
    items = encode_data(key, 2, "down", 9, T1).rstrip(b"\n").split(b",")
    assert items[0] == b"ip1=10.0.0.1"
    assert items[4] == b"hop=3"
    assert items[7] == b"event=DATA"
    assert items[8] == b"from=2"
    assert items[10] == b"len=9"


def test_vlan_goes_after_port2() -> None:
    key, _ = flow_key(("10.0.0.1", 40000), ("10.0.0.2", 80))
    line = encode_created(key, 1.5, vlan=-1)
    assert line == (
        b"ip1=10.0.0.1,ip2=10.0.0.2,port1=40000,port2=80,vlan=-1,hop=0,l3=ipv4,l4=tcp,"
        b"event=CREATED,time=1.5\n"
    )
    assert decode_text(line).vlan == -1
    assert encode_data(key, 1, "up", 1, 2.0, vlan=7).startswith(b"ip1=10.0.0.1,ip2=10.0.0.2,")
    assert b",port2=80,vlan=7,hop=0," in encode_data(key, 1, "up", 1, 2.0, vlan=7)


# -- time like C's %.17g ----------------------------------------------------------


def _c_format(t: float) -> bytes:
    libc = ctypes.CDLL(None)
    buf = ctypes.create_string_buffer(64)
    libc.snprintf(buf, 64, b"%.17g", ctypes.c_double(t))
    return buf.value


@pytest.mark.parametrize(
    "t", [T0, T1, T2, 0.1, 0.0, -0.0, 1.0, 123.0, 1e16, 1e17, 1.5e-7, 2.5e-300, 1e300]
)
def test_time_matches_c(t: float) -> None:
    assert format_time(t).encode() == _c_format(t)
    key, _ = flow_key(("10.0.0.1", 1), ("10.0.0.2", 2))
    assert encode_created(key, t).endswith(b",time=" + _c_format(t) + b"\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="compares with glibc")
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_time_matches_c_everywhere(t: float) -> None:
    assert format_time(t).encode() == _c_format(t)


# -- normalization ----------------------------------------------------------------


def test_smaller_endpoint_first_not_the_client() -> None:
    key, client_is_1 = flow_key(("93.184.216.34", 40000), ("10.0.0.1", 443))
    assert not client_is_1
    assert (key.ip1, key.port1, key.ip2, key.port2) == ("10.0.0.1", 443, "93.184.216.34", 40000)


def test_same_address_orders_by_port() -> None:
    key, client_is_1 = flow_key(("127.0.0.1", 50000), ("127.0.0.1", 8080))
    assert not client_is_1
    assert (key.port1, key.port2) == (8080, 50000)


def test_address_compares_as_network_order_bytes() -> None:
    # 9.255.255.255 < 10.0.0.0 as bytes, though "9..." > "10..." as text
    key, client_is_1 = flow_key(("10.0.0.0", 1), ("9.255.255.255", 2))
    assert not client_is_1 and key.ip1 == "9.255.255.255"


def test_ipv6_text_is_inet_ntop() -> None:
    key, _ = flow_key(("2001:DB8:0:0:0:0:0:2", 443), ("2001:db8::10", 40000))
    assert key.prefix == (
        "ip1=2001:db8::2,ip2=2001:db8::10,port1=443,port2=40000,hop=0,l3=ipv6,l4=tcp"
    )


def test_mixed_families_become_mapped_ipv6() -> None:
    key, client_is_1 = flow_key(("192.0.2.7", 50000), ("2001:db8::1", 443))
    assert key.l3 == "ipv6"
    # ::ffff:192.0.2.7 (0000...ffff) sorts before 2001:db8::1
    assert client_is_1
    assert key.ip1 == "::ffff:192.0.2.7"
    assert key.ip2 == "2001:db8::1"
    packed = pack_created(key, 1.0)
    assert packed[:16] == ipaddress.IPv6Address("::ffff:192.0.2.7").packed


def test_equal_endpoints_client_is_1() -> None:
    _, client_is_1 = flow_key(("127.0.0.1", 1), ("127.0.0.1", 1))
    assert client_is_1


def test_key_fields_are_validated() -> None:
    with pytest.raises(ProtocolError):
        FlowKey("10.0.0.1", "::1", 1, 2, 0, "ipv4", "tcp")
    with pytest.raises(ProtocolError):
        FlowKey("10.0.0.1", "10.0.0.2", 70000, 2, 0, "ipv4", "tcp")
    with pytest.raises(ProtocolError):
        FlowKey("10.0.0.1", "10.0.0.2", 1, 2, 256, "ipv4", "tcp")
    with pytest.raises(ProtocolError):
        FlowKey("10.0.0.1", "10.0.0.2", 1, 2, 0, "ipv5", "tcp")
    with pytest.raises(ProtocolError):
        FlowKey("10.0.0.1", "10.0.0.2", 1, 2, 0, "ipv4", "sctp")
    with pytest.raises(ProtocolError):
        flow_key(("not an address", 1), ("10.0.0.2", 2))


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)
_endpoint = st.tuples(st.one_of(_ipv4, _ipv6), _port)


@given(_endpoint, _endpoint, st.sampled_from(["tcp", "udp"]), st.integers(0, 255))
def test_flow_key_is_symmetric(a: tuple[str, int], b: tuple[str, int], l4: str, hop: int) -> None:
    k1, a_is_1 = flow_key(a, b, l4, hop)
    k2, b_is_1 = flow_key(b, a, l4, hop)
    assert k1 == k2 and k1.prefix == k2.prefix
    # two spellings of one endpoint (0.0.0.0 and ::ffff:0:0) are the same endpoint
    if (k1.addrs[:16], k1.port1) != (k1.addrs[16:], k1.port2):
        assert a_is_1 != b_is_1
    # endpoint 1 really is the smaller one
    assert (k1.addrs[:16], k1.port1) <= (k1.addrs[16:], k1.port2)


@given(_endpoint, _endpoint, st.sampled_from(["tcp", "udp"]), st.integers(0, 255))
def test_flow_key_renders_as_the_public_constructor(
    a: tuple[str, int], b: tuple[str, int], l4: str, hop: int
) -> None:
    """``flow_key`` builds its key from the packed addresses it already has; the result
    is what the checking constructor makes of the same fields, every rendering too."""
    key, _ = flow_key(a, b, l4, hop)
    ref = FlowKey(key.ip1, key.ip2, key.port1, key.port2, key.hop, key.l3, key.l4)
    assert key == ref
    for name in ("prefix", "head", "head_vlan", "addrs", "ports"):
        assert getattr(key, name) == getattr(ref, name), name


def test_flow_key_refuses_what_the_constructor_refuses() -> None:
    with pytest.raises(ProtocolError):
        flow_key(("10.0.0.1", 70000), ("10.0.0.2", 80))
    with pytest.raises(ProtocolError):
        flow_key(("10.0.0.1", 1), ("10.0.0.2", 80), "sctp")
    with pytest.raises(ProtocolError):
        flow_key(("10.0.0.1", 1), ("10.0.0.2", 80), "tcp", 256)
    with pytest.raises(ProtocolError):
        flow_key(("not an address", 1), ("10.0.0.2", 80))


# -- balance hash ---------------------------------------------------------------


def test_flow_hash_ipv4_by_hand() -> None:
    key, _ = flow_key(("10.0.0.1", 40000), ("93.184.216.34", 443))
    h = (40000 ^ 443) ^ 0x0A000001 ^ 0x5DB8D822
    assert flow_hash(key) == (h & 0xFFFF) ^ (h >> 16)


def test_flow_hash_ipv6_reads_the_port_word() -> None:
    key, _ = flow_key(("2001:db8::2", 443), ("2001:db8::10", 40000))
    h = 443 ^ 40000
    for word in struct.unpack("!8I", key.addrs):
        h ^= word
    h ^= (443 << 16) ^ (40000 << 16)
    assert flow_hash(key) == (h & 0xFFFF) ^ (h >> 16)


@given(_endpoint, _endpoint, st.integers(0, 255))
def test_flow_hash_range_and_symmetry(a: tuple[str, int], b: tuple[str, int], hop: int) -> None:
    h = flow_hash(flow_key(a, b, "tcp", hop)[0])
    assert 0 <= h <= 0xFFFF
    assert h == flow_hash(flow_key(b, a, "tcp", hop)[0])


# -- binary header ----------------------------------------------------------------


def test_binary_layout() -> None:
    key, _ = flow_key(("10.0.0.1", 40000), ("93.184.216.34", 443), hop=2)
    buf = pack_data(key, 2, "down", 517, 1795300775.25)
    assert len(buf) == 64
    assert buf[0:16] == bytes([10, 0, 0, 1]) + bytes(12)
    assert buf[16:32] == bytes([93, 184, 216, 34]) + bytes(12)
    assert struct.unpack("=qq", buf[32:48]) == (1795300775, 250000)
    assert buf[48:52] == struct.pack("!HH", 40000, 443)
    assert buf[52] == 2  # DATA
    assert buf[53] == 1  # from addr2
    assert struct.unpack("=H", buf[54:56]) == (517,)
    assert list(buf[56:64]) == [2, 0, 6, 1, 0, 0, 0, 0]  # hop l3 l4 match reason unused
    created = pack_created(key, 1.0)
    assert (created[52], created[53], created[59]) == (0, 3, 2)
    destroyed = pack_destroyed(key, "TIMEOUT", 1.0)
    assert (destroyed[52], destroyed[60]) == (1, 2)
    six, _ = flow_key(("::1", 1), ("::2", 2), "udp")
    six_buf = pack_data(six, 1, "none", 1, 0.0)
    assert (six_buf[57], six_buf[58], six_buf[59]) == (41, 17, 2)


def test_binary_len_is_16_bits() -> None:
    key, _ = flow_key(("10.0.0.1", 1), ("10.0.0.2", 2))
    pack_data(key, 1, "up", 65535, 0.0)
    with pytest.raises(ValueError):
        pack_data(key, 1, "up", 65536, 0.0)


def test_binary_time_rounds_to_microseconds() -> None:
    key, _ = flow_key(("10.0.0.1", 1), ("10.0.0.2", 2))
    assert struct.unpack("=qq", pack_created(key, 5.9999999)[32:48]) == (6, 0)
    assert struct.unpack("=qq", pack_created(key, -0.5)[32:48]) == (-1, 500000)


def test_reasons() -> None:
    assert sftap.REASONS == {
        CloseReason.NORMAL: "NORMAL",
        CloseReason.RESET: "RESET",
        CloseReason.TIMEOUT: "TIMEOUT",
        CloseReason.ERROR: "RESET",
        CloseReason.SHUTDOWN: "SHUTDOWN",
    }
    # the abstractor knows only its own four: a shutdown goes into loopback7 as RESET
    assert sftap.LOOPBACK7_REASONS == {**sftap.REASONS, CloseReason.SHUTDOWN: "RESET"}
    assert set(sftap.LOOPBACK7_REASONS.values()) <= set(sftap.REASON_NAMES[:4])


# -- decoders: tables -------------------------------------------------------------

_GOOD = (
    b"ip1=10.0.0.1,ip2=93.184.216.34,port1=40000,port2=443,hop=0,l3=ipv4,l4=tcp,"
    b"event=DATA,from=1,match=up,len=517,time=1795300775.9750979"
)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        _GOOD.replace(b"len=517", b"len=-1"),
        _GOOD.replace(b"len=517", b"len=5_17"),
        _GOOD.replace(b"len=517", b"len= 517"),
        _GOOD.replace(b"time=1795300775.9750979", b"time=inf"),
        _GOOD.replace(b"time=1795300775.9750979", b"time=1e999"),
        _GOOD.replace(b"time=1795300775.9750979", b"time=1.5\r"),
        _GOOD.replace(b"from=1", b"from=0"),
        _GOOD.replace(b"match=up", b"match=left"),
        _GOOD.replace(b"l3=ipv4", b"l3=ipv6"),
        _GOOD.replace(b"port1=40000", b"port1=65536"),
        _GOOD.replace(b"hop=0", b"hop=256"),
        _GOOD.replace(b",from=1", b""),
        _GOOD.replace(b",from=1", b",from=1,from=1"),
        _GOOD.replace(b",from=1", b",reason=NORMAL,from=1"),
        _GOOD.replace(b",from=1", b",from"),
        _GOOD.replace(b",from=1", b",,from=1"),
        _GOOD.replace(b"event=DATA", b"event=DATUM"),
        _GOOD.replace(b"10.0.0.1", b"10.0.0.1\x00"),
        _GOOD.replace(b"10.0.0.1", "10.0.0.\u0661".encode()),
        _GOOD + b"\r\n",
        _GOOD + b"\n\n",
    ],
)
def test_decode_text_rejects(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_text(line)


def test_decode_text_good() -> None:
    ev = decode_text(_GOOD + b"\n")
    assert ev == decode_text(_GOOD)
    assert ev.event == DATA and ev.from_ == 1 and ev.match == "up" and ev.length == 517
    assert ev.key.prefix.encode() + b"," in _GOOD
    assert encode_text(ev) == _GOOD + b"\n"


def test_decode_text_from_none() -> None:
    ev = decode_text(_GOOD.replace(b"from=1", b"from=none"))
    assert ev.from_ is None
    assert decode_binary(encode_binary(ev)).from_ is None


def test_decode_binary_rejects() -> None:
    key, _ = flow_key(("10.0.0.1", 1), ("10.0.0.2", 2))
    good = bytearray(pack_data(key, 1, "up", 10, 1.0))
    assert decode_binary(bytes(good)).length == 10
    for offset, value in [(52, 3), (53, 2), (57, 4), (58, 1), (59, 3)]:
        bad = bytearray(good)
        bad[offset] = value
        with pytest.raises(ProtocolError):
            decode_binary(bytes(bad))
    bad = bytearray(good)
    bad[40:48] = struct.pack("=q", 1_000_000)
    with pytest.raises(ProtocolError):
        decode_binary(bytes(bad))
    with pytest.raises(ProtocolError):
        decode_binary(bytes(good[:63]))
    destroyed = bytearray(pack_destroyed(key, "RESET", 1.0))
    destroyed[60] = 5  # 0-3 are SF-TAP's reasons, 4 is proxytap's SHUTDOWN
    with pytest.raises(ProtocolError):
        decode_binary(bytes(destroyed))
    destroyed[60] = 4
    assert decode_binary(bytes(destroyed)).reason == "SHUTDOWN"


# -- decoders: properties ---------------------------------------------------------


@st.composite
def _keys(draw: st.DrawFn) -> FlowKey:
    l4 = draw(st.sampled_from(["tcp", "udp"]))
    hop = draw(st.integers(0, 255))
    key, _ = flow_key(draw(_endpoint), draw(_endpoint), l4, hop)
    return key


_times = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def _events(draw: st.DrawFn, binary: bool) -> Event:
    key = draw(_keys())
    if binary:
        t = draw(st.integers(-(2**31), 2**32)) + draw(st.integers(0, 999_999)) / 1_000_000
        vlan = None
    else:
        t = draw(_times)
        vlan = draw(st.one_of(st.none(), st.integers(-1, 4095)))
    kind = draw(st.sampled_from([CREATED, DESTROYED, DATA]))
    if kind == CREATED:
        return Event(CREATED, key, t, vlan=vlan)
    if kind == DESTROYED:
        reason = draw(st.sampled_from(sftap.REASON_NAMES))
        return Event(DESTROYED, key, t, reason=reason, vlan=vlan)
    return Event(
        DATA,
        key,
        t,
        from_=draw(st.sampled_from([1, 2, None])),
        match=draw(st.sampled_from(["up", "down", "none"])),
        length=draw(st.integers(0, 65535 if binary else 2**32 - 1)),
        vlan=vlan,
    )


@given(_events(binary=False))
def test_text_roundtrip(ev: Event) -> None:
    line = encode_text(ev)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = decode_text(line)
    assert back == ev
    assert back.key.prefix == ev.key.prefix


@given(_events(binary=True))
def test_binary_roundtrip(ev: Event) -> None:
    buf = encode_binary(ev)
    assert len(buf) == 64
    assert decode_binary(buf) == ev


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_decode_text_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_text(data)


@settings(max_examples=500)
@given(st.binary(min_size=64, max_size=64) | st.binary(max_size=80))
def test_decode_binary_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_binary(data)


@settings(max_examples=300)
@given(_events(binary=False), st.data())
def test_decode_text_mutations(ev: Event, data: st.DataObject) -> None:
    line = bytearray(encode_text(ev))
    pos = data.draw(st.integers(0, len(line) - 1))
    line[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        decode_text(bytes(line))


# -- chunking ---------------------------------------------------------------------


@given(st.binary(max_size=5000), st.integers(1, 700))
def test_split_payload(data: bytes, limit: int) -> None:
    pieces = split_payload(data, limit)
    assert b"".join(pieces) == data
    assert all(1 <= len(p) <= limit for p in pieces)
    assert len(pieces) == -(-len(data) // limit)


def test_split_payload_limits() -> None:
    assert split_payload(b"", 10) == []
    body = bytes(range(256)) * 1000
    pieces = split_payload(body, sftap.SERVED_CHUNK)
    assert [len(p) for p in pieces] == [65535, 65535, 65535, 256000 - 3 * 65535]
    assert max(len(p) for p in split_payload(body, sftap.LOOPBACK7_CHUNK)) == 16384
    with pytest.raises(ValueError):
        split_payload(b"x", 0)


@given(_keys(), st.sampled_from([1, 2, None]), st.sampled_from(["up", "down", "none"]))
def test_data_line_heads_its_body(key: FlowKey, from_: int | None, match: str) -> None:
    body = b"\x00payload\n,="
    for vlan in (None, -1):
        head = sftap.data_head(key, from_, match, vlan=vlan)
        whole = sftap.data_line(head, len(body), 12.5) + body  # as the writers send it
        assert whole == encode_data(key, from_, match, len(body), 12.5, vlan=vlan) + body
        line, _, rest = whole.partition(b"\n")
        assert rest == body and decode_text(line).length == len(body)
