#!/usr/bin/env python3
"""Strict SF-TAP consumers, run as subprocesses: an analyzer and an abstractor's loopback7.

Standalone on purpose (no proxytap import: the parser here is an independent
oracle of ``shared/spec/sftap-flow-interface.md``). Every read is a system call
on a raw, BLOCKING socket (``sock.recv`` / ``os.read``): no asyncio stream, no
buffered file object, nothing that would paper over how the bytes arrived.

How both modes read (spec sections 1, 2, 3 "Message integrity", 4.5, 5)
------------------------------------------------------------------------

* **Text header**: the line up to and including ``\\n``. It is taken with
  ``recv(MSG_PEEK)`` and then one ``recv`` of exactly the line's length (the
  peeked bytes are already queued, so that ``recv`` returns them all): the same
  bytes, in the same place in the stream, as the abstractor's byte-by-byte
  ``read(fd, &c, 1)`` loop, at a fraction of the system calls. A peek without a
  ``\\n`` consumes what it saw and peeks again (a header split over two sends
  is fine for the real readers too: they block for the next byte).
* **Binary header**: ONE ``os.read(fd, 64)``. Fewer than 64 bytes is a
  ``short_header_read`` (the abstractor logs ``INVALID HEADER``).
* **Body** (DATA only): ONE ``os.read(fd, len)``, as the abstractor
  (``read_loopback7``) and several analyzers do. Fewer than ``len`` bytes is a
  **short read**: what those readers treat as corruption.
* **Strict parse** (section 1): fields in exactly this order, ``name=value``
  each, nothing more, nothing less::

      ip1,ip2,port1,port2,[vlan, loopback7 mode only],hop,l3,l4,event,
          CREATED:   time
          DESTROYED: reason,time
          DATA:      from,match,len,time

  addresses in canonical ``inet_ntop`` form of ``l3``'s family, decimal ports
  and hop without sign or leading zeros, ``\\n`` not ``\\r\\n``, at most 4096
  bytes. Binary (section 2): the 64-byte packed layout; ``event``, ``l3``,
  ``l4`` must be known codes (else framing is unknowable: parse error), and
  ``from``/``match``/``reason``/``len``/IPv4 padding/unused bytes are checked
  (a bad value there is a protocol error; framing still holds).
* Protocol errors that keep framing (counted, reading goes on): endpoint 1 not
  the smaller endpoint (section 1), a zero-length DATA, a DATA ``len`` over
  65535, a second CREATED of a live flow, DESTROYED of an unknown flow, DATA
  ``from`` disagreeing with its ``match`` within a flow.

``reader`` mode: an analyzer on a served flow socket (section 3)
----------------------------------------------------------------

Connects to ``PATH`` (``<home>/tcp/default``, ...) and reads events until end
of file or SIGTERM. A short read is counted (``short_reads``), then the rest of
the body is read (blocking) so that the count can go on over a well-framed
stream. DATA of a flow whose CREATED it did not see is counted
(``data_without_created``) and ignored, as real analyzers ignore it (section
5). A header it cannot parse loses the framing: it is recorded, the reader
closes its socket (the proxy sees it leave) and idles until SIGTERM.
``--throttle MBPS`` keeps the average read rate (every byte read, headers
included, since the first byte) at most MBPS x 10^6 bytes/s. ``--stall-after
BYTES``: after the first whole message that brings the bytes read to BYTES,
stops reading for good and keeps the socket open until killed.

``loopback7`` mode: the abstractor's ``loopback7`` (section 4)
---------------------------------------------------------------

Creates and listens on ``PATH`` and accepts connections one after another (a
new one once the current one closes, as when proxytap reconnects). Reads as
``read_loopback7`` in the original does, and CLOSES the connection
(``shutdown`` + ``close``) where it does, which ends every flow created on that
connection (recorded as ``ended: closed_by_standin``; a connection the writer
closes ends them as ``connection_eof``):

* a short body read: prints ``INVALID BODY LENGTH`` to stderr (4.5);
* DATA ``len`` 0 (the original's ``read`` returns 0 and it closes) or over
  16384 (4.4);
* CREATED or DESTROYED with ``l4=udp`` (4.6: the original crashes);
* a header it cannot parse, a short binary header read, an unknown event
  (stricter than the original, which misframes and goes on, or closes).

DATA of a flow not CREATED on this connection is dropped silently, as the
original does (4.3): counted in ``data_without_created``, not an error.

Summary (``--out FILE``)
------------------------

JSON, written atomically (tmp file + ``rename``) on connect, when idle for 0.1 s
with news, at most every 0.5 s while busy, on a stall, and at the end (EOF in
reader mode, SIGTERM in both). ``flows`` maps the key text
(``ip1=..,ip2=..,port1=..,port2=..,hop=..,l3=..,l4=..``; ``#2`` appended for a
key's second life) to CREATED count, DESTROYED reason, how it ended, and per
``"<from>/<match>"`` stream the DATA bytes, events and sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

MAX_LINE = 4096
HEADER_SIZE = 64
SERVED_MAX = 65535  # the binary len field; served chunks never exceed it (section 3)
LOOPBACK7_MAX = 16384  # section 4.4
IDLE_FLUSH = 0.1  # seconds without data before a pending summary is written
BUSY_FLUSH = 0.5  # at most this long between summaries while data flows
MAX_ERRORS = 50  # error messages kept in the summary (counts are complete)

KEY_NAMES = ("ip1", "ip2", "port1", "port2", "hop", "l3", "l4")
TAIL_NAMES = {
    "CREATED": ("time",),
    "DESTROYED": ("reason", "time"),
    "DATA": ("from", "match", "len", "time"),
}
REASONS = ("NORMAL", "RESET", "TIMEOUT", "COMPROMISED")
MATCHES = ("up", "down", "none")
BIN_EVENTS = {0: "CREATED", 1: "DESTROYED", 2: "DATA"}
BIN_L3 = {0: "ipv4", 41: "ipv6"}
BIN_L4 = {6: "tcp", 17: "udp"}
FAMILY = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


class Terminated(Exception):
    """SIGTERM arrived (raised from the handler, so blocking reads are left at once)."""


class ParseError(Exception):
    """A header whose framing cannot be trusted."""


class Closed(Exception):
    """The loopback7 stand-in closes this connection (``why`` says why)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _on_sigterm(signum: int, frame: Any) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one summary, however many signals
    raise Terminated


