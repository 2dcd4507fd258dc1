"""TLS ClientHello reader: SNI, ALPN, offered versions, fingerprint fields (pure, no I/O).

The relay peeks at the first bytes a client sends into a tunnel to learn the
server name it asked for (policy, interception rules, the flow table) and the
application protocols it offers (the L7 classifier). ``ClientHelloReader`` takes
those bytes as they arrive and answers ``None`` ("need more") until it has the
whole ClientHello; it never consumes anything: the caller keeps and forwards
every byte it fed.

Decisions:

* **Records.** Every record until the ClientHello is complete must be a
  handshake record (content type 22) with a legacy record version 0x0300 ..
  0x0304 and a length of 1 .. 2^14 (RFC 8446 5.1: no zero-length handshake
  fragments, no plaintext record over 2^14). A ClientHello may be split over
  several records and each record over several reads. Bytes after the end of
  the ClientHello are not looked at (a TLS 1.3 client may send a
  ChangeCipherSpec or early data right after it).
* **Bounded.** The handshake message may be at most ``max_size`` bytes
  (default 64 KiB; real hellos are 0.2 .. 2 KiB, post-quantum key shares
  push them past one record). A longer one is refused as soon as its length
  field is seen, so a client cannot make the reader buffer more than that.
* **Strict structure, lenient content.** Every length field must agree with
  its container, trailing bytes inside a vector or the message are an error,
  and an extension type may occur once (RFC 8446 4.2). Unknown extensions,
  cipher suites and versions are skipped, not refused.
* **GREASE** values (RFC 8701, ``0x?a?a``) are removed from ``cipher_suites``,
  ``extensions``, ``supported_versions``, ``supported_groups`` and
  ``signature_algorithms``, as JA3 and JA4 fingerprints do (JA3 drops them from
  ciphers, extensions and curves; JA4 "anywhere it sees them").
* **Fingerprint fields** (``proxytap.proto.fingerprint``): supported_groups
  (10, RFC 8446 4.2.7, ``<2..2^16-1>``), ec_point_formats (11, RFC 8422 5.1.2,
  ``<1..2^8-1>``) and signature_algorithms (13, RFC 8446 4.2.3,
  ``<2..2^16-2>``) are kept in the order sent, with the same strictness as
  every other vector: a length out of range, an odd length for a list of
  2-byte values or trailing bytes is a ``ProtocolError``.
* **SNI** (RFC 6066 section 3) must be one ``host_name`` entry of ASCII. It is
  lower-cased and one trailing dot is dropped (the RFC forbids it; some
  clients send it anyway, and policy must see the canonical name). It must be
  a DNS name: dot-separated labels of 1 .. 63 letters, digits, ``-`` or ``_``
  (underscores and hyphens anywhere are in real use), at most 253 bytes. An IP
  literal is not allowed there by RFC 6066 but some clients send one: it is
  kept as written and ``sni_is_ip`` is set, so policy can decide. Anything
  else (spaces, control bytes, non-ASCII, an empty label) is a
  ``ProtocolError``: a name that cannot be a host must not reach policy or logs.
* **ALPN** names (RFC 7301) are decoded as Latin-1, which maps every byte to
  one character and back, so ``"h2"`` compares as expected and nothing is lost.
* **ECH** (encrypted_client_hello, 0xfe0d): the SNI seen is the outer, public
  name; ``ech`` says so.
* SSLv2-compatible hellos (first byte 0x80) are refused: no client from this
  century sends one.

``ProtocolError`` from this module means "not a TLS ClientHello we accept"; the
shell decides whether that closes the tunnel or just skips the peek.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from proxytap.errors import ProtocolError

CONTENT_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1
MAX_RECORD: Final = 1 << 14
DEFAULT_MAX_SIZE: Final = 64 * 1024

EXT_SERVER_NAME: Final = 0
EXT_SUPPORTED_GROUPS: Final = 10
EXT_EC_POINT_FORMATS: Final = 11
EXT_SIGNATURE_ALGORITHMS: Final = 13
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43
EXT_ECH: Final = 0xFE0D

VERSION_NAMES: Final = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}

_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE value: both bytes equal and of the form 0x?A."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def is_tls_handshake(first_bytes: bytes) -> bool | None:
    """Do these first bytes of a stream start a TLS handshake record?

    ``None`` when fewer than three bytes decide nothing yet. Checks the content
    type (22) and the legacy record version (0x0300 .. 0x0304).
    """
    if not first_bytes:
        return None
    if first_bytes[0] != CONTENT_HANDSHAKE:
        return False
    if len(first_bytes) < 2:
        return None
    if first_bytes[1] != 3:
        return False
    if len(first_bytes) < 3:
        return None
    return first_bytes[2] <= 4


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the reader learnt; GREASE values are already removed."""

    legacy_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]  # extension types in the order sent
    sni: str | None = None  # lower-case host_name, no trailing dot
    sni_is_ip: bool = False  # the host_name was an IP literal (RFC 6066 forbids it)
    alpn: tuple[str, ...] = ()  # Latin-1 decoded protocol names, in client order
    supported_versions: tuple[int, ...] = ()
    supported_groups: tuple[int, ...] = ()  # ext 10 named groups, in client order
    ec_point_formats: tuple[int, ...] = ()  # ext 11, one byte each, in client order
    signature_algorithms: tuple[int, ...] = ()  # ext 13 SignatureSchemes, in client order
    size: int = 0  # bytes of the handshake message, header included

    @property
    def best_version(self) -> int:
        """The highest version offered: from supported_versions if sent, else legacy_version."""
        known = [v for v in self.supported_versions if v in VERSION_NAMES]
        if known:
            return max(known)
        if self.supported_versions:
            return max(self.supported_versions)
        return self.legacy_version

    @property
    def version(self) -> str:
        """``best_version`` by name ("TLSv1.3", "TLSv1.2", ...; ``0x7f1c`` if unknown)."""
        v = self.best_version
        return VERSION_NAMES.get(v, f"0x{v:04x}")

    @property
    def ech(self) -> bool:
        """True when the hello carries encrypted_client_hello: ``sni`` is the outer name."""
        return EXT_ECH in self.extensions


