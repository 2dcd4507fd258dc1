"""SOCKS5 UDP ASSOCIATE end to end: a real proxy process, a DNS responder, an RFC 1928 client.

The proxy runs as a real process (``python -m proxytap run --config FILE``,
the harness of ``tests/export/test_whole_messages.py``) with a SOCKS listener,
served SF-TAP flow sockets, the JSON flow log, PCAP files and the admin
server. The client is written here from RFC 1928 (python-socks has no UDP
ASSOCIATE): a blocking TCP control connection and a UDP socket that wraps
every datagram in the section 7 header by hand (not with proxytap's
``udp_header``). The destination is a DNS responder on 127.0.0.1 that parses
each query strictly (one question, well-formed name, nothing after it) and
answers it with an A record: a real DNS exchange, which tshark dissects as
such. The ``udp/dns`` socket is read by ``strict_consumer.py`` (an SF-TAP
analyzer's reads: no CREATED or DESTROYED may come for UDP).

Oracles independent of proxytap: the client's UDP address is its own
socket's ``getsockname``, the destination's is where the responder listens,
the payloads are what the client sent and the responder answered (recorded
by each); drops are read from ``/metrics`` as deltas around each case.
The responder's port is not 53 (tests do not bind privileged ports), so the
config adds it to the ``dns`` rule, as an operator would for a resolver on
another port.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.export.sftap_helpers import short_tmp
from tests.export.strict_helpers import Consumer, poll
from tests.export.test_whole_messages import Proxy, total, wait_readers

Endpoint = tuple[str, int]
DENY_RULE = "no-second-resolver"
MAX_DESTINATIONS = 3  # limits.max_udp_destinations of the shared proxy

# -- a DNS responder ---------------------------------------------------------------------------


def dns_query(qid: int, name: str) -> bytes:
    """A standard query (RD set) for the A record of ``name``, as a stub resolver sends it."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def parse_query(msg: bytes) -> tuple[int, bytes]:
    """(id, question) of a well-formed standard query; ``ValueError`` for anything else."""
    if len(msg) < 12:
        raise ValueError("short header")
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    if flags & 0x8000 or (flags >> 11) & 0xF or (qd, an, ns, ar) != (1, 0, 0, 0):
        raise ValueError(f"not a standard query with one question: {msg[:12].hex()}")
    i = 12
    total_len = 0
    while True:
        if i >= len(msg):
            raise ValueError("name runs past the message")
        n = msg[i]
        i += 1
        if n == 0:
            break
        if n > 63:
            raise ValueError("label longer than 63 (or a pointer, which a question lacks)")
        total_len += n + 1
        i += n
    if total_len > 255 or i + 4 != len(msg):
        raise ValueError("bad name length or bytes after the question")
    return qid, msg[12 : i + 4]


