#!/usr/bin/env python3
"""Bounded soak of proxytap with flow export ON: does it grow, does it stay correct?

Starts proxytap (HTTP, SOCKS and admin listeners, ``--sftap-home`` in a temporary
directory, ``bench/proxytap-bench.toml``), a reader on every flow socket
(``bench/sftap_drain.py``, SIGKILLed and restarted every 30 s) and, all at once for
``--seconds`` (600), mixed load on 127.0.0.1 only:

* ``wrk`` through the plain-HTTP proxy (absolute-form GET of the nginx origin's
  ``/small``, as the shared harness's workload A);
* CONNECT and SOCKS5 tunnel loops (open, one GET of ``/small`` through the
  tunnel, check status and body, close), several workers each;
* a bulk download (64, 128, 256 MiB in turn) through CONNECT (``curl -p -x``)
  every ``--download-every`` (25) seconds from a local origin that serves a
  deterministic pattern; size and sha256 are checked.

Every ``--sample-every`` (10) seconds it records proxytap's RSS and open fds
(/proc) and its admin ``/metrics``. At the end it stops the load, waits for the
connections to drain, samples again, SIGTERMs proxytap (exit status 0 expected),
greps its log for Traceback/ERROR, writes a JSON file and prints a summary.
Everything it started is stopped on every exit (SIGTERM, then SIGKILL), Ctrl-C
included: the first Ctrl-C ends the load early and still does the end phase,
a second one skips to the cleanup.

usage: soak.py [--seconds 600] [--worktree DIR | --proxytap CMD] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from proctree import tree_pids

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
HOST = "127.0.0.1"  # everything runs on loopback, nothing else
NGINX_PORT = 11080  # the shared harness's nginx origin
SMALL_PATH = "/small"
SMALL_BODY = b"a" * 100  # what bench.py origin up puts in /small

# deterministic download pattern: a prime-length pseudo-random block, repeated
PATTERN_PERIOD = 1_048_573
PATTERN_SEED = 0x50A4
CHUNK = 1 << 20
MAX_PATTERN = 4 << 30

# a worktree's code instead of the editable install (see bench/README.md, "Soak")
WORKTREE_WRAPPER = (
    "import sys; "
    'sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]; '
    "sys.path.insert(0, {tree!r}); "
    'sys.argv[0] = "proxytap"; '
    "from proxytap.cli import main; sys.exit(main())"
)

WRK_LUA = """\
-- absolute-form GET through a forward proxy (as the shared harness's abs_get.lua),
-- plus a JSON line with wrk's totals at the end
local url = os.getenv("PB_URL") or "http://127.0.0.1:11080/small"
local hostport = url:match("^http://([^/]+)")
wrk.method = "GET"
wrk.path = url
wrk.headers["Host"] = hostport
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SOAKWRK {"requests": %d, "bytes": %d, "duration_us": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"latency_p50_us": %d, "latency_p99_us": %d, "latency_max_us": %d}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""

MiB = 1 << 20


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [soak] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the pattern origin


def pattern_block() -> bytes:
    return random.Random(PATTERN_SEED).randbytes(PATTERN_PERIOD)


def pattern_chunks(size: int, buf: memoryview) -> Iterator[memoryview]:
    """The first ``size`` bytes of the pattern, in slices of ``buf`` (block + CHUNK)."""
    pos = 0
    while pos < size:
        off = pos % PATTERN_PERIOD
        n = min(CHUNK, size - pos)
        yield buf[off : off + n]
        pos += n


def pattern_buffer() -> memoryview:
    block = pattern_block()
    return memoryview(block + block[:CHUNK])


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for piece in pattern_chunks(size, pattern_buffer()):
        h.update(piece)
    return h.hexdigest()


class PatternHandler(BaseHTTPRequestHandler):
    """GET /pattern/N: N bytes of the pattern, Content-Length, then close."""

    protocol_version = "HTTP/1.1"
    buf: memoryview = memoryview(b"")

    def do_GET(self) -> None:
        m = re.fullmatch(r"/pattern/(\d{1,12})", self.path)
        if m is None or int(m[1]) > MAX_PATTERN:
            self.send_error(404)
            return
        size = int(m[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(OSError):
            for piece in pattern_chunks(size, self.buf):
                self.wfile.write(piece)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_pattern(port: int, max_secs: float) -> int:
    """The download origin (run as a child: ``soak.py _origin PORT MAX_SECS``)."""
    PatternHandler.buf = pattern_buffer()
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer((HOST, port), PatternHandler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    parent = os.getppid()
    deadline = time.monotonic() + max_secs
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    # bounded: gone after max_secs, or as soon as the soak that started it is gone
    while not stop.wait(1.0) and time.monotonic() < deadline and os.getppid() == parent:
        pass
    srv.shutdown()
    return 0


# ---------------------------------------------------------------- processes


class Procs:
    """Every child the soak starts, each in its own session, so cleanup finds them."""

    def __init__(self) -> None:
        self.live: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        out: Path | None = None,
        err: Path | None = None,
        **kw: Any,
    ) -> subprocess.Popen[bytes]:
        """Start a child in its own session; ``out``/``err``: files for its stdout/stderr
        (``err == out``: both in one file, appended)."""
        with contextlib.ExitStack() as files:
            if out is not None:
                kw["stdout"] = files.enter_context(open(out, "ab"))
            if err is not None:
                kw["stderr"] = (
                    subprocess.STDOUT if err == out else files.enter_context(open(err, "ab"))
                )
            p: subprocess.Popen[bytes] = subprocess.Popen(argv, start_new_session=True, **kw)
        self.live.append((name, p))
        return p

    def forget(self, p: subprocess.Popen[bytes]) -> None:
        self.live = [(n, q) for n, q in self.live if q is not p]

    @staticmethod
    def signal(p: subprocess.Popen[bytes], sig: int, group: bool = True) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(p.pid, sig)
            elif p.poll() is None:
                p.send_signal(sig)

    def stop(
        self, p: subprocess.Popen[bytes], grace: float, group: bool = True
    ) -> tuple[int | None, bool]:
        """SIGTERM, wait ``grace`` s, then SIGKILL: (exit status, killed?)."""
        killed = False
        if p.poll() is None:
            self.signal(p, signal.SIGTERM, group)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
        if p.poll() is None or killed:
            self.signal(p, signal.SIGKILL, True)  # the leader and anything it left
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.forget(p)
        return p.returncode, killed

    def stop_all(self, grace: float = 5.0) -> None:
        for name, p in reversed(list(self.live)):
            if p.poll() is None:
                log(f"cleanup: stopping {name} (pid {p.pid})")
            self.stop(p, grace)


def wait_for_exit(p: subprocess.Popen[bytes], secs: float) -> int | None:
    """Its exit status, or None if it is still running after ``secs``."""
    try:
        return p.wait(secs)
    except subprocess.TimeoutExpired:
        return None


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def proc_usage(root: int) -> dict[str, float]:
    """RSS (KiB), open fds and CPU seconds, summed over the process tree."""
    rss = fds = 0
    cpu = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = tree_pids(root)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            cpu += (int(parts[11]) + int(parts[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return {"rss_kib": rss, "fds": fds, "cpu_s": round(cpu, 2), "nprocs": len(pids)}


# ---------------------------------------------------------------- HTTP helpers


async def http_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """A one-shot GET to 127.0.0.1:port (admin endpoints): (status, body)."""
    async with asyncio.timeout(timeout):
        r, w = await asyncio.open_connection(HOST, port)
        try:
            w.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            data = await r.read()
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        body = dechunk(body)
    return status, body


def dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = body.index(b"\r\n", pos)
        n = int(body[pos:eol].split(b";")[0], 16)
        if n == 0:
            return bytes(out)
        out += body[eol + 2 : eol + 2 + n]
        pos = eol + 2 + n + 2


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: ``name{labels}`` -> value, histogram buckets left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        if "_bucket{" in key or key.startswith("proxytap_info"):
            continue
        with contextlib.suppress(ValueError):
            out[key] = float(val)
    return out


def msum(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, v in m.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def mby(m: dict[str, float], name: str, label: str) -> dict[str, float]:
    """Series of ``name`` by one label's value (non-zero ones)."""
    out: dict[str, float] = {}
    for key, v in m.items():
        base, _, rest = key.partition("{")
        if base != name or not v:
            continue
        lm = re.search(rf'{label}="([^"]*)"', rest)
        k = lm[1] if lm else ""
        out[k] = out.get(k, 0.0) + v
    return out


# ---------------------------------------------------------------- counters


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def fail(self, reason: str, detail: str = "") -> None:
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{time.strftime('%H:%M:%S')} {reason} {detail}".strip())


class Failure(Exception):
    """A load step that completed with the wrong answer: a short reason, and details."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ReaderState:
    proc: subprocess.Popen[bytes] | None = None
    started: int = 0
    restarts: int = 0  # SIGKILL and a new one
    not_ready: int = 0
    died: int = 0  # found dead when it was to be killed
    sockets: int = 0  # flow sockets the last ready reader connected to
    final: dict[str, Any] | None = None


# ---------------------------------------------------------------- the soak


class Soak:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.procs = Procs()
        self.stop = asyncio.Event()
        self.load_started = False
        self.tmp = Path(tempfile.mkdtemp(prefix="proxytap-soak-"))
        self.home = self.tmp / "sftap"
        self.home.mkdir()
        self.pt: subprocess.Popen[bytes] | None = None
        self.pt_log = self.tmp / "proxytap.log"
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.load_t0 = 0.0
        self.load_secs = 0.0
        self.tunnels = {"connect": Tally(), "socks5": Tally()}
        self.downloads = Tally()
        self.download_sizes: list[int] = []
        self.expected_sha: dict[int, str] = {}
        self.reader = ReaderState()
        self.wrk: dict[str, Any] = {}
        self.origin_ours = False
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        log("NOTE: " + msg)
        self.notes.append(msg)

    # ------------------------------------------------------------ commands
    def proxytap_argv(self) -> list[str]:
        a = self.a
        if a.worktree:
            base = [
                str(ROOT / ".venv/bin/python"),
                "-c",
                WORKTREE_WRAPPER.format(tree=str(Path(a.worktree).resolve())),
            ]
        else:
            base = shlex.split(a.proxytap)
        return [
            *base,
            "run",
            "--http",
            f"{HOST}:{a.http_port}",
            "--socks",
            f"{HOST}:{a.socks_port}",
            "--admin",
            f"{HOST}:{a.admin_port}",
            "--sftap-home",
            str(self.home),
            "--config",
            str(a.config),
            "--log-level",
            a.log_level,
        ]

    def measured(self) -> dict[str, Any]:
        """The commit proxytap runs from, and whether its proxytap/ has local edits."""
        src = Path(self.a.worktree or self.a.source or ROOT)

        def git(*args: str) -> str:
            r = subprocess.run(
                ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30
            )
            return r.stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "proxytap")
        return {
            "source": str(src),
            "commit": commit,
            "commit_subject": git("log", "-1", "--format=%s"),
            "proxytap_dirty": dirty.splitlines(),
        }

    # ------------------------------------------------------------ start-up
    async def start_origin(self) -> None:
        if not port_open(NGINX_PORT):
            log("nginx origin not running: bench.py origin up")
            r = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(self.a.shared / "bench.py"), "origin", "up"],
                timeout=300,
            )
            self.origin_ours = True
            if r.returncode != 0 or not port_open(NGINX_PORT):
                raise RuntimeError("bench.py origin up failed")
        status, body = await http_get(NGINX_PORT, SMALL_PATH, 5)
        if status != 200 or body != SMALL_BODY:
            raise RuntimeError(f"origin {SMALL_PATH}: {status}, {len(body)} bytes, not 100 x 'a'")
        p = self.procs.start(
            "pattern origin",
            [
                sys.executable,
                str(SELF),
                "_origin",
                str(self.a.origin_port),
                str(self.a.seconds + 600),
            ],
            stdin=subprocess.DEVNULL,
            out=self.tmp / "origin.log",
            err=self.tmp / "origin.log",
        )
        for _ in range(100):
            if port_open(self.a.origin_port):
                break
            if p.poll() is not None:
                raise RuntimeError(f"pattern origin exited {p.returncode}")
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("pattern origin did not listen")

    async def start_proxytap(self) -> None:
        argv = self.proxytap_argv()
        log("proxytap: " + shlex.join(argv))
        self.pt = self.procs.start(
            "proxytap",
            argv,
            stdin=subprocess.DEVNULL,
            out=self.pt_log,
            err=self.pt_log,
            cwd=str(ROOT),
        )
        for _ in range(300):
            if self.pt.poll() is not None:
                tail = self.pt_log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"proxytap exited {self.pt.returncode} at start:\n{tail}")
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await http_get(self.a.admin_port, "/readyz", 2)
                if status == 200 and port_open(self.a.http_port) and port_open(self.a.socks_port):
                    break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("proxytap not ready within 30 s")
        socks = [p for sub in ("tcp", "udp") for p in sorted((self.home / sub).glob("*"))]
        if not socks:
            raise RuntimeError(f"proxytap serves no flow socket under {self.home}")
        log(f"proxytap ready, pid {self.pt.pid}, {len(socks)} flow sockets")

    async def start_reader(self) -> None:
        st = self.reader
        st.started += 1
        out = self.tmp / f"reader-{st.started}.out"
        st.proc = self.procs.start(
            "reader",
            [
                sys.executable,
                str(ROOT / "bench/sftap_drain.py"),
                str(self.home),
                "--stats",
                str(self.tmp / f"reader-{st.started}.json"),
                "--ready-timeout",
                "15",
                "--max-secs",
                str(self.a.seconds + 900),
            ],
            stdin=subprocess.DEVNULL,
            out=out,
            err=out,
        )
        for _ in range(200):
            text = out.read_text(errors="replace") if out.exists() else ""
            if text.startswith("READY"):
                st.sockets = int(text.split()[1])
                return
            if text.startswith("NOT READY") or st.proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        st.not_ready += 1
        self.note(f"reader {st.started} not ready: {out.read_text(errors='replace')[:200]!r}")

    async def reader_loop(self) -> None:
        """SIGKILL the reader and start a new one every --reader-restart s (off the samples)."""
        k = 1
        while not self.stop.is_set():
            due = self.load_t0 + k * self.a.reader_restart + self.a.sample_every / 2
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, due - time.monotonic()))
                return
            k += 1
            p = self.reader.proc
            if p is not None:
                if p.poll() is not None:
                    self.reader.died += 1
                    self.note(f"reader pid {p.pid} had exited ({p.returncode}) before its restart")
                else:
                    p.kill()
                    await asyncio.to_thread(p.wait, 10)
                self.procs.forget(p)
            self.reader.restarts += 1
            await self.start_reader()

    # ------------------------------------------------------------ load
    async def tunnel_once(self, kind: str) -> None:
        port = self.a.http_port if kind == "connect" else self.a.socks_port
        r, w = await asyncio.open_connection(HOST, port)
        try:
            if kind == "connect":
                target = f"{HOST}:{NGINX_PORT}"
                w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                head = await r.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                if status != b"200":
                    raise Failure(f"CONNECT {status.decode(errors='replace')}", repr(head[:80]))
            else:
                w.write(b"\x05\x01\x00")
                if (hello := await r.readexactly(2)) != b"\x05\x00":
                    raise Failure("SOCKS5 method", hello.hex())
                w.write(b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + NGINX_PORT.to_bytes(2))
                rep = await r.readexactly(4)
                if rep[1] != 0:
                    raise Failure(f"SOCKS5 reply {rep[1]:#04x}")
                alen = {1: 4, 4: 16}.get(rep[3]) or (await r.readexactly(1))[0]
                await r.readexactly(alen + 2)
            w.write(
                f"GET {SMALL_PATH} HTTP/1.1\r\nHost: {HOST}:{NGINX_PORT}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = await r.read()
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise Failure("GET status", repr(head[:40]))
            if body != SMALL_BODY:
                raise Failure("GET body", f"{len(body)} bytes, not the 100 expected")
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    async def tunnel_worker(self, kind: str) -> None:
        t = self.tunnels[kind]
        while not self.stop.is_set() and t.ok + t.failed < self.a.max_tunnels:
            try:
                await asyncio.wait_for(self.tunnel_once(kind), self.a.tunnel_timeout)
                t.ok += 1
            except Failure as e:
                t.fail(e.reason, e.detail)
            except TimeoutError:
                t.fail("timeout")
            except asyncio.IncompleteReadError as e:
                t.fail("eof", f"after {len(e.partial)} bytes")
            except OSError as e:
                t.fail(type(e).__name__, str(e))
            else:
                continue
            await asyncio.sleep(0.05)  # a failing proxy does not turn this into a busy loop

    async def download_once(self, size: int) -> None:
        url = f"http://{HOST}:{self.a.origin_port}/pattern/{size}"
        err = self.tmp / f"curl-{size}-{time.monotonic_ns()}.err"
        curl = self.procs.start(
            "curl",
            [
                "curl",
                "-sS",
                "-p",
                "-x",
                f"http://{HOST}:{self.a.http_port}",
                "--noproxy",
                "",
                "--max-time",
                str(self.a.download_timeout),
                "-o",
                "-",
                "-w",
                "%{stderr}SOAKCURL %{http_code} %{size_download}\\n",
                url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            err=err,
        )
        sha = self.procs.start(
            "sha256sum",
            ["sha256sum"],
            stdin=curl.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert curl.stdout is not None
        curl.stdout.close()
        try:
            rc = await asyncio.to_thread(curl.wait, self.a.download_timeout + 30)
            digest_out, _ = await asyncio.to_thread(sha.communicate, None, 60)
        finally:
            for p in (curl, sha):
                if p.poll() is None:
                    self.procs.stop(p, 2)
                self.procs.forget(p)
        text = err.read_text(errors="replace")
        m = re.search(r"SOAKCURL (\d+) (\d+)", text)
        code, got = (int(m[1]), int(m[2])) if m else (0, 0)
        digest = digest_out.decode().split(" ")[0]
        if rc != 0:
            raise Failure(f"curl exit {rc}", text.strip()[:200])
        if code != 200:
            raise Failure(f"http {code}")
        if got != size:
            raise Failure("size", f"{got} of {size}")
        if digest != self.expected_sha[size]:
            raise Failure("sha256 mismatch", f"{size} bytes")

    async def download_loop(self) -> None:
        t = self.downloads
        i = 0
        # the first at 10 s; a period off the reader's 30 s, so that some downloads run
        # while the reader is killed and some do not
        due = self.load_t0 + min(10.0, self.a.download_every)
        while not self.stop.is_set() and i < self.a.max_downloads:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, due - time.monotonic()))
                return
            size = self.download_sizes[i % len(self.download_sizes)]
            i += 1
            t0 = time.monotonic()
            try:
                await self.download_once(size)
                t.ok += 1
                t.bytes += size
                log(f"download {i}: {size // MiB} MiB ok, {time.monotonic() - t0:.1f} s")
            except Failure as e:
                t.fail(e.reason, e.detail)
                log(f"download {i}: {size // MiB} MiB FAILED: {e}")
            except (OSError, subprocess.SubprocessError) as e:
                t.fail(type(e).__name__, str(e))
            due = max(due + self.a.download_every, time.monotonic())

    def start_wrk(self) -> subprocess.Popen[bytes]:
        lua = self.tmp / "soak_get.lua"
        lua.write_text(WRK_LUA)
        a = self.a
        argv = [
            "wrk",
            f"-t{a.wrk_threads}",
            f"-c{a.wrk_conns}",
            f"-d{math.ceil(a.seconds)}s",
            "--timeout",
            "5s",
            "-s",
            str(lua),
            f"http://{HOST}:{a.http_port}/",
        ]
        env = dict(os.environ, PB_URL=f"http://{HOST}:{NGINX_PORT}{SMALL_PATH}")
        log("wrk: " + shlex.join(argv))
        return self.procs.start(
            "wrk",
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            out=self.tmp / "wrk.out",
            err=self.tmp / "wrk.out",
        )

    def wrk_result(self, rc: int | None) -> dict[str, Any]:
        text = (self.tmp / "wrk.out").read_text(errors="replace")
        res: dict[str, Any] = {"exit": rc}
        m = re.search(r"^SOAKWRK (\{.*\})$", text, re.M)
        if m:
            res.update(json.loads(m[1]))
        else:  # fall back on wrk's own text
            if mm := re.search(r"(\d+) requests in", text):
                res["requests"] = int(mm[1])
            if mm := re.search(
                r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
            ):
                res.update(
                    zip(("connect", "read", "write", "timeout"), map(int, mm.groups()), strict=True)
                )
        if mm := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
            res["non_2xx_3xx"] = int(mm[1])
        else:
            res["non_2xx_3xx"] = 0
        res["text"] = text[-3000:]
        return res

    # ------------------------------------------------------------ sampling
    async def sample(self, phase: str) -> dict[str, Any]:
        assert self.pt is not None
        now = time.monotonic()
        s: dict[str, Any] = {
            "t": round(now - self.load_t0, 1) if self.load_t0 else 0.0,
            "phase": phase,
            "wall": round(time.time(), 1),
            "loadavg": os.getloadavg()[0],
        }
        s.update(proc_usage(self.pt.pid))
        m: dict[str, float] = {}
        try:
            status, body = await http_get(self.a.admin_port, "/metrics", self.a.metrics_timeout)
            if status != 200:
                raise ValueError(f"status {status}")
            m = parse_metrics(body.decode(errors="replace"))
            s["metrics_ms"] = round((time.monotonic() - now) * 1000)
        except (OSError, TimeoutError, ValueError, IndexError) as e:
            s["metrics_error"] = f"{type(e).__name__}: {e}"
        if m:
            s.update(
                conns_active=msum(m, "proxytap_downstream_connections_active"),
                upstream_active=msum(m, "proxytap_upstream_connections_active"),
                flows_active=msum(m, "proxytap_flows_active"),
                export_flows_active=msum(m, "proxytap_export_flows_active"),
                export_subscribers=msum(m, "proxytap_export_subscribers"),
                export_buffered_bytes=msum(m, "proxytap_export_buffered_bytes"),
                export_sent_bytes=msum(m, "proxytap_export_sent_bytes_total"),
                export_dropped_bytes=msum(m, "proxytap_export_dropped_bytes_total"),
                export_dropped_events=msum(m, "proxytap_export_dropped_events_total"),
                export_subscriber_errors=msum(m, "proxytap_export_subscriber_errors_total"),
                upstream_connect_errors=msum(m, "proxytap_upstream_connect_errors_total"),
                protocol_errors=msum(m, "proxytap_downstream_protocol_errors_total"),
                handshake_timeouts=msum(m, "proxytap_downstream_handshake_timeouts_total"),
                open_file_refusals=msum(m, "proxytap_downstream_open_file_refusals_total"),
                rejections=msum(m, "proxytap_downstream_rejections_total"),
                module_errors=msum(m, "proxytap_module_errors_total"),
                http_proxy_answers=msum(
                    m, "proxytap_downstream_http_requests_total", source="proxy"
                ),
                flows_total=msum(m, "proxytap_flows_total"),
                flows_reset=msum(m, "proxytap_flows_closed_total", reason="reset"),
                relayed_bytes=msum(m, "proxytap_relayed_bytes_total"),
            )
            s["metrics"] = m
        s["load"] = {
            "connect_ok": self.tunnels["connect"].ok,
            "connect_failed": self.tunnels["connect"].failed,
            "socks5_ok": self.tunnels["socks5"].ok,
            "socks5_failed": self.tunnels["socks5"].failed,
            "downloads_ok": self.downloads.ok,
            "downloads_failed": self.downloads.failed,
            "reader_restarts": self.reader.restarts,
        }
        self.samples.append(s)
        log(
            f"sample {phase} t={s['t']:.0f}s rss={s['rss_kib'] / 1024:.1f} MiB fds={s['fds']} "
            f"conns={s.get('conns_active', '?')} flows={s.get('flows_active', '?')} "
            f"drop={s.get('export_dropped_bytes', 0) / MiB:.0f} MiB "
            f"tunnels={self.tunnels['connect'].ok}+{self.tunnels['socks5'].ok} "
            f"dl={self.downloads.ok}"
        )
        return s

    async def sample_loop(self) -> None:
        k = 1
        while not self.stop.is_set():
            due = self.load_t0 + k * self.a.sample_every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, due - time.monotonic()))
                return
            k += 1
            await self.sample("load")

    # ------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        a = self.a
        for port in (a.http_port, a.socks_port, a.admin_port, a.origin_port):
            if port_open(port):
                raise RuntimeError(f"port {port} is in use; pick others")
        if shutil.which("wrk") is None:
            await asyncio.to_thread(install_wrk)
        self.download_sizes = [int(x) * MiB for x in a.download_sizes.split(",")]
        sha_jobs = {s: asyncio.to_thread(pattern_sha256, s) for s in set(self.download_sizes)}
        meta: dict[str, Any] = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "measured": self.measured(),
            "proxytap_argv": self.proxytap_argv(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "nproc": os.cpu_count(),
        }
        log(f"measuring {meta['measured']['commit'][:12]} from {meta['measured']['source']}")
        if meta["measured"]["proxytap_dirty"]:
            self.note(f"proxytap/ has local changes in {meta['measured']['source']}")
        await self.start_origin()
        shas = await asyncio.gather(*sha_jobs.values())
        self.expected_sha = dict(zip(sha_jobs, shas, strict=True))
        await self.start_proxytap()
        await self.start_reader()
        await asyncio.sleep(1.0)
        self.load_t0 = time.monotonic()
        await self.sample("before")

        # ---- load, all at once, bounded in time and count
        self.load_started = True
        self.load_t0 = time.monotonic()
        deadline = self.load_t0 + a.seconds
        wrk = self.start_wrk()
        tasks = [asyncio.create_task(self.sample_loop(), name="samples")]
        tasks.append(asyncio.create_task(self.reader_loop(), name="reader"))
        tasks.append(asyncio.create_task(self.download_loop(), name="downloads"))
        tasks += [
            asyncio.create_task(self.tunnel_worker(kind), name=f"{kind}-{i}")
            for kind in ("connect", "socks5")
            for i in range(a.tunnel_conc)
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), deadline - time.monotonic())
        early = self.stop.is_set()
        self.stop.set()
        self.load_secs = time.monotonic() - self.load_t0
        if early:
            self.note(f"load ended early at t={self.load_secs:.0f}s (signal)")
            Procs.signal(wrk, signal.SIGINT, group=False)  # wrk stops and still prints
        log(f"load over after {self.load_secs:.0f} s; stopping it")
        _, pending = await asyncio.wait(tasks, timeout=a.download_timeout + 30)
        for t in pending:
            self.note(f"task {t.get_name()} still running at the end of the load; cancelled")
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and (exc := t.exception()) is not None:
                self.note(f"task {t.get_name()} failed: {exc!r}")
        # wrk ends by itself at -d; SIGINT makes it stop early and still print
        rc = await asyncio.to_thread(wait_for_exit, wrk, 10)
        if rc is None:
            self.note("wrk still running 10 s after the load; SIGINT")
            Procs.signal(wrk, signal.SIGINT, group=False)
            rc = await asyncio.to_thread(wait_for_exit, wrk, 5)
        if rc is None:
            rc, _ = await asyncio.to_thread(self.procs.stop, wrk, 5)
        self.procs.forget(wrk)
        self.wrk = self.wrk_result(rc)

        # ---- drain, sample after the load
        drain_t0 = time.monotonic()
        drained = False
        left: dict[str, float] = {}
        for _ in range(int(a.drain_secs * 2)):
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                _, body = await http_get(a.admin_port, "/metrics", a.metrics_timeout)
                m = parse_metrics(body.decode(errors="replace"))
                left = {
                    "conns": msum(m, "proxytap_downstream_connections_active"),
                    "upstream": msum(m, "proxytap_upstream_connections_active"),
                    "flows": msum(m, "proxytap_flows_active"),
                }
                if not any(left.values()):
                    drained = True
                    break
            await asyncio.sleep(0.5)
        drain = {
            "drained": drained,
            "secs": round(time.monotonic() - drain_t0, 1),
            "left": left,
        }
        log(f"drain: {drain}")
        await asyncio.sleep(1.0)
        await self.sample("after")

        # ---- stop the reader (SIGTERM: it writes its counters) and proxytap
        rp = self.reader.proc
        if rp is not None:
            await asyncio.to_thread(self.procs.stop, rp, 10, False)
            stats = self.tmp / f"reader-{self.reader.started}.json"
            with contextlib.suppress(OSError, ValueError):
                self.reader.final = json.loads(stats.read_text())
        assert self.pt is not None
        pt_rc, pt_killed = await asyncio.to_thread(self.procs.stop, self.pt, a.stop_grace, False)
        log(f"proxytap exit {pt_rc}{' (SIGKILLed)' if pt_killed else ''}")
        return self.report(meta, drain, pt_rc, pt_killed)

    # ------------------------------------------------------------ the report
    def report(
        self, meta: dict[str, Any], drain: dict[str, Any], pt_rc: int | None, pt_killed: bool
    ) -> dict[str, Any]:
        a = self.a
        text = self.pt_log.read_text(errors="replace") if self.pt_log.exists() else ""
        lines = text.splitlines()
        tracebacks = [ln for ln in lines if "Traceback" in ln]
        errors = [ln for ln in lines if re.search(r"\b(ERROR|CRITICAL)\b", ln)]
        warnings = [ln for ln in lines if " WARNING " in ln]
        before = self.samples[0]
        after = self.samples[-1]
        load = [s for s in self.samples if s["phase"] == "load"]
        during = [before, *load]
        peak_rss = max(self.samples, key=lambda s: s["rss_kib"])
        peak_fds = max(self.samples, key=lambda s: s["fds"])
        # growth: least-squares slope of RSS over the second half of the load
        half = [s for s in load if s["t"] >= self.load_secs / 2]
        slope = rss_slope(half) if len(half) >= 3 else None
        m = after.get("metrics", {})
        subs = [s["export_subscribers"] for s in self.samples if "export_subscribers" in s]
        wrk = self.wrk
        wrk_sock = sum(int(wrk.get(k, 0)) for k in ("connect", "read", "write", "timeout"))
        totals: dict[str, Any] = {
            "load_secs": round(self.load_secs, 1),
            "wrk": {k: v for k, v in wrk.items() if k != "text"},
            "tunnels": {k: asdict(v) for k, v in self.tunnels.items()},
            "downloads": asdict(self.downloads),
            "reader": {
                "restarts": self.reader.restarts,
                "started": self.reader.started,
                "not_ready": self.reader.not_ready,
                "died": self.reader.died,
                "sockets": self.reader.sockets,
                "last_reader": self.reader.final,
            },
            "export": {
                "sent_bytes": msum(m, "proxytap_export_sent_bytes_total"),
                "dropped_bytes": msum(m, "proxytap_export_dropped_bytes_total"),
                "dropped_bytes_by_reason": mby(m, "proxytap_export_dropped_bytes_total", "reason"),
                "dropped_events_by_reason": mby(
                    m, "proxytap_export_dropped_events_total", "reason"
                ),
                "events": mby(m, "proxytap_export_events_total", "type"),
                "subscriber_errors": msum(m, "proxytap_export_subscriber_errors_total"),
                "subscribers_min_max_last": [min(subs), max(subs), subs[-1]] if subs else None,
            },
            "proxytap_counters": {
                "upstream_connect_errors": mby(
                    m, "proxytap_upstream_connect_errors_total", "reason"
                ),
                "protocol_errors": mby(m, "proxytap_downstream_protocol_errors_total", "protocol"),
                "handshake_timeouts": mby(
                    m, "proxytap_downstream_handshake_timeouts_total", "stage"
                ),
                "rejections": mby(m, "proxytap_downstream_rejections_total", "reason"),
                "open_file_refusals": msum(m, "proxytap_downstream_open_file_refusals_total"),
                "module_errors": mby(m, "proxytap_module_errors_total", "module"),
                "http_requests": mby(m, "proxytap_downstream_http_requests_total", "code_class"),
                "http_proxy_answers": msum(
                    m, "proxytap_downstream_http_requests_total", source="proxy"
                ),
                "flows_total": msum(m, "proxytap_flows_total"),
                "flows_closed_by_reason": mby(m, "proxytap_flows_closed_total", "reason"),
                "relayed_bytes": msum(m, "proxytap_relayed_bytes_total"),
                "cpu_s": after["cpu_s"],
            },
            "drain": drain,
            "proxytap": {
                "pid": self.pt.pid if self.pt else None,
                "exit": pt_rc,
                "sigkilled": pt_killed,
                "tracebacks": len(tracebacks),
                "error_lines": len(errors),
                "warning_lines": len(warnings),
                "first_errors": (errors + tracebacks)[:20],
                "first_warnings": warnings[:10],
                "log_lines": len(lines),
            },
        }
        mem = {
            "rss_mib_first": mib(before["rss_kib"]),
            "rss_mib_first_load": mib(load[0]["rss_kib"]) if load else None,
            "rss_mib_peak": mib(peak_rss["rss_kib"]),
            "rss_peak_t": peak_rss["t"],
            "rss_mib_end_of_load": mib(during[-1]["rss_kib"]),
            "rss_mib_last": mib(after["rss_kib"]),
            "rss_slope_mib_per_min_second_half": None if slope is None else round(slope, 3),
            "fds_first": before["fds"],
            "fds_peak": peak_fds["fds"],
            "fds_peak_t": peak_fds["t"],
            "fds_after_drain": after["fds"],
        }
        tun_failed = sum(t.failed for t in self.tunnels.values())
        checks = {
            "proxytap exit 0 on SIGTERM": pt_rc == 0 and not pt_killed,
            "no Traceback/ERROR in its log": not tracebacks and not errors,
            "no client-side errors": (
                wrk_sock == 0
                and int(wrk.get("status", 0)) == 0
                and int(wrk.get("non_2xx_3xx", 0)) == 0
                and bool(wrk.get("requests"))
                and tun_failed == 0
                and self.downloads.failed == 0
            ),
            "connections drained": bool(drain["drained"]),
            f"fds after drain <= first + {a.fd_slack}": after["fds"] <= before["fds"] + a.fd_slack,
            # None: too few samples to judge
            f"RSS slope (2nd half) <= {a.max_rss_slope} MiB/min": (
                None if slope is None else slope <= a.max_rss_slope
            ),
            "every reader got ready": self.reader.not_ready == 0,
            "metrics answered every sample": all("metrics_error" not in s for s in self.samples),
        }
        result = {
            "meta": meta,
            "memory": mem,
            "totals": totals,
            "checks": checks,
            "notes": self.notes,
            "samples": self.samples,
            "wrk_output": wrk.get("text", ""),
        }
        result["summary_lines"] = summary_lines(result)
        return result


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


def rss_slope(samples: list[dict[str, Any]]) -> float:
    """MiB per minute, least squares over (t, rss)."""
    xs = [s["t"] / 60 for s in samples]
    ys = [s["rss_kib"] / 1024 for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def fmt_bytes(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MiB:.1f} MiB"


def summary_lines(r: dict[str, Any]) -> list[str]:
    mem, tot, meta = r["memory"], r["totals"], r["meta"]
    w, tun, dl, rd, ex, pt = (
        tot["wrk"],
        tot["tunnels"],
        tot["downloads"],
        tot["reader"],
        tot["export"],
        tot["proxytap"],
    )
    secs = tot["load_secs"] or 1
    ms = meta["measured"]
    dirty = " (proxytap/ has local changes)" if ms["proxytap_dirty"] else ""
    reqs = int(w.get("requests", 0))
    slope = mem["rss_slope_mib_per_min_second_half"]
    drops = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in ex["dropped_bytes_by_reason"].items())
    dropped, sent = ex["dropped_bytes"], ex["sent_bytes"]
    share = f" ({100 * dropped / (dropped + sent):.1f}% of DATA bytes)" if dropped + sent else ""
    pc = tot["proxytap_counters"]
    err_counts = {
        "upstream connect errors": sum(pc["upstream_connect_errors"].values()),
        "protocol errors": sum(pc["protocol_errors"].values()),
        "handshake timeouts": sum(pc["handshake_timeouts"].values()),
        "rejections": sum(pc["rejections"].values()),
        "open-file refusals": pc["open_file_refusals"],
        "module errors": sum(pc["module_errors"].values()),
        "proxy-made HTTP answers": pc["http_proxy_answers"],
        "export subscriber errors": ex["subscriber_errors"],
    }
    last = rd["last_reader"] or {}
    failed_checks = [k for k, ok in r["checks"].items() if ok is False]
    skipped = [k for k, ok in r["checks"].items() if ok is None]
    lines = [
        f"soak: {tot['load_secs']:.0f} s of load; proxytap {ms['commit'][:12]} "
        f"({ms['commit_subject'][:60]}) from {ms['source']}{dirty}",
        f"RSS MiB: first {mem['rss_mib_first']} (before load), peak {mem['rss_mib_peak']} "
        f"(t={mem['rss_peak_t']:.0f}s), end of load {mem['rss_mib_end_of_load']}, "
        f"last {mem['rss_mib_last']} (after drain); slope over the 2nd half "
        f"{'n/a' if slope is None else f'{slope:+.3f}'} MiB/min",
        f"fds: first {mem['fds_first']}, peak {mem['fds_peak']} (t={mem['fds_peak_t']:.0f}s), "
        f"after drain {mem['fds_after_drain']}",
        f"wrk: {reqs} requests ({reqs / secs:.0f}/s), HTTP >= 400 {w.get('status', '?')}, "
        f"non-2xx/3xx {w.get('non_2xx_3xx', '?')}, socket errors connect {w.get('connect', '?')} "
        f"read {w.get('read', '?')} write {w.get('write', '?')} timeout {w.get('timeout', '?')}, "
        f"exit {w.get('exit')}",
        f"tunnels: CONNECT ok {tun['connect']['ok']} failed {tun['connect']['failed']}; "
        f"SOCKS5 ok {tun['socks5']['ok']} failed {tun['socks5']['failed']}"
        + (
            f" (errors: CONNECT {tun['connect']['errors']}, SOCKS5 {tun['socks5']['errors']})"
            if tun["connect"]["failed"] + tun["socks5"]["failed"]
            else ""
        ),
        f"downloads (CONNECT, size+sha256 checked): ok {dl['ok']} failed {dl['failed']}, "
        f"{fmt_bytes(dl['bytes'])} verified"
        + (f" (errors: {dl['errors']})" if dl["failed"] else ""),
        f"reader: {rd['restarts']} restarts (SIGKILL every {meta['args']['reader_restart']} s), "
        f"{rd['not_ready']} not ready, {rd['died']} died on their own; last reader "
        f"{fmt_bytes(last.get('bytes', 0))} on {last.get('sockets', '?')} sockets; "
        f"export subscribers min/max/last {ex['subscribers_min_max_last']}",
        f"export: sent {fmt_bytes(sent)}, dropped {fmt_bytes(dropped)}{share}"
        + (f" [{drops}]" if drops else "")
        # a reader sees only flows created after it connected: what a flow relays
        # after its reader was killed reaches no one and is not counted as dropped
        + f"; proxytap relayed {fmt_bytes(pc['relayed_bytes'])} (both directions)",
        "proxytap counters: " + ", ".join(f"{k} {v:.0f}" for k, v in err_counts.items()),
        f"drain: {'drained' if tot['drain']['drained'] else 'NOT drained'} in "
        f"{tot['drain']['secs']} s {tot['drain']['left']}",
        f"proxytap: exit {pt['exit']}{' after SIGKILL' if pt['sigkilled'] else ''} on SIGTERM; "
        f"log: {pt['tracebacks']} Traceback, {pt['error_lines']} ERROR, "
        f"{pt['warning_lines']} WARNING lines",
        "checks: "
        + ("all passed" if not failed_checks else "FAILED: " + "; ".join(failed_checks))
        + (f" (not judged: {'; '.join(skipped)})" if skipped else ""),
    ]
    lines += [f"  error line: {ln[:200]}" for ln in pt["first_errors"][:5]]
    return lines


def install_wrk() -> None:
    """wrk is a Debian package; install it if it is missing (root or sudo)."""
    log("wrk missing: apt-get install -y --no-install-recommends wrk")
    pre = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run(
        [*pre, "apt-get", "install", "-y", "--no-install-recommends", "wrk"], timeout=600
    )
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is missing and could not be installed")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--seconds", type=float, default=600.0, help="load duration")
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--proxytap",
        default=str(ROOT / ".venv/bin/proxytap"),
        help="command that runs proxytap (shell words; 'run ...' is appended)",
    )
    src.add_argument(
        "--worktree",
        help="run proxytap from this git worktree's code with the project venv "
        "(the editable install's finder removed)",
    )
    ap.add_argument("--source", help="git tree to record as measured (default: worktree or repo)")
    ap.add_argument("--config", type=Path, default=ROOT / "bench/proxytap-bench.toml")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared/bench")
    ap.add_argument("--http-port", type=int, default=13280)
    ap.add_argument("--socks-port", type=int, default=13281)
    ap.add_argument("--admin-port", type=int, default=13282)
    ap.add_argument("--origin-port", type=int, default=13283, help="pattern download origin")
    ap.add_argument("--log-level", default="warning", help="proxytap's (info logs every request)")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--reader-restart", type=float, default=30.0, help="SIGKILL+restart period")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--wrk-conns", type=int, default=16)
    ap.add_argument("--tunnel-conc", type=int, default=4, help="workers per kind")
    ap.add_argument("--tunnel-timeout", type=float, default=15.0)
    ap.add_argument("--max-tunnels", type=int, default=2_000_000, help="per kind")
    ap.add_argument("--download-every", type=float, default=25.0)
    ap.add_argument("--download-sizes", default="64,128,256", help="MiB, in turn")
    ap.add_argument("--download-timeout", type=float, default=120.0)
    ap.add_argument("--max-downloads", type=int, default=200)
    ap.add_argument("--drain-secs", type=float, default=30.0)
    ap.add_argument("--stop-grace", type=float, default=30.0, help="SIGTERM to SIGKILL")
    ap.add_argument("--metrics-timeout", type=float, default=10.0)
    ap.add_argument("--fd-slack", type=int, default=4)
    ap.add_argument("--max-rss-slope", type=float, default=1.0, help="MiB/min")
    ap.add_argument("--out", type=Path, help="JSON (default bench/out/soak-<time>.json)")
    a = ap.parse_args(argv)
    if a.worktree and not (Path(a.worktree) / "proxytap/cli.py").exists():
        ap.error(f"--worktree {a.worktree}: no proxytap/cli.py there")
    sizes = a.download_sizes.split(",")
    if not all(x.isdigit() and 0 < int(x) * MiB <= MAX_PATTERN for x in sizes):
        ap.error("--download-sizes: MiB values, comma separated, up to 4096")
    return a


async def amain(a: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=16))
    soak = Soak(a)
    main_task = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1 and soak.load_started and not soak.stop.is_set():
            log(f"signal {signum}: ending the load early (again: skip to cleanup)")
            soak.stop.set()
        elif main_task is not None:
            log(f"signal {signum}: cleaning up")
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    out = a.out or ROOT / "bench/out" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        result = await soak.run()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        shutil.copyfile(soak.pt_log, out.with_suffix(".proxytap.log"))
        print("\n".join(result["summary_lines"]), flush=True)
        print(f"JSON: {out}  proxytap log: {out.with_suffix('.proxytap.log')}", flush=True)
        return 1 if False in result["checks"].values() else 0
    except asyncio.CancelledError:
        log("interrupted")
        return 130
    except RuntimeError as e:
        log(f"ERROR: {e}")
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        cleanup(soak, out)


def cleanup(soak: Soak, out: Path) -> None:
    """Stop everything the soak started; the origin only if the soak started it."""
    soak.procs.stop_all()
    if soak.origin_ours:
        log("bench.py origin down (the soak started it)")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [sys.executable, str(soak.a.shared / "bench.py"), "origin", "down"], timeout=60
            )
    if soak.pt_log.exists() and not out.with_suffix(".proxytap.log").exists():
        with contextlib.suppress(OSError):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(soak.pt_log, out.with_suffix(".proxytap.log"))
    shutil.rmtree(soak.tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_origin"]:
        return serve_pattern(int(argv[1]), float(argv[2]))
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
