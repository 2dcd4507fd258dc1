"""The strict stand-ins are strict: a body split over two sends is caught, a whole one is not.

``strict_consumer.py`` is the oracle of ``test_whole_messages.py``, so it is
checked first, over real AF_UNIX sockets: a test writes SF-TAP messages into
it by hand, splitting one (header and half the body, then, once the consumer
has read all of that, the rest) and sending the others whole, and checks that
the reader counts exactly one short read and that the loopback7 stand-in closes
the connection exactly where the abstractor does (spec section 4.5).

"Once the consumer has read all of that" is a condition, not a pause: the
sender's ``SIOCOUTQ`` (bytes the peer has not read) reaching 0.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import pattern
from tests.export.sftap_helpers import short_tmp
from tests.export.strict_helpers import Consumer, poll, unsent

IP1, IP2, PORT1, PORT2 = "10.0.0.1", "10.0.0.2", 40000, 8080
KEY = f"ip1={IP1},ip2={IP2},port1={PORT1},port2={PORT2},hop=0,l3=ipv4,l4=tcp"
T = 1795300775.5


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


# -- messages, encoded here by hand from the spec --------------------------------------------


def text(
    event: str,
    *,
    l4: str = "tcp",
    port1: int = PORT1,
    tail: str = "",
    vlan: bool = False,
) -> bytes:
    v = "vlan=-1," if vlan else ""
    head = f"ip1={IP1},ip2={IP2},port1={port1},port2={PORT2},{v}hop=0,l3=ipv4,l4={l4}"
    mid = f",{tail}" if tail else ""
    return f"{head},event={event}{mid},time={T!r}\n".encode()


def created(**kw: Any) -> bytes:
    return text("CREATED", **kw)


def destroyed(**kw: Any) -> bytes:
    return text("DESTROYED", tail="reason=NORMAL", **kw)


def data(body: bytes, *, from_: int = 1, match: str = "up", **kw: Any) -> bytes:
    return text("DATA", tail=f"from={from_},match={match},len={len(body)}", **kw) + body


def binary(event: int, *, length: int = 0, from_: int = 3, match: int = 2) -> bytes:
    a1 = socket.inet_aton(IP1) + bytes(12)
    a2 = socket.inet_aton(IP2) + bytes(12)
    return (
        a1
        + a2
        + struct.pack("=qq", int(T), 500000)
        + struct.pack(">HH", PORT1, PORT2)
        + struct.pack("=BBHBBBBB3x", event, from_, length, 0, 0, 6, match, 0)
    )


def bin_data(body: bytes) -> bytes:
    return binary(2, length=len(body), from_=0, match=0) + body


def messages(fmt: str, bodies: list[bytes]) -> list[bytes]:
    """CREATED, one DATA per body (client to server, from=1, match=up), DESTROYED."""
    if fmt == "binary":
        assert len(binary(0)) == 64
        return [binary(0), *(bin_data(b) for b in bodies), binary(1)]
    return [created(), *(data(b) for b in bodies), destroyed()]


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the consumer has closed ``sock`` (EOF or reset on our side)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- a listener the reader connects to ---------------------------------------------------------


class Served:
    """A flow socket served by the test, one reader connected to it."""

    def __init__(self, tmp: Path, fmt: str) -> None:
        self.path = tmp / "tcp-default"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.reader = Consumer("reader", self.path, tmp, "reader", fmt=fmt).start()
        self.conn, _ = self.listener.accept()

    def drained(self) -> None:
        poll(lambda: unsent(self.conn) == 0, 10, "the reader read everything sent")

    def whole(self, msg: bytes) -> None:
        """One message, one ``sendall``, on a socket with room for all of it."""
        self.drained()
        self.conn.sendall(msg)

    def split(self, msg: bytes, at: int) -> None:
        """``msg[:at]`` (header and part of the body), then, once read, the rest."""
        self.drained()
        self.conn.sendall(msg[:at])
        self.drained()
        self.conn.sendall(msg[at:])

    def close(self) -> None:
        self.conn.close()
        self.listener.close()
        self.reader.kill()


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_reader_counts_a_body_split_over_two_sends(tmp: Path, fmt: str) -> None:
    bodies = [pattern(1000), pattern(65535), pattern(20000), pattern(7)]
    msgs = messages(fmt, bodies)
    served = Served(tmp, fmt)
    try:
        served.whole(msgs[0])
        served.whole(msgs[1])
        head = 64 if fmt == "binary" else msgs[2].index(b"\n") + 1
        served.split(msgs[2], head + 30000)  # header + 30000 of 65535 body bytes
        for m in msgs[3:]:
            served.whole(m)
        served.drained()
        served.conn.close()
        s = served.reader.wait(lambda s: s["eof"], 10, "end of file")
    finally:
        served.close()
    assert s["short_reads"] == 1, s
    assert s["short_header_reads"] == 0
    assert (s["parse_errors"], s["protocol_errors"], s["errors"]) == (0, 0, [])
    assert s["events"] == {"CREATED": 1, "DATA": 4, "DESTROYED": 1}
    flow = s["flows"][KEY]
    assert (flow["created"], flow["destroyed"], flow["ended"]) == (1, "NORMAL", "DESTROYED")
    assert flow["short_reads"] == 1
    payload = b"".join(bodies)
    assert flow["streams"] == {
        "1/up": {
            "bytes": len(payload),
            "events": 4,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    }
    assert s["bytes_total"] == sum(map(len, msgs))


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_reader_sees_no_short_read_in_whole_messages(tmp: Path, fmt: str) -> None:
    bodies = [pattern(65535)] * 6 + [pattern(1)]
    msgs = messages(fmt, bodies)
    served = Served(tmp, fmt)
    try:
        for m in msgs:
            served.whole(m)
        served.drained()
        served.conn.close()
        s = served.reader.wait(lambda s: s["eof"], 10, "end of file")
    finally:
        served.close()
    assert (s["short_reads"], s["short_header_reads"], s["parse_errors"]) == (0, 0, 0), s
    assert s["protocol_errors"] == 0, s["errors"]
    assert s["flows"][KEY]["streams"]["1/up"]["bytes"] == sum(map(len, bodies))


def test_reader_split_header_is_not_a_short_read(tmp: Path) -> None:
    """A text header split over two sends: the real readers block for the next byte."""
    msgs = messages("text", [pattern(100)])
    served = Served(tmp, "text")
    try:
        served.whole(msgs[0])
        served.split(msgs[1], 20)  # inside the header line
        served.whole(msgs[2])
        served.drained()
        served.conn.close()
        s = served.reader.wait(lambda s: s["eof"], 10, "end of file")
    finally:
        served.close()
    assert (s["short_reads"], s["parse_errors"], s["protocol_errors"]) == (0, 0, 0), s


def test_reader_counts_orphans_and_misordered_endpoints(tmp: Path) -> None:
    swapped = (
        f"ip1={IP2},ip2={IP1},port1={PORT2},port2={PORT1},hop=0,l3=ipv4,l4=tcp,"
        f"event=CREATED,time={T!r}\n"
    ).encode()
    served = Served(tmp, "text")
    try:
        served.whole(data(b"orphan"))  # DATA of a flow whose CREATED it never saw
        served.whole(swapped)  # endpoint 1 must be the smaller one (spec section 1)
        served.drained()
        served.conn.close()
        s = served.reader.wait(lambda s: s["eof"], 10, "end of file")
    finally:
        served.close()
    assert s["data_without_created"] == 1 and s["data_without_created_bytes"] == 6
    assert s["parse_errors"] == 0
    assert s["protocol_errors"] == 1 and "not the smaller" in s["errors"][0], s["errors"]
    assert s["events"] == {"CREATED": 1, "DATA": 1, "DESTROYED": 0}


@pytest.mark.parametrize(
    "line",
    [
        # ip2 before ip1: an analyzer parsing positionally reads the wrong address
        f"ip2={IP2},ip1={IP1},port1=1,port2=2,hop=0,l3=ipv4,l4=tcp,event=CREATED,time=1.5\n",
        # \r\n
        f"ip1={IP1},ip2={IP2},port1=1,port2=2,hop=0,l3=ipv4,l4=tcp,event=CREATED,time=1.5\r\n",
        # len before match
        f"{KEY},event=DATA,from=1,len=1,match=up,time=1.5\nx",
        # a field without "="
        f"{KEY},event=CREATED,time=1.5,extra\n",
        # not inet_ntop form
        "ip1=10.0.0.01,ip2=10.0.0.2,port1=1,port2=2,hop=0,l3=ipv4,l4=tcp,event=CREATED,time=1\n",
    ],
)
def test_reader_closes_on_a_header_it_cannot_trust(tmp: Path, line: str) -> None:
    served = Served(tmp, "text")
    try:
        served.whole(line.encode())
        served.conn.settimeout(10)
        assert closed_by_peer(served.conn)  # the reader closed its socket
        s = served.reader.wait(lambda s: s["closed"], 10, "closed")
    finally:
        served.close()
    assert s["parse_errors"] == 1, s
    assert s["events"] == {"CREATED": 0, "DATA": 0, "DESTROYED": 0}


# -- the loopback7 stand-in ----------------------------------------------------------------------


class Abstractor:
    """The loopback7 stand-in listening; ``connect`` is proxytap's side."""

    def __init__(self, tmp: Path, fmt: str = "text") -> None:
        self.path = tmp / "loopback7"
        self.proc = Consumer("loopback7", self.path, tmp, "lb7", fmt=fmt).start()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.path))
        s.settimeout(10)
        return s