class DnsResponder:
    """A UDP DNS server on 127.0.0.1 (a thread): answers every valid query with an A record."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr: Endpoint = self.sock.getsockname()
        self.queries: list[tuple[bytes, Endpoint]] = []
        self.answers: list[bytes] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                msg, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                qid, question = parse_query(msg)
            except ValueError as exc:
                with self.lock:
                    self.errors.append(str(exc))
                continue
            n = len(self.answers) % 250 + 1
            answer = (
                struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
                + question
                + struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4)
                + bytes([192, 0, 2, n])
            )
            with self.lock:
                self.queries.append((msg, src))
                self.answers.append(answer)
            self.sock.sendto(answer, src)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


# -- an RFC 1928 UDP ASSOCIATE client ----------------------------------------------------------


def _addr_field(host: str) -> bytes:
    try:
        return b"\x01" + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        name = host.encode()
        return b"\x03" + bytes([len(name)]) + name


def wrap(dst: Endpoint, payload: bytes, frag: int = 0) -> bytes:
    """RFC 1928 section 7: RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA."""
    return b"\x00\x00" + bytes([frag]) + _addr_field(dst[0]) + struct.pack("!H", dst[1]) + payload


def unwrap(datagram: bytes) -> tuple[Endpoint, bytes]:
    assert datagram[:3] == b"\x00\x00\x00", datagram[:8]
    atyp = datagram[3]
    assert atyp in (1, 4), atyp
    n = 4 if atyp == 1 else 16
    host = socket.inet_ntop(socket.AF_INET if atyp == 1 else socket.AF_INET6, datagram[4 : 4 + n])
    (port,) = struct.unpack("!H", datagram[4 + n : 6 + n])
    return (host, port), datagram[6 + n :]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"control connection closed after {out!r}"
        out += chunk
    return out


class UdpClient:
    """A SOCKS5 client with one UDP association (control connection + its own UDP socket)."""

    def __init__(self, socks: Endpoint, *, announce_port: bool = False) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(10)
        self.addr: Endpoint = self.udp.getsockname()
        self.ctl = socket.create_connection(socks, timeout=10)
        self.ctl.sendall(b"\x05\x01\x00")
        assert recv_exact(self.ctl, 2) == b"\x05\x00"
        # DST.ADDR/DST.PORT: where datagrams will come from (zeros: not known yet)
        src = self.addr if announce_port else ("0.0.0.0", 0)
        self.ctl.sendall(b"\x05\x03\x00" + _addr_field(src[0]) + struct.pack("!H", src[1]))
        head = recv_exact(self.ctl, 4)
        assert head[:3] == b"\x05\x00\x00", f"UDP ASSOCIATE refused: {head!r}"
        assert head[3] == 1, head
        addr = recv_exact(self.ctl, 6)
        self.relay: Endpoint = (socket.inet_ntop(socket.AF_INET, addr[:4]), addr[4] << 8 | addr[5])

    def send(self, dst: Endpoint, payload: bytes, frag: int = 0) -> None:
        self.udp.sendto(wrap(dst, payload, frag), self.relay)

    def recv(self) -> tuple[Endpoint, bytes]:
        data, src = self.udp.recvfrom(65535)
        assert src == self.relay, f"datagram from {src}, not the relay {self.relay}"
        return unwrap(data)

    def ask(self, dst: Endpoint, qid: int, name: str) -> tuple[bytes, bytes]:
        """One DNS exchange through the relay: (query, answer); the answer comes from ``dst``."""
        query = dns_query(qid, name)
        self.send(dst, query)
        src, answer = self.recv()
        assert src == dst, f"answer from {src}, not from {dst}"
        assert answer[:2] == query[:2] and answer[2] & 0x80, answer[:4].hex()
        return query, answer

    def close(self) -> None:
        self.ctl.close()
        self.udp.close()


# -- the proxy under test ----------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    home: Path
    proxy: Proxy
    dns: DnsResponder
    denied: DnsResponder  # a second resolver an access rule denies
    reader: Consumer  # strict reader on udp/dns

    @property
    def socks(self) -> Endpoint:
        return self.proxy.socks

    def metric(self, name: str, **labels: str) -> float:
        return total(self.proxy.metrics(), name, **labels)

    def dropped(self, reason: str) -> float:
        return self.metric("proxytap_udp_dropped_datagrams_total", listener="socks", reason=reason)

    def flow_log(self) -> list[dict[str, Any]]:
        path = self.home / "flows.json"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def start_proxy(home: Path, rules_ports: list[int], extra: str) -> Proxy:
    proxy = Proxy(
        home,
        {"sftap_home": str(home / "sf")},
        rules=[{"name": "dns", "l4": "udp", "port": [53, 5353, 5355, *rules_ports]}],
        args=("--log-flows", str(home / "flows.json"), "--log-level", "debug"),
    )
    proxy.config.write_text(proxy.config.read_text() + extra)
    return proxy.start()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with short_tmp() as home:
        dns, denied = DnsResponder(), DnsResponder()
        extra = (
            f'\n[[access.rules]]\nname = "{DENY_RULE}"\naction = "deny"\n'
            f'ports = ["{denied.addr[1]}"]\n'
            f'\n[upstream]\nprefer = "ipv4"\n'
            f"\n[limits]\nmax_udp_destinations = {MAX_DESTINATIONS}\n"
            f'\n[export.pcap]\ndir = "{home / "pcap"}"\n'
        )
        proxy = start_proxy(home, [dns.addr[1], denied.addr[1]], extra)
        reader = None
        try:
            reader = Consumer("reader", home / "sf" / "udp" / "dns", home, "udpdns").start()
            wait_readers(proxy, 1)
            yield Env(home, proxy, dns, denied, reader)
        finally:
            if reader is not None:
                reader.kill()
            proxy.stop()
            dns.close()
            denied.close()


def spec_key(a: Endpoint, b: Endpoint) -> str:
    """The SF-TAP key text of a UDP/IPv4 flow: endpoint 1 the smaller (address, then port)."""
    (ip1, p1), (ip2, p2) = sorted([a, b], key=lambda e: (socket.inet_aton(e[0]), e[1]))
    return f"ip1={ip1},ip2={ip2},port1={p1},port2={p2},hop=0,l3=ipv4,l4=udp"


def sha(chunks: list[bytes]) -> str:
    return hashlib.sha256(b"".join(chunks)).hexdigest()


# -- cases -------------------------------------------------------------------------------------


def test_dns_through_the_relay_exported_with_true_endpoints(env: Env) -> None:
    relayed_up = env.metric("proxytap_udp_datagrams_total", listener="socks", direction="upstream")
    client = UdpClient(env.socks)
    try:
        assert client.relay[0] == "127.0.0.1" and client.relay != env.socks
        exchanges = [client.ask(env.dns.addr, 0x1000 + i, f"host{i}.example") for i in range(3)]
        assert env.metric("proxytap_udp_associations_active", listener="socks") >= 1
    finally:
        client.close()
    queries = [q for q, _ in exchanges]
    answers = [a for _, a in exchanges]
    with env.dns.lock:
        seen = [(q, src) for q, src in env.dns.queries if q in queries]
        assert not env.dns.errors, env.dns.errors
    assert [q for q, _ in seen] == queries  # each query arrived once, unaltered
    assert all(src[1] != client.addr[1] for _, src in seen)  # from the proxy, not the client

    # the udp/dns flow socket: DATA only, keyed by the client's UDP address and the resolver's
    key = spec_key(client.addr, env.dns.addr)
    summary = env.reader.wait(
        lambda s: (
            key in s["flows"] and sum(x["events"] for x in s["flows"][key]["streams"].values()) >= 6
        ),
        15,
        "the exchange on udp/dns",
    )
    flow = summary["flows"][key]
    client_is_1 = (socket.inet_aton(client.addr[0]), client.addr[1]) < (
        socket.inet_aton(env.dns.addr[0]),
        env.dns.addr[1],
    )
    client_from, server_from = ("1", "2") if client_is_1 else ("2", "1")
    streams = flow["streams"]
    assert set(streams) == {f"{client_from}/none", f"{server_from}/none"}, streams
    assert streams[f"{client_from}/none"]["events"] == 3
    assert streams[f"{client_from}/none"]["sha256"] == sha(queries)
    assert streams[f"{server_from}/none"]["events"] == 3
    assert streams[f"{server_from}/none"]["sha256"] == sha(answers)
    assert flow["created"] == 0 and flow["destroyed"] is None
    assert summary["events"]["CREATED"] == 0 and summary["events"]["DESTROYED"] == 0
    assert summary["parse_errors"] == 0 and summary["protocol_errors"] == 0, summary["errors"]
    assert summary["short_reads"] == 0

    # the JSON flow log: one UDP flow, ended when the control connection closed
    def logged() -> dict[str, Any] | None:
        for rec in env.flow_log():
            if rec["id.orig_p"] == client.addr[1] and rec["proto"] == "udp":
                return rec
        return None

    rec = poll(logged, 15, "the UDP flow in the flow log")
    assert (rec["id.orig_h"], rec["id.orig_p"]) == client.addr
    assert (rec["id.resp_h"], rec["id.resp_p"]) == env.dns.addr
    assert rec["service"] == "dns" and rec["tunnel"] == "socks5"
    assert rec["orig_bytes"] == sum(map(len, queries))
    assert rec["resp_bytes"] == sum(map(len, answers))
    assert (rec["orig_chunks"], rec["resp_chunks"]) == (3, 3)
    assert rec["close_reason"] == "normal"
    assert (
        env.metric("proxytap_udp_datagrams_total", listener="socks", direction="upstream")
        >= relayed_up + 3
    )


def test_dns_by_name_resolved_by_the_proxy(env: Env) -> None:
    """ATYP 3: the proxy resolves ``localhost`` (kept per association: one lookup)."""
    client = UdpClient(env.socks)
    try:
        for i in range(2):
            query = dns_query(0x2000 + i, "by-name.example")
            client.send(("localhost", env.dns.addr[1]), query)
            src, answer = client.recv()
            assert src == env.dns.addr  # the answer names the address it came from
            assert answer[:2] == query[:2]
    finally:
        client.close()

    def logged() -> dict[str, Any] | None:
        for rec in env.flow_log():
            if rec["id.orig_p"] == client.addr[1]:
                return rec
        return None

    rec = poll(logged, 15, "the by-name flow in the flow log")
    assert rec["requested_host"] == "localhost" and rec["requested_port"] == env.dns.addr[1]
    assert (rec["id.resp_h"], rec["id.resp_p"]) == env.dns.addr
    assert rec["orig_chunks"] == 2


def test_foreign_fragment_and_malformed_datagrams_are_dropped(env: Env) -> None:
    before = {r: env.dropped(r) for r in ("foreign_source", "fragment", "malformed")}
    client = UdpClient(env.socks)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    try:
        client.ask(env.dns.addr, 0x3000, "pin.example")  # pins the client's port
        foreign = dns_query(0x3001, "foreign.example")
        stranger.sendto(wrap(env.dns.addr, foreign), client.relay)
        fragment = dns_query(0x3002, "fragment.example")
        client.send(env.dns.addr, fragment, frag=1)
        client.udp.sendto(b"\x00\x00\x00\x09junk", client.relay)  # unknown ATYP
        # the relay handles datagrams in order: once this is answered, all above were seen
        client.ask(env.dns.addr, 0x3003, "after.example")
    finally:
        stranger.close()
        client.close()
    with env.dns.lock:
        got = [q for q, _ in env.dns.queries]
    assert foreign not in got and fragment not in got
    assert env.dropped("foreign_source") == before["foreign_source"] + 1
    assert env.dropped("fragment") == before["fragment"] + 1
    assert env.dropped("malformed") == before["malformed"] + 1


def test_announced_client_port_is_the_only_source(env: Env) -> None:
    """DST.ADDR/DST.PORT of the request name the client's socket: nothing else is taken."""
    before = env.dropped("foreign_source")
    client = UdpClient(env.socks, announce_port=True)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    try:
        # sent first: without the announced port it would have pinned the association
        other.sendto(wrap(env.dns.addr, dns_query(0x4000, "first.example")), client.relay)
        client.ask(env.dns.addr, 0x4001, "announced.example")
    finally:
        other.close()
        client.close()
    assert env.dropped("foreign_source") == before + 1


