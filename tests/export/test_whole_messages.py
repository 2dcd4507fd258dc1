"""Issue J acceptance: every exported message reaches real-style consumers whole.

The proxy runs as a real process (``python -m proxytap run --config FILE``),
real clients (curl through CONNECT with ``--proxytunnel``, curl
``--socks5-hostname``, curl through the plain-HTTP forwarder, a raw-socket
CONNECT client) fetch from fast local origins (threads of this process on
127.0.0.1), and the flows are read by ``strict_consumer.py`` processes, which
read as SF-TAP's analyzers and abstractor do: the header line, then the body
with ONE ``read(len)``; the loopback7 stand-in closes the connection on a
short read, as the abstractor does (spec sections 3 "Message integrity", 4.5).

Oracles, independent of proxytap:

* what the client got: curl's body piped into ``sha256sum``, curl's own
  ``size_download`` and ``time_total``, and curl's ``local_port`` (the flow's
  client endpoint);
* what crossed the tunnel: the origin records every byte it received (the
  ``up`` direction) and hashes every byte it sent (head and body, ``down``);
  each request carries a tag, so origin records and curl runs pair up;
* what the consumer got: its summary (per flow key, per ``from/match``
  stream: bytes, events and sha256; short reads; parse errors);
* drops and waits: the admin server's ``/metrics``.

Cases, and how their transfers run:

* served sockets, default export config: three CONNECT downloads at once,
  then three SOCKS5 downloads at once, all read on ``tcp/http`` (strict
  readers on ``tcp/http_client``, ``tcp/http_proxy`` and ``tcp/default`` must
  stay silent): every byte, no short read, no drop;
* ``--loopback7`` into the abstractor stand-in (``--export-overload wait``),
  the same six downloads: no connection closed, no reconnect, every byte;
* ``wait`` with a reader throttled to 20 MB/s: one download, sha256-exact,
  no drop, and no faster than the reader allows (a lower bound only);
* ``wait`` with a reader that stops (``max_wait`` 2 s): the download resumes
  after ``max_wait`` and completes, drops are counted, and a plain GET whose
  flow goes to another socket is served meanwhile;
* ``drop`` with a reader that stops: the download does not wait at all, drops
  are counted, the reader's framing holds;
* an unknown line protocol reaches ``tcp/default`` while the connection is
  open, within ``classify_timeout`` + 2 s.

The 256 MiB variants are ``slow`` (``make test-slow``); the same cases run
with 8 to 32 MiB in the normal suite. ``PROXYTAP_UNDER_TEST=DIR`` runs the
proxy from another tree (``DIR/proxytap``), e.g. an older commit's export.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BLOCK, pattern_sha256
from tests.export.sftap_helpers import short_tmp
from tests.export.strict_helpers import Consumer, poll, stop_process

MiB = 1 << 20
SLOW_TIMEOUT = 900  # seconds, for the 256 MiB variants (pytest's default is 120)
PROXYTAP = [sys.executable, "-m", "proxytap"]  # proxytap/__main__.py
# Extra PYTHONPATH for the proxy process (empty: the installed proxytap). Lets a
# scratch run point the same tests at another tree (e.g. an older commit).
PROXY_PYTHONPATH = os.environ.get("PROXYTAP_UNDER_TEST", "")

# Two cores run the proxy, its consumers and the load (curl, sha256sum, the origin), and
# other test runs besides. Where a consumer must keep up (the zero-drop cases), it asks for
# more CPU (niceness -10, applied when permitted) and the clients run at +10: the
# assertions then say what the proxy does for a consumer that keeps up, not what the
# scheduler did to one.
FAST = -10
LOAD_NICE = ("nice", "-n", "10")

SLOW = (pytest.mark.slow, pytest.mark.timeout(SLOW_TIMEOUT))
# (format, bytes per download): both formats fast, the 256 MiB run in text
FORMATS_SIZES = [
    pytest.param("text", 8 * MiB, id="text-8MiB"),
    pytest.param("binary", 8 * MiB, id="binary-8MiB"),
    pytest.param("text", 256 * MiB, id="text-256MiB", marks=SLOW),
]


def clean_env() -> dict[str, str]:
    """The environment without proxy variables (curl would honour them)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


@pytest.fixture
def home() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


# -- origins (threads of this process, blocking sockets) ----------------------------------------


@dataclasses.dataclass
class OriginConn:
    received: bytearray = dataclasses.field(default_factory=bytearray)
    sent: int = 0
    sent_sha: str = ""
    done: bool = False
    eof: bool = False  # the client side closed
    error: str = ""


