"""JA3 and JA4 fingerprints, checked against oracles that are not this code.

* JA3: Wireshark's own implementation. Each hello (real ones from Python's
  ssl module and from curl, captured as the server received them, and
  handmade ones with GREASE everywhere) goes into one pcap, written here with
  struct (Ethernet / IPv4 / TCP to port 443, checksums zero), and
  ``tshark -e tls.handshake.ja3_full -e tls.handshake.ja3`` reads it.
* JA4: the ``ja4plus`` package (an independent implementation with its own
  ClientHello parser: ``parse_tls_handshake`` on the raw record bytes, then
  ``generate_ja4``), on the same hellos and on generated ones; and the worked
  example of FoxIO's JA4.md with the exact lists it gives
  (``t13d1516h2_8daaf6152771_e5627efa2ab1``), plus its ALPN hex examples.
  ja4plus is not used for ALPN values whose end bytes are not alphanumeric:
  it writes them differently from the spec text (see fingerprint.py).
* JA3 also has the example of Salesforce's README (its string and MD5).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import struct
import subprocess
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ja4plus import generate_ja4
from ja4plus.utils.tls_utils import parse_tls_handshake

from proxytap.config import Config, ListenerConfig, LogConfig
from proxytap.errors import ProtocolError
from proxytap.export.jsonlog import JsonFlowLog
from proxytap.proto.fingerprint import ja3, ja3_string, ja4, ja4_alpn
from proxytap.proto.tlshello import ClientHello, ClientHelloReader
from tests.certs import Pki
from tests.conftest import TEST_ACCESS, Origin, ProxyFactory, RunningProxy, curl, run
from tests.proto.test_tlshello import (
    alpn_ext,
    ext,
    hello,
    point_formats_ext,
    sni_ext,
    ssl_hello,
    u8,
    u16,
    u16_list_ext,
    versions_ext,
)

JA4_SHAPE = re.compile(
    r"[tqd](13|12|11|10|s3|s2|d1|d2|d3|00)[di]\d\d\d\d[0-9A-Za-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}"
)

# -- hellos ---------------------------------------------------------------------------------


@cache
def curl_hello(*args: str) -> bytes:
    """The ClientHello records curl sends, as a TLS server on 127.0.0.1 receives them."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(30)
        port = srv.getsockname()[1]
        proc = subprocess.Popen(
            [
                *("curl", "-sS", "--max-time", "30", "--resolve", f"curl.test:{port}:127.0.0.1"),
                *args,
                f"https://curl.test:{port}/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                return recv_records(conn)
        finally:
            proc.kill()
            proc.wait()


def recv_records(conn: socket.socket) -> bytes:
    """Whole TLS records from ``conn`` until they hold one complete handshake message."""
    data = b""
    while True:
        msg = b""
        pos = 0
        while pos + 5 <= len(data) and pos + 5 + int.from_bytes(data[pos + 3 : pos + 5]) <= len(
            data
        ):
            end = pos + 5 + int.from_bytes(data[pos + 3 : pos + 5])
            msg += data[pos + 5 : end]
            pos = end
        if len(msg) >= 4 and len(msg) >= 4 + int.from_bytes(msg[1:4]):
            return data[:pos]
        chunk = conn.recv(65536)
        assert chunk, f"the client closed after {len(data)} bytes"
        data += chunk


JA4_SPEC_SUITES = "1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,0035"
JA4_SPEC_EXTS = "001b,0000,0033,0010,4469,0017,002d,000d,0005,0023,0012,002b,ff01,000b,000a,0015"
JA4_SPEC_SIGS = "0403,0804,0401,0503,0805,0501,0806,0601"


def chrome_like() -> bytes:
    """GREASE in ciphers, extensions, groups, signature algorithms and versions."""
    return hello(
        [
            ext(0x0A0A, b""),
            sni_ext(b"grease.example"),
            ext(23, b""),
            ext(0xFF01, b"\x00"),
            u16_list_ext(10, 0x6A6A, 0x11EC, 29, 23, 24),
            point_formats_ext(0),
            ext(35, b""),
            alpn_ext(b"h2", b"http/1.1"),
            ext(5, b"\x01\x00\x00\x00\x00"),
            u16_list_ext(13, 0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601),
            ext(18, b""),
            ext(51, u16(5) + u16(0x6A6A) + u16(1) + b"\x00"),
            ext(45, u8(1) + b"\x01"),
            versions_ext(0x2A2A, 0x0304, 0x0303),
            ext(27, u8(2) + u16(2)),
            ext(0x4469, u16(3) + u8(2) + b"h2"),
            ext(0x1A1A, b"\x00"),
        ],
        suites=(0x5A5A, *(int(s, 16) for s in JA4_SPEC_SUITES.split(","))),
    )


def ja3_readme_example() -> bytes:
    """The hello behind Salesforce's README example (TLS 1.0, SNI, groups, formats)."""
    return hello(
        [sni_ext(b"example.com"), u16_list_ext(10, 23, 24, 25), point_formats_ext(0)],
        legacy=0x0301,
        suites=(47, 53, 5, 10, 49161, 49162, 49171, 49172, 50, 56, 19, 4),
    )


def ja4_spec_example() -> bytes:
    """A hello with exactly the cipher, extension and signature lists of JA4.md's example."""
    bodies = {
        0x0000: sni_ext(b"spec.example")[4:],
        0x0010: alpn_ext(b"h2", b"http/1.1")[4:],
        0x000D: u16_list_ext(13, *(int(s, 16) for s in JA4_SPEC_SIGS.split(",")))[4:],
        0x002B: versions_ext(0x0304, 0x0303)[4:],
        0x000A: u16_list_ext(10, 29, 23, 24)[4:],
        0x000B: point_formats_ext(0)[4:],
        0x0033: u16(6) + u16(29) + u16(2) + b"\x00\x00",
        0x002D: u8(1) + b"\x01",
        0x001B: u8(2) + u16(2),
        0x4469: u16(3) + u8(2) + b"h2",
        0xFF01: b"\x00",
        0x0005: b"\x01\x00\x00\x00\x00",
        0x0015: b"\x00" * 7,
    }
    exts = [ext(int(e, 16), bodies.get(int(e, 16), b"")) for e in JA4_SPEC_EXTS.split(",")]
    return hello(exts, suites=tuple(int(s, 16) for s in JA4_SPEC_SUITES.split(",")))


def records_only(data: bytes) -> ClientHello:
    ch = ClientHelloReader().feed(data)
    assert ch is not None
    return ch


@cache
def corpus() -> dict[str, bytes]:
    return {
        "openssl tls1.3 sni alpn": ssl_hello("www.example.com", ("h2", "http/1.1")),
        "openssl no sni no alpn": ssl_hello(None),
        "openssl tls1.2": ssl_hello("example.org", ("http/1.1",), ssl.TLSVersion.TLSv1_2),
        "curl default": curl_hello("-k"),
        "curl tls1.2 http1.1": curl_hello("-k", "--tls-max", "1.2", "--http1.1"),
        "chrome-like grease": chrome_like(),
        "ja3 readme example": ja3_readme_example(),
        "ja4 spec example": ja4_spec_example(),
        "no extensions": hello(None, legacy=0x0301, suites=(0x002F, 0x0035)),
    }


# -- the tshark oracle ------------------------------------------------------------------------


def pcap(payloads: list[bytes]) -> bytes:
    """A classic pcap: one Ethernet/IPv4/TCP packet per payload, each its own connection."""
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)  # LINKTYPE_ETHERNET
    for i, payload in enumerate(payloads):
        tcp = struct.pack("!HHIIBBHHH", 40000 + i, 443, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp) + len(payload),
            i,
            0x4000,
            64,
            6,
            0,
            bytes([127, 0, 0, 1]),
            bytes([127, 0, 0, 2]),
        )
        frame = b"\x00" * 12 + b"\x08\x00" + ip + tcp + payload
        out += struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame
    return out