# -- headers ------------------------------------------------------------------------------


@dataclass
class Header:
    event: str
    key: str  # "ip1=..,ip2=..,port1=..,port2=..,hop=..,l3=..,l4=.."
    ip1: str
    ip2: str
    port1: int
    port2: int
    hop: int
    l3: str
    l4: str
    from_: int | None = None  # 1 or 2 (DATA)
    match: str | None = None  # up / down / none (DATA)
    length: int = 0  # DATA body length
    reason: str | None = None  # DESTROYED
    time: float = 0.0
    problems: list[str] = field(default_factory=list)  # protocol errors that keep framing


def _uint(text: str, name: str, limit: int) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ParseError(f"{name}={text!r}: not a plain decimal")
    value = int(text)
    if value > limit:
        raise ParseError(f"{name}={value} > {limit}")
    return value


def _time(text: str) -> float:
    body = text[1:] if text.startswith("-") else text
    mant, _, exp = body.partition("e")
    whole, _, frac = mant.partition(".")
    ok = whole.isdigit() and (frac == "" or frac.isdigit()) and "." not in frac
    if exp:
        ok = ok and exp[:1] in "+-" and exp[1:].isdigit()
    if not ok or not text.isascii():
        raise ParseError(f"time={text!r}")
    return float(text)


