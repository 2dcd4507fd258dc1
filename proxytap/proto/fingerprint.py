"""JA3 and JA4 fingerprints of a TLS ClientHello (pure: a parsed hello in, strings out).

Analyzers match clients by these fingerprints (threat-intel lists, bot
detection), so proxytap computes them once from the hello it already reads
and puts them on the flow. Both take a ``ClientHello`` from
``proxytap.proto.tlshello``, whose lists have GREASE (RFC 8701) removed
already, as both specifications require.

JA3 (Salesforce): ``SSLVersion,Ciphers,Extensions,EllipticCurves,
EllipticCurvePointFormats`` with decimal values joined by ``-`` and fields
left empty when absent; the fingerprint is the MD5 of that string. The
version is the ClientHello's legacy_version (771 for every TLS 1.3 client):
JA3 predates supported_versions and its reference implementation reads the
hello's own version field, as Wireshark's ``tls.handshake.ja3`` does.

JA4 (FoxIO, technical_details/JA4.md): ``a_b_c`` where

* a = transport (``t`` TCP, ``q`` QUIC, ``d`` DTLS), 2-character version,
  ``d``/``i`` for SNI extension present/absent, 2-digit cipher and extension
  counts (capped at 99; the extension count includes SNI and ALPN), and two
  characters for the first ALPN value;
* b = sha256[:12] of the sorted 4-hex-digit cipher suites, comma-joined;
* c = sha256[:12] of the sorted extensions without SNI (0x0000) and ALPN
  (0x0010), comma-joined, then ``_`` and the signature algorithms in wire
  order (no ``_`` when there are none).

An empty list hashes to ``000000000000`` rather than to sha256 of nothing, so
a reader sees at once that the field had no values.

Readings of the spec where it leaves room:

* Version: "the highest value" in supported_versions, numerically, GREASE
  ignored, mapped through the spec's table; anything not in it (a draft
  version such as 0x7f1c that happens to be the highest) is ``00``. When the
  extension is absent, or held only GREASE, the hello's legacy_version counts
  (the record-layer version is ignored, as the spec says).
* SNI: ``d`` when the server_name extension is present, even if its name is
  an IP literal (the spec tests the extension, not what it names).
* ALPN: the first and last byte of the first value when both are ASCII
  letters or digits; otherwise the first and last character of that value's
  hex form (``0xAB 0xCD`` -> ``ad``), as the spec's ALPN section says. Some
  implementations print a printable non-alphanumeric byte as itself or
  write ``9`` for bytes >= 0x80; this module follows the spec text.
"""

from __future__ import annotations

import hashlib
from typing import Final

from proxytap.proto.tlshello import EXT_ALPN, EXT_SERVER_NAME, ClientHello

EMPTY_HASH: Final = "000000000000"

JA4_VERSIONS: Final = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}

TRANSPORTS: Final = frozenset({"t", "q", "d"})


def ja3_string(hello: ClientHello) -> str:
    """The JA3 string: ``version,ciphers,extensions,curves,point_formats`` in decimal."""
    return ",".join(
        (
            str(hello.legacy_version),
            _dash(hello.cipher_suites),
            _dash(hello.extensions),
            _dash(hello.supported_groups),
            _dash(hello.ec_point_formats),
        )
    )


def ja3(hello: ClientHello) -> tuple[str, str]:
    """(JA3 string, its MD5 in lower-case hex)."""
    text = ja3_string(hello)
    # MD5 is what JA3 is defined as; it identifies, it protects nothing
    return text, hashlib.md5(text.encode("ascii"), usedforsecurity=False).hexdigest()


def ja4(hello: ClientHello, transport: str = "t") -> str:
    """The JA4 fingerprint, e.g. ``t13d1516h2_8daaf6152771_e5627efa2ab1``.

    ``transport`` is ``t`` (TLS over TCP, every tunnel proxytap relays), ``q``
    (QUIC) or ``d`` (DTLS).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"JA4 transport must be one of t, q, d, not {transport!r}")
    sni = "d" if EXT_SERVER_NAME in hello.extensions else "i"
    part_a = (
        f"{transport}{ja4_version(hello)}{sni}"
        f"{min(len(hello.cipher_suites), 99):02d}{min(len(hello.extensions), 99):02d}"
        f"{ja4_alpn(hello)}"
    )
    ciphers = ",".join(f"{c:04x}" for c in sorted(hello.cipher_suites))
    exts = ",".join(
        f"{e:04x}" for e in sorted(hello.extensions) if e not in (EXT_SERVER_NAME, EXT_ALPN)
    )
    if hello.signature_algorithms:
        exts_with_sigs = exts + "_" + ",".join(f"{s:04x}" for s in hello.signature_algorithms)
    else:
        exts_with_sigs = exts
    # the spec tests the sorted extension list for emptiness; signature algorithms
    # cannot be there without extension 13 in that list, so nothing is lost
    part_c = _sha12(exts_with_sigs) if exts else EMPTY_HASH
    part_b = _sha12(ciphers) if ciphers else EMPTY_HASH
    return f"{part_a}_{part_b}_{part_c}"


def ja4_version(hello: ClientHello) -> str:
    """JA4's two-character version: highest supported_versions entry, else legacy_version."""
    version = max(hello.supported_versions) if hello.supported_versions else hello.legacy_version
    return JA4_VERSIONS.get(version, "00")


def ja4_alpn(hello: ClientHello) -> str:
    """JA4's two ALPN characters: ``00`` without a (non-empty) first value."""
    if not hello.alpn or not hello.alpn[0]:
        return "00"
    raw = hello.alpn[0].encode("latin-1")  # the parser decoded bytes 1:1 as Latin-1
    first, last = raw[0], raw[-1]
    if _alnum(first) and _alnum(last):
        return chr(first) + chr(last)
    hexed = raw.hex()
    return hexed[0] + hexed[-1]


def _alnum(byte: int) -> bool:
    # ASCII only: str.isalnum() would also accept Latin-1 letters such as 0xE9
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


def _dash(values: tuple[int, ...]) -> str:
    return "-".join(str(v) for v in values)


def _sha12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]