class Server:
    """A threaded TCP server on 127.0.0.1; ``handle`` runs per connection."""

    def __init__(self, handle: Callable[[socket.socket, OriginConn], str | None]) -> None:
        self.handle = handle
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.conns: dict[str, OriginConn] = {}  # finished, by tag
        self.untagged: list[OriginConn] = []  # finished, without a tag
        self.started: list[OriginConn] = []  # every connection, from its start
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        rec = OriginConn()
        with self.lock:
            self.started.append(rec)
        conn.settimeout(120)
        try:
            tag = self.handle(conn, rec)
        except OSError as exc:
            rec.error = repr(exc)
            tag = None
        finally:
            conn.close()
        rec.done = True
        with self.lock:
            if tag is None:
                self.untagged.append(rec)
            else:
                self.conns[tag] = rec

    def record(self, tag: str, within: float = 30.0) -> OriginConn:
        def get() -> OriginConn | None:
            with self.lock:
                return self.conns.get(tag)

        return poll(get, within, f"origin connection {tag!r} finished")

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.accepter.join(5)


def response_head(n: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {n}\r\nConnection: close\r\n\r\n"
    ).encode()


def expected_down_sha(n: int) -> str:
    """sha256 of what the HTTP origin sends for ``n``: the head, then ``pattern(n)``."""
    h = hashlib.sha256(response_head(n))
    reps, rest = divmod(n, len(BLOCK))
    for _ in range(reps):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


REQUEST = re.compile(rb"GET /bytes/(\d+)\?tag=([\w.-]+) HTTP/1\.[01]\r\n")


def serve_http(conn: socket.socket, rec: OriginConn) -> str | None:
    """``GET /bytes/N?tag=T``: a fixed head, ``pattern(N)``, FIN; then read to EOF."""
    while b"\r\n\r\n" not in rec.received:
        chunk = conn.recv(65536)
        if not chunk:
            rec.eof = True
            return None
        rec.received += chunk
        if len(rec.received) > 65536:
            return None
    m = REQUEST.match(rec.received)
    if m is None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return None
    n, tag = int(m[1]), m[2].decode()
    head = response_head(n)
    h = hashlib.sha256(head)
    conn.sendall(head)
    sent = len(head)
    block = memoryview(BLOCK)
    left = n
    while left:
        piece = block[: min(left, len(block))]
        conn.sendall(piece)
        h.update(piece)
        sent += len(piece)
        left -= len(piece)
    rec.sent = sent
    rec.sent_sha = h.hexdigest()
    conn.shutdown(socket.SHUT_WR)
    while chunk := conn.recv(65536):  # whatever else the client sends, until it closes
        rec.received += chunk
    rec.eof = True
    return tag


HELLO = b"HELLO proxytap 1234\n"
WORLD = b"WORLD proxytap 5678\n"
assert len(HELLO) == len(WORLD) == 20


def serve_line(conn: socket.socket, rec: OriginConn) -> str | None:
    """An unknown line protocol: 20 bytes in, 20 bytes out, then open until the client closes."""
    while len(rec.received) < len(HELLO):
        chunk = conn.recv(len(HELLO) - len(rec.received))
        if not chunk:
            return None
        rec.received += chunk
    conn.sendall(WORLD)
    rec.sent = len(WORLD)
    while chunk := conn.recv(65536):
        rec.received += chunk
    rec.eof = True
    return None


@pytest.fixture
def origin() -> Iterator[Server]:
    s = Server(serve_http)
    yield s
    s.close()


# -- the proxy process ----------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