def _addr16(ip: str, l3: str) -> bytes:
    packed = socket.inet_pton(FAMILY[l3], ip)
    return packed + bytes(16 - len(packed))


def _order_problem(h: Header) -> list[str]:
    a = (_addr16(h.ip1, h.l3), h.port1)
    b = (_addr16(h.ip2, h.l3), h.port2)
    return [] if a <= b else [f"endpoint 1 is not the smaller: {h.key}"]


def parse_text(line: bytes, *, vlan: bool) -> Header:
    """One header line, ``\\n`` included, checked field by field (spec section 1)."""
    if not line.endswith(b"\n"):
        raise ParseError("no \\n")
    body = line[:-1]
    if b"\r" in body:
        raise ParseError("\\r in the header line")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("not ASCII") from None
    items = text.split(",")
    names: list[str] = []
    values: list[str] = []
    for item in items:
        parts = item.split("=")
        if len(parts) != 2 or not parts[0]:
            raise ParseError(f"item {item!r} is not name=value")
        names.append(parts[0])
        values.append(parts[1])
    fields = dict(zip(names, values, strict=True))
    key_names: tuple[str, ...] = KEY_NAMES
    if vlan and len(names) > 4 and names[4] == "vlan":
        key_names = (*KEY_NAMES[:4], "vlan", *KEY_NAMES[4:])
    event = fields.get("event", "")
    if event not in TAIL_NAMES:
        raise ParseError(f"event={event!r}")
    expected = (*key_names, "event", *TAIL_NAMES[event])
    if tuple(names) != expected:
        raise ParseError(f"fields {names} != {list(expected)}")
    l3, l4 = fields["l3"], fields["l4"]
    if l3 not in FAMILY:
        raise ParseError(f"l3={l3!r}")
    if l4 not in ("tcp", "udp"):
        raise ParseError(f"l4={l4!r}")
    for name in ("ip1", "ip2"):
        ip = fields[name]
        try:
            canonical = socket.inet_ntop(FAMILY[l3], socket.inet_pton(FAMILY[l3], ip))
        except (OSError, ValueError):
            raise ParseError(f"{name}={ip!r} is not an {l3} address") from None
        if canonical != ip:
            raise ParseError(f"{name}={ip!r} is not inet_ntop form ({canonical})")
    if "vlan" in fields:
        v = fields["vlan"]
        if not (v[1:] if v.startswith("-") else v).isdigit():
            raise ParseError(f"vlan={v!r}")
    h = Header(
        event=event,
        key=",".join(f"{n}={fields[n]}" for n in KEY_NAMES),
        ip1=fields["ip1"],
        ip2=fields["ip2"],
        port1=_uint(fields["port1"], "port1", 65535),
        port2=_uint(fields["port2"], "port2", 65535),
        hop=_uint(fields["hop"], "hop", 255),
        l3=l3,
        l4=l4,
        time=_time(fields["time"]),
    )
    if event == "DESTROYED":
        if fields["reason"] not in REASONS:
            raise ParseError(f"reason={fields['reason']!r}")
        h.reason = fields["reason"]
    elif event == "DATA":
        if fields["from"] not in ("1", "2"):
            raise ParseError(f"from={fields['from']!r}")
        if fields["match"] not in MATCHES:
            raise ParseError(f"match={fields['match']!r}")
        h.from_ = int(fields["from"])
        h.match = fields["match"]
        h.length = _uint(fields["len"], "len", 2**31)
    h.problems.extend(_order_problem(h))
    return h