def send_whole(sock: socket.socket, msg: bytes) -> None:
    poll(lambda: unsent(sock) == 0, 10, "the stand-in read everything sent")
    sock.sendall(msg)


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_loopback7_standin_closes_on_a_split_body(tmp: Path, fmt: str) -> None:
    ab = Abstractor(tmp, fmt)
    try:
        body = pattern(16384)
        if fmt == "binary":
            first, split_msg = binary(0), bin_data(body)
            head = 64
            second = [binary(0), bin_data(body), bin_data(b"tail"), binary(1)]
        else:
            first, split_msg = created(vlan=True), data(body, vlan=True)
            head = split_msg.index(b"\n") + 1
            second = [created(), data(body), data(b"tail"), destroyed()]
        # connection 1: CREATED, then a DATA whose body comes in two sends
        c1 = ab.connect()
        send_whole(c1, first)
        send_whole(c1, split_msg[: head + 8000])
        poll(lambda: unsent(c1) == 0, 10, "the stand-in read the half message")
        assert closed_by_peer(c1)  # it closed the connection, as the abstractor does
        s = ab.proc.wait(lambda s: s["connections_closed_by_standin"] == 1, 10, "closed")
        assert s["flows"][KEY]["ended"] == "closed_by_standin"
        assert s["flows"][KEY]["destroyed"] is None
        assert s["short_reads"] == 1
        assert "INVALID BODY LENGTH" in ab.proc.stderr
        c1.close()
        # connection 2 (a reconnect): every message whole: nothing closed
        c2 = ab.connect()
        for m in second:
            send_whole(c2, m)
        poll(lambda: unsent(c2) == 0, 10, "the stand-in read connection 2")
        c2.close()
        ab.proc.wait(lambda s: len(s["close_reasons"]) == 2, 10, "connection 2 closed by us")
        s = ab.proc.stop()
    finally:
        ab.proc.kill()
    assert s["connections"] == 2
    assert s["connections_closed_by_standin"] == 1, s["close_reasons"]
    assert s["short_reads"] == 1
    flow2 = s["flows"][f"{KEY}#2"]
    assert (flow2["created"], flow2["destroyed"], flow2["ended"]) == (1, "NORMAL", "DESTROYED")
    payload = body + b"tail"
    assert flow2["streams"] == {
        "1/up": {"bytes": len(payload), "events": 2, "sha256": hashlib.sha256(payload).hexdigest()}
    }
    assert flow2["short_reads"] == 0