@pytest.fixture(scope="module")
def tshark_ja3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """name -> (tshark's JA3 string, tshark's JA3 hash) for every hello of the corpus."""
    tshark = shutil.which("tshark")
    assert tshark, "tshark is missing: tests/setup-tools.sh installs it"
    names = list(corpus())
    path = tmp_path_factory.mktemp("ja3") / "hellos.pcap"
    path.write_bytes(pcap([corpus()[n] for n in names]))
    out = subprocess.run(
        [
            *(tshark, "-n", "-r", str(path), "-T", "fields", "-E", "separator=/t"),
            *("-e", "frame.number", "-e", "tls.handshake.ja3_full", "-e", "tls.handshake.ja3"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, len(names) + 1)), out
    return {name: (row[1], row[2]) for name, row in zip(names, rows, strict=True)}


@pytest.mark.parametrize("name", list(corpus()))
def test_ja3_matches_tshark(name: str, tshark_ja3: dict[str, tuple[str, str]]) -> None:
    text, digest = ja3(records_only(corpus()[name]))
    assert (text, digest) == tshark_ja3[name]


def test_ja3_readme_example() -> None:
    ch = records_only(ja3_readme_example())
    assert ja3(ch) == (
        "769,47-53-5-10-49161-49162-49171-49172-50-56-19-4,0-10-11,23-24-25,0",
        "ada70206e40642a3e4461f35503241d5",
    )


def test_ja3_drops_grease_and_keeps_tls13_clients_at_771() -> None:
    text = ja3_string(records_only(chrome_like()))
    version, ciphers, exts, groups, formats = text.split(",")
    assert version == "771"  # the hello's legacy_version, not supported_versions
    assert ciphers.startswith("4865-") and "23130" not in ciphers.split("-")  # 0x5a5a
    assert "2570" not in exts.split("-") and "6682" not in exts.split("-")  # 0x0a0a, 0x1a1a
    assert groups == "4588-29-23-24" and formats == "0"


def test_ja3_fields_stay_when_empty() -> None:
    assert ja3_string(records_only(hello(None, legacy=0x0301, suites=(47,)))) == "769,47,,,"


# -- the ja4plus oracle and the spec --------------------------------------------------------


@pytest.mark.parametrize("name", list(corpus()))
def test_ja4_matches_ja4plus(name: str) -> None:
    data = corpus()[name]
    expected = generate_ja4(parse_tls_handshake(data))
    assert expected is not None and JA4_SHAPE.fullmatch(expected)
    assert ja4(records_only(data)) == expected


def test_ja4_spec_worked_example() -> None:
    assert ja4(records_only(ja4_spec_example())) == "t13d1516h2_8daaf6152771_e5627efa2ab1"


def test_ja4_chrome_like_ignores_grease() -> None:
    # the spec example's ciphers again with GREASE added: the same cipher hash; 0x0015
    # (padding) is left out, so 15 extensions
    assert ja4(records_only(chrome_like())).startswith("t13d1515h2_8daaf6152771_")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # JA4.md, "ALPN Extension Value"
        (b"h2", "h2"),
        (b"http/1.1", "h1"),
        (b"\xab", "ab"),
        (b"\xab\xcd", "ad"),
        (b"\x30\xab", "3b"),
        (b"\x30\x31\xab\xcd", "3d"),
        (b"\x30\xab\xcd\x31", "01"),
        # a single character is first and last
        (b"x", "xx"),
        # printable but not alphanumeric: the hex rule as well
        (b"h2-", "6d"),
        (b"\xe9t", "e4"),  # a Latin-1 letter is not ASCII alphanumeric: hex "e974"
    ],
)
def test_ja4_alpn_rules(raw: bytes, expected: str) -> None:
    ch = records_only(hello([alpn_ext(raw, b"h2")]))
    assert ja4_alpn(ch) == expected
    assert ja4(ch)[8:10] == expected