def parse_binary(buf: bytes) -> Header:
    """One 64-byte header (spec section 2)."""
    assert len(buf) == HEADER_SIZE
    sec, usec = struct.unpack_from("=qq", buf, 32)
    port1, port2 = struct.unpack_from(">HH", buf, 48)
    event_code, from_code = buf[52], buf[53]
    (length,) = struct.unpack_from("=H", buf, 54)
    hop, l3_code, l4_code, match_code, reason_code = buf[56:61]
    event = BIN_EVENTS.get(event_code)
    l3 = BIN_L3.get(l3_code)
    l4 = BIN_L4.get(l4_code)
    if event is None or l3 is None or l4 is None:
        raise ParseError(f"binary event={event_code} l3={l3_code} l4={l4_code}")
    problems: list[str] = []
    if l3 == "ipv4":
        if buf[4:16] != bytes(12) or buf[20:32] != bytes(12):
            problems.append("IPv4 address with non-zero padding")
        ip1 = socket.inet_ntop(socket.AF_INET, buf[0:4])
        ip2 = socket.inet_ntop(socket.AF_INET, buf[16:20])
    else:
        ip1 = socket.inet_ntop(socket.AF_INET6, buf[0:16])
        ip2 = socket.inet_ntop(socket.AF_INET6, buf[16:32])
    if buf[61:64] != bytes(3):
        problems.append("unused bytes not zero")
    if not 0 <= usec < 1_000_000:
        problems.append(f"tv_usec={usec}")
    key = f"ip1={ip1},ip2={ip2},port1={port1},port2={port2},hop={hop},l3={l3},l4={l4}"
    h = Header(event, key, ip1, ip2, port1, port2, hop, l3, l4, time=sec + usec / 1e6)
    if event == "DATA":
        if from_code not in (0, 1):
            problems.append(f"DATA from={from_code}")
        if match_code > 2:
            problems.append(f"DATA match={match_code}")
        h.from_ = 1 if from_code == 0 else 2
        h.match = MATCHES[match_code] if match_code <= 2 else "none"
        h.length = length
    else:
        if length:
            problems.append(f"{event} with len={length}")
        if event == "DESTROYED":
            if reason_code > 3:
                problems.append(f"reason={reason_code}")
            h.reason = REASONS[reason_code] if reason_code <= 3 else "NORMAL"
        elif reason_code:
            problems.append(f"CREATED with reason={reason_code}")
    h.problems.extend(problems + _order_problem(h))
    return h


# -- bookkeeping ----------------------------------------------------------------------------


class Stream:
    __slots__ = ("bytes", "events", "sha")

    def __init__(self) -> None:
        self.bytes = 0
        self.events = 0
        self.sha = hashlib.sha256()