@pytest.mark.parametrize(
    ("name", "msgs", "closes"),
    [
        ("len 0", [created(), text("DATA", tail="from=1,match=up,len=0")], True),
        ("len 16385", [created(), data(pattern(16385))], True),
        ("udp CREATED", [created(l4="udp")], True),
        ("udp DESTROYED", [destroyed(l4="udp")], True),
        ("bad header", [b"event=CREATED\n"], True),
        ("udp DATA", [data(b"datagram", l4="udp")], False),
        ("DATA without CREATED", [data(b"who?"), created(), data(b"ok"), destroyed()], False),
        ("len 16384 with vlan", [created(vlan=True), data(pattern(16384), vlan=True)], False),
    ],
)
def test_loopback7_standin_close_rules(
    tmp: Path, name: str, msgs: list[bytes], closes: bool
) -> None:
    ab = Abstractor(tmp)
    try:
        c = ab.connect()
        for m in msgs:
            send_whole(c, m)
        if closes:
            assert closed_by_peer(c), name
            s = ab.proc.wait(lambda s: s["connections_closed_by_standin"] == 1, 10, name)
        else:
            poll(lambda: unsent(c) == 0, 10, "everything read")
            c.close()
            s = ab.proc.wait(lambda s: s["close_reasons"], 10, "the writer's close noticed")
        s = ab.proc.stop()
    finally:
        ab.proc.kill()
    assert s["connections_closed_by_standin"] == (1 if closes else 0), s["close_reasons"]
    assert s["short_reads"] == 0
    if name == "DATA without CREATED":
        assert s["data_without_created"] == 1
        assert s["flows"][KEY]["streams"]["1/up"]["bytes"] == 2
    if name == "len 16384 with vlan":
        assert s["flows"][KEY]["streams"]["1/up"]["bytes"] == 16384
        assert s["flows"][KEY]["ended"] == "connection_eof"