@pytest.mark.parametrize(
    ("exts", "legacy", "version"),
    [
        ([versions_ext(0x0304, 0x0303)], 0x0303, "13"),
        ([versions_ext(0x3A3A, 0x0303)], 0x0303, "12"),
        ([versions_ext(0x0302, 0x0301)], 0x0303, "11"),  # the extension wins over legacy
        ([versions_ext(0x7F1C, 0x0304)], 0x0303, "00"),  # "the highest value": a draft one
        ([versions_ext(0x0A0A)], 0x0302, "11"),  # nothing but GREASE: legacy counts
        ([], 0x0303, "12"),
        ([], 0x0301, "10"),
        ([], 0x0300, "s3"),
        ([], 0x03FF, "00"),
    ],
)
def test_ja4_version(exts: list[bytes], legacy: int, version: str) -> None:
    assert ja4(records_only(hello(exts, legacy=legacy)))[1:3] == version


@pytest.mark.parametrize(
    ("data", "prefix", "suffix"),
    [
        # only SNI and ALPN: the sorted extension list is empty
        (hello([sni_ext(b"a.example"), alpn_ext(b"h2")]), "t12d0202h2_", "_000000000000"),
        # nothing but GREASE cipher suites: the cipher list is empty
        (hello([ext(23, b"")], suites=(0x0A0A, 0xFAFA)), "t12i000100_000000000000_", ""),
        # extensions without signature algorithms: no "_" in what is hashed
        (hello([u16_list_ext(10, 29), ext(23, b"")]), "t12i020200_", ""),
    ],
)
def test_ja4_empty_lists(data: bytes, prefix: str, suffix: str) -> None:
    fp = ja4(records_only(data))
    assert fp.startswith(prefix) and fp.endswith(suffix)
    assert fp == generate_ja4(parse_tls_handshake(data))