class FlowRec:
    def __init__(self, h: Header) -> None:
        self.h = h
        self.created = 0
        self.destroyed: str | None = None
        self.ended: str | None = None  # DESTROYED / closed_by_standin / connection_eof
        self.streams: dict[str, Stream] = {}
        self.short_reads = 0
        self.from_by_match: dict[str, int] = {}

    def json(self) -> dict[str, Any]:
        h = self.h
        return {
            "ip1": h.ip1,
            "ip2": h.ip2,
            "port1": h.port1,
            "port2": h.port2,
            "hop": h.hop,
            "l3": h.l3,
            "l4": h.l4,
            "created": self.created,
            "destroyed": self.destroyed,
            "ended": self.ended,
            "short_reads": self.short_reads,
            "streams": {
                k: {"bytes": s.bytes, "events": s.events, "sha256": s.sha.hexdigest()}
                for k, s in sorted(self.streams.items())
            },
        }


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode: str = args.mode
        self.flows: dict[str, FlowRec] = {}  # by unique name (key, "#n" for a key's later lives)
        self.live: dict[str, str] = {}  # key -> unique name, flows CREATED and not ended
        self.lives: dict[str, int] = {}
        self.events = {"CREATED": 0, "DATA": 0, "DESTROYED": 0}
        self.messages = 0
        self.bytes_total = 0
        self.payload_bytes = 0
        self.max_body = 0
        self.short_reads = 0
        self.short_read_details: list[dict[str, Any]] = []  # the first MAX_ERRORS
        self.short_header_reads = 0
        self.data_without_created = 0
        self.data_without_created_bytes = 0
        self.destroyed_without_created = 0
        self.parse_errors = 0
        self.protocol_errors = 0
        self.errors: list[str] = []
        self.udp_datagrams = 0
        self.connected = False
        self.eof = False
        self.stalled = False
        self.closed = False
        self.terminated = False
        self.connections = 0
        self.closed_by_standin = 0
        self.close_reasons: list[str] = []
        self.first_byte: float | None = None
        self.last_byte: float | None = None
        self.idle_seconds = 0.0  # time spent waiting for the next header (in select)
        self.throttle_seconds = 0.0  # time spent sleeping for --throttle
        self.dirty = True
        self.last_write = 0.0

    def error(self, msg: str, *, parse: bool = False) -> None:
        if parse:
            self.parse_errors += 1
        else:
            self.protocol_errors += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)

    def json(self) -> dict[str, Any]:
        a = self.args
        return {
            "mode": self.mode,
            "path": a.path,
            "format": a.format,
            "throttle_mbps": a.throttle,
            "stall_after": a.stall_after,
            "pid": os.getpid(),
            "niceness": os.nice(0),
            "connected": self.connected,
            "eof": self.eof,
            "stalled": self.stalled,
            "closed": self.closed,
            "terminated": self.terminated,
            "events": dict(self.events),
            "messages": self.messages,
            "bytes_total": self.bytes_total,
            "payload_bytes": self.payload_bytes,
            "max_body_len": self.max_body,
            "short_reads": self.short_reads,
            "short_read_details": self.short_read_details,
            "short_header_reads": self.short_header_reads,
            "data_without_created": self.data_without_created,
            "data_without_created_bytes": self.data_without_created_bytes,
            "destroyed_without_created": self.destroyed_without_created,
            "parse_errors": self.parse_errors,
            "protocol_errors": self.protocol_errors,
            "errors": self.errors,
            "udp_datagrams": self.udp_datagrams,
            "connections": self.connections,
            "connections_closed_by_standin": self.closed_by_standin,
            "close_reasons": self.close_reasons,
            "first_byte": self.first_byte,
            "last_byte": self.last_byte,
            "idle_seconds": round(self.idle_seconds, 3),
            "throttle_seconds": round(self.throttle_seconds, 3),
            "cpu_seconds": round(time.process_time(), 3),
            "flows": {k: f.json() for k, f in self.flows.items()},
        }

    def write(self) -> None:
        """The summary, atomically: a reader of ``--out`` never sees half a file."""
        out = self.args.out
        if not out:
            return
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.json(), fh, indent=1, sort_keys=True)
            fh.flush()
        os.replace(tmp, out)
        self.dirty = False
        self.last_write = time.monotonic()

    def maybe_write(self) -> None:
        if self.dirty and time.monotonic() - self.last_write >= BUSY_FLUSH:
            self.write()

    # -- events -----------------------------------------------------------------------------

    def created(self, h: Header) -> FlowRec:
        if h.key in self.live:
            self.error(f"second CREATED of a live flow: {h.key}")
            rec = self.flows[self.live[h.key]]
            rec.created += 1
            return rec
        n = self.lives.get(h.key, 0) + 1
        self.lives[h.key] = n
        name = h.key if n == 1 else f"{h.key}#{n}"
        rec = FlowRec(h)
        rec.created = 1
        self.flows[name] = rec
        self.live[h.key] = name
        return rec

    def flow_of(self, h: Header) -> FlowRec | None:
        name = self.live.get(h.key)
        return None if name is None else self.flows[name]

    def udp_flow(self, h: Header) -> FlowRec:
        rec = self.flows.get(h.key)
        if rec is None:
            rec = self.flows[h.key] = FlowRec(h)
        return rec

    def destroyed(self, h: Header) -> None:
        rec = self.flow_of(h)
        if rec is None:
            self.destroyed_without_created += 1
            self.error(f"DESTROYED of a flow without CREATED: {h.key}")
            return
        rec.destroyed = h.reason
        rec.ended = "DESTROYED"
        del self.live[h.key]

    def end_live(self, keys: set[str], how: str) -> None:
        for key in keys:
            name = self.live.pop(key, None)
            if name is not None:
                self.flows[name].ended = how

    def data(self, h: Header, rec: FlowRec | None, body: bytes | bytearray) -> None:
        self.payload_bytes += len(body)
        if rec is None:
            return
        assert h.match is not None and h.from_ is not None
        if h.l4 == "tcp" and h.match in ("up", "down"):
            seen = rec.from_by_match.setdefault(h.match, h.from_)
            if seen != h.from_:
                self.error(f"match={h.match} from both endpoints in {h.key}")
        s = rec.streams.get(f"{h.from_}/{h.match}")
        if s is None:
            s = rec.streams[f"{h.from_}/{h.match}"] = Stream()
        s.bytes += len(body)
        s.events += 1
        s.sha.update(body)