def test_denied_destinations_are_dropped_and_counted(env: Env) -> None:
    by_rule = env.metric("proxytap_policy_denied_total", listener="socks", rule=DENY_RULE)
    by_range = env.metric(
        "proxytap_policy_denied_total", listener="socks", rule="default-deny:documentation"
    )
    denied = env.dropped("denied")
    client = UdpClient(env.socks)
    try:
        blocked = dns_query(0x5000, "blocked.example")
        client.send(env.denied.addr, blocked)  # an [[access.rules]] deny
        client.send(("192.0.2.1", 53), dns_query(0x5001, "range.example"))  # default-denied
        client.ask(env.dns.addr, 0x5002, "allowed.example")  # in order: the two were judged
    finally:
        client.close()
    with env.denied.lock:
        assert env.denied.queries == []
    assert env.metric("proxytap_policy_denied_total", listener="socks", rule=DENY_RULE) == (
        by_rule + 1
    )
    assert (
        env.metric(
            "proxytap_policy_denied_total", listener="socks", rule="default-deny:documentation"
        )
        == by_range + 1
    )
    assert env.dropped("denied") == denied + 2


def test_only_destinations_the_client_sent_to_may_answer(env: Env) -> None:
    """A datagram to the proxy's upstream socket from elsewhere never reaches the client."""
    before = env.dropped("unsolicited")
    client = UdpClient(env.socks)
    intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intruder.bind(("127.0.0.1", 0))
    try:
        query, _ = client.ask(env.dns.addr, 0x8000, "who.example")
        with env.dns.lock:
            (upstream,) = [src for q, src in env.dns.queries if q == query]
        intruder.sendto(b"not an answer", upstream)  # the proxy's socket, as the resolver saw it
        client.ask(env.dns.addr, 0x8001, "next.example")  # the client gets answers, and only those
        # datagrams on one socket are handled in order: the intruder's came before that answer
        assert env.dropped("unsolicited") == before + 1
    finally:
        intruder.close()
        client.close()