Metrics = list[tuple[str, dict[str, str], float]]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Proxy:
    """``python -m proxytap run --config FILE`` with an HTTP and a SOCKS listener and admin."""

    def __init__(
        self,
        workdir: Path,
        export: dict[str, Any],
        *,
        rules: list[dict[str, Any]] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        lines = [
            '[[listeners]]\nkind = "http"\naddress = "127.0.0.1:0"\nname = "http"\n',
            '[[listeners]]\nkind = "socks"\naddress = "127.0.0.1:0"\nname = "socks"\n',
            '[admin]\naddress = "127.0.0.1:0"\n',
            '[access]\nallow_dest = ["127.0.0.0/8", "::1/128"]\nconnect_ports = ["1-65535"]\n',
            "[export]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in export.items()),
        ]
        lines += [
            "[[export.rules]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in rule.items())
            for rule in rules or []
        ]
        self.config = workdir / "proxytap.toml"
        self.config.write_text("\n".join(lines))
        self.log = workdir / "proxytap.log"
        self.argv = [*PROXYTAP, "run", "--config", str(self.config), *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: tuple[str, int] = ("", 0)
        self.socks: tuple[str, int] = ("", 0)
        self.admin = ""

    def start(self, within: float = 30.0) -> Proxy:
        env = clean_env()
        if PROXY_PYTHONPATH:
            env["PYTHONPATH"] = PROXY_PYTHONPATH
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=self.log.parent
            )

        def ready() -> bool:
            text = self.log_text()
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"proxytap exited {self.proc.returncode}:\n{text[-3000:]}")
            return "proxytap ready" in text

        poll(ready, within, "proxytap ready")
        text = self.log_text()
        for name in ("http", "socks"):
            m = re.search(rf"listening: {name} on (\S+):(\d+)", text)
            assert m, text
            setattr(self, name, (m[1], int(m[2])))
        m = re.search(r"admin: serving (http://\S+)/metrics", text)
        assert m, text
        self.admin = m[1]
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def http_url(self) -> str:
        return "http://{}:{}".format(*self.http)

    @property
    def socks_addr(self) -> str:
        return "{}:{}".format(*self.socks)

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: Metrics = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = SAMPLE.match(line)
            assert m, line
            labels = dict(LABEL.findall(m[2] or ""))
            out.append((m[1], labels, float(m[3])))
        return out

    def stop(self) -> int:
        assert self.proc is not None
        return stop_process(self.proc, grace=20)


