#!/usr/bin/env python3
"""Interception benchmark: proxytap decrypting HTTPS vs mitmdump doing the same, loopback only.

The shared harness's clients speak no TLS, so it has no interception workload.
This one starts, in a temporary directory:

* an HTTPS origin: nginx (one worker, HTTP/1.1, TLS 1.3) with a certificate of
  its own test CA, serving ``/small`` (1 KiB) and ``/big`` (a sparse file,
  ``--bulk-mib``, 256 MiB by default) for the name ``localhost``;
* one proxy at a time, each told to trust that test CA for origins and each
  intercepting ``localhost``:

  - ``direct``: no proxy (the baseline; the clients are the limit here);
  - ``proxytap``: ``proxytap run --http ... --config TMP.toml`` with
    ``bench/proxytap-bench.toml`` plus ``[tls] intercept = ["localhost"]``,
    ``ca_dir`` and ``upstream_ca``; flow export OFF;
  - ``proxytap-export``: the same with ``--sftap-home`` and
    ``bench/sftap_drain.py`` reading every flow socket (export ON, as
    ``bench/run.sh``'s export pass);
  - ``mitm-eager``: ``mitmdump`` with the shared harness's ``mitm-eager``
    options (regular mode, default ``connection_strategy=eager``, its own
    confdir CA) plus ``ssl_verify_upstream_trusted_ca`` for the test CA;
  - ``mitm-stream``: the same plus ``stream_large_bodies=1m``, because
    mitmdump holds a whole response body in memory by default while proxytap
    streams bodies (L is only a like-for-like comparison against this one);

* workload **K** (keep-alive): ``--procs`` client processes (4) with
  ``--conns`` connections each (4): CONNECT, TLS (trusting the proxy's CA,
  ALPN ``http/1.1``), then back-to-back ``GET /small`` on each connection for
  ``--secs`` (10) seconds, status and body length checked. Tunnels are set up
  before the window opens, so K counts steady-state requests only;
* workload **L** (large): one download of ``/big`` through a tunnel, MB/s
  (1e6 B/s) from the request to the last byte, bounded by ``--bulk-max-secs``.

The proxy's CPU (utime+stime over its process tree, /proc) is read at the
edges of each window: CPU µs per request for K, CPU s per GiB for L. Its RSS
is sampled during L (mitmdump buffers a whole body). Results: a markdown
report on stdout and in ``OUT/intercept.md``, raw numbers in
``OUT/intercept.json``, each proxy's log in ``OUT/intercept-NAME.log``.
Everything it starts is stopped on every exit (SIGTERM, then SIGKILL).

usage: intercept.py [--proxies direct,proxytap,proxytap-export,mitm-eager,mitm-stream]
                    [--secs 10] [--procs 4] [--conns 4] [--bulk-mib 256] [--rounds 1]
                    [--out bench/out]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proctree import tree_pids

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
HOST = "127.0.0.1"
NAME = "localhost"  # the origin's name: what the clients CONNECT to, send as SNI, intercept
SMALL = 1024
DEFAULT_PROXIES = "direct,proxytap,proxytap-export,mitm-eager,mitm-stream"
ALL_PROXIES = ("direct", "proxytap", "proxytap-export", "mitm-eager", "mitm-stream")
MAX_LAT = 200_000  # latencies kept per client process
MAX_RECONNECTS = 50  # per connection and window
MAX_REQUESTS = 10_000_000  # per connection and window


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), "[intercept]", msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- client side (subprocesses)


class BadResponse(Exception):
    """The origin's answer through the proxy was not the expected one."""