def test_ja4_counts_cap_at_99() -> None:
    suites = tuple(range(0x0100, 0x0100 + 120))
    exts = [ext(0x0100 + i, b"") for i in range(105)]
    data = hello(exts, suites=suites)
    fp = ja4(records_only(data))
    assert fp[:10] == "t12i999900"
    assert fp == generate_ja4(parse_tls_handshake(data))


def test_ja4_transport() -> None:
    ch = records_only(ssl_hello("t.example"))
    assert ja4(ch, "q")[0] == "q" and ja4(ch, "d")[0] == "d"
    assert ja4(ch, "q")[1:] == ja4(ch)[1:]
    with pytest.raises(ValueError):
        ja4(ch, "x")


# -- properties ------------------------------------------------------------------------------

_grease = st.sampled_from([0x0A0A + 0x1010 * i for i in range(16)])
_u16 = st.integers(0, 0xFFFF)
_alnum = st.sampled_from(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_alpn_name = st.builds(
    lambda a, mid, b: bytes([a]) + mid + bytes([b]), _alnum, st.binary(max_size=8), _alnum
) | _alnum.map(lambda c: bytes([c]))
_PARSED = {0, 10, 11, 13, 16, 43}


@st.composite
def generated_hello(draw: st.DrawFn) -> bytes:
    """Hellos with every field JA3/JA4 read, GREASE sprinkled in, unknown extensions."""
    suites = draw(st.lists(_u16 | _grease, min_size=1, max_size=120))
    exts: list[bytes] = []
    if draw(st.booleans()):
        exts.append(sni_ext(b"gen.example"))
    if draw(st.booleans()):
        exts.append(alpn_ext(*draw(st.lists(_alpn_name, min_size=1, max_size=3))))
    if draw(st.booleans()):
        exts.append(u16_list_ext(10, *draw(st.lists(_u16 | _grease, min_size=1, max_size=8))))
    if draw(st.booleans()):
        exts.append(point_formats_ext(*draw(st.lists(st.integers(0, 255), min_size=1))))
    if draw(st.booleans()):
        exts.append(u16_list_ext(13, *draw(st.lists(_u16 | _grease, min_size=1, max_size=12))))
    if draw(st.booleans()):
        versions = draw(st.lists(st.sampled_from([0x0301, 0x0302, 0x0303, 0x0304]) | _grease))
        exts.append(versions_ext(*(versions or [0x0304])))
    others = draw(st.lists(_u16, max_size=110, unique=True))
    exts += [ext(e, b"") for e in others if e not in _PARSED and not _is_grease(e)]
    exts += [ext(g, b"") for g in draw(st.lists(_grease, max_size=2, unique=True))]
    order = draw(st.permutations(range(len(exts))))
    legacy = draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303]))
    return hello([exts[i] for i in order], suites=tuple(suites), legacy=legacy)


