"""TLS ClientHello reader: real hellos from Python's ssl module, handmade edge cases, fuzz."""

from __future__ import annotations

import gc
import ssl
import weakref
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ProtocolError
from proxytap.proto.tlshello import (
    ClientHello,
    ClientHelloReader,
    is_grease,
    is_tls_handshake,
    validate_server_name,
)

# -- builders ------------------------------------------------------------------------


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(u8(name_type) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn_ext(*names: bytes) -> bytes:
    lst = b"".join(u8(len(n)) + n for n in names)
    return ext(16, u16(len(lst)) + lst)


def versions_ext(*versions: int) -> bytes:
    body = b"".join(u16(v) for v in versions)
    return ext(43, u8(len(body)) + body)


def u16_list_ext(ext_type: int, *values: int) -> bytes:
    """supported_groups (10) or signature_algorithms (13): a 2-byte-length list of u16."""
    body = b"".join(u16(v) for v in values)
    return ext(ext_type, u16(len(body)) + body)


def point_formats_ext(*formats: int) -> bytes:
    return ext(11, u8(len(formats)) + bytes(formats))


def hello_body(
    exts: list[bytes] | None = None,
    *,
    suites: tuple[int, ...] = (0x1301, 0xC02F),
    legacy: int = 0x0303,
    session_id: bytes = b"\x11" * 32,
    compression: bytes = b"\x00",
) -> bytes:
    body = u16(legacy) + b"\x22" * 32 + u8(len(session_id)) + session_id
    suite_bytes = b"".join(u16(s) for s in suites)
    body += u16(len(suite_bytes)) + suite_bytes + u8(len(compression)) + compression
    if exts is not None:
        joined = b"".join(exts)
        body += u16(len(joined)) + joined
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + len(body).to_bytes(3, "big") + body


def records(msg: bytes, size: int = 1 << 14, version: int = 0x0301, ctype: int = 22) -> bytes:
    out = b""
    for i in range(0, len(msg), size):
        frag = msg[i : i + size]
        out += u8(ctype) + u16(version) + u16(len(frag)) + frag
    return out


def hello(exts: list[bytes] | None = None, **kw: object) -> bytes:
    return records(handshake(hello_body(exts, **kw)))  # type: ignore[arg-type]


def parse(data: bytes, chunk: int | None = None) -> ClientHello | None:
    reader = ClientHelloReader()
    if chunk is None:
        return reader.feed(data)
    result = None
    for i in range(0, len(data), chunk):
        result = reader.feed(data[i : i + chunk])
    return result


@cache
def ssl_hello(
    server_hostname: str | None,
    alpn: tuple[str, ...] = (),
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of Python's own TLS client (OpenSSL)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sock = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        sock.do_handshake()
    return outgoing.read()


# -- real hellos ---------------------------------------------------------------------


def test_openssl_tls13_hello() -> None:
    data = ssl_hello("Www.Example.COM", ("h2", "http/1.1"))
    ch = parse(data)
    assert ch is not None
    assert ch.sni == "www.example.com"
    assert not ch.sni_is_ip
    assert ch.alpn == ("h2", "http/1.1")
    assert ch.legacy_version == 0x0303
    assert 0x0304 in ch.supported_versions
    assert ch.version == "TLSv1.3"
    assert ch.best_version == 0x0304
    assert 0x1301 in ch.cipher_suites
    assert 0 in ch.extensions and 16 in ch.extensions and 43 in ch.extensions
    assert ch.size == len(data) - 5
    assert not ch.ech


def test_openssl_fingerprint_fields() -> None:
    ch = parse(ssl_hello("fp.example"))
    assert ch is not None
    # OpenSSL 3 offers x25519 (29) and secp256r1 (23), the uncompressed point format
    # (0) and ecdsa_secp256r1_sha256 (0x0403) / rsa_pss_rsae_sha256 (0x0804)
    assert 29 in ch.supported_groups and 23 in ch.supported_groups
    assert ch.ec_point_formats[0] == 0
    assert 0x0403 in ch.signature_algorithms and 0x0804 in ch.signature_algorithms
    assert len(set(ch.signature_algorithms)) == len(ch.signature_algorithms)


def test_fingerprint_fields_in_order_grease_removed() -> None:
    exts = [
        u16_list_ext(10, 0x3A3A, 0x11EC, 29, 23),
        point_formats_ext(0, 1, 2),
        u16_list_ext(13, 0x0804, 0x9A9A, 0x0403, 0x0401),
    ]
    ch = parse(hello(exts))
    assert ch is not None
    assert ch.supported_groups == (0x11EC, 29, 23)
    assert ch.ec_point_formats == (0, 1, 2)
    assert ch.signature_algorithms == (0x0804, 0x0403, 0x0401)
    assert ch.extensions == (10, 11, 13)


def test_no_fingerprint_extensions_means_empty_fields() -> None:
    ch = parse(hello([sni_ext(b"bare.example")]))
    assert ch is not None
    assert ch.supported_groups == ch.ec_point_formats == ch.signature_algorithms == ()


def test_openssl_tls12_hello() -> None:
    ch = parse(ssl_hello("example.org", ("http/1.1",), ssl.TLSVersion.TLSv1_2))
    assert ch is not None
    assert ch.sni == "example.org"
    assert ch.alpn == ("http/1.1",)
    assert ch.supported_versions == ()
    assert ch.version == "TLSv1.2"


def test_openssl_hello_without_sni_or_alpn() -> None:
    ch = parse(ssl_hello(None))
    assert ch is not None
    assert ch.sni is None
    assert ch.alpn == ()
    assert 0 not in ch.extensions


def test_openssl_does_not_send_ip_sni() -> None:
    ch = parse(ssl_hello("192.0.2.7"))
    assert ch is not None and ch.sni is None


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 100])
def test_split_into_small_feeds(chunk: int) -> None:
    data = ssl_hello("split.example", ("h2",))
    reader = ClientHelloReader()
    results = [reader.feed(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    assert all(r is None for r in results[:-1])
    last = results[-1]
    assert last is not None and last.sni == "split.example" and last.alpn == ("h2",)


def test_one_byte_short_is_need_more() -> None:
    data = ssl_hello("example.com")
    assert ClientHelloReader().feed(data[:-1]) is None


def test_bytes_after_the_hello_are_ignored() -> None:
    data = ssl_hello("example.com") + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05hello"
    ch = parse(data)
    assert ch is not None and ch.sni == "example.com"


def test_result_is_kept() -> None:
    reader = ClientHelloReader()
    ch = reader.feed(ssl_hello("example.com"))
    assert ch is not None
    assert reader.feed(b"garbage") is ch


# -- handmade hellos -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 40, 100])
def test_hello_across_records(size: int) -> None:
    msg = handshake(hello_body([sni_ext(b"records.example"), alpn_ext(b"h2")]))
    data = records(msg, size=size, version=0x0303)
    assert data.count(b"\x16\x03\x03") >= len(msg) // size
    for chunk in (None, 1, 6):
        ch = parse(data, chunk)
        assert ch is not None and ch.sni == "records.example" and ch.alpn == ("h2",)


def test_no_extensions_at_all() -> None:
    ch = parse(hello(None, legacy=0x0301))
    assert ch is not None
    assert ch.sni is None and ch.alpn == () and ch.extensions == ()
    assert ch.version == "TLSv1"


def test_multiple_alpn() -> None:
    ch = parse(hello([alpn_ext(b"h2", b"http/1.1", b"spdy/3", b"\xff\x00")]))
    assert ch is not None
    assert ch.alpn == ("h2", "http/1.1", "spdy/3", "\xff\x00")
    assert ch.alpn[3].encode("latin-1") == b"\xff\x00"


def test_grease_is_dropped() -> None:
    exts = [
        ext(0x0A0A, b""),
        sni_ext(b"grease.example"),
        versions_ext(0x2A2A, 0x0304, 0x0303),
        ext(0xFAFA, b"\x00"),
    ]
    ch = parse(hello(exts, suites=(0x1A1A, 0x1301, 0x1302)))
    assert ch is not None
    assert ch.cipher_suites == (0x1301, 0x1302)
    assert ch.extensions == (0, 43)
    assert ch.supported_versions == (0x0304, 0x0303)
    assert ch.version == "TLSv1.3"


@pytest.mark.parametrize(
    ("value", "grease"),
    [(0x0A0A, True), (0xFAFA, True), (0x1A1A, True), (0x0A1A, False), (0x0B0B, False), (0, False)],
)
def test_is_grease(value: int, grease: bool) -> None:
    assert is_grease(value) is grease


@pytest.mark.parametrize(
    ("versions", "legacy", "name"),
    [
        ((0x0304, 0x0303), 0x0303, "TLSv1.3"),
        ((0x0303, 0x0304), 0x0303, "TLSv1.3"),
        ((0x0302,), 0x0303, "TLSv1.1"),
        ((0x7F1C, 0x0303), 0x0303, "TLSv1.2"),  # a draft version is not "better"
        ((0x7F1C,), 0x0303, "0x7f1c"),
        ((), 0x0300, "SSLv3"),
        ((), 0x0302, "TLSv1.1"),
    ],
)
def test_version(versions: tuple[int, ...], legacy: int, name: str) -> None:
    exts = [versions_ext(*versions)] if versions else []
    ch = parse(hello(exts, legacy=legacy))
    assert ch is not None and ch.version == name


def test_ech_flag() -> None:
    ch = parse(hello([sni_ext(b"public.example"), ext(0xFE0D, b"\x00" * 8)]))
    assert ch is not None and ch.ech and ch.sni == "public.example"


def test_unknown_name_type_beside_host_name() -> None:
    entries = u8(0) + u16(3) + b"a.b" + u8(7) + u16(2) + b"zz"
    ch = parse(hello([ext(0, u16(len(entries)) + entries)]))
    assert ch is not None and ch.sni == "a.b"


@pytest.mark.parametrize(
    ("raw", "name", "is_ip"),
    [
        (b"example.com", "example.com", False),
        (b"EXAMPLE.Com", "example.com", False),
        (b"example.com.", "example.com", False),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example", False),
        (b"my_host.example", "my_host.example", False),
        (b"-odd-.example", "-odd-.example", False),
        (b"localhost", "localhost", False),
        (b"a" * 63 + b".b", "a" * 63 + ".b", False),
        (b"192.0.2.1", "192.0.2.1", True),
        (b"::1", "::1", True),
        (b"2001:DB8::1", "2001:DB8::1", True),  # an IP literal is kept as written
    ],
)
def test_server_name_table(raw: bytes, name: str, is_ip: bool) -> None:
    assert validate_server_name(raw) == (name, is_ip)
    ch = parse(hello([sni_ext(raw)]))
    assert ch is not None and ch.sni == name and ch.sni_is_ip is is_ip


@pytest.mark.parametrize(
    "raw",
    [
        b"caf\xc3\xa9.example",
        b"a b.example",
        b"a..b",
        b".example",
        b".",
        b"a\x00b",
        b"a\r\nb",
        b"a" * 64 + b".b",
        b".".join([b"a" * 63] * 4) + b".abc",  # 256 bytes
        b"[::1]",
        b"a/b",
        b"example.com..",
    ],
)
def test_bad_server_names(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        validate_server_name(raw)
    with pytest.raises(ProtocolError):
        parse(hello([sni_ext(raw)]))


# -- errors ----------------------------------------------------------------------------

GOOD_BODY = hello_body([sni_ext(b"ok.example")])

BAD_INPUTS = {
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "sslv2": b"\x80\x2e\x01\x00\x02\x00\x15",
    "alert record": b"\x15\x03\x03\x00\x02\x02\x28",
    "record version 3.5": b"\x16\x03\x05\x00\x01\x01",
    "record version 2.0": b"\x16\x02\x00\x00\x01\x01",
    "zero-length record": b"\x16\x03\x01\x00\x00",
    "record over 2^14": b"\x16\x03\x01\x40\x01\x01",
    "server hello": records(handshake(GOOD_BODY, msg_type=2)),
    "hello over the size limit": b"\x16\x03\x01\x00\x04\x01\x01\x00\x00",
    "application data mid-hello": records(handshake(GOOD_BODY)[:35]) + records(b"hello", ctype=23),
    "legacy_version 2.0": hello([], legacy=0x0200),
    "session id 33": hello([], session_id=b"\x00" * 33),
    "odd cipher suites": records(
        handshake(u16(0x0303) + b"\x22" * 32 + u8(0) + u16(3) + b"\x13\x01\x13" + b"\x01\x00")
    ),
    "no cipher suites": hello([], suites=()),
    "no compression methods": hello([], compression=b""),
    "duplicate extension": hello([ext(23, b""), ext(23, b"")]),
    "two host_names": hello([sni_ext(b"a.example", b"b.example")]),
    "empty server_name": hello([ext(0, b"")]),
    "empty server name list": hello([ext(0, u16(0))]),
    "empty host_name": hello([sni_ext(b"")]),
    "no host_name entry": hello([sni_ext(b"x", name_type=5)]),
    "server_name trailing bytes": hello([ext(0, sni_ext(b"a.b")[4:] + b"\x00")]),
    "empty alpn list": hello([ext(16, u16(0))]),
    "empty alpn name": hello([alpn_ext(b"h2", b"")]),
    "alpn overrun": hello([ext(16, u16(5) + u8(2) + b"h2")]),
    "supported_versions odd": hello([ext(43, u8(3) + b"\x03\x04\x03")]),
    "supported_versions empty": hello([ext(43, u8(0))]),
    "supported_groups empty": hello([u16_list_ext(10)]),
    "supported_groups odd": hello([ext(10, u16(3) + b"\x00\x1d\x00")]),
    "supported_groups overrun": hello([ext(10, u16(4) + b"\x00\x1d")]),
    "supported_groups trailing bytes": hello([ext(10, u16(2) + b"\x00\x1d\x00")]),
    "ec_point_formats empty": hello([point_formats_ext()]),
    "ec_point_formats overrun": hello([ext(11, u8(3) + b"\x00")]),
    "ec_point_formats trailing bytes": hello([ext(11, u8(1) + b"\x00\x01")]),
    "signature_algorithms empty": hello([u16_list_ext(13)]),
    "signature_algorithms odd": hello([ext(13, u16(1) + b"\x04")]),
    "signature_algorithms trailing bytes": hello([ext(13, u16(2) + b"\x04\x03\x00")]),
    "extension overrun": hello([u16(0x1234) + u16(10) + b"abc"]),
    "extensions length short": records(handshake(hello_body([ext(23, b"")]) + b"\x00")),
    "trailing bytes after hello": records(handshake(hello_body(None) + b"\x00")),
    "truncated body": records(handshake(hello_body(None)[:30])),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("chunk", [None, 1])
def test_bad_inputs(name: str, chunk: int | None) -> None:
    reader = ClientHelloReader(max_size=1024 if "limit" not in name else 255)
    data = BAD_INPUTS[name]
    with pytest.raises(ProtocolError):
        for i in range(0, len(data), chunk or len(data)):
            reader.feed(data[i : i + (chunk or len(data))])
    with pytest.raises(ProtocolError):  # the reader stays failed
        reader.feed(ssl_hello("example.com"))


def test_error_is_early_on_non_tls() -> None:
    with pytest.raises(ProtocolError, match="not a TLS handshake"):
        ClientHelloReader().feed(b"G")
    with pytest.raises(ProtocolError, match="not ClientHello"):
        ClientHelloReader().feed(b"\x16\x03\x01\x00\x30\x02")


def test_a_spent_reader_keeps_no_frames() -> None:
    """The error is raised again with its reason, and the reader keeps no traceback:
    one would hold the caller's frames, and through them whoever holds the reader."""

    class Holder:
        def __init__(self) -> None:
            self.reader = ClientHelloReader()

        def feed(self, data: bytes) -> str:
            try:
                self.reader.feed(data)
            except ProtocolError as exc:
                return exc.reason
            raise AssertionError("no error")

    holder = Holder()
    first = holder.feed(b"\x16\x03\x01\x00\x30\x02")
    again = holder.feed(b"")
    assert first == again and "not ClientHello" in first
    gone = weakref.ref(holder)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del holder
        assert gone() is None  # freed by reference counting alone
    finally:
        if enabled:
            gc.enable()


def test_size_limit_before_the_body_arrives() -> None:
    reader = ClientHelloReader(max_size=1000)
    # a 1 MiB hello announced in the first record is refused before any of it is buffered
    with pytest.raises(ProtocolError, match="limit"):
        reader.feed(b"\x16\x03\x01\x40\x00\x01\x10\x00\x00")
    big = hello([ext(0x1234, b"\x00" * 3000), sni_ext(b"big.example")])
    with pytest.raises(ProtocolError, match="limit"):
        ClientHelloReader(max_size=3000).feed(big)
    ch = ClientHelloReader().feed(records(handshake(hello_body([ext(0x1234, b"\x00" * 40000)]))))
    assert ch is not None and ch.size > 40000  # larger than one record: fine under 64 KiB


@pytest.mark.parametrize(
    ("first", "verdict"),
    [
        (b"", None),
        (b"\x16", None),
        (b"\x16\x03", None),
        (b"\x16\x03\x01", True),
        (b"\x16\x03\x03\x02\x00", True),
        (b"\x16\x03\x00", True),
        (b"\x16\x03\x04", True),
        (b"\x16\x03\x05", False),
        (b"\x16\x02", False),
        (b"\x17", False),
        (b"\x80", False),
        (b"GET", False),
        (b"CONNECT", False),
        (b"\x05\x01\x00", False),
    ],
)
def test_is_tls_handshake(first: bytes, verdict: bool | None) -> None:
    assert is_tls_handshake(first) is verdict


# -- properties --------------------------------------------------------------------------


def _run(data: bytes, cuts: list[int]) -> ClientHello | None:
    reader = ClientHelloReader()
    result = None
    prev = 0
    try:
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            result = reader.feed(data[prev:cut])
            prev = max(prev, cut)
    except ProtocolError:
        return None
    return result


@settings(max_examples=400)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_any_bytes_parse_or_protocol_error(data: bytes, cuts: list[int]) -> None:
    _run(data, cuts)
    _run(b"\x16\x03\x01" + data, cuts)
    _run(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data, cuts)
    _run(b"\x16\x03\x01" + (len(data) + 4).to_bytes(2, "big") + handshake(data), cuts)


@settings(max_examples=300)
@given(st.data())
def test_mutated_real_hello_parses_or_raises(data: st.DataObject) -> None:
    base = bytearray(ssl_hello("mutate.example", ("h2", "http/1.1")))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    reader = ClientHelloReader()
    try:
        reader.feed(bytes(base[:cut]))
        reader.feed(bytes(base[cut:]))
    except ProtocolError:
        pass


_label = st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=5).map(".".join)
_alpn = st.lists(st.binary(min_size=1, max_size=20), max_size=5)


@settings(max_examples=200)
@given(_names, _alpn, st.integers(1, 300), st.integers(1, 50), st.booleans())
def test_generated_hellos_round_trip(
    name: str, alpn: list[bytes], record_size: int, chunk: int, upper: bool
) -> None:
    exts = [sni_ext((name.upper() if upper else name).encode())]
    if alpn:
        exts.append(alpn_ext(*alpn))
    data = records(handshake(hello_body(exts)), size=record_size)
    ch = parse(data, chunk)
    assert ch is not None
    assert ch.sni == name
    assert ch.alpn == tuple(a.decode("latin-1") for a in alpn)