def test_destinations_per_association_are_bounded(env: Env) -> None:
    before = env.dropped("destination_limit")
    client = UdpClient(env.socks)
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(MAX_DESTINATIONS)]
    try:
        client.ask(env.dns.addr, 0x9000, "first.example")
        for s in sinks:
            s.bind(("127.0.0.1", 0))
            s.settimeout(10)
        for i, s in enumerate(sinks[: MAX_DESTINATIONS - 1]):  # up to the limit: relayed
            client.send(s.getsockname(), b"hello %d" % i)
            assert s.recv(100) == b"hello %d" % i
        client.send(sinks[-1].getsockname(), b"one too many")
        client.ask(env.dns.addr, 0x9001, "known.example")  # a known destination still works
        sinks[-1].setblocking(False)
        with pytest.raises(BlockingIOError):  # loopback delivers at send: nothing was sent
            sinks[-1].recv(100)
    finally:
        for s in sinks:
            s.close()
        client.close()
    assert env.dropped("destination_limit") == before + 1


def test_control_connection_close_ends_the_association(env: Env) -> None:
    client = UdpClient(env.socks)
    client.ask(env.dns.addr, 0x6000, "before-close.example")
    client.close()
    poll(
        lambda: env.metric("proxytap_udp_associations_active", listener="socks") == 0,
        15,
        "the association ended",
    )
    # a connected UDP socket hears the port unreachable of a closed relay (an open one
    # would drop this foreign datagram in silence, or relay it from the client's address)
    late = dns_query(0x6001, "after-close.example")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(10)
    try:
        probe.connect(client.relay)
        probe.send(wrap(env.dns.addr, late))
        with pytest.raises(ConnectionRefusedError):
            probe.recv(65535)
    finally:
        probe.close()
    with env.dns.lock:
        assert late not in [q for q, _ in env.dns.queries]