def _error(reason: str) -> ProtocolError:
    return ProtocolError(f"TLS ClientHello: {reason}", proxy_status="tls_protocol_error")


class ClientHelloReader:
    """Feed it the client's first bytes; it returns the ``ClientHello`` once complete.

    After the hello is returned, further ``feed`` calls return the same object.
    After a ``ProtocolError`` the reader is spent: every later call raises again.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()  # bytes of the current, incomplete record
        self._msg = bytearray()  # handshake bytes gathered from complete records
        self._result: ClientHello | None = None
        self._failed: str | None = None  # the reason of the error raised, once spent

    def feed(self, data: bytes) -> ClientHello | None:
        if self._result is not None:
            return self._result
        if self._failed is not None:
            raise ProtocolError(self._failed, proxy_status="tls_protocol_error")
        try:
            self._result = self._feed(data)
        except ProtocolError as exc:
            # the reason only: the exception's traceback holds the caller's frames,
            # and with them whoever holds this reader (a reference cycle)
            self._failed = exc.reason
            self._buf.clear()
            self._msg.clear()
            raise
        if self._result is not None:
            self._buf.clear()
            self._msg.clear()
        return self._result

    def _feed(self, data: bytes) -> ClientHello | None:
        buf = self._buf
        buf += data
        while True:
            verdict = is_tls_handshake(bytes(buf[:3]))
            if verdict is False:
                if buf[:1] == b"\x80":
                    raise _error("SSLv2-compatible hellos are not supported")
                raise _error("not a TLS handshake record")
            if len(buf) < 5:
                return None
            length = int.from_bytes(buf[3:5])
            if not 0 < length <= MAX_RECORD:
                raise _error(f"record length {length} is not 1..{MAX_RECORD}")
            # Check the handshake header as soon as its bytes are here, even in
            # an incomplete record, so a bad or huge hello fails before buffering.
            msg = self._msg
            if len(msg) < 4:
                self._check_header(bytes(msg) + bytes(buf[5 : 5 + min(length, 4 - len(msg))]))
            if len(buf) < 5 + length:
                return None
            msg += buf[5 : 5 + length]
            del buf[: 5 + length]
            if len(msg) >= 4:
                body_len = int.from_bytes(msg[1:4])
                if len(msg) >= 4 + body_len:
                    return parse_client_hello(bytes(msg[4 : 4 + body_len]))

    def _check_header(self, head: bytes) -> None:
        if head and head[0] != HANDSHAKE_CLIENT_HELLO:
            raise _error(f"first handshake message is type {head[0]}, not ClientHello")
        if len(head) >= 4:
            size = int.from_bytes(head[1:4]) + 4
            if size > self.max_size:
                raise _error(f"{size} bytes exceed the {self.max_size}-byte limit")


class _Cursor:
    """Reads big-endian fields from a bytes object; any overrun is a ProtocolError."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise _error(f"{what} is truncated")
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def take_rest(self) -> bytes:
        start = self.pos
        self.pos = self.end
        return self.data[start : self.end]

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what))

    def vector(self, len_bytes: int, what: str, lo: int = 0, hi: int | None = None) -> _Cursor:
        """A length-prefixed vector as a sub-cursor; ``lo``..``hi`` bound its length."""
        n = self.uint(len_bytes, f"{what} length")
        if n < lo or (hi is not None and n > hi):
            raise _error(f"{what} length {n} is out of range")
        if n > self.end - self.pos:
            raise _error(f"{what} is truncated")
        sub = _Cursor(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise _error(f"{self.end - self.pos} trailing bytes in {what}")


def parse_client_hello(body: bytes) -> ClientHello:
    """Parse a ClientHello handshake body (after the 4-byte handshake header)."""
    cur = _Cursor(body)
    legacy_version = cur.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise _error(f"legacy_version 0x{legacy_version:04x} is not 3.x")
    cur.take(32, "random")
    cur.vector(1, "legacy_session_id", 0, 32)
    suites_cur = cur.vector(2, "cipher_suites", 2)
    if suites_cur.remaining() % 2:
        raise _error("cipher_suites has an odd length")
    suites = []
    while suites_cur.remaining():
        suite = suites_cur.uint(2, "cipher suite")
        if not is_grease(suite):
            suites.append(suite)
    cur.vector(1, "legacy_compression_methods", 1)

    ext_types: list[int] = []
    seen: set[int] = set()
    sni: str | None = None
    sni_is_ip = False
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    point_formats: tuple[int, ...] = ()
    sig_algs: tuple[int, ...] = ()
    if cur.remaining():  # extensions are optional before TLS 1.3 (RFC 5246 7.4.1.2)
        exts = cur.vector(2, "extensions")
        while exts.remaining():
            ext_type = exts.uint(2, "extension type")
            ext = exts.vector(2, f"extension {ext_type}")
            if ext_type in seen:
                raise _error(f"extension {ext_type} appears twice")
            seen.add(ext_type)
            if is_grease(ext_type):
                continue
            ext_types.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni, sni_is_ip = _server_name(ext)
            elif ext_type == EXT_ALPN:
                alpn = _alpn(ext)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(ext)
            elif ext_type == EXT_SUPPORTED_GROUPS:
                groups = _u16_list(ext, "supported_groups")
            elif ext_type == EXT_EC_POINT_FORMATS:
                point_formats = _point_formats(ext)
            elif ext_type == EXT_SIGNATURE_ALGORITHMS:
                sig_algs = _u16_list(ext, "signature_algorithms")
    cur.done("ClientHello")
    return ClientHello(
        legacy_version=legacy_version,
        cipher_suites=tuple(suites),
        extensions=tuple(ext_types),
        sni=sni,
        sni_is_ip=sni_is_ip,
        alpn=alpn,
        supported_versions=versions,
        supported_groups=groups,
        ec_point_formats=point_formats,
        signature_algorithms=sig_algs,
        size=len(body) + 4,
    )


def _server_name(ext: _Cursor) -> tuple[str, bool]:
    names = ext.vector(2, "server_name_list", 1)
    ext.done("server_name extension")
    host: bytes | None = None
    seen_types: set[int] = set()
    while names.remaining():
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name", 1).take_rest()
        if name_type in seen_types:
            raise _error(f"server name type {name_type} appears twice")
        seen_types.add(name_type)
        if name_type == 0:
            host = name
    if host is None:
        raise _error("server_name has no host_name")
    return validate_server_name(host)


def validate_server_name(raw: bytes) -> tuple[str, bool]:
    """A host_name's bytes -> (canonical name, is an IP literal); ``ProtocolError`` if neither."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _error("server name is not ASCII") from None
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return text, True
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise _error(f"server name {text!r} is not a DNS name")
    return name, False


def _alpn(ext: _Cursor) -> tuple[str, ...]:
    names = ext.vector(2, "protocol_name_list", 2)
    ext.done("ALPN extension")
    out = []
    while names.remaining():
        out.append(names.vector(1, "protocol name", 1).take_rest().decode("latin-1"))
    return tuple(out)


def _supported_versions(ext: _Cursor) -> tuple[int, ...]:
    versions = ext.vector(1, "supported_versions", 2, 254)
    ext.done("supported_versions extension")
    if versions.remaining() % 2:
        raise _error("supported_versions has an odd length")
    out = []
    while versions.remaining():
        v = versions.uint(2, "version")
        if not is_grease(v):
            out.append(v)
    return tuple(out)


def _u16_list(ext: _Cursor, what: str) -> tuple[int, ...]:
    """A ``<2..2^16-1>`` vector of 2-byte values (named groups, signature schemes), GREASE removed.

    signature_algorithms' upper bound (2^16-2) needs no check of its own: an odd
    length is refused anyway.
    """
    values = ext.vector(2, what, 2)
    ext.done(f"{what} extension")
    if values.remaining() % 2:
        raise _error(f"{what} has an odd length")
    out = []
    while values.remaining():
        v = values.uint(2, what)
        if not is_grease(v):
            out.append(v)
    return tuple(out)


def _point_formats(ext: _Cursor) -> tuple[int, ...]:
    # one byte each: no GREASE form exists for them (RFC 8701 greases 2-byte code points)
    formats = ext.vector(1, "ec_point_formats", 1)
    ext.done("ec_point_formats extension")
    return tuple(formats.take_rest())