async def read_head(r: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise BadResponse(f"bad status line {lines[0][:80]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            fields[k.strip().lower()] = v.strip()
    return int(parts[1]), fields


async def read_body(r: asyncio.StreamReader, fields: dict[str, str]) -> int:
    """The body's length (Content-Length or chunked; nothing else is expected)."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        total = 0
        for _ in range(1_000_000):
            line = await r.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await r.readuntil(b"\r\n")  # no trailers expected
                return total
            await r.readexactly(size + 2)
            total += size
        raise BadResponse("too many chunks")
    if "content-length" not in fields:
        raise BadResponse("no Content-Length and not chunked")
    n = int(fields["content-length"])
    await r.readexactly(n)
    return n


async def open_tunnel(
    proxy: tuple[str, int] | None, port: int, ctx: ssl.SSLContext, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT localhost:port through ``proxy`` (or straight there), then TLS."""
    async with asyncio.timeout(timeout):
        if proxy is None:
            return await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=NAME)
        r, w = await asyncio.open_connection(*proxy)
        try:
            w.write(f"CONNECT {NAME}:{port} HTTP/1.1\r\nHost: {NAME}:{port}\r\n\r\n".encode())
            status, _ = await read_head(r)
            if status != 200:
                raise BadResponse(f"CONNECT answered {status}")
            await w.start_tls(ctx, server_hostname=NAME)
        except BaseException:
            w.close()
            raise
        return r, w


@dataclass
class ClientTally:
    requests: int = 0
    errors: int = 0
    reconnects: int = 0
    setup_ms: list[float] = field(default_factory=list)
    lat_us: list[int] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def keepalive_conn(a: argparse.Namespace, ctx: ssl.SSLContext, tally: ClientTally) -> None:
    proxy = (HOST, a.proxy_port) if a.proxy_port else None
    req = f"GET /small HTTP/1.1\r\nHost: {NAME}:{a.origin_port}\r\n\r\n".encode()
    end = a.start_at + a.secs
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        for attempt in range(MAX_RECONNECTS + 1):
            if time.time() >= end:
                break
            t0 = time.perf_counter()
            try:
                conn = await open_tunnel(proxy, a.origin_port, ctx, 15.0)
            except (OSError, ssl.SSLError, TimeoutError, BadResponse, EOFError) as exc:
                tally.error(exc)
                await asyncio.sleep(0.05)
                continue
            tally.setup_ms.append((time.perf_counter() - t0) * 1000)
            if attempt:
                tally.reconnects += 1
            r, w = conn
            # the window opens at start_at for every process alike
            await asyncio.sleep(max(0.0, a.start_at - time.time()))
            try:
                for _ in range(MAX_REQUESTS):
                    if time.time() >= end:
                        return
                    t1 = time.perf_counter()
                    w.write(req)
                    async with asyncio.timeout(10.0):
                        status, fields = await read_head(r)
                        n = await read_body(r, fields)
                    if status != 200 or n != SMALL:
                        raise BadResponse(f"status {status}, body {n} bytes")
                    if time.time() <= end:
                        tally.requests += 1
                        if len(tally.lat_us) < MAX_LAT:
                            tally.lat_us.append(int((time.perf_counter() - t1) * 1e6))
            except (OSError, ssl.SSLError, TimeoutError, BadResponse, EOFError) as exc:
                tally.error(exc)
            finally:
                w.close()
                conn = None
    finally:
        if conn is not None:
            conn[1].close()


async def keepalive_client(a: argparse.Namespace) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    tally = ClientTally()
    async with asyncio.timeout(a.secs + 60):
        await asyncio.gather(*(keepalive_conn(a, ctx, tally) for _ in range(a.conns)))
    return dict(
        requests=tally.requests,
        errors=tally.errors,
        reconnects=tally.reconnects,
        setup_ms=tally.setup_ms,
        lat_us=tally.lat_us,
        first_errors=tally.first_errors,
    )


def bulk_client(a: argparse.Namespace) -> dict[str, Any]:
    """One GET /big through a tunnel, blocking sockets, a 1 MiB receive buffer."""
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    deadline = time.monotonic() + a.secs
    out: dict[str, Any] = dict(bytes=0, ok=False, error=None)
    try:
        raw = socket.create_connection((HOST, a.proxy_port or a.origin_port), timeout=15)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if a.proxy_port:
            raw.sendall(f"CONNECT {NAME}:{a.origin_port} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = raw.recv(4096)
                if not chunk:
                    raise BadResponse("proxy closed before answering CONNECT")
                head += chunk
            if head.split(b" ", 2)[1] != b"200":
                raise BadResponse(f"CONNECT answered {head[:40]!r}")
        s = ctx.wrap_socket(raw, server_hostname=NAME)
        t0 = time.perf_counter()
        s.sendall(f"GET /big HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        got = b""
        while b"\r\n\r\n" not in got and len(got) < 65536:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            n = s.recv_into(view)
            if not n:
                raise BadResponse("closed before the response head")
            got += bytes(view[:n])
        ttfb = time.perf_counter() - t0
        head_b, _, rest = got.partition(b"\r\n\r\n")
        status = int(head_b.split(b" ", 2)[1])
        m = re.search(rb"(?im)^content-length:\s*(\d+)", head_b)
        want = int(m.group(1)) if m else None  # chunked: read to EOF, count framing too
        total = len(rest)
        for _ in range(100_000_000):
            if want is not None and total >= want:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                out["error"] = f"stopped after --bulk-max-secs with {total:,} bytes"
                break
            s.settimeout(left)
            n = s.recv_into(view)
            if not n:
                break
            total += n
        secs = time.perf_counter() - t0
        out.update(
            bytes=total,
            want=want,
            status=status,
            secs=round(secs, 3),
            ttfb_s=round(ttfb, 3),
            MBps=round(total / secs / 1e6, 1),
            ok=status == 200 and (want is None or total == want),
        )
        with contextlib.suppress(OSError):
            s.close()
    except (OSError, ssl.SSLError, BadResponse, ValueError, IndexError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def client_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="intercept.py _client")
    ap.add_argument("mode", choices=("keepalive", "bulk"))
    ap.add_argument("--proxy-port", type=int, default=0)
    ap.add_argument("--origin-port", type=int, required=True)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--secs", type=float, required=True)
    ap.add_argument("--start-at", type=float, default=0.0)
    ap.add_argument("--result", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.mode == "keepalive":
        try:
            import uvloop  # the clients' own loop, so they stay cheap beside the proxy

            res = uvloop.run(keepalive_client(a))
        except ImportError:
            res = asyncio.run(keepalive_client(a))
    else:
        res = bulk_client(a)
    # a file, not stdout: the latencies pass 64 KiB and uvloop leaves stdout non-blocking
    tmp = a.result.with_suffix(".part")
    tmp.write_text(json.dumps(res))
    tmp.rename(a.result)
    return 0


# ---------------------------------------------------------------- parent: processes and /proc


class Procs:
    """Every child started here, each in its own session, so cleanup finds them."""

    def __init__(self) -> None:
        self.live: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], logfile: Path | None = None, **kw: Any) -> Any:
        with contextlib.ExitStack() as files:
            if logfile is not None:
                f = files.enter_context(open(logfile, "ab"))
                kw.setdefault("stdout", f)
                kw.setdefault("stderr", f)
            p: subprocess.Popen[bytes] = subprocess.Popen(
                argv, start_new_session=True, stdin=subprocess.DEVNULL, **kw
            )
        self.live.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[Any], grace: float = 10.0) -> tuple[int | None, bool]:
        """SIGTERM to its group, wait ``grace`` s, then SIGKILL: (exit status, killed?)."""
        killed = False
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # the leader, if still there, and anything it left
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
        self.live = [(n, q) for n, q in self.live if q is not p]
        return p.returncode, killed

    def stop_all(self) -> None:
        for name, p in reversed(list(self.live)):
            if p.poll() is None:
                log(f"cleanup: stopping {name} (pid {p.pid})")
            self.stop(p, 5.0)


def usage(root: int) -> tuple[float, int]:
    """CPU seconds (utime+stime) and RSS KiB, summed over the process tree."""
    cpu, rss = 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            cpu += (int(parts[11]) + int(parts[12])) / tick
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def free_port(port: int) -> None:
    if port_open(port):
        raise RuntimeError(f"port {port} is in use; pick others with --port-base")


def wait_until(cond: Any, secs: float, what: str, p: subprocess.Popen[Any] | None = None) -> None:
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if cond():
            return
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {p.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {secs:.0f} s")


# ---------------------------------------------------------------- origin


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for localhost / 127.0.0.1 / ::1 (ECDSA P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxytap bench origin CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(NAME)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem, cert_pem, key_pem = d / "origin-ca.pem", d / "origin-cert.pem", d / "origin-key.pem"
    ca_pem.write_bytes(ca.public_bytes(pem))
    cert_pem.write_bytes(cert.public_bytes(pem))
    key_pem.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_pem, cert_pem, key_pem


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        listen [::1]:{port} ssl;
        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_buffer_size 16k;
        root {www};
        location / {{ }}
    }}
}}
"""


def nginx_bin() -> str:
    for c in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("nginx not found (apt-get install nginx-light)")


# ---------------------------------------------------------------- the run


@dataclass
class Result:
    proxy: str
    round: int
    k: dict[str, Any] = field(default_factory=dict)
    bulk: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, a: argparse.Namespace, tmp: Path, procs: Procs) -> None:
        self.a = a
        self.tmp = tmp
        self.procs = procs
        self.out: Path = a.out
        self.origin_port = a.port_base + 3
        self.proxy_port = a.port_base
        self.admin_port = a.port_base + 1
        self.mitm_port = a.port_base + 2
        self.py = sys.executable
        self.origin_ca: Path = tmp / "origin-ca.pem"
        self.n_clients = 0

    # -- origin --------------------------------------------------------------------

    def origin_up(self) -> None:
        tmp = self.tmp
        self.origin_ca, cert, key = make_pki(tmp)
        www = tmp / "www"
        www.mkdir()
        (www / "small").write_bytes(b"a" * SMALL)
        with open(www / "big", "wb") as f:
            f.truncate(self.a.bulk_mib << 20)  # sparse: zeros, no disk
        for d in (tmp, www):
            d.chmod(0o755)
        for fn in (www / "small", www / "big"):
            fn.chmod(0o644)
        conf = tmp / "nginx.conf"
        conf.write_text(  # readable by nginx's workers (nobody when started as root)
            NGINX_CONF.format(
                tmp=tmp, port=self.origin_port, name=NAME, cert=cert, key=key, www=www
            )
        )
        free_port(self.origin_port)
        logf = self.out / "intercept-nginx.log"
        p = self.procs.start("nginx", [nginx_bin(), "-c", str(conf)], logf)
        wait_until(lambda: port_open(self.origin_port), 15, "nginx origin", p)
        log(f"origin: nginx (pid {p.pid}) https://{NAME}:{self.origin_port}/ (test CA)")

    # -- proxies -------------------------------------------------------------------

    def proxytap_conf(self) -> Path:
        base = (ROOT / "bench" / "proxytap-bench.toml").read_text()
        conf = self.tmp / "proxytap-intercept.toml"
        conf.write_text(
            base
            + "\n[tls]\n"
            + f'ca_dir = "{self.tmp / "proxytap-ca"}"\n'
            + f'intercept = ["{NAME}"]\n'
            + f'upstream_ca = "{self.origin_ca}"\n'
        )
        return conf

    def start_proxy(self, name: str) -> tuple[subprocess.Popen[Any] | None, str, list[Any]]:
        """(process, the CA file clients trust, extra processes to stop with it)."""
        logf = self.out / f"intercept-{name}.log"
        if name == "direct":
            return None, str(self.origin_ca), []
        free_port(self.proxy_port if name.startswith("proxytap") else self.mitm_port)
        if name.startswith("proxytap"):
            argv = [
                *shlex.split(self.a.proxytap),
                "run",
                "--http",
                f"{HOST}:{self.proxy_port}",
                "--admin",
                f"{HOST}:{self.admin_port}",
                "--log-level",
                "warning",
                "--config",
                str(self.proxytap_conf()),
            ]
            home = self.tmp / "sftap-home"
            if name == "proxytap-export":
                shutil.rmtree(home, ignore_errors=True)
                argv += ["--sftap-home", str(home)]
            p = self.procs.start(name, argv, logf)
            wait_until(lambda: port_open(self.proxy_port), 30, name, p)
            cafile = self.tmp / "proxytap-ca" / "proxytap-ca-cert.pem"
            wait_until(cafile.exists, 10, f"{name}: {cafile}", p)
            extra: list[Any] = []
            if name == "proxytap-export":
                rout = self.tmp / "reader.out"
                rout.unlink(missing_ok=True)
                rd = self.procs.start(
                    "reader",
                    [
                        self.py,
                        str(ROOT / "bench" / "sftap_drain.py"),
                        str(home),
                        "--ready-timeout",
                        "15",
                        "--max-secs",
                        "900",
                        "--stats",
                        str(self.out / "intercept-reader.json"),
                    ],
                    rout,
                )
                wait_until(lambda: b"READY" in rout.read_bytes(), 20, "reader", rd)
                extra.append(rd)
            return p, str(cafile), extra
        confdir = self.tmp / "mitm"
        argv = [
            self.a.mitmdump,
            "--mode",
            f"regular@{self.mitm_port}",
            "-q",
            "--set",
            f"confdir={confdir}",
            "--set",
            "flow_detail=0",
            "--set",
            "termlog_verbosity=error",
            "--listen-host",
            HOST,
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.origin_ca}",
        ]
        if name == "mitm-stream":
            argv += ["--set", "stream_large_bodies=1m"]
        p = self.procs.start(name, argv, logf)
        wait_until(lambda: port_open(self.mitm_port), 30, name, p)
        cafile = confdir / "mitmproxy-ca-cert.pem"
        wait_until(cafile.exists, 10, f"{name}: {cafile}", p)
        return p, str(cafile), []

    # -- workloads -----------------------------------------------------------------

    def client(self, mode: str, port: int, cafile: str, secs: float, start_at: float = 0) -> Any:
        argv = [
            self.py,
            str(SELF),
            "_client",
            mode,
            "--proxy-port",
            str(port),
            "--origin-port",
            str(self.origin_port),
            "--cafile",
            cafile,
            "--conns",
            str(self.a.conns),
            "--secs",
            str(secs),
            "--start-at",
            repr(start_at),
        ]
        self.n_clients += 1
        result = self.tmp / f"client-{self.n_clients}.json"
        p = self.procs.start(
            f"client-{mode}",
            [*argv, "--result", str(result)],
            self.out / "intercept-clients.log",
            stdout=subprocess.DEVNULL,
        )
        return p, result

    def collect(self, kid: tuple[subprocess.Popen[bytes], Path], secs: float) -> dict[str, Any]:
        p, result = kid
        try:
            p.wait(timeout=secs)
        except subprocess.TimeoutExpired:
            self.procs.stop(p, 2.0)
            return dict(error="client timed out")
        self.procs.live = [(n, q) for n, q in self.procs.live if q is not p]
        try:
            res: dict[str, Any] = json.loads(result.read_text())
            return res
        except (OSError, ValueError) as exc:
            return dict(error=f"client exit {p.returncode}, no result ({exc})")

    def keepalive(self, pid: int | None, port: int, cafile: str) -> dict[str, Any]:
        a = self.a
        start_at = time.time() + a.ramp
        kids = [self.client("keepalive", port, cafile, a.secs, start_at) for _ in range(a.procs)]
        time.sleep(max(0.0, start_at - time.time()))
        c0 = usage(pid)[0] if pid else 0.0
        t0 = time.monotonic()
        time.sleep(max(0.0, start_at + a.secs - time.time()))
        c1, rss = usage(pid) if pid else (0.0, 0)
        wall = time.monotonic() - t0
        res = [self.collect(k, a.ramp + a.secs + 60) for k in kids]
        reqs = sum(r.get("requests", 0) for r in res)
        lat = sorted(x for r in res for x in r.get("lat_us", []))
        setup = [x for r in res for x in r.get("setup_ms", [])]
        errs = [e for r in res for e in r.get("first_errors", [])]
        errs += [r["error"] for r in res if r.get("error")]
        cpu = c1 - c0
        return dict(
            requests=reqs,
            secs=round(wall, 2),
            rps=round(reqs / wall, 1) if wall else None,
            p50_ms=round(lat[len(lat) // 2] / 1000, 2) if lat else None,
            p99_ms=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000, 2) if lat else None,
            setup_ms_median=round(statistics.median(setup), 1) if setup else None,
            tunnels=len(setup),
            errors=sum(r.get("errors", 0) for r in res) + sum(1 for r in res if r.get("error")),
            reconnects=sum(r.get("reconnects", 0) for r in res),
            first_errors=errs[:5],
            proxy_cpu_s=round(cpu, 2) if pid else None,
            proxy_cpu_us_per_req=round(cpu / reqs * 1e6, 1) if pid and reqs else None,
            proxy_rss_kib=rss if pid else None,
            conns=a.procs * a.conns,
        )

    def bulk(self, pid: int | None, port: int, cafile: str) -> dict[str, Any]:
        a = self.a
        c0 = usage(pid)[0] if pid else 0.0
        t0 = time.monotonic()
        k = self.client("bulk", port, cafile, a.bulk_max_secs)
        peak = 0
        for _ in range(int((a.bulk_max_secs + 60) / 0.2)):
            if k[0].poll() is not None:
                break
            if pid:
                peak = max(peak, usage(pid)[1])
            time.sleep(0.2)
        res = self.collect(k, 30)
        c1, rss = usage(pid) if pid else (0.0, 0)
        cpu = c1 - c0
        n = res.get("bytes", 0)
        res.update(
            wall_s=round(time.monotonic() - t0, 2),
            proxy_cpu_s=round(cpu, 2) if pid else None,
            cpu_s_per_GiB=round(cpu / (n / (1 << 30)), 2) if pid and n else None,
            proxy_peak_rss_kib=max(peak, rss) if pid else None,
        )
        return res

    def measure(self, name: str, rnd: int) -> Result:
        res = Result(name, rnd)
        try:
            p, cafile, extra = self.start_proxy(name)
        except (RuntimeError, OSError) as exc:
            res.notes.append(f"did not start: {exc}")
            log(f"{name}: did not start: {exc}")
            return res
        pid = p.pid if p else None
        port = self.mitm_port if name.startswith("mitm") else self.proxy_port
        if name == "direct":
            port = 0
        try:
            _, rss0 = usage(pid) if pid else (0.0, 0)
            a = self.a
            log(f"{name} (round {rnd}): K, {a.procs} x {a.conns} connections, {a.secs:g} s")
            res.k = self.keepalive(pid, port, cafile)
            res.k["proxy_idle_rss_kib"] = rss0 if pid else None
            log(f"{name}: K {res.k['rps']} req/s, errors {res.k['errors']}")
            log(f"{name}: L, one download of {self.a.bulk_mib} MiB")
            res.bulk = self.bulk(pid, port, cafile)
            log(f"{name}: L {res.bulk.get('MBps')} MB/s, {res.bulk.get('cpu_s_per_GiB')} CPU s/GiB")
            if name.startswith("proxytap"):
                res.k["metrics"] = self.scrape()
        finally:
            for e in extra:
                self.procs.stop(e, 5.0)
            if p is not None:
                rc, killed = self.procs.stop(p, 15.0)
                if killed:
                    res.notes.append("did not exit within 15 s of SIGTERM (SIGKILLed)")
                elif rc not in (0, -signal.SIGTERM):
                    res.notes.append(f"exit status {rc} after SIGTERM")
                logf = self.out / f"intercept-{name}.log"
                text = logf.read_text(errors="replace") if logf.exists() else ""
                bad = [ln for ln in text.splitlines() if re.search(r"Traceback|ERROR|CRITICAL", ln)]
                if bad:
                    res.notes.append(f"{len(bad)} error line(s) in its log, first: {bad[0][:200]}")
                warn = sum(1 for ln in text.splitlines() if "WARNING" in ln)
                if warn:
                    res.notes.append(f"{warn} WARNING line(s) in its log")
        if name == "proxytap-export":
            with contextlib.suppress(OSError, ValueError, IndexError):
                stats = (self.out / "intercept-reader.json").read_text().strip().splitlines()[-1]
                res.k["reader"] = json.loads(stats)
        return res

    def scrape(self) -> dict[str, float]:
        """proxytap's interception and export counters from its /metrics."""
        try:
            with socket.create_connection((HOST, self.admin_port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                for _ in range(10_000):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in data.decode(errors="replace").splitlines():
            if line.startswith(("proxytap_intercept_", "proxytap_export_")):
                with contextlib.suppress(ValueError, IndexError):
                    k, v = line.rsplit(" ", 1)
                    if float(v):
                        out[k] = float(v)
        return out


# ---------------------------------------------------------------- report


def f(x: float | None, nd: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def med(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


def report(results: list[Result], a: argparse.Namespace, meta: dict[str, Any]) -> str:
    names = [n for n in ALL_PROXIES if any(r.proxy == n for r in results)]
    by = {n: [r for r in results if r.proxy == n] for n in names}
    d_rps = med([r.k.get("rps") for r in by.get("direct", [])])
    d_mbps = med([r.bulk.get("MBps") for r in by.get("direct", [])])
    lines = [
        f"## Interception: proxytap vs mitmdump ({meta['when']})",
        "",
        f"Host: {meta['host']}. proxytap: {meta['proxytap']}, mitmproxy {meta['mitmproxy']}, "
        f"nginx origin (1 worker, TLS). Rounds: {a.rounds}; values are medians over rounds.",
        f"K: {a.procs} client processes x {a.conns} keep-alive connections (CONNECT + TLS 1.3, "
        f"then GET /small, {SMALL} B body) for {a.secs:g} s. L: one GET /big, {a.bulk_mib} MiB "
        "through one tunnel. x direct: against the no-proxy baseline of the same run "
        "(the Python clients are the limit there, so it flatters every proxy in K).",
        "",
        "| proxy | K req/s | K x direct | p50 ms | p99 ms | errors | tunnel setup ms "
        "| proxy CPU µs/req | L MB/s | L x direct | L CPU s/GiB | RSS MiB start / after K "
        "/ L peak |",
        "|" + "---|" * 12,
    ]
    for n in names:
        rs = by[n]
        rps = med([r.k.get("rps") for r in rs])
        mbps = med([r.bulk.get("MBps") for r in rs])
        rss = [med([r.k.get(k) for r in rs]) for k in ("proxy_idle_rss_kib", "proxy_rss_kib")] + [
            med([r.bulk.get("proxy_peak_rss_kib") for r in rs])
        ]
        cells = [
            n,
            f(rps, 0),
            f(rps / d_rps, 3) if rps and d_rps and n != "direct" else "-",
            f(med([r.k.get("p50_ms") for r in rs]), 2),
            f(med([r.k.get("p99_ms") for r in rs]), 2),
            str(sum(r.k.get("errors", 0) + (0 if r.bulk.get("ok") else 1) for r in rs)),
            f(med([r.k.get("setup_ms_median") for r in rs]), 1),
            f(med([r.k.get("proxy_cpu_us_per_req") for r in rs]), 0),
            f(mbps, 0),
            f(mbps / d_mbps, 3) if mbps and d_mbps and n != "direct" else "-",
            f(med([r.bulk.get("cpu_s_per_GiB") for r in rs]), 2),
            " / ".join(f(x / 1024 if x else None, 0) for x in rss),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    pt, mi = by.get("proxytap"), by.get("mitm-eager")
    if pt and mi:
        lines.append("")
        rr = [med([r.k.get("rps") for r in x]) for x in (pt, mi)]
        mb = [med([r.bulk.get("MBps") for r in x]) for x in (pt, mi)]
        ce = [med([r.bulk.get("cpu_s_per_GiB") for r in x]) for x in (pt, mi)]
        cu = [med([r.k.get("proxy_cpu_us_per_req") for r in x]) for x in (pt, mi)]

        def ratio(v: list[float | None]) -> str:
            return f"{v[0] / v[1]:.2f}x" if v[0] and v[1] else "-"

        lines.append(
            f"proxytap / mitm-eager: K req/s {ratio(rr)}, K CPU per request {ratio(cu)}, "
            f"L MB/s {ratio(mb)}, L CPU s/GiB {ratio(ce)}."
        )
    lines += ["", "errors = failed K requests + failed L downloads. Notes:", ""]
    any_note = False
    for r in results:
        notes = list(r.notes)
        if r.k.get("first_errors"):
            notes.append(f"K errors, first: {'; '.join(r.k['first_errors'][:3])}")
        if r.bulk and not r.bulk.get("ok"):
            notes.append(f"L failed: {r.bulk.get('error')}")
        elif r.bulk.get("error"):
            notes.append(f"L: {r.bulk['error']}")
        if r.k.get("reconnects"):
            notes.append(f"K: {r.k['reconnects']} reconnects")
        if r.bulk.get("ttfb_s") is not None and r.proxy != "direct":
            notes.append(f"L first byte after {r.bulk['ttfb_s']} s")
        m = r.k.get("metrics")
        if m:
            keys = (
                "proxytap_intercept_requests_total",
                "proxytap_intercept_upstream_tls_errors_total",
                "proxytap_intercept_client_tls_failures_total",
                "proxytap_intercept_refusals_total",
            )
            got = {k: v for k, v in m.items() if k.startswith(keys)}
            if got:
                notes.append("metrics: " + ", ".join(f"{k} {v:,.0f}" for k, v in got.items()))
            sent = sum(v for k, v in m.items() if k.startswith("proxytap_export_sent_bytes"))
            drop = sum(v for k, v in m.items() if k.startswith("proxytap_export_dropped_bytes"))
            if sent or drop:
                notes.append(f"export: {sent:,.0f} bytes sent, {drop:,.0f} DATA bytes dropped")
        if notes:
            any_note = True
            lines.append(f"* {r.proxy} (round {r.round}): " + " | ".join(notes))
    if not any_note:
        lines.append("* none")
    return "\n".join(lines) + "\n"


def versions(a: argparse.Namespace) -> dict[str, Any]:
    def run(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    commit = run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]) or "?"
    default = str(ROOT / ".venv" / "bin" / "proxytap")
    # another proxytap (BENCH_PROXYTAP, e.g. a clean worktree's) is named, not this tree's commit
    proxytap = f"this tree at {commit}" if a.proxytap == default else f"`{a.proxytap}`"
    mitm = run([a.mitmdump, "--version"]).splitlines()
    return dict(
        when=time.strftime("%Y-%m-%d %H:%M"),
        host=f"{os.uname().release}, {os.cpu_count()} CPUs",
        commit=commit,
        proxytap=proxytap,
        mitmproxy=mitm[0].split()[-1] if mitm else "?",
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    venv = ROOT / ".venv" / "bin"
    ap.add_argument("--proxies", default=os.environ.get("BENCH_INTERCEPT_PROXIES", DEFAULT_PROXIES))
    ap.add_argument(
        "--secs", type=float, default=float(os.environ.get("BENCH_INTERCEPT_SECS", "10"))
    )
    ap.add_argument("--procs", type=int, default=4, help="client processes in K")
    ap.add_argument("--conns", type=int, default=4, help="keep-alive connections per process")
    ap.add_argument("--ramp", type=float, default=3.0, help="s to set tunnels up before K")
    ap.add_argument(
        "--bulk-mib", type=int, default=int(os.environ.get("BENCH_INTERCEPT_MIB", "256"))
    )
    ap.add_argument("--bulk-max-secs", type=float, default=30.0)
    ap.add_argument(
        "--rounds", type=int, default=int(os.environ.get("BENCH_INTERCEPT_ROUNDS", "1"))
    )
    ap.add_argument("--port-base", type=int, default=13380, help="proxy, admin, mitmdump, origin")
    ap.add_argument("--proxytap", default=os.environ.get("BENCH_PROXYTAP", str(venv / "proxytap")))
    ap.add_argument("--mitmdump", default=str(venv / "mitmdump"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = ap.parse_args(argv)
    a.proxies = [p for p in a.proxies.split(",") if p]
    bad = [p for p in a.proxies if p not in ALL_PROXIES]
    if bad:
        ap.error(f"unknown proxies {bad}; known: {', '.join(ALL_PROXIES)}")
    if not (1 <= a.rounds <= 10 and 1 <= a.procs <= 32 and 1 <= a.conns <= 64):
        ap.error("rounds 1..10, procs 1..32, conns 1..64")
    if not (1 <= a.secs <= 300 and 1 <= a.bulk_mib <= 8192):
        ap.error("secs 1..300, bulk-mib 1..8192")
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    results: list[Result] = []
    interrupted = False

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pt-intercept-") as tmpname:
        tmp = Path(tmpname)
        try:
            bench = Bench(a, tmp, procs)
            for n in a.proxies:
                (a.out / f"intercept-{n}.log").unlink(missing_ok=True)
            for n in ("nginx", "clients"):
                (a.out / f"intercept-{n}.log").unlink(missing_ok=True)
            bench.origin_up()
            for rnd in range(1, a.rounds + 1):
                order = a.proxies if rnd % 2 else list(reversed(a.proxies))
                results.extend(bench.measure(n, rnd) for n in order)
        except RuntimeError as exc:  # the origin did not start
            log(f"failed: {exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted: stopping everything, no report")
            interrupted = True
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):  # the cleanup runs to its end
                signal.signal(sig, signal.SIG_IGN)
            procs.stop_all()
    if interrupted:
        return 130
    if not results:
        return 1
    meta = versions(a)
    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    text = report(results, a, meta)
    clients = a.out / "intercept-clients.log"
    if clients.exists() and "Traceback" in clients.read_text(errors="replace"):
        text += f"* the clients' log has tracebacks: {clients}\n"
    (a.out / "intercept.json").write_text(
        json.dumps(
            dict(
                meta=meta,
                args={k: str(v) for k, v in vars(a).items()},
                rows=[r.__dict__ for r in results],
            ),
            indent=1,
        )
    )
    (a.out / "intercept.md").write_text(text)
    print(text)
    log(f"wall time {meta['wall_s']} s; {a.out / 'intercept.md'}")
    failed = any(r.notes and "did not start" in r.notes[0] for r in results)
    failed |= any(r.k.get("errors") or (r.bulk and not r.bulk.get("ok")) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