def test_pcap_has_the_dns_exchange_with_true_endpoints(env: Env) -> None:
    client = UdpClient(env.socks)
    try:
        query, answer = client.ask(env.dns.addr, 0x7000, "pcap.example")
    finally:
        client.close()
    pcap_dir = env.home / "pcap"
    fields = ("ip.src", "udp.srcport", "ip.dst", "udp.dstport", "dns.id", "udp.payload")

    def rows() -> list[list[str]] | None:
        files = sorted(pcap_dir.glob("*.pcap"))
        if not files:
            return None
        out = subprocess.run(
            ["tshark", "-r", str(files[-1]), "-Y", "dns.id == 0x7000", "-T", "fields"]
            + [a for f in fields for a in ("-e", f)]
            + ["-o", "udp.check_checksum:TRUE", "-d", f"udp.port=={env.dns.addr[1]},dns"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        got = [line.split("\t") for line in out.stdout.splitlines() if line]
        return got if len(got) >= 2 else None

    got = poll(rows, 30, "the DNS exchange in the pcap file", every=0.5)
    c, s = client.addr, env.dns.addr
    assert got == [
        [c[0], str(c[1]), s[0], str(s[1]), "0x7000", query.hex()],
        [s[0], str(s[1]), c[0], str(c[1]), "0x7000", answer.hex()],
    ]


def test_idle_association_ends() -> None:
    """No datagram for ``timeouts.udp_idle``: the proxy closes the control connection."""
    with short_tmp() as home:
        proxy = start_proxy(home, [], "\n[timeouts]\nudp_idle = 0.5\n")
        try:
            client = UdpClient(proxy.socks)
            try:
                client.ctl.settimeout(15)
                assert client.ctl.recv(1) == b""  # closed by the proxy (bounded by the timeout)
            finally:
                client.close()
            assert total(proxy.metrics(), "proxytap_udp_associations_active", listener="socks") == 0
            assert total(proxy.metrics(), "proxytap_udp_associations_total", listener="socks") == 1
            assert "no datagram for 0.5s" in proxy.log_text()
        finally:
            proxy.stop()