def _is_grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


@settings(max_examples=200, deadline=None)
@given(generated_hello())
def test_generated_hellos_match_ja4plus(data: bytes) -> None:
    ch = records_only(data)
    fp = ja4(ch)
    assert JA4_SHAPE.fullmatch(fp), fp
    assert fp == generate_ja4(parse_tls_handshake(data))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_parsed_hello_has_well_formed_fingerprints(data: st.DataObject) -> None:
    base = bytearray(data.draw(st.sampled_from([ssl_hello("m.example", ("h2",)), chrome_like()])))
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(5, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    try:
        ch = ClientHelloReader().feed(bytes(base))
    except ProtocolError:
        return
    if ch is None:
        return
    assert JA4_SHAPE.fullmatch(ja4(ch))
    text, digest = ja3(ch)
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    assert re.fullmatch(r"\d+,[\d-]*,[\d-]*,[\d-]*,[\d-]*", text)


# -- end to end: a curl CONNECT tunnel, the flow log --------------------------------------------


async def test_flow_log_carries_the_fingerprints_of_the_hello_the_origin_saw(
    start_proxy: ProxyFactory, tls_origin: Origin, pki: Pki, tmp_path: Path
) -> None:
    """curl -> proxytap (CONNECT) -> a recorder -> the TLS origin: a real HTTPS request.

    The recorder keeps the first records the origin's side received; the tunnel is
    passthrough, so they are curl's ClientHello unchanged, and tshark and ja4plus
    fingerprint them for the comparison.
    """
    seen: list[bytes] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while chunk := await r.read(65536):
            w.write(chunk)
            await w.drain()
        w.write_eof()

    async def recorder(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = b""
        while records_only_or_none(first) is None:
            chunk = await r.read(65536)
            assert chunk
            first += chunk
        seen.append(first)
        ur, uw = await asyncio.open_connection("127.0.0.1", tls_origin.port)
        uw.write(first)
        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        uw.close()
        w.close()

    server = await asyncio.start_server(recorder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = tmp_path / "flows.json"
    listeners = (ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),)
    cfg = Config(listeners=listeners, access=TEST_ACCESS, log=LogConfig(flows=str(path)))
    proxy: RunningProxy = await start_proxy(cfg)
    try:
        rc, out, err = await curl(
            "--proxy",
            f"http://{proxy.http[0]}:{proxy.http[1]}",
            "--proxytunnel",
            "--cacert",
            str(pki.ca_pem),
            f"https://localhost:{port}/hello",
        )
        assert rc == 0, err
        assert out == b"hello GET /hello"
        await proxy.recorder.wait_destroyed(1)
        sink = next(s for s in proxy.app.sinks if isinstance(s, JsonFlowLog))
        await sink.flush()
    finally:
        server.close()
    (rec,) = [json.loads(line) for line in path.read_text().splitlines()]
    (hello_bytes,) = seen
    tshark = shutil.which("tshark")
    assert tshark
    cap = tmp_path / "e2e.pcap"
    cap.write_bytes(pcap([hello_bytes]))
    rc, out, err = await run(tshark, "-nr", str(cap), "-T", "fields", "-e", "tls.handshake.ja3")
    assert rc == 0, err
    fields = out.decode().split()
    assert rec["sni"] == "localhost" and rec["tunnel"] == "http-connect"
    assert fields == [rec["ja3"]]
    assert rec["ja4"] == generate_ja4(parse_tls_handshake(hello_bytes))
    assert rec["ja4"].startswith("t13d")


def records_only_or_none(data: bytes) -> ClientHello | None:
    if len(data) < 5:
        return None
    return ClientHelloReader().feed(data)