def samples(metrics: Metrics, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (lab, v)
        for n, lab, v in metrics
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    ]


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` matching ``labels``; the metric must be there."""
    found = samples(metrics, name, **labels)
    assert found, f"no {name}{labels} in /metrics"
    return sum(v for _, v in found)


def wait_readers(proxy: Proxy, count: int) -> None:
    """The proxy has accepted ``count`` flow-socket readers (its own gauge says so)."""
    poll(
        lambda: total(proxy.metrics(), "proxytap_export_subscribers", sink="sftap") == count,
        15,
        f"{count} readers connected",
        every=0.05,
    )


# -- clients ------------------------------------------------------------------------------------


class Curl:
    """One curl download, its body hashed by ``sha256sum`` as it arrives."""

    WRITE_OUT = (
        "%{stderr}CURL %{local_ip} %{local_port} %{size_download} %{time_total} %{http_code}\n"
    )

    def __init__(self, workdir: Path, via: list[str], url: str, tag: str, max_time: float) -> None:
        self.tag = tag
        self.errfile = workdir / f"curl-{tag}.err"
        self.argv = [
            *LOAD_NICE,
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            str(max_time),
            *via,
            url,
            "-o",
            "-",
            "-w",
            self.WRITE_OUT,
        ]
        self.started = 0.0
        self.ended: float | None = None
        self.curl: subprocess.Popen[bytes] | None = None
        self.hasher: subprocess.Popen[bytes] | None = None

    def start(self) -> Curl:
        with open(self.errfile, "wb") as err:
            self.started = time.monotonic()
            self.curl = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=err, env=clean_env()
            )
        assert self.curl.stdout is not None
        self.hasher = subprocess.Popen(
            [*LOAD_NICE, "sha256sum"], stdin=self.curl.stdout, stdout=subprocess.PIPE
        )
        self.curl.stdout.close()  # sha256sum holds the pipe now
        return self

    def done(self) -> bool:
        assert self.curl is not None
        if self.ended is None and self.curl.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    def result(self) -> CurlResult:
        assert self.curl is not None and self.hasher is not None
        rc = self.curl.wait(5)
        out, _ = self.hasher.communicate(timeout=30)
        err = self.errfile.read_text(errors="replace")
        m = re.search(r"^CURL (\S+) (\d+) (\d+) ([\d.]+) (\d+)$", err, re.M)
        assert m, f"curl {self.tag}: rc={rc}: {err}"
        return CurlResult(
            tag=self.tag,
            rc=rc,
            stderr=err,
            local=(m[1], int(m[2])),
            size=int(m[3]),
            time_total=float(m[4]),
            http_code=int(m[5]),
            sha256=out.split()[0].decode(),
        )

    def kill(self) -> None:
        for p in (self.curl, self.hasher):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)


@dataclasses.dataclass
class CurlResult:
    tag: str
    rc: int
    stderr: str
    local: tuple[str, int]
    size: int
    time_total: float
    http_code: int
    sha256: str


def curl_via(proxy: Proxy, kind: str) -> list[str]:
    if kind == "connect":
        return ["-p", "-x", proxy.http_url]  # CONNECT, then plain HTTP inside the tunnel
    if kind == "socks5":
        return ["--socks5-hostname", proxy.socks_addr]
    assert kind == "plain"
    return ["-x", proxy.http_url]  # the forwarder


def all_done(runs: list[Curl]) -> bool:
    return all([c.done() for c in runs])  # a list: every run gets its end time noted


def run_batches(
    workdir: Path,
    proxy: Proxy,
    origin: Server,
    batches: list[tuple[str, int]],
    size: int,
    within: float,
) -> list[tuple[str, CurlResult]]:
    """For each (kind, count): ``count`` concurrent curl downloads of ``size`` bytes; in order."""
    out: list[tuple[str, CurlResult]] = []
    for kind, count in batches:
        runs = [
            Curl(
                workdir,
                curl_via(proxy, kind),
                f"http://127.0.0.1:{origin.port}/bytes/{size}?tag={kind}{len(out) + i}",
                f"{kind}{len(out) + i}",
                within,
            ).start()
            for i in range(count)
        ]
        try:
            poll(functools.partial(all_done, runs), within + 10, f"{kind} downloads")
            out += [(kind, c.result()) for c in runs]
        except BaseException:
            for c in runs:
                c.kill()
            raise
    return out


def check_client(r: CurlResult, size: int) -> None:
    assert (r.rc, r.http_code) == (0, 200), r.stderr
    assert r.size == size, r
    assert r.sha256 == pattern_sha256(size), f"{r.tag}: the client got other bytes"


# -- what the consumers saw -----------------------------------------------------------------------


def addr16(ip: str) -> bytes:
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return socket.inet_aton(ip) + bytes(12)


def client_from(client: tuple[str, int], server: tuple[str, int]) -> int:
    """``from`` of the client's bytes: 1 when the client is the smaller endpoint (spec s. 1)."""
    return 1 if (addr16(client[0]), client[1]) <= (addr16(server[0]), server[1]) else 2


def find_flow(
    summary: dict[str, Any], client: tuple[str, int], server: tuple[str, int]
) -> dict[str, Any] | None:
    ends = {client, server}
    found = [
        f
        for f in summary["flows"].values()
        if {(f["ip1"], f["port1"]), (f["ip2"], f["port2"])} == ends
    ]
    assert len(found) <= 1, f"{len(found)} flows between {client} and {server}"
    return found[0] if found else None


def stream(flow: dict[str, Any], from_: int, match: str | None) -> dict[str, Any]:
    """The flow's only stream from endpoint ``from_`` (and with ``match`` when given)."""
    keys = [k for k in flow["streams"] if k.split("/")[0] == str(from_)]
    assert len(keys) == 1, f"streams from {from_}: {sorted(flow['streams'])}"
    if match is not None:
        assert keys[0] == f"{from_}/{match}", sorted(flow["streams"])
    s: dict[str, Any] = flow["streams"][keys[0]]
    return s


def check_flow(
    flow: dict[str, Any] | None,
    client: tuple[str, int],
    server: tuple[str, int],
    origin_rec: OriginConn,
    *,
    routed_by_match: bool,
) -> None:
    """Every byte of both directions, exactly, and one CREATED and one DESTROYED."""
    assert flow is not None, f"no flow {client} -> {server}"
    assert flow["created"] == 1, flow
    assert flow["ended"] == "DESTROYED" and flow["destroyed"] == "NORMAL", flow
    assert flow["short_reads"] == 0, flow
    assert flow["hop"] == 0
    up_from = client_from(client, server)
    up = stream(flow, up_from, "up" if routed_by_match else None)
    down = stream(flow, 3 - up_from, "down" if routed_by_match else None)
    assert len(flow["streams"]) == 2, flow["streams"]
    assert up["bytes"] == len(origin_rec.received), (up, len(origin_rec.received))
    assert up["sha256"] == hashlib.sha256(origin_rec.received).hexdigest()
    assert down["bytes"] == origin_rec.sent, (down["bytes"], origin_rec.sent)
    assert down["sha256"] == origin_rec.sent_sha, "the consumer got other bytes than were relayed"


def check_clean(summary: dict[str, Any], name: str) -> None:
    """No short read, nothing unparseable, no protocol error, no orphan DATA."""
    bad = {
        k: summary[k]
        for k in (
            "short_reads",
            "short_header_reads",
            "parse_errors",
            "protocol_errors",
            "data_without_created",
            "destroyed_without_created",
        )
        if summary[k]
    }
    details = summary.get("short_read_details", [])[:5]
    assert not bad, f"{name}: {bad}; errors: {summary['errors'][:5]}; short reads: {details}"


def all_ended(summary: dict[str, Any], count: int) -> bool:
    flows = summary["flows"].values()
    return len(summary["flows"]) >= count and all(f["ended"] for f in flows)


def stop_all(*things: Any) -> None:
    """Teardown: stop whatever was started, in order, whatever failed before."""
    for t in things:
        if t is None:
            continue
        try:
            if isinstance(t, Proxy):
                if t.proc is not None:
                    stop_process(t.proc, grace=20)
            elif isinstance(t, Consumer):
                t.kill()
            elif isinstance(t, Server):
                t.close()
        except Exception as exc:  # teardown goes on; the test's own failure matters more
            print(f"teardown of {t!r} failed: {exc!r}", file=sys.stderr)


# == served sockets, default export config =========================================================

TRANSFERS = [("connect", 3), ("socks5", 3)]


@pytest.mark.parametrize(("fmt", "size"), FORMATS_SIZES)
def test_served_sockets_deliver_every_message_whole(
    home: Path, origin: Server, size: int, fmt: str
) -> None:
    """Default export config: 3 CONNECT then 3 SOCKS5 downloads, all on tcp/http, all whole."""
    export: dict[str, Any] = {"sftap_home": str(home / "sf")}
    if fmt == "binary":
        export["formats"] = {"tcp/http": "binary"}
    proxy = Proxy(home, export)
    readers: dict[str, Consumer] = {}
    try:
        proxy.start()
        for name in ("http", "http_client", "http_proxy", "default"):
            readers[name] = Consumer(
                "reader",
                home / "sf" / "tcp" / name,
                home,
                f"r-{name}",
                fmt=fmt if name == "http" else "text",
                nice=FAST,
            ).start()
        wait_readers(proxy, len(readers))
        results = run_batches(home, proxy, origin, TRANSFERS, size, within=300)
        server = ("127.0.0.1", origin.port)
        http = readers["http"].wait(lambda s: all_ended(s, 6), 120, "6 flows ended")
        m = proxy.metrics()
        finals = {name: r.stop() for name, r in readers.items()}
    finally:
        stop_all(proxy, *readers.values())
    h = finals["http"]
    print(
        f"served {fmt} 6x{size}: DATA={h['events']['DATA']} short_reads={h['short_reads']} "
        f"max_body={h['max_body_len']} dropped={total(m, 'proxytap_export_dropped_bytes_total')} "
        f"curl_s={[r.time_total for _, r in results]}"
    )
    for _, r in results:
        check_client(r, size)
    for name, s in finals.items():
        check_clean(s, name)
        if name != "http":
            assert s["events"] == {"CREATED": 0, "DATA": 0, "DESTROYED": 0}, (name, s["events"])
    dropped = samples(m, "proxytap_export_dropped_bytes_total")
    assert dropped, "no proxytap_export_dropped_bytes_total in /metrics"
    assert all(v == 0 for _, v in dropped), [(lab, v) for lab, v in dropped if v]
    assert total(m, "proxytap_export_partial_sends_total", sink="sftap") == 0
    assert len(http["flows"]) == 6, sorted(http["flows"])
    for _, r in results:
        check_flow(
            find_flow(finals["http"], r.local, server),
            r.local,
            server,
            origin.record(r.tag),
            routed_by_match=True,
        )
    assert finals["http"]["max_body_len"] <= 65535
    recs = [origin.record(r.tag) for _, r in results]
    payload = sum(len(rec.received) + rec.sent for rec in recs)
    assert total(m, "proxytap_export_sent_bytes_total", sink="sftap") >= payload


# == loopback7 into the abstractor stand-in =======================================================


@pytest.mark.parametrize(("fmt", "size"), FORMATS_SIZES)
def test_loopback7_standin_never_closes(home: Path, origin: Server, size: int, fmt: str) -> None:
    """``--loopback7 PATH --export-overload wait``: nothing closed, every byte delivered.

    ``wait``: the stand-in (like the abstractor, about 100 MB/s) may be slower
    than the tunnel; under ``drop`` a 100% delivery would not be promised.
    """
    path = home / "loopback7"
    standin = Consumer("loopback7", path, home, "lb7", fmt=fmt, nice=FAST)
    proxy = Proxy(
        home,
        {"loopback7_format": fmt, "loopback7_max_wait": 10.0},
        args=("--loopback7", str(path), "--export-overload", "wait"),
    )
    try:
        standin.start()
        proxy.start()
        poll(
            lambda: total(proxy.metrics(), "proxytap_loopback7_link_up", sink="loopback7") == 1,
            15,
            "loopback7 link up",
            every=0.05,
        )
        standin.wait(lambda s: s["connections"] == 1, 10, "proxytap connected")
        results = run_batches(home, proxy, origin, TRANSFERS, size, within=300)
        standin.wait(
            # (or, once it has closed a connection, until what it has is over: the test fails)
            lambda s: all_ended(s, 6) or (s["connections_closed_by_standin"] and all_ended(s, 0)),
            120,
            "6 flows ended",
        )
        m = proxy.metrics()
        final = standin.stop()
    finally:
        stop_all(proxy, standin)
    print(
        f"loopback7 {fmt} 6x{size}: DATA={final['events']['DATA']} "
        f"short_reads={final['short_reads']} connections={final['connections']} "
        f"closed_by_standin={final['connections_closed_by_standin']} "
        f"wait_s={total(m, 'proxytap_export_wait_seconds_total', sink='loopback7')}"
    )
    assert final["connections_closed_by_standin"] == 0, (
        final["close_reasons"],
        final["short_reads"],
        standin.stderr[-2000:],
    )
    assert final["connections"] == 1, final["close_reasons"]  # and no reconnect either
    check_clean(final, "loopback7 stand-in")
    assert 0 < final["max_body_len"] <= 16384
    server = ("127.0.0.1", origin.port)
    for _, r in results:
        check_client(r, size)
        check_flow(
            find_flow(final, r.local, server),
            r.local,
            server,
            origin.record(r.tag),
            routed_by_match=False,  # the abstractor overwrites match; from says who sent
        )
    assert len(final["flows"]) == 6
    dropped = samples(m, "proxytap_export_dropped_bytes_total", sink="loopback7")
    assert dropped and all(v == 0 for _, v in dropped), dropped
    assert total(m, "proxytap_export_partial_sends_total", sink="loopback7") == 0


# == overload "wait": a throttled reader slows the tunnel, loses nothing ===========================

THROTTLE_MBPS = 20.0


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(24 * MiB, id="24MiB"),
        pytest.param(256 * MiB, id="256MiB", marks=SLOW),
    ],
)
def test_wait_follows_a_throttled_reader(home: Path, origin: Server, size: int) -> None:
    sndbuf = reader_buffer = 1 * MiB
    proxy = Proxy(
        home,
        {
            "sftap_home": str(home / "sf"),
            "overload": "wait",
            "max_wait": 5.0,
            "reader_sndbuf": sndbuf,
            "reader_buffer": reader_buffer,
        },
    )
    reader = Consumer(
        "reader", home / "sf" / "tcp" / "http", home, "throttled", throttle=THROTTLE_MBPS
    )
    try:
        proxy.start()
        reader.start()
        wait_readers(proxy, 1)
        [(_, r)] = run_batches(home, proxy, origin, [("connect", 1)], size, within=600)
        reader.wait(lambda s: all_ended(s, 1), 120, "the flow ended at the reader")
        m = proxy.metrics()
        final = reader.stop()
    finally:
        stop_all(proxy, reader)
    ahead = 2 * sndbuf + 2 * reader_buffer + 1 * MiB
    floor = (size - ahead) / (THROTTLE_MBPS * 1e6)
    print(
        f"throttled {size}: curl {r.time_total:.2f}s (floor {floor:.2f}s), "
        f"wait_s={total(m, 'proxytap_export_wait_seconds_total', sink='sftap'):.2f}"
    )
    check_client(r, size)
    check_clean(final, "throttled reader")
    assert total(m, "proxytap_export_dropped_bytes_total", sink="sftap") == 0
    server = ("127.0.0.1", origin.port)
    check_flow(
        find_flow(final, r.local, server),
        r.local,
        server,
        origin.record(r.tag),
        routed_by_match=True,
    )
    assert total(m, "proxytap_export_wait_seconds_total", sink="sftap") > 0
    # The proxy can be ahead of the reader by what the kernel holds for the reader's socket
    # (twice SO_SNDBUF), what proxytap may queue for it under "wait" (up to twice
    # reader_buffer) and a little slack (``ahead``); the rest it must have waited for.
    assert r.time_total >= floor - 0.05, (
        f"{size} bytes in {r.time_total:.2f}s: the proxy did not wait for a 20 MB/s reader "
        f"(at least {floor:.2f}s expected)"
    )


# == overload "wait" with a reader that stops: bounded wait, then drops; others unaffected ========

STALL_AFTER = 256 << 10
STALL_SIZES = [
    pytest.param(32 * MiB, id="32MiB"),
    pytest.param(256 * MiB, id="256MiB", marks=SLOW),
]


def stalled_setup(home: Path, overload: str, max_wait: float, side_port: int) -> Proxy:
    return Proxy(
        home,
        {
            "sftap_home": str(home / "sf"),
            "overload": overload,
            "max_wait": max_wait,
            "reader_sndbuf": 1 * MiB,
            "reader_buffer": 1 * MiB,
        },
        # flows to the second origin go to their own socket, tcp/side, where nobody stalls
        rules=[{"name": "side", "nice": 10, "port": [side_port]}],
    )


@pytest.mark.parametrize("size", STALL_SIZES)
def test_wait_gives_up_on_a_stalled_reader_after_max_wait(
    home: Path, origin: Server, size: int
) -> None:
    max_wait = 2.0
    side = Server(serve_http)
    proxy = stalled_setup(home, "wait", max_wait, side.port)
    stalled = Consumer(
        "reader", home / "sf" / "tcp" / "http", home, "stalled", stall_after=STALL_AFTER
    )
    side_reader = Consumer("reader", home / "sf" / "tcp" / "side", home, "side", nice=FAST)
    big = small = None
    try:
        proxy.start()
        stalled.start()
        side_reader.start()
        wait_readers(proxy, 2)
        big = Curl(
            home,
            curl_via(proxy, "connect"),
            f"http://127.0.0.1:{origin.port}/bytes/{size}?tag=big",
            "big",
            300,
        ).start()
        stalled.wait(lambda s: s["stalled"], 30, "the reader stopped reading")
        # meanwhile: an unrelated plain GET through the same proxy, to another socket
        small = Curl(
            home,
            curl_via(proxy, "plain"),
            f"http://127.0.0.1:{side.port}/bytes/1000?tag=side",
            "side",
            30,
        ).start()
        poll(small.done, 30, "the side request")
        small_ended_while_big_ran = not big.done()
        poll(big.done, 310, "the big download")
        side_flow = side_reader.wait(lambda s: all_ended(s, 1), 30, "the side flow ended")
        m = proxy.metrics()
        stalled_final = stalled.stop()
        side_final = side_reader.stop()
        rb, rs = big.result(), small.result()
    finally:
        for c in (big, small):
            if c is not None:
                c.kill()
        stop_all(proxy, stalled, side_reader, side)
    print(
        f"stalled/wait {size}: big {rb.time_total:.2f}s, side {rs.time_total:.3f}s, "
        f"wait_s={total(m, 'proxytap_export_wait_seconds_total', sink='sftap'):.2f}, "
        f"dropped={total(m, 'proxytap_export_dropped_bytes_total', sink='sftap')}"
    )
    check_client(rb, size)
    assert rb.time_total >= max_wait * 0.95, (
        f"the download took {rb.time_total:.2f}s: the tunnel did not wait {max_wait}s"
    )
    assert total(m, "proxytap_export_wait_seconds_total", sink="sftap") >= max_wait * 0.9
    assert total(m, "proxytap_export_dropped_bytes_total", sink="sftap") > 0
    assert total(m, "proxytap_export_partial_sends_total", sink="sftap") == 0
    # the unrelated client was served while the big tunnel waited, and exported whole
    assert (rs.rc, rs.http_code, rs.size) == (0, 200, 1000), rs.stderr
    assert rs.sha256 == pattern_sha256(1000)
    assert small_ended_while_big_ran, "the side request finished only after the big download"
    assert rs.time_total < max_wait / 2, f"the side request took {rs.time_total:.2f}s"
    server2 = ("127.0.0.1", side.port)
    check_flow(
        find_flow(side_final, rs.local, server2),
        rs.local,
        server2,
        side.record("side"),
        routed_by_match=True,
    )
    assert len(side_flow["flows"]) == 1
    check_clean(side_final, "side reader")
    # the stalled reader's framing held up to where it stopped
    check_clean(stalled_final, "stalled reader")
    assert stalled_final["stalled"] and stalled_final["events"]["CREATED"] == 1


@pytest.mark.parametrize("size", STALL_SIZES)
def test_drop_never_slows_the_tunnel_for_a_stalled_reader(
    home: Path, origin: Server, size: int
) -> None:
    max_wait = 10.0  # must not matter under "drop"
    side = Server(serve_http)
    proxy = stalled_setup(home, "drop", max_wait, side.port)
    stalled = Consumer(
        "reader", home / "sf" / "tcp" / "http", home, "stalled", stall_after=STALL_AFTER
    )
    try:
        proxy.start()
        stalled.start()
        wait_readers(proxy, 1)
        [(_, r)] = run_batches(home, proxy, origin, [("connect", 1)], size, within=120)
        m = proxy.metrics()
        final = stalled.stop()
    finally:
        stop_all(proxy, stalled, side)
    print(
        f"stalled/drop {size}: {r.time_total:.2f}s, "
        f"dropped={total(m, 'proxytap_export_dropped_bytes_total', sink='sftap')}"
    )
    check_client(r, size)
    assert r.time_total < max_wait, f"{r.time_total:.2f}s: the tunnel waited under 'drop'"
    assert total(m, "proxytap_export_wait_seconds_total", sink="sftap") == 0
    assert total(m, "proxytap_export_dropped_bytes_total", sink="sftap") > 0
    assert total(m, "proxytap_export_partial_sends_total", sink="sftap") == 0
    assert final["stalled"], final
    check_clean(final, "stalled reader")
    assert final["events"]["CREATED"] == 1 and final["events"]["DATA"] > 0


# == an unknown line protocol reaches tcp/default while the connection is still open =============


def raw_connect(proxy: Proxy, port: int) -> socket.socket:
    """A CONNECT tunnel on a plain blocking socket; returns it after the 200."""
    sock = socket.create_connection(proxy.http, timeout=10)
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # one byte at a time: nothing of the tunnel is read here
        assert chunk, f"proxy closed: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def serve_silent(conn: socket.socket, rec: OriginConn) -> str | None:
    """Reads what the client sends until it closes; never answers."""
    while chunk := conn.recv(65536):
        rec.received += chunk
    rec.eof = True
    return None


@pytest.mark.parametrize("answer", [True, False], ids=["both-ways", "client-only"])
def test_unclassified_flow_is_exported_before_it_closes(home: Path, answer: bool) -> None:
    """20 bytes each way (or the client's only), connection left open: on tcp/default soon.

    Both ways, the flow is decided as soon as both sides have data; one way,
    ``classify_timeout`` after it opened. Either way within ``classify_timeout`` + 2 s.
    """
    classify_timeout = 0.5
    line = Server(serve_line if answer else serve_silent)
    proxy = Proxy(home, {"sftap_home": str(home / "sf"), "classify_timeout": classify_timeout})
    readers: dict[str, Consumer] = {}
    sock: socket.socket | None = None
    try:
        proxy.start()
        for name in ("default", "http"):
            path = home / "sf" / "tcp" / name
            readers[name] = Consumer("reader", path, home, name, nice=FAST).start()
        wait_readers(proxy, 2)
        sock = raw_connect(proxy, line.port)
        client = sock.getsockname()[:2]
        sock.sendall(HELLO)
        got = b""
        while answer and len(got) < len(WORLD):
            chunk = sock.recv(len(WORLD) - len(got))
            assert chunk, "the tunnel closed"
            got += chunk
        both = time.monotonic()
        assert got == (WORLD if answer else b"")
        server = ("127.0.0.1", line.port)

        def exported(s: dict[str, Any]) -> bool:
            f = find_flow(s, client, server)
            return bool(f and f["created"] and len(f["streams"]) == (2 if answer else 1))

        s = readers["default"].wait(exported, classify_timeout + 2.0, "the flow on tcp/default")
        in_time = time.monotonic() - both
        [origin_side] = line.started
        still_open = not origin_side.eof
        flow = find_flow(s, client, server)
        sock.close()
        sock = None
        s = readers["default"].wait(lambda s: all_ended(s, 1), 10, "DESTROYED after the close")
        finals = {n: r.stop() for n, r in readers.items()}
    finally:
        if sock is not None:
            sock.close()
        stop_all(proxy, *readers.values(), line)
    print(f"unclassified flow on tcp/default {in_time:.3f}s after the data (answer={answer})")
    assert in_time <= classify_timeout + 2.0
    assert still_open, "the origin saw the client close before the flow was exported"
    assert flow is not None and flow["ended"] is None  # seen while the flow was open
    up_from = client_from(client, server)
    up = stream(flow, up_from, "up")
    assert (up["bytes"], up["sha256"]) == (20, hashlib.sha256(HELLO).hexdigest())
    if answer:
        down = stream(flow, 3 - up_from, "down")
        assert (down["bytes"], down["sha256"]) == (20, hashlib.sha256(WORLD).hexdigest())
    else:
        assert len(flow["streams"]) == 1, flow["streams"]
    assert bytes(origin_side.received) == HELLO
    for name, fs in finals.items():
        check_clean(fs, name)
    assert finals["http"]["events"] == {"CREATED": 0, "DATA": 0, "DESTROYED": 0}
    done = find_flow(finals["default"], client, server)
    assert done is not None and done["ended"] == "DESTROYED"


def test_proxy_process_is_stopped_by_sigterm(home: Path) -> None:
    """The harness itself: the proxy process starts, serves /metrics and exits 0 on SIGTERM."""
    proxy = Proxy(home, {"sftap_home": str(home / "sf")})
    try:
        proxy.start()
        assert total(proxy.metrics(), "proxytap_export_subscribers", sink="sftap") == 0
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        rc = proxy.proc.wait(20)
    finally:
        stop_all(proxy)
    assert rc == 0, proxy.log_text()[-2000:]