# -- reading ----------------------------------------------------------------------------------


class Conn:
    """One connection, read with blocking system calls only."""

    def __init__(self, sock: socket.socket, st: State) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.fd = sock.fileno()
        self.st = st
        self.rate = st.args.throttle * 1e6 if st.args.throttle else 0.0
        self._t0 = 0.0  # monotonic time of the first byte (the throttle's origin)

    def _account(self, n: int) -> None:
        st = self.st
        now = time.monotonic()
        if st.first_byte is None:
            st.first_byte = time.time()
            self._t0 = now
        st.last_byte = time.time()
        st.bytes_total += n
        st.dirty = True
        if self.rate:
            ahead = self._t0 + st.bytes_total / self.rate - now
            if ahead > 0:
                time.sleep(ahead)
                st.throttle_seconds += ahead

    def wait_readable(self) -> None:
        """Block until the socket has something (EOF included); write news while idle."""
        while True:
            t = time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], IDLE_FLUSH)
            self.st.idle_seconds += time.monotonic() - t
            if ready:
                return
            if self.st.dirty:
                self.st.write()

    def read_line(self) -> bytes | None:
        """The header line, ``\\n`` included; ``None`` at a clean end of file."""
        line = bytearray()
        while True:
            self.wait_readable()
            peek = self.sock.recv(MAX_LINE + 1, socket.MSG_PEEK)
            if not peek:
                if line:
                    raise ParseError(f"end of file inside a header line: {bytes(line)!r}")
                return None
            i = peek.find(b"\n")
            take = i + 1 if i >= 0 else len(peek)
            got = self.sock.recv(take)
            assert len(got) == take, "peeked bytes were not there to read"
            self._account(take)
            line += got
            if len(line) > MAX_LINE:
                raise ParseError(f"header line over {MAX_LINE} bytes: {bytes(line[:120])!r}")
            if i >= 0:
                return bytes(line)

    def read_header64(self) -> bytes | None:
        self.wait_readable()
        buf = os.read(self.fd, HEADER_SIZE)
        if not buf:
            return None
        self._account(len(buf))
        if len(buf) < HEADER_SIZE:
            self.st.short_header_reads += 1
            if self.st.mode == "loopback7":
                print(
                    f"CAUTION! LOOPBACK 7 RECEIVED INVALID HEADER! got {len(buf)} of 64",
                    file=sys.stderr,
                    flush=True,
                )
                raise Closed(f"short header read: {len(buf)} of {HEADER_SIZE}")
            rest = self.read_rest(HEADER_SIZE - len(buf))
            if rest is None:
                raise ParseError("end of file inside a binary header")
            buf += rest
        return buf

    def read_rest(self, n: int) -> bytes | None:
        """``n`` more bytes, blocking, to keep the framing after a short read."""
        out = bytearray()
        while len(out) < n:
            chunk = os.read(self.fd, n - len(out))
            if not chunk:
                return None
            self._account(len(chunk))
            out += chunk
        return bytes(out)

    def header(self) -> Header | None:
        if self.st.args.format == "binary":
            raw = self.read_header64()
            return None if raw is None else parse_binary(raw)
        line = self.read_line()
        return None if line is None else parse_text(line, vlan=self.st.mode == "loopback7")

    def body(self, h: Header, rec: FlowRec | None) -> bytes | None:
        """The DATA body with ONE ``os.read(fd, len)``; ``None`` on a short read in loopback7."""
        st = self.st
        want = h.length
        body = os.read(self.fd, want)  # the one read real consumers do
        if not body:
            raise EOFError(f"end of file before a {want}-byte body")
        self._account(len(body))
        if len(body) == want:
            return body
        st.short_reads += 1
        if len(st.short_read_details) < MAX_ERRORS:
            # where the read stopped says who split the message: a writer's send boundary,
            # or the kernel's (an AF_UNIX stream send is queued in sk_buffs of at most
            # about 36 KiB; a reader woken by the first may read before the next is queued)
            st.short_read_details.append(
                {"message": st.messages, "len": want, "got": len(body), "key": h.key}
            )
        if rec is not None:
            rec.short_reads += 1
        if st.mode == "loopback7":
            print(
                f"CAUTION! LOOPBACK 7 RECEIVED INVALID BODY LENGTH!: len = {want} "
                f"(read {len(body)})",
                file=sys.stderr,
                flush=True,
            )
            return None
        rest = self.read_rest(want - len(body))
        if rest is None:
            raise EOFError(f"end of file inside a {want}-byte body")
        return body + rest


def note_problems(st: State, h: Header) -> None:
    for p in h.problems:
        st.error(p)


def run_reader(args: argparse.Namespace, st: State) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.path)
    conn = Conn(sock, st)
    st.connected = True
    st.connections = 1
    st.write()
    try:
        while True:
            try:
                h = conn.header()
            except ParseError as exc:
                st.error(f"parse: {exc}", parse=True)
                st.close_reasons.append(f"parse error: {exc}")
                break
            if h is None:
                st.eof = True
                break
            st.messages += 1
            st.events[h.event] += 1
            note_problems(st, h)
            if h.event == "CREATED":
                if h.l4 == "udp":
                    st.error(f"CREATED of a UDP flow: {h.key}")
                st.created(h)
            elif h.event == "DESTROYED":
                if h.l4 == "udp":
                    st.error(f"DESTROYED of a UDP flow: {h.key}")
                st.destroyed(h)
            else:
                if h.length == 0:
                    st.error(f"zero-length DATA: {h.key}")
                elif h.length > SERVED_MAX:
                    st.error(f"DATA len={h.length} > {SERVED_MAX}: {h.key}")
                if h.l4 == "udp":
                    st.udp_datagrams += 1
                    rec: FlowRec | None = st.udp_flow(h)
                else:
                    rec = st.flow_of(h)
                    if rec is None:
                        st.data_without_created += 1
                        st.data_without_created_bytes += h.length
                body = b""
                if h.length:
                    try:
                        got = conn.body(h, rec)
                    except EOFError as exc:
                        st.error(f"parse: {exc}", parse=True)
                        st.eof = True
                        break
                    assert got is not None
                    body = got
                st.max_body = max(st.max_body, len(body))
                st.data(h, rec, body)
            if args.stall_after is not None and st.bytes_total >= args.stall_after:
                st.stalled = True
                st.write()
                while True:  # keep the socket open, read nothing, until SIGTERM
                    time.sleep(3600)
            st.maybe_write()
    finally:
        if not st.stalled:
            st.closed = True
            sock.close()
    if st.eof:
        return
    st.write()
    while True:  # framing lost: socket closed, idle until SIGTERM (the test stops us)
        time.sleep(3600)


def serve_one(conn: Conn, st: State, keys: set[str]) -> str:
    """One loopback7 connection until the writer closes it (returns why) or we do (``Closed``).

    ``keys``: the flows CREATED on this connection and not DESTROYED, kept by the caller
    so that it can end them when the connection goes.
    """
    while True:
        try:
            h = conn.header()
        except ParseError as exc:
            st.error(f"parse: {exc}", parse=True)
            raise Closed(f"invalid header: {exc}") from None
        if h is None:
            return "eof"
        st.messages += 1
        st.events[h.event] += 1
        note_problems(st, h)
        if h.event in ("CREATED", "DESTROYED"):
            if h.l4 == "udp":
                raise Closed(f"{h.event} with l4=udp (the abstractor crashes): {h.key}")
            if h.event == "CREATED":
                st.created(h)
                keys.add(h.key)
            else:
                st.destroyed(h)
                keys.discard(h.key)
            st.maybe_write()
            continue
        if h.length == 0:
            raise Closed(f"DATA len=0 (the abstractor's read returns 0 and it closes): {h.key}")
        if h.length > LOOPBACK7_MAX:
            raise Closed(f"DATA len={h.length} > {LOOPBACK7_MAX}: {h.key}")
        if h.l4 == "udp":
            st.udp_datagrams += 1
            rec: FlowRec | None = st.udp_flow(h)
        else:
            rec = st.flow_of(h) if h.key in keys else None
            if rec is None:  # dropped silently, as the abstractor does
                st.data_without_created += 1
                st.data_without_created_bytes += h.length
        try:
            body = conn.body(h, rec)
        except EOFError:
            return "eof inside a body"
        if body is None:
            raise Closed(f"INVALID BODY LENGTH (len={h.length})")
        st.max_body = max(st.max_body, len(body))
        st.data(h, rec, body)
        st.maybe_write()


def run_loopback7(args: argparse.Namespace, st: State) -> None:
    path = args.path
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    st.connected = True  # "listening", for the test's wait
    st.write()
    while True:
        while not select.select([listener], [], [], IDLE_FLUSH)[0]:
            if st.dirty:
                st.write()
        sock, _ = listener.accept()
        st.connections += 1
        st.write()
        conn = Conn(sock, st)
        keys: set[str] = set()
        try:
            why = serve_one(conn, st, keys)
            st.close_reasons.append(f"connection {st.connections}: writer closed ({why})")
            st.end_live(keys, "connection_eof")
        except Closed as exc:
            st.closed_by_standin += 1
            st.close_reasons.append(f"connection {st.connections}: closed by stand-in: {exc.why}")
            print(f"loopback7 stand-in: closing connection: {exc.why}", file=sys.stderr, flush=True)
            st.end_live(keys, "closed_by_standin")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        st.write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="strict SF-TAP consumer (tests)")
    p.add_argument("mode", choices=["reader", "loopback7"])
    p.add_argument("path", help="flow socket to connect to, or loopback7 socket to listen on")
    p.add_argument("--format", choices=["text", "binary"], default="text")
    p.add_argument("--throttle", type=float, metavar="MBPS", help="read at most MBPS*10^6 B/s")
    p.add_argument("--stall-after", type=int, metavar="BYTES", help="stop reading after BYTES")
    p.add_argument("--out", metavar="FILE", help="JSON summary")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="add N to the scheduling niceness (negative: more CPU; needs privilege, "
        "silently not applied without it; the summary says what was applied)",
    )
    args = p.parse_args(argv)
    if args.nice:
        with contextlib.suppress(PermissionError):
            os.nice(args.nice)
    if args.mode == "loopback7" and (args.throttle or args.stall_after is not None):
        p.error("--throttle and --stall-after are reader options")
    st = State(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.mode == "reader":
            run_reader(args, st)
        else:
            run_loopback7(args, st)
    except Terminated:
        st.terminated = True
    except Exception as exc:  # report, then leave the summary for the test to see
        st.error(f"crashed: {exc!r}", parse=True)
        st.write()
        raise
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    st.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
